"""The sink's write retry: a failed INSERT that landed anyway is not written twice."""

from __future__ import annotations

from typing import Any, cast

import orjson
import pytest

from processors import sink as sink_module
from processors.exceptions import SinkFencedError
from processors.sink import Sink
from processors.sink_fence import Gate


class FakeRollups:
    def __init__(self, outcomes: list[str], pending: dict[int, int]) -> None:
        self.pending = pending  # the markers the INSERT carries
        self.outcomes = outcomes  # per INSERT: "ok", "lost-reply" (landed, raised), "fail"
        self.inserts: list[bytes] = []
        self.offsets: dict[int, int] = {}

    def write_json(self, body: bytes, count: int, table: str) -> None:
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if outcome in ("ok", "lost-reply"):
            self.inserts.append(body)
            self.offsets.update(self.pending)
        if outcome != "ok":
            raise ConnectionError("connection reset during INSERT")

    def resume_offsets(self, topic: str) -> dict[int, int]:
        return dict(self.offsets)


class OpenGates:
    """Gates no other sink drops: these tests are about one sink's own writes."""

    def alive(self, gate: Gate) -> bool:
        return True


def sink_with(rollups: FakeRollups) -> Sink:
    sink = Sink(cast(Any, None), "127.0.0.1:9", "r", "e")
    sink.rollups = cast(Any, rollups)
    sink.gates = cast(Any, OpenGates())
    sink._gate = Gate(1, frozenset({0, 3}))
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
    await sink._write_once(b'["row"]', 1, {0: 10, 3: 7})
    assert len(rollups.inserts) == inserts
    assert rollups.offsets == {0: 10, 3: 7}


class Record:
    def __init__(self, offset: int, value: bytes) -> None:
        self.offset, self.value = offset, value


def _row(account: str, events: int) -> list[object]:
    from datetime import UTC, datetime

    minute = datetime(2026, 11, 1, 12, 0, tzinfo=UTC)
    return [
        account,
        minute,
        "tally.request.v1",
        "/r",
        "GET",
        "",
        200,
        "",
        events,
        0,
        0.0,
        0,
        0,
        minute,
    ]


async def test_a_batch_committed_twice_upstream_is_applied_once() -> None:
    from aiokafka.structs import TopicPartition

    from schemas.deltas import Delta, encode

    written: list[list[object]] = []

    class Rollups:
        def write_json(self, body: bytes, count: int, table: str) -> None:
            rows = orjson.loads(b"[" + body + b"]")
            assert len(rows) == count
            written.extend(r for r in rows if r[0] != "")  # data rows, not markers

        def resume_offsets(self, topic: str) -> dict[int, int]:
            return {}

    sink = sink_with(cast(Any, Rollups()))
    sink._counted = {3: 100}  # events partition 3 counted up to offset 100 (from the store)
    first = encode(Delta(3, 150, 0, [_row("a", 2)]))  # offsets 100..149
    again = encode(Delta(3, 150, 0, [_row("a", 2)]))  # the same batch, committed twice
    old = encode(Delta(3, 90, 0, [_row("b", 5)]))  # below what the store already had
    heartbeat = encode(Delta(3, 150, 0, []))  # no rows: freshness only, never skipped
    later = encode(Delta(3, 170, 0, [_row("a", 1)]))
    values = [*first, *again, *old, *heartbeat, *later]
    records = [Record(i, v) for i, v in enumerate(values)]
    await sink._apply([(TopicPartition("r", 3), records)])
    assert [r[8] for r in written] == [2, 1]
    assert sink.stats.duplicate_deltas == 2
    assert sink._counted == {3: 170}


async def test_stats_say_how_far_each_partition_is_stored_once_written() -> None:
    from aiokafka.structs import TopicPartition

    from schemas.deltas import Delta, encode

    seen: list[dict[int, int]] = []

    class Rollups:
        def write_json(self, body: bytes, count: int, table: str) -> None:
            seen.append(dict(sink.stats.counted))  # not yet: the INSERT is under way

        def resume_offsets(self, topic: str) -> dict[int, int]:
            return {}

    sink = sink_with(cast(Any, Rollups()))
    split = encode(Delta(1, 40, 0, [_row("a", 1)] * 3), max_bytes=200)  # final last
    assert len(split) > 1
    values = [*encode(Delta(0, 10, 0, [_row("a", 1)])), *split[:-1]]
    await sink._apply([(TopicPartition("r", 0), [Record(i, v) for i, v in enumerate(values)])])
    assert seen == [{}]
    assert sink.stats.counted == {0: 10}  # partition 1's delta is not all out yet
    await sink._apply([(TopicPartition("r", 0), [Record(len(values), split[-1])])])
    assert sink.stats.counted == {0: 10, 1: 40}


async def test_a_write_refused_because_the_gate_is_gone_is_not_retried() -> None:
    """Another sink dropped this one's gate: the batch is its successor's now."""

    class DroppedGates:
        def alive(self, gate: Gate) -> bool:
            return False

    rollups = FakeRollups(["fail", "fail", "fail"], {0: 10})
    sink = sink_with(rollups)
    sink.gates = cast(Any, DroppedGates())
    with pytest.raises(SinkFencedError):
        await sink._write_once(b'["row"]', 1, {0: 10})
    assert rollups.outcomes == ["fail", "fail"]  # one attempt, no retry
    assert rollups.inserts == []


async def test_a_fenced_sink_drops_its_batch_and_writes_nothing_more() -> None:
    from aiokafka.structs import TopicPartition

    from schemas.deltas import Delta, encode

    class DroppedGates:
        def alive(self, gate: Gate) -> bool:
            return False

    rollups = FakeRollups(["fail"], {0: 1})
    sink = sink_with(rollups)
    sink.gates = cast(Any, DroppedGates())
    values = encode(Delta(0, 10, 0, [_row("a", 1)]))
    await sink._apply_owned([(TopicPartition("r", 0), [Record(0, v) for v in values])])
    assert sink.stats.fenced == 1
    assert sink.stats.partitions == ()
    await sink._apply_owned([(TopicPartition("r", 0), [Record(1, v) for v in values])])
    assert rollups.inserts == []
    assert rollups.outcomes == []  # the second batch was not even tried
