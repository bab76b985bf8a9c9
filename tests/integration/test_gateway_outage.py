"""Kafka goes away while gateways keep recording: nothing recorded is lost.

These tests run a broker of their own (a LocalKafka on a free port, in a temporary data
dir), since they stop, kill and restart it; the session's shared broker is left alone.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from deploy.kafka_local import LocalKafka, ensure_topics
from producers import events
from producers.gateway import Gateway
from producers.partitioning import partition_for
from producers.settings import ProducerSettings
from tests.conftest import consume_all, own_broker

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
PARTITIONS = 8


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalKafka]:
    """A broker these tests may stop and restart (on the same data dir)."""
    with own_broker(tmp_path_factory, "outage-kafka") as kafka:
        yield kafka


def received(records: list[Any]) -> tuple[Counter[tuple[str, str]], list[dict[str, Any]]]:
    """(source, id) -> copies received, and the events in partition order."""
    seen: Counter[tuple[str, str]] = Counter()
    ordered: list[dict[str, Any]] = []
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        doc = orjson.loads(record.value)
        batch = doc if isinstance(doc, list) else [doc]
        for event in batch:
            assert partition_for(event["subject"], PARTITIONS) == record.partition
            seen[(event["source"], event["id"])] += 1
            ordered.append(event)
    return seen, ordered


def out_of_order(ordered: list[dict[str, Any]]) -> int:
    """Events whose first copy arrived after a later-recorded event of the same account."""
    latest: dict[str, int] = {}
    first_seen: set[str] = set()
    late = 0
    for event in ordered:
        if event["id"] in first_seen:
            continue
        first_seen.add(event["id"])
        n = int(event["id"][1:])
        if n < latest.get(event["subject"], -1):
            late += 1
        latest[event["subject"]] = max(n, latest.get(event["subject"], -1))
    return late


@pytest.mark.timeout(240)
async def test_kafka_down_for_60_s_while_recording_loses_nothing(
    broker: LocalKafka, unique_name: str, tmp_path: Path
) -> None:
    rate, before_s, outage_s, after_s = 500, 15.0, 60.0, 10.0
    await asyncio.to_thread(broker.start)
    topic = unique_name
    await ensure_topics(broker.bootstrap, {topic: PARTITIONS})
    gateway = Gateway(
        broker.bootstrap,
        topic,
        settings=ProducerSettings(),
        spool_dir=tmp_path / "spool",
        client_id="gw-outage",
    )
    await gateway.start()
    loop = asyncio.get_running_loop()
    recorded: list[str] = []
    stop = asyncio.Event()
    slowest_record = 0.0
    peak = {"spool_bytes": 0, "in_spool": 0, "pending": 0}

    async def record_steadily() -> None:
        nonlocal slowest_record
        started = loop.time()
        n = 0
        while not stop.is_set():
            delay = started + n / rate - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            event = events.request(f"acct-{n % 200:04d}", "gw-outage", id=f"e{n}", units=1)
            began = loop.time()
            await gateway.record(event)
            slowest_record = max(slowest_record, loop.time() - began)
            recorded.append(event.id)
            n += 1

    async def watch() -> None:
        while not stop.is_set():
            stats = gateway.stats
            peak["spool_bytes"] = max(peak["spool_bytes"], stats.spool_bytes)
            peak["in_spool"] = max(peak["in_spool"], stats.events_in_spool)
            peak["pending"] = max(peak["pending"], stats.events_pending)
            await asyncio.sleep(0.1)

    recorder = asyncio.create_task(record_steadily())
    watcher = asyncio.create_task(watch())
    try:
        await asyncio.sleep(before_s)
        assert not gateway.spooling
        recorded_before = len(recorded)

        down_at = loop.time()
        await asyncio.to_thread(broker.kill)
        await asyncio.sleep(max(0.0, down_at + outage_s - loop.time()))
        assert gateway.spooling, "batches should be going to the spool"
        spooled_during_outage = gateway.stats.events_in_spool
        await asyncio.to_thread(broker.start)
        up_at = loop.time()

        while gateway.spooling or gateway.stats.events_in_spool:
            assert loop.time() - up_at < 30, f"the spool did not drain: {gateway.stats}"
            await asyncio.sleep(0.05)
        drained_at = loop.time()
        await asyncio.sleep(max(0.0, up_at + after_s - loop.time()))
    finally:
        stop.set()
        await recorder
        await watcher
    closing = loop.time()
    assert await gateway.close() == 0
    close_s = loop.time() - closing
    stats = gateway.stats

    seen, ordered = received(await consume_all(broker.bootstrap, topic, PARTITIONS))
    expected = {("gw-outage", event_id) for event_id in recorded}
    missing = expected - set(seen)
    duplicates = sum(seen.values()) - len(seen)
    print(
        "\n--- Kafka outage while recording ---\n"
        f"events recorded:         {len(recorded)} ({recorded_before} before the outage, "
        f"{rate}/s)\n"
        f"outage (kill -> ready):  {up_at - down_at:.1f} s\n"
        f"spooled after 60 s down: {spooled_during_outage} events; peak "
        f"{peak['in_spool']} events, {peak['spool_bytes'] / 1e6:.1f} MB; peak in memory "
        f"{peak['pending']} events\n"
        f"events spooled/replayed: {stats.events_spooled} / {stats.events_replayed}\n"
        f"drain after recovery:    {drained_at - up_at:.2f} s (broker ready -> spool empty, "
        "direct sends again)\n"
        f"slowest record() call:   {slowest_record * 1000:.1f} ms\n"
        f"close():                 {close_s:.2f} s\n"
        f"received:                {sum(seen.values())} events, {len(seen)} distinct, "
        f"{duplicates} duplicates, {len(missing)} missing, "
        f"{out_of_order(ordered)} out of account order\n"
    )
    assert not missing, f"{len(missing)} recorded events never reached Kafka"
    assert set(seen) == expected
    assert stats.events_failed == 0
    assert stats.events_in_spool == 0
    assert slowest_record < 2.0, "record() should not stall while Kafka is away"


CHILD = """
import asyncio, json, sys
from producers import events
from producers.gateway import Gateway
from producers.settings import ProducerSettings

