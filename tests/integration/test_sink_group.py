"""Sinks in a group on a real broker and store: split, paused, fenced, restarted.

The embedded store admits one process, so the two sinks share this process, each
with an event loop (and a Kafka consumer) on a thread of its own. "Pausing" one
blocks its thread right before an INSERT, the worst moment: it has read its
markers and built its batch, and its heartbeats stop as they would under SIGSTOP.
Nothing of the fence lives in the process: it is the store's gates and Kafka's
group, exactly as between two `tally sink` processes on a ClickHouse server.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaProducer

from processors.sink import Sink
from schemas.deltas import Delta, encode
from schemas.rollup_table import TABLE
from schemas.store import Store
from tests.conftest import MakeTopics

PARTITIONS = 4
# The broker's group.min.session.timeout.ms (6 s by default) is the floor.
SESSION_MS = 6_000
MINUTE = datetime(2026, 12, 1, 9, 0, tzinfo=UTC)


class SinkThread:
    """A sink on its own thread and event loop, as if in a process of its own."""

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._main, daemon=True)
        self.thread.start()

    def _main(self) -> None:
        self.loop.run_until_complete(self.sink.run())

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.sink.stop)
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()
        self.loop.close()


def _sink(store: Store, bootstrap: str, name: str) -> Sink:
    return Sink(
        store,
        bootstrap,
        f"{name}.rollups",
        f"{name}.events",
        group=f"{name}.sinks",
        session_timeout_ms=SESSION_MS,
    )


async def _publish(bootstrap: str, topic: str, wave: int, truth: Counter[str]) -> None:
    """A delta per rollups partition and account, as workers publish them."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, enable_idempotence=True)
    await producer.start()
    try:
        for p in range(PARTITIONS):
            for i in range(5):
                account = f"acct-{p}-{i}"
                events = 1 + wave * 10 + i
                truth[account] += events
                row = [account, MINUTE, "t", "/r", "GET", "", 200, "", events, 1, 0.5, 1, 1, MINUTE]
                # next_offset: where this batch ends in events partition p (grows).
                for value in encode(Delta(p, wave * 100 + i + 1, 0, [row])):
                    await producer.send_and_wait(topic, value, partition=p)
    finally:
        await producer.stop()


def _stored(store: Store) -> Counter[str]:
    rows = store.query(
        f"SELECT account, sum(events) FROM {TABLE} WHERE account != '' GROUP BY account"
    )
    return Counter({str(account): int(events) for account, events in rows})


async def _until(what: str, check: Callable[[], bool], seconds: float = 30.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, f"not within {seconds}s: {what}"
        await asyncio.sleep(0.1)


def _split(*sinks: Sink) -> bool:
    held = [set(s.stats.partitions) for s in sinks]
    return (
        all(held)
        and sum(map(len, held)) == PARTITIONS
        and set().union(*held) == set(range(PARTITIONS))
    )


async def test_a_sink_paused_past_its_session_loses_its_partitions_and_never_writes_them(
    kafka_bootstrap: str, make_topics: MakeTopics, store: Store, unique_name: str
) -> None:
    topic = f"{unique_name}.rollups"
    await make_topics(kafka_bootstrap, {topic: PARTITIONS})
    truth: Counter[str] = Counter()
    a = SinkThread(_sink(store, kafka_bootstrap, unique_name))
    b = SinkThread(_sink(store, kafka_bootstrap, unique_name))
    paused, resume, woke = threading.Event(), threading.Event(), threading.Event()
    try:
        await _until("the sinks split the partitions", lambda: _split(a.sink, b.sink))
        await _publish(kafka_bootstrap, topic, 0, truth)
        await _until("wave 0 stored", lambda: _stored(store) == truth)

        # A's next INSERT stops its whole thread: no heartbeat, no write.
        write = a.sink._write_once

        async def write_after_a_pause(body: bytes, count: int, applied: dict[int, int]) -> None:
            if paused.is_set():
                await write(body, count, applied)
                return
            paused.set()
            resume.wait(timeout=60)  # blocks A's event loop, as SIGSTOP would
            try:
                await write(body, count, applied)
            finally:
                woke.set()

        a.sink._write_once = write_after_a_pause  # type: ignore[method-assign]
        held_by_a = set(a.sink.stats.partitions)
        inserts_by_a = a.sink.stats.inserts
        await _publish(kafka_bootstrap, topic, 1, truth)
        await _until("A paused holding a batch", paused.is_set)
        await _until(
            "B took every partition over and applied A's batch too",
            lambda: (
                set(b.sink.stats.partitions) == set(range(PARTITIONS)) and _stored(store) == truth
            ),
            seconds=SESSION_MS / 1000 + 20,
        )
        resume.set()  # SIGCONT: A carries on with the INSERT it had built
        await _until("A's stale INSERT returned", woke.is_set)
        assert _stored(store) == truth  # it did not land
        assert a.sink.stats.inserts == inserts_by_a
        assert a.sink.stats.fenced == 1

        # A rejoined; the group splits the partitions again and both sinks write.
        await _until("the sinks split the partitions again", lambda: _split(a.sink, b.sink))
        await _publish(kafka_bootstrap, topic, 2, truth)
        await _until("wave 2 stored", lambda: _stored(store) == truth)
        await asyncio.sleep(1.0)  # anything late would land now
    finally:
        resume.set()
        a.stop()
        b.stop()
    assert _stored(store) == truth
    assert held_by_a  # A did hold partitions before its pause
    assert a.sink.stats.duplicate_deltas == b.sink.stats.duplicate_deltas == 0
    assert a.sink.stats.inserts > inserts_by_a  # and writes again once reassigned


async def test_a_restarted_sink_resumes_after_the_stores_markers(
    kafka_bootstrap: str, make_topics: MakeTopics, store: Store, unique_name: str
) -> None:
    topic = f"{unique_name}.rollups"
    await make_topics(kafka_bootstrap, {topic: PARTITIONS})
    truth: Counter[str] = Counter()
    first = SinkThread(_sink(store, kafka_bootstrap, unique_name))
    try:
        await _publish(kafka_bootstrap, topic, 0, truth)
        await _until("wave 0 stored", lambda: _stored(store) == truth)
    finally:
        first.stop()
    await _publish(kafka_bootstrap, topic, 1, truth)  # while no sink runs
    second = SinkThread(_sink(store, kafka_bootstrap, unique_name))
    stats: Any = second.sink.stats
    try:
        await _until("wave 1 stored", lambda: _stored(store) == truth)
        await asyncio.sleep(1.0)
    finally:
        second.stop()
    assert _stored(store) == truth
    # It started from the markers, not from the beginning: nothing re-read to skip.
    assert stats.duplicate_deltas == 0
    assert stats.messages == PARTITIONS * 5
