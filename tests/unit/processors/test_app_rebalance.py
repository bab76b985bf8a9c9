"""A rebalance while a worker is busy (Tally issue 20): what made counting stop.

Two faults, each enough to stall or ping-pong a partition when a second worker
joins mid-batch (tests/integration/test_worker_join.py runs the real thing):
- a commit in flight on an output the worker lets go waited forever, because
  aiokafka's commit waits on a future only the (stopped) producer's sender resolves;
- messages fetched before the rebalance, still in faust's take buffer, or the
  consumer's old assignment read by the heartbeat between revocation and the new
  assignment, made the worker take over partitions given to another worker.
The Kafka side is faked (unit tier).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import pytest
from faust.types import TP

from processors import output as output_module
from processors.app import RollupWorker
from processors.exceptions import OutputClosedError
from processors.output import PartitionOutput
from processors.settings import WorkerSettings


class StuckProducer:
    """An AIOKafkaProducer whose commit never answers once it is stopped: aiokafka's
    `commit_transaction` waits on a future that only its (cancelled) sender sets."""

    starts = 0

    def __init__(self, **kwargs: Any) -> None:
        self.stopped = asyncio.Event()

    async def start(self) -> None:
        StuckProducer.starts += 1

    async def stop(self) -> None:
        self.stopped.set()

    def transaction(self) -> StuckProducer:
        return self

    async def __aenter__(self) -> None:
        return None

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.Future()  # the EndTxn answer that never comes

    async def send(self, *args: Any, **kwargs: Any) -> None:
        return None


@pytest.fixture
def stuck(monkeypatch: pytest.MonkeyPatch) -> None:
    StuckProducer.starts = 0
    monkeypatch.setattr(output_module, "AIOKafkaProducer", StuckProducer)


@pytest.mark.usefixtures("stuck")
async def test_closing_an_output_releases_the_commit_in_flight_on_it() -> None:
    output = PartitionOutput("kafka:9092", "g", "events", 3, None)
    commit = asyncio.ensure_future(output.commit([("rollups", None, b"x", 3, [])], 10))
    await asyncio.sleep(0.01)  # the transaction waits for its end
    await output.close()
    with pytest.raises(OutputClosedError):
        await asyncio.wait_for(commit, timeout=2)


@pytest.mark.usefixtures("stuck")
async def test_a_closed_output_never_starts_a_producer_again() -> None:
    # A heartbeat waiting for the lock while the batch's commit let the partition go
    # would otherwise start a producer, fencing the partition's new owner.
    output = PartitionOutput("kafka:9092", "g", "events", 3, None)
    await output.close()
    with pytest.raises(OutputClosedError):
        await output.commit([], None)
    assert StuckProducer.starts == 0


class Assigned:
    def __init__(self, *tps: TP) -> None:
        self.tps = set(tps)

    def assignment(self) -> set[TP]:
        return self.tps


class _Msg:
    def __init__(self, partition: int, generation: int) -> None:
        self.partition, self.offset, self.key, self.timestamp = partition, 5, b"k", 1.0
        self.value = b"[]"
        self.generation_id = generation


class _Event:
    def __init__(self, partition: int, generation: int) -> None:
        self.message = _Msg(partition, generation)


def rebalanced_worker() -> tuple[RollupWorker, SimpleNamespace, list[int]]:
    """A worker of generation 1 with partitions 0 and 1; takeovers recorded."""
    settings = WorkerSettings(events_topic="e", rollups_topic="r", dlq_topic="d")
    app = SimpleNamespace(consumer=Assigned(TP("e", 0), TP("e", 1)), consumer_generation_id=1)
    worker = RollupWorker(settings, cast(Any, app))
    taken: list[int] = []

    async def take_over(partition: int) -> None:
        taken.append(partition)

    worker._take_over = take_over  # type: ignore[method-assign]
    return worker, app, taken


async def test_messages_fetched_before_a_rebalance_are_left_to_the_new_owner() -> None:
    worker, app, taken = rebalanced_worker()
    worker.on_revoked({0, 1})
    app.consumer = Assigned(TP("e", 1))  # generation 2: partition 0 went to another worker
    app.consumer_generation_id = 2
    # Read before the rebalance, yielded by faust's take buffer after it.
    await worker._handle([_Event(0, generation=1), _Event(1, generation=1)])
    assert taken == []  # taking 0 over would fence its new owner
    await worker._handle([_Event(1, generation=2)])
    assert taken == [1]


async def test_between_revocation_and_assignment_nothing_is_taken_over() -> None:
    worker, app, taken = rebalanced_worker()
    worker.on_revoked({0, 1})
    # The consumer still reports the revoked partitions until the group answers.
    await worker.heartbeat()
    await worker._handle([_Event(0, generation=1)])
    assert taken == []
    app.consumer = Assigned(TP("e", 1))
    app.consumer_generation_id = 2
    await worker.heartbeat()
    assert taken == [1]