async def main(bootstrap: str, topic: str, spool_dir: str) -> None:
    gateway = Gateway(
        bootstrap, topic, settings=ProducerSettings(), spool_dir=spool_dir,
        unreachable_after_s=1.0,
    )
    await gateway.start()
    for n in range(500):
        await gateway.record(events.request(f"acct-{n % 50}", "gw-killed", id=f"k{n}"))
    await gateway.flush()
    print("up", flush=True)
    await asyncio.to_thread(sys.stdin.readline)  # the broker is down now
    for n in range(500, 2500):
        await gateway.record(events.request(f"acct-{n % 50}", "gw-killed", id=f"k{n}"))
    await gateway.flush()  # returns once everything recorded is acked or spooled
    stats = gateway.stats
    report = {
        "recorded": stats.events_recorded,
        "acked": stats.events_acked,
        "in_spool": stats.events_in_spool,
    }
    print(json.dumps(report), flush=True)
    await asyncio.sleep(3600)  # SIGKILLed here

asyncio.run(main(*sys.argv[1:4]))
"""


@pytest.mark.timeout(180)
async def test_a_killed_gateway_process_leaves_a_spool_the_next_one_replays(
    broker: LocalKafka, unique_name: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(broker.start)
    topic = unique_name
    await ensure_topics(broker.bootstrap, {topic: PARTITIONS})
    spool_dir = tmp_path / "spool"
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        textwrap.dedent(CHILD),
        broker.bootstrap,
        topic,
        str(spool_dir),
        cwd=REPO_ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        assert child.stdin is not None
        assert (await asyncio.wait_for(child.stdout.readline(), 60)).strip() == b"up"
        await asyncio.to_thread(broker.stop)
        child.stdin.write(b"go\n")
        await child.stdin.drain()
        report = json.loads(await asyncio.wait_for(child.stdout.readline(), 60))
        assert report["recorded"] == 2_500
        assert report["acked"] >= 500
        assert report["in_spool"] >= 2_000
        child.send_signal(signal.SIGKILL)
        assert await asyncio.wait_for(child.wait(), 10) == -signal.SIGKILL
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert list(spool_dir.glob("*.seg")), "the killed process left its spool"

    await asyncio.to_thread(broker.start)
    started = time.monotonic()
    async with Gateway(
        broker.bootstrap, topic, settings=ProducerSettings(), spool_dir=spool_dir
    ) as successor:
        assert successor.stats.events_in_spool == report["in_spool"]
        await successor.record(events.request("acct-1", "gw-successor", id="s0"))
    replay_s = time.monotonic() - started
    # Its own event may have queued behind the replay, and been replayed too.
    assert successor.stats.events_replayed >= report["in_spool"]
    assert not spool_dir.exists(), "an empty spool cleans up after itself"

    seen, _ = received(await consume_all(broker.bootstrap, topic, PARTITIONS))
    expected = {("gw-killed", f"k{n}") for n in range(2_500)} | {("gw-successor", "s0")}
    print(
        f"\n--- SIGKILL with a spool: {report['in_spool']} events spooled by the killed "
        f"process, replayed by its successor in {replay_s:.2f} s; received "
        f"{sum(seen.values())} events, {len(seen)} distinct, "
        f"{sum(seen.values()) - len(seen)} duplicates\n"
    )
    assert set(seen) == expected
