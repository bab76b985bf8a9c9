"""The fake recorder every MeteringMiddleware unit test gets, and its error log captured."""

from __future__ import annotations

import logging

import pytest

from tests.unit.producers.asgi.fakes import FakeRecorder


@pytest.fixture
def recorder() -> FakeRecorder:
    return FakeRecorder()


@pytest.fixture(autouse=True)
def _capture_metering_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="producers.asgi")
