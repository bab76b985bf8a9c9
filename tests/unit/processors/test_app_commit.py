"""The worker's commit loop when a commit raises: retry, or recognise it went through.

The Kafka side is faked (unit tier): what matters is the decision after a
failure whose outcome is unknown, which the kill tests caught counting a batch
twice when it was always "retry".
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

import pytest

from processors import app as app_module
from processors.app import RollupWorker
from processors.exceptions import FencedError
from processors.output import Record
from processors.settings import WorkerSettings


class FakeOutput:
    """Commits land in `log`; `lost-reply` raises although the commit landed."""

    def __init__(self, outcomes: list[str]) -> None:
        self.outcomes = outcomes  # per commit: "ok", "lost-reply" (landed, raised), "abort"
        self.log: list[int | None] = []
        self.lock = asyncio.Lock()
        self.starts = 0
        self.stops = 0

    async def commit(self, records: Sequence[Record], next_offset: int | None) -> None:
        outcome = self.outcomes.pop(0) if self.outcomes else "ok"
        if outcome == "fenced":
            raise FencedError("taken")
        if outcome in ("ok", "lost-reply"):
            self.log.append(next_offset)
        if outcome != "ok":
            raise TimeoutError("no reply to EndTxn")

    async def start(self) -> None:
        self.starts += 1

    async def stop(self) -> None:
        self.stops += 1

    async def close(self) -> None:
        await self.stop()


class FakeResumer:
    def __init__(self, output: FakeOutput, start: int) -> None:
        self.output = output
        self.start = start
        self.lock = asyncio.Lock()

    async def committed(self, partition: int) -> int:
        landed = [o for o in self.output.log if o is not None]
        return max([self.start, *landed])


def worker_with(output: FakeOutput, start: int) -> RollupWorker:
    settings = WorkerSettings(events_topic="e", rollups_topic="r", dlq_topic="d")
    worker = RollupWorker(settings, cast(Any, SimpleNamespace(consumer_generation_id=1)))
    worker._outputs[0] = cast(Any, output)
    worker._resumer = cast(Any, FakeResumer(output, start))
    return worker


@pytest.fixture(autouse=True)
def no_sleep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "retry_delay", lambda attempt: 0.0)


async def test_a_commit_that_landed_despite_the_error_is_not_sent_again() -> None:
    output = FakeOutput(["lost-reply"])
    worker = worker_with(output, start=100)
    assert await worker._transact(0, [], 150, worker._outputs[0])
    assert output.log == [150]  # once: a blind retry would have made it [150, 150]
    assert output.starts == 1  # a fresh producer settled the earlier transaction first
    assert worker.stats.transactions == 1


async def test_an_aborted_commit_is_retried_until_it_lands() -> None:
    output = FakeOutput(["abort", "abort", "ok"])
    worker = worker_with(output, start=100)
    assert await worker._transact(0, [], 150, worker._outputs[0])
    assert output.log == [150]
    assert worker.stats.transactions == 1


async def test_a_heartbeat_without_offset_is_simply_retried() -> None:
    output = FakeOutput(["abort", "ok"])
    worker = worker_with(output, start=100)
    assert await worker._transact(0, [], None, worker._outputs[0])
    assert output.log == [None]


async def test_fencing_drops_the_partition() -> None:
    output = FakeOutput(["fenced"])
    worker = worker_with(output, start=100)
    assert not await worker._transact(0, [], 150, worker._outputs[0])
    assert 0 not in worker._outputs
    assert worker.stats.fenced == 1


async def test_a_partition_revoked_during_the_retry_is_not_restarted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    output = FakeOutput(["lost-reply"])
    worker = worker_with(output, start=100)
    real_sleep = asyncio.sleep

    async def revoke_while_waiting(delay: float) -> None:
        worker._outputs.pop(0, None)  # the rebalance lands during the back-off
        await real_sleep(0)

    monkeypatch.setattr(asyncio, "sleep", revoke_while_waiting)
    assert not await worker._transact(0, [], 150, worker._outputs[0])
    assert output.starts == 0  # its producer would have fenced the new owner


class GatedOutput(FakeOutput):
    """Each commit waits for `gate`; `log` records when each one starts and ends."""

    def __init__(self) -> None:
        super().__init__([])
        self.gate = asyncio.Event()
        self.events: list[str] = []

    async def commit(self, records: Sequence[Record], next_offset: int | None) -> None:
        self.events.append(f"start {next_offset}")
        await self.gate.wait()
        self.events.append(f"end {next_offset}")
        self.log.append(next_offset)


class _Msg:
    def __init__(self, offset: int) -> None:
        self.partition, self.offset, self.key, self.timestamp = 0, offset, b"k", 1.0
        self.generation_id = 1  # fetched under the assignment in force
        self.value = b"[]"  # a dead letter: enough to give the batch an offset to commit


class _Event:
    def __init__(self, offset: int) -> None:
        self.message = _Msg(offset)


def pipelined_worker(output: FakeOutput) -> RollupWorker:
    worker = worker_with(output, start=100)
    worker.pipeline.resume(0, 100)
    return worker


async def test_a_batch_commits_only_after_the_previous_batch_committed() -> None:
    output = GatedOutput()
    worker = pipelined_worker(output)
    await worker._handle([_Event(100)])  # returns with its commit under way
    second = asyncio.ensure_future(worker._handle([_Event(101)]))
    for _ in range(20):
        await asyncio.sleep(0)
    assert output.events == ["start 101"]  # batch 2 folded, but waits for batch 1
    output.gate.set()
    await second
    await worker._settle_commits()
    assert output.events == ["start 101", "end 101", "start 102", "end 102"]
    assert worker.stats.messages == 2


async def test_a_retried_commit_is_not_overtaken_by_the_next_batch() -> None:
    # The retry releases the output's lock while it backs off: only waiting for the
    # whole previous batch keeps batch 2's offset from being committed first (after
    # which batch 1 would look as if it had gone through, and its rows were lost).
    output = FakeOutput(["abort"])
    worker = pipelined_worker(output)
    await worker._handle([_Event(100)])
    await worker._handle([_Event(101)])
    await worker._settle_commits()
    assert output.log == [101, 102]
    assert worker.stats.transactions == 2


async def test_a_batch_folded_before_a_takeover_is_not_committed_through_the_new_output() -> None:
    old = GatedOutput()
    worker = pipelined_worker(old)
    await worker._handle([_Event(100)])
    new = FakeOutput([])
    worker._outputs[0] = cast(Any, new)  # dropped and taken over before the commit ran
    old.gate.set()
    await worker._settle_commits()
    assert new.log == []  # rows folded from the old state never go out
    assert old.events == []
