"""Fixtures shared by the integration tier: one ClickHouse target per session.

chdb admits one data path per process, so every test in the session shares one
path and isolates itself with a database of its own (`unique_name`).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    explicit = os.environ.get("TALLY_TEST_CLICKHOUSE_URL")
    if explicit:
        return explicit
    path: Path = tmp_path_factory.mktemp("chdb")
    return f"chdb://{path}"
