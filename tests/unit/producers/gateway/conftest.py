"""Every Gateway unit test runs in both of record()'s ways, under a fresh data dir."""

from __future__ import annotations

from pathlib import Path

import pytest

from producers import gateway as gateway_module


@pytest.fixture(autouse=True, params=["native", "python"])
def encoding(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test in both of record()'s ways: the native encoder (the default when
    native/ is installed) and the Python modes it falls back to without it."""
    if request.param == "native":
        pytest.importorskip("tally_fold")
    else:
        monkeypatch.setattr(gateway_module, "batch_encoder", lambda *args: None)
    return str(request.param)


@pytest.fixture(autouse=True)
def data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Spools go under a fresh data dir, never the repository's .tally/data."""
    monkeypatch.setenv("TALLY_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"
