"""The e2e tier shares the integration tier's store fixture (one chdb path per process)."""

from tests.integration.conftest import store_url

__all__ = ["store_url"]
