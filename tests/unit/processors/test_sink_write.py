"""The sink's write retry: a failed INSERT that landed anyway is not written twice."""

from __future__ import annotations

from typing import Any, cast

import pytest

from processors import sink as sink_module
from processors.sink import Sink


class FakeRollups:
    def __init__(self, outcomes: list[str], pending: dict[int, int]) -> None:
        self.pending = pending  # the markers the INSERT carries
        self.outcomes = outcomes  # per INSERT: "ok", "lost-reply" (landed, raised), "fail"
        self.inserts: list[list[list[object]]] = []
        self.offsets: dict[int, int] = {}

    def write(self, rows: list[list[object]]) -> None:
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if outcome in ("ok", "lost-reply"):
            self.inserts.append(rows)
            self.offsets.update(self.pending)
        if outcome != "ok":
            raise ConnectionError("connection reset during INSERT")

    def resume_offsets(self, topic: str) -> dict[int, int]:
        return dict(self.offsets)


def sink_with(rollups: FakeRollups) -> Sink:
    sink = Sink(cast(Any, None), "127.0.0.1:9", "r", "e")
    sink.rollups = cast(Any, rollups)
    return sink


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sink_module, "retry_delay", lambda attempt: 0.0)


@pytest.mark.parametrize(
    ("outcomes", "inserts"),
    [(["lost-reply"], 1), (["fail", "fail"], 1), (["fail", "lost-reply"], 1), ([], 1)],
)
async def test_each_batch_lands_exactly_once(outcomes: list[str], inserts: int) -> None:
    rollups = FakeRollups(outcomes, {0: 10, 3: 7})
    sink = sink_with(rollups)
    await sink._write_once([["row"]], {0: 10, 3: 7})
    assert len(rollups.inserts) == inserts
    assert rollups.offsets == {0: 10, 3: 7}
