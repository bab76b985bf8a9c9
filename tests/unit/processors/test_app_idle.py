"""The worker's idle heartbeat takes over partitions no event has touched yet
(processors/app.py), so an idle worker reports; and nothing is taken over once
the worker stops, or its producers would outlive it."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest
from faust.types import TP

from processors.app import RollupWorker
from processors.settings import WorkerSettings


class Assigned:
    """The faust consumer as the heartbeat sees it: an assignment, nothing fetched."""

    def __init__(self, *tps: TP) -> None:
        self.tps = set(tps)

    def assignment(self) -> set[TP]:
        return self.tps

    def highwater(self, tp: TP) -> int | None:
        return None


def idle_worker(*tps: TP) -> tuple[RollupWorker, list[int]]:
    settings = WorkerSettings(events_topic="e", rollups_topic="r", dlq_topic="d")
    app = SimpleNamespace(consumer=Assigned(*tps), consumer_generation_id=1)
    worker = RollupWorker(settings, cast(Any, app))
    taken: list[int] = []

    async def take_over(partition: int) -> None:
        await asyncio.sleep(0)
        taken.append(partition)

    worker._take_over = take_over  # type: ignore[method-assign]
    return worker, taken


async def test_the_heartbeat_takes_over_assigned_partitions_no_batch_touched() -> None:
    worker, taken = idle_worker(TP("e", 0), TP("e", 3), TP("other", 1))
    await worker.heartbeat()
    assert sorted(taken) == [0, 3]  # the events topic's partitions only


async def test_a_batch_and_the_heartbeat_share_one_takeover() -> None:
    worker, taken = idle_worker(TP("e", 0))
    await asyncio.gather(worker.heartbeat(), worker._take_over_all([0]))
    assert taken == [0]


async def test_nothing_is_taken_over_once_the_worker_stops() -> None:
    worker, taken = idle_worker(TP("e", 0), TP("e", 1))
    worker._resumer = cast(Any, SimpleNamespace(stop=lambda: asyncio.sleep(0)))
    await worker.stop()
    await worker.heartbeat()
    await worker._take_over_all([0, 1])
    assert taken == []


class FakeOutput:
    def __init__(self, *args: Any) -> None:
        self.started = self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def close(self) -> None:
        self.stopped = True


class SlowResumer:
    """Answers `committed` once the test lets it, so a revocation can come first."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.go = asyncio.Event()

    async def committed(self, partition: int) -> int:
        await self.go.wait()
        return 0

    async def replay(self, *args: Any) -> int:
        return 0


async def test_a_takeover_overtaken_by_a_revocation_installs_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    made: list[FakeOutput] = []

    def output(*args: Any) -> FakeOutput:
        made.append(FakeOutput())
        return made[-1]

    monkeypatch.setattr("processors.app.PartitionOutput", output)
    settings = WorkerSettings(events_topic="e", rollups_topic="r", dlq_topic="d")
    app = SimpleNamespace(consumer=Assigned(TP("e", 0)), consumer_generation_id=1)
    worker = RollupWorker(settings, cast(Any, app))
    resumer = SlowResumer()
    worker._resumer = cast(Any, resumer)
    taking = asyncio.ensure_future(worker._take_over_all([0]))
    await asyncio.sleep(0.01)  # the producer started (fencing), `committed` pending
    worker.on_revoked({0})
    resumer.go.set()
    await taking
    assert 0 not in worker._outputs
    assert made[0].started
    assert made[0].stopped
    # Assigned again: a fresh takeover, whose output is installed.
    await worker._take_over_all([0])
    assert worker._outputs[0] is cast(Any, made[1])
