"""The worker's faust app starts its (empty) table manager without faust's 1 s wait."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from processors.app import NoTablesManager, build_app
from processors.settings import WorkerSettings


def test_the_app_uses_the_table_manager_without_the_wait(tmp_path: Path) -> None:
    settings = WorkerSettings(events_topic="e", rollups_topic="r", dlq_topic="d", data_dir=tmp_path)
    app, _ = build_app(settings)
    assert isinstance(app.tables, NoTablesManager)
    assert not app.tables  # no tables: nothing for the wait to include


async def test_its_start_does_what_faust_does_without_sleeping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = WorkerSettings(events_topic="e", rollups_topic="r", dlq_topic="d", data_dir=tmp_path)
    app, _ = build_app(settings)
    manager: Any = app.tables
    calls: list[str] = []

    async def sleep(seconds: float) -> None:
        calls.append(f"sleep {seconds}")

    async def update_channels() -> None:
        calls.append("channels")

    class Recovery:
        async def start(self) -> None:
            calls.append("recovery")

    monkeypatch.setattr(manager, "sleep", sleep)
    monkeypatch.setattr(manager, "_update_channels", update_channels)
    monkeypatch.setattr(type(manager), "recovery", Recovery())
    await manager.on_start()
    assert calls == ["channels", "recovery"]
