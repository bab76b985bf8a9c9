"""Nothing lost, nothing counted twice, under faults (issue: exactly-once).

Each test publishes a known set of events (with re-sent duplicates), computes
the expected per-account totals from the events themselves, injects a fault
while the stack processes them, and then requires the store to hold exactly
the expected totals, read back through the admin analytics API of a running
`tally up`. Every test is bounded in events and time and prints its figures.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest

from deploy.kafka_local import LocalKafka, ensure_topics
from deploy.processes import free_port
from deploy.settings import REPO_ROOT
from producers.gateway import Gateway
from producers.loadgen import Traffic

pytestmark = pytest.mark.e2e

TALLY = Path(sys.executable).parent / "tally"
LIBS = REPO_ROOT / ".tally" / "kafka" / "libs"
ADMIN_KEY = "fault-test-admin-key-0123456789abcdef"
Totals = dict[str, tuple[int, int]]
"""account -> (requests, units in millionths)."""


def _micro(units: float) -> int:
    return int(Decimal(repr(units)) * 1_000_000)


@dataclass
class Stack:
    """A `tally up` subprocess and what it needs to be started again."""

    env: dict[str, str]
    log: Path
    api: str
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(TALLY), "up"],
                cwd=REPO_ROOT,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)

    def totals(self, since: datetime, until: datetime) -> Totals | None:
        """Per-account totals from the running stack, or None while it is not up."""
        try:
            r = httpx.get(
                f"{self.api}/api/v1/analytics/top-accounts",
                params={
                    "from": since.isoformat(),
                    "to": until.isoformat(),
                    "metric": "requests",
                    "limit": 1000,
                },
                headers={"X-API-Key": ADMIN_KEY},
                timeout=10,
            )
        except httpx.TransportError:
            return None
        if r.status_code != 200:
            return None
        return {
            row["account"]: (row["requests"], round(row["units"] * 1_000_000))
            for row in r.json()["data"]
        }


def _stack(tmp: Path, **extra: str) -> Stack:
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(
        TALLY_DATA_DIR=str(tmp / "data"),
        TALLY_KAFKA_PORT=str(free_port()),
        TALLY_API_PORT=str(api_port),
        TALLY_ADMIN_KEY=ADMIN_KEY,
        # Small batches: many transactions, so a kill lands mid-stream.
        TALLY_WORKER_BATCH_MESSAGES="8",
    )
    env.update(extra)
    return Stack(env=env, log=tmp / "tally-up.log", api=f"http://127.0.0.1:{api_port}")


def _traffic(n: int, accounts: int, seed: int) -> tuple[list[Any], Totals]:
    flow = Traffic(seed, accounts, gateways=3, total=n)
    events = list(flow)
    expected: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for event in events:
        cell = expected[event.subject]
        if event.type == "tally.request.v1":
            cell[0] += 1
        cell[1] += _micro(getattr(event.data, "units", 0.0))
    return events, {a: (r, u) for a, (r, u) in expected.items() if r or u}


async def _publish(
    bootstrap: str, topic: str, events: list[Any], resend: float, seed: int, pace_s: float = 0.0
) -> int:
    rng = random.Random(seed)
    again = rng.sample(events, int(len(events) * resend))
    async with Gateway(bootstrap, topic) as gateway:
        for i, event in enumerate(events + again):
            await gateway.record(event)
            if pace_s and i % 1_000 == 0:
                await asyncio.sleep(pace_s)
    return len(again)


def _window() -> tuple[datetime, datetime]:
    now = datetime.now(UTC)
    return now - timedelta(days=40), now + timedelta(hours=1)


def _wait_totals(stack: Stack, expected: Totals, timeout_s: float) -> tuple[Totals, float]:
    since, until = _window()
    started = time.monotonic()
    got: Totals = {}
    while time.monotonic() - started < timeout_s:
        got = stack.totals(since, until) or {}
        if sum(r for r, _ in got.values()) >= sum(r for r, _ in expected.values()):
            time.sleep(2)  # anything counted twice would show up by now
            return stack.totals(since, until) or {}, time.monotonic() - started
        time.sleep(0.5)
    return got, time.monotonic() - started


def _progress(stack: Stack) -> int:
    since, until = _window()
    got = stack.totals(since, until)
    return -1 if got is None else sum(r for r, _ in got.values())


@pytest.fixture
def tmp_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = _stack(tmp_path)
    yield stack
    stack.stop()


def test_kill_9_of_tally_up_three_times_loses_and_repeats_nothing(
    tmp_stack: Stack, tmp_path: Path
) -> None:
    stack = tmp_stack
    events, expected = _traffic(300_000, accounts=800, seed=41)
    want = sum(r for r, _ in expected.values())
    broker = LocalKafka(tmp_path / "data", LIBS, port=int(stack.env["TALLY_KAFKA_PORT"]))
    broker.start()  # publish beforehand, into the log `tally up` will reuse
    try:
        asyncio.run(
            ensure_topics(
                broker.bootstrap, {"tally.events": 8, "tally.rollups": 8, "tally.events.dlq": 1}
            )
        )
        resent = asyncio.run(_publish(broker.bootstrap, "tally.events", events, 0.05, seed=5))
    finally:
        broker.stop()

    kills = 0
    started = time.monotonic()
    last = -1
    while kills < 3:
        stack.start()
        deadline = time.monotonic() + 120
        # Kill once this run has counted something new, mid-stream.
        while time.monotonic() < deadline:
            seen = _progress(stack)
            if seen > max(last, 0):
                break
            time.sleep(0.2)
        time.sleep(random.Random(kills).uniform(0.3, 1.5))
        seen = _progress(stack)
        stack.kill()
        kills += 1
        print(f"\nkill -9 #{kills}: {max(seen, last)} of {want} requests counted when killed")
        assert seen < want, "processing finished before the kill; publish more or slow it"
        last = max(seen, last)
    stack.start()
    got, settle = _wait_totals(stack, expected, timeout_s=300)
    total_s = time.monotonic() - started
    print(
        f"{len(events)} events (+{resent} re-sent), {kills} kills, exact after "
        f"{settle:.1f}s from the last restart ({total_s:.1f}s in all)"
    )
    # How the commits fared: retried commits that had landed, and deltas the
    # sink's guard skipped (a batch committed twice upstream; 0 by design).
    log = stack.log.read_text(errors="replace")
    print(
        f"commits found landed after an error: {log.count('had gone through')}; "
        f"deltas skipped by the sink's guard: {log.count('skipped a delta')}"
    )
    assert got == expected

    since, until = _window()
    reconcile = subprocess.run(
        [str(TALLY), "reconcile", "--from", since.isoformat(), "--to", until.isoformat()],
        env={
            **stack.env,
            "TALLY_API_URL": stack.api,
            "TALLY_KAFKA_BOOTSTRAP": f"127.0.0.1:{stack.env['TALLY_KAFKA_PORT']}",
        },
        capture_output=True,
        text=True,
        timeout=180,
    )
    print(reconcile.stdout.strip().splitlines()[-1:] if reconcile.stdout else reconcile.stderr)
    assert reconcile.returncode == 0, reconcile.stdout + reconcile.stderr


def test_broker_killed_and_restarted_during_load(tmp_path: Path) -> None:
    events, expected = _traffic(120_000, accounts=500, seed=43)
    broker = LocalKafka(tmp_path / "broker", LIBS, port=free_port())
    broker.start()
    stack = _stack(tmp_path, TALLY_KAFKA_BOOTSTRAP=broker.bootstrap)
    try:
        asyncio.run(
            ensure_topics(
                broker.bootstrap, {"tally.events": 8, "tally.rollups": 8, "tally.events.dlq": 1}
            )
        )
        half = len(events) // 2
        asyncio.run(_publish(broker.bootstrap, "tally.events", events[:half], 0.05, seed=6))
        stack.start()
        deadline = time.monotonic() + 90
        while _progress(stack) <= 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        broker.kill()
        down = time.monotonic()
        time.sleep(3)
        broker.start()
        print(f"\nbroker SIGKILLed mid-stream, back after {time.monotonic() - down:.1f}s")
        asyncio.run(_publish(broker.bootstrap, "tally.events", events[half:], 0.05, seed=7))
        got, settle = _wait_totals(stack, expected, timeout_s=240)
        print(f"{len(events)} events, exact {settle:.1f}s after the last publish")
        assert got == expected
    finally:
        stack.stop()
        broker.stop()


def test_two_workers_one_killed_mid_stream(tmp_path: Path) -> None:
    events, expected = _traffic(150_000, accounts=500, seed=47)
    broker = LocalKafka(tmp_path / "broker", LIBS, port=free_port())
    broker.start()
    stack = _stack(tmp_path, TALLY_KAFKA_BOOTSTRAP=broker.bootstrap)
    second: subprocess.Popen[bytes] | None = None
    try:
        asyncio.run(
            ensure_topics(
                broker.bootstrap, {"tally.events": 8, "tally.rollups": 8, "tally.events.dlq": 1}
            )
        )
        stack.start()
        with (tmp_path / "worker-2.log").open("ab") as out:
            second = subprocess.Popen(
                [str(TALLY), "worker"],
                cwd=REPO_ROOT,
                env=stack.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        time.sleep(8)  # both join the group and split the partitions
        asyncio.run(_publish(broker.bootstrap, "tally.events", events, 0.05, seed=8, pace_s=0.01))
        deadline = time.monotonic() + 90
        while _progress(stack) <= 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        second.send_signal(signal.SIGKILL)
        second.wait(30)
        print(f"\nsecond worker killed at {_progress(stack)} requests counted")
        got, settle = _wait_totals(stack, expected, timeout_s=240)
        log = (tmp_path / "tally-up.log").read_text()
        taken = log.count("counting resumes at offset")
        print(
            f"{len(events)} events, exact after {settle:.1f}s; "
            f"{taken} partition takeovers logged by the surviving worker"
        )
        assert got == expected
        worker_log = (tmp_path / "worker-2.log").read_text()
        assert "counting resumes at offset" in worker_log, "the second worker never took work"
        assert taken >= 8, "the survivor did not take over the dead worker's partitions"
    finally:
        if second is not None and second.poll() is None:
            second.kill()
        stack.stop()
        broker.stop()


def test_tally_up_with_a_worker_process_is_exact_and_leaves_no_orphan(tmp_path: Path) -> None:
    """TALLY_UP_WORKER_PROCESSES=1: the worker runs as a child of `tally up`.

    Counting stays exact across a kill -9 of `tally up`, and the kill takes the
    child worker with it (PDEATHSIG): no orphan keeps consuming.
    """
    stack = _stack(tmp_path, TALLY_UP_WORKER_PROCESSES="1")
    events, expected = _traffic(60_000, accounts=300, seed=43)
    broker = LocalKafka(tmp_path / "data", LIBS, port=int(stack.env["TALLY_KAFKA_PORT"]))
    broker.start()
    try:
        asyncio.run(
            ensure_topics(
                broker.bootstrap, {"tally.events": 8, "tally.rollups": 8, "tally.events.dlq": 1}
            )
        )
        asyncio.run(_publish(broker.bootstrap, "tally.events", events, 0.02, seed=6))
    finally:
        broker.stop()
    try:
        stack.start()
        deadline = time.monotonic() + 120
        while _progress(stack) <= 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        children = _worker_children(stack)
        assert len(children) == 1, stack.log.read_text(errors="replace")[-3000:]
        stack.kill()
        gone_by = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in children):
            assert time.monotonic() < gone_by, f"worker {children} outlived kill -9 of tally up"
            time.sleep(0.1)
        stack.start()
        got, settle = _wait_totals(stack, expected, timeout_s=180)
        print(f"\n{len(events)} events with a worker process: exact after {settle:.1f}s")
        assert got == expected
    finally:
        stack.stop()


def _worker_children(stack: Stack) -> list[int]:
    """The worker pids `tally up` logged (`tally up: N worker processes [pid, ...]`)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        for line in stack.log.read_text(errors="replace").splitlines():
            if "worker processes [" in line:
                pids = line.rpartition("[")[2].rstrip("]").split(",")
                return [int(p) for p in pids if p.strip()]
        time.sleep(0.2)
    return []
