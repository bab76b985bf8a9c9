"""A second worker joins while the first folds its first large batch (Tally issue 20).

100,000 events wait in the events topic before any worker runs. Worker 1 starts and
takes every partition; worker 2 joins while worker 1 is still on its first batches
(and, in a variant, leaves and joins again), so partitions move mid-batch. Every
event must then be counted exactly once, within a bounded time: the group's committed
offsets reach the end of every partition and the committed deltas, applied by the
sink's rule (a delta for offsets already counted adds nothing), sum to the events sent.
Both workers are separate `tally worker` processes, as in production; worker 1 runs
a fifth of the time until worker 2 has joined (as on a loaded machine), so the join
lands mid-stream whatever this machine's speed, and the test checks that it did.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from deploy.kafka_local import ensure_topics
from deploy.settings import REPO_ROOT
from producers import events as build
from producers.gateway import Gateway
from schemas.deltas import read, rows_of

pytestmark = pytest.mark.integration

PARTITIONS = 8
EVENTS = 100_000
ACCOUNTS = 40
RESUMED = "counting resumes at offset"
"""What a worker logs as it takes a partition over."""
SETTLE_S = 60.0
"""From worker 2's (last) start until every event must be counted."""


class Workers:
    """`tally worker` processes of one group, each logging to a file of its own."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.starts = 0

    def start(self, name: str) -> None:
        self.starts += 1
        env = {**self.env, "TALLY_DATA_DIR": str(self.logs / name)}
        with (self.logs / f"{name}.log").open("ab") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "deploy.cli", "worker"],
                cwd=REPO_ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    @asynccontextmanager
    async def slowed(self, name: str) -> AsyncIterator[None]:
        """Run `name` a fifth of the time (SIGSTOP/SIGCONT), as on a loaded machine.

        Its backlog then lasts until the other worker has joined, however fast this
        machine is, and its heartbeats still reach the group (0.4 s stops, against
        a 10 s session).
        """
        pid = self.procs[name].pid

        async def throttle() -> None:
            while True:
                os.kill(pid, signal.SIGSTOP)
                try:
                    await asyncio.sleep(0.4)
                finally:
                    os.kill(pid, signal.SIGCONT)
                await asyncio.sleep(0.1)

        task = asyncio.ensure_future(throttle())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        for name in list(self.procs):
            self.stop(name)


@pytest.fixture
def workers(tmp_path: Path, kafka_bootstrap: str, unique_name: str) -> Iterator[Workers]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(
        TALLY_KAFKA_BOOTSTRAP=kafka_bootstrap,
        TALLY_EVENTS_TOPIC=f"{unique_name}.events",
        TALLY_ROLLUPS_TOPIC=f"{unique_name}.rollups",
        TALLY_DLQ_TOPIC=f"{unique_name}.dlq",
        TALLY_CONSUMER_GROUP=f"{unique_name}-worker",
        # Small batches: the backlog takes worker 1 many batches (and commits), so
        # worker 2 joins while a batch is folded and the one before it commits.
        TALLY_WORKER_BATCH_MESSAGES="10",
    )
    group = Workers(env, tmp_path)
    try:
        yield group
    finally:
        group.close()
        for name in ("worker-1", "worker-2"):
            text = group.log(name)
            # The tail of each log says what the workers did when a run fails.
            print(f"\n----- {name} -----\n" + "\n".join(text.splitlines()[-40:]))


async def _publish(bootstrap: str, topic: str) -> None:
    async with Gateway(bootstrap, topic) as gateway:
        for i in range(EVENTS):
            await gateway.record(build.request(f"join-{i % ACCOUNTS}", "gw-join", id=f"e{i}"))
            if i % 10 == 0:  # a re-sent copy: counted once
                await gateway.record(build.request(f"join-{i % ACCOUNTS}", "gw-join", id=f"e{i}"))


async def _progress(env: dict[str, str]) -> tuple[dict[int, int], dict[int, int]]:
    """Per partition: (the group's committed offset, the end of the events partition)."""
    topic, group = env["TALLY_EVENTS_TOPIC"], env["TALLY_CONSUMER_GROUP"]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=env["TALLY_KAFKA_BOOTSTRAP"], group_id=group, enable_auto_commit=False
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        end = await consumer.end_offsets(tps)
        committed = {tp.partition: await consumer.committed(tp) or 0 for tp in tps}
        return committed, {tp.partition: offset for tp, offset in end.items()}
    finally:
        await consumer.stop()


async def _counted(env: dict[str, str]) -> int:
    """Requests in the committed deltas, each partition's applied once (the sink's rule)."""
    topic = env["TALLY_ROLLUPS_TOPIC"]
    consumer = AIOKafkaConsumer(
        bootstrap_servers=env["TALLY_KAFKA_BOOTSTRAP"],
        isolation_level="read_committed",
        enable_auto_commit=False,
    )
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        applied: dict[int, int] = {}
        total = 0
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for records in (await consumer.getmany(timeout_ms=1_000)).values():
                for record in records:
                    frame = read(record.value)
                    if frame.next_offset <= applied.get(frame.partition, 0):
                        continue  # offsets this partition already counts
                    total += sum(int(row[8]) for row in rows_of(frame.body))
                    if frame.final:
                        applied[frame.partition] = frame.next_offset
        return total
    finally:
        await consumer.stop()


async def _until_all_committed(
    env: dict[str, str], within_s: float
) -> tuple[dict[int, int], dict[int, int]]:
    deadline = time.monotonic() + within_s
    committed, end = await _progress(env)
    while committed != end and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        committed, end = await _progress(env)
    return committed, end


async def _until_logged(
    workers: Workers, name: str, text: str, within_s: float, times: int = 1
) -> None:
    """Until `name`'s log holds `text` `times` times (its log spans its restarts)."""
    deadline = time.monotonic() + within_s
    while workers.log(name).count(text) < times:
        assert time.monotonic() < deadline, f"{name} never logged {text!r}"
        await asyncio.sleep(0.05)


@pytest.mark.timeout(180)
@pytest.mark.parametrize("rejoin", [False, True], ids=["join", "join-leave-rejoin"])
async def test_a_worker_joining_mid_batch_leaves_nothing_uncounted(
    workers: Workers, rejoin: bool
) -> None:
    env = workers.env
    bootstrap = env["TALLY_KAFKA_BOOTSTRAP"]
    await ensure_topics(
        bootstrap,
        {env["TALLY_EVENTS_TOPIC"]: PARTITIONS, env["TALLY_ROLLUPS_TOPIC"]: PARTITIONS,
         env["TALLY_DLQ_TOPIC"]: 1},
    )  # fmt: skip
    await _publish(bootstrap, env["TALLY_EVENTS_TOPIC"])
    workers.start("worker-1")
    # Worker 1 has the partitions and starts on the backlog: worker 2 joins now.
    await _until_logged(workers, "worker-1", RESUMED, 60)
    async with workers.slowed("worker-1"):
        workers.start("worker-2")
        await _until_logged(workers, "worker-2", RESUMED, 60)
        # Where worker 2 resumed: below a partition's end, it joined mid-stream (else
        # this run proved nothing: worker 1 counted everything before the rebalance).
        resumed = re.findall(
            r"partition (\d+): counting resumes at offset (\d+)", workers.log("worker-2")
        )
        _, end = await _progress(env)
        assert any(int(at) < end[int(p)] for p, at in resumed), "worker 2 joined too late"
        if rejoin:  # and leaves mid-batch, and joins again: two more rebalances
            taken = workers.log("worker-2").count(RESUMED)
            await asyncio.to_thread(workers.stop, "worker-2")
            workers.start("worker-2")
            await _until_logged(workers, "worker-2", RESUMED, 60, times=taken + 1)
    started = time.monotonic()
    committed, end = await _until_all_committed(env, SETTLE_S)
    took = time.monotonic() - started
    print(
        f"\n{sum(committed.values())} of {sum(end.values())} messages committed {took:.1f}s after"
    )
    assert committed == end, f"counting stopped: committed {committed}, partitions end at {end}"
    assert await _counted(env) == EVENTS
