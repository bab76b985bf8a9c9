"""Memory benchmark: the peak RSS of one `tally worker` with 1M accounts active this week.

`tally worker` runs as its own process (topics, group and data dir of its own on
the bench broker). The benchmark publishes EVENTS_PER_ACCOUNT request events for
each of N distinct accounts (1,000,000 at scale 1.0), their times spread over the
current week up to now, in gateway-shaped batches (one JSON array of up to
BATCH_EVENTS co-partitioned events per message, partitioned as docs/api.md#partitioning
says), waits until the worker's committed offsets reach the end of every
partition, and reads VmHWM (the peak resident set) from /proc/<pid>/status.

What the worker keeps between batches is its dedup memory: every (source, id)
seen within TALLY_DEDUP_WINDOW_S (1 h) up to TALLY_DEDUP_MAX_KEYS per partition
generation; a batch's rollup rows live only until its transaction commits.

Figures: worker_peak_rss_mib, worker_idle_rss_mib (after start, before any
event), worker_final_rss_mib (caught up: mostly dedup memory), memory_accounts,
memory_events, memory_catch_up_s (publish end to all committed; informative only).
The worker starts with the whole backlog waiting, so each batch is full
(TALLY_WORKER_BATCH_MESSAGES messages of BATCH_EVENTS events): the peak is the
dedup memory plus one full batch in flight. `--set TALLY_WORKER_BATCH_MESSAGES=500`
tries another batch size.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import random
import tempfile
import time
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta

from benchmarks._procs import REPO_ROOT, child_env, python_module, rss_mib, running

FULL_ACCOUNTS = 1_000_000
MIN_ACCOUNTS = 20_000
EVENTS_PER_ACCOUNT = 2
BATCH_EVENTS = 200
"""The gateway's default TALLY_PRODUCER_MAX_BATCH_EVENTS."""
PARTITIONS = 8
STARTUP_S = 8.0
TIMEOUT_S = 900.0


async def publish(bootstrap: str, topic: str, accounts: int) -> int:
    """Publish the events; returns how many. Raw batches, so setup stays quick."""
    import orjson
    from aiokafka import AIOKafkaProducer

    from producers.partitioning import partition_for
    from schemas.kafka import COMPRESSION

    now = datetime.now(UTC)
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    week_start = today - timedelta(days=today.weekday())
    span_s = max(60, int((now - week_start).total_seconds()) - 60)
    rng = random.Random(11)
    run = uuid.uuid4().hex[:10]
    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        compression_type=COMPRESSION,
        linger_ms=20,
        max_batch_size=1_000_000,
        max_request_size=2_000_000,
        acks="all",
    )
    await producer.start()
    buffers: dict[int, list[bytes]] = {p: [] for p in range(PARTITIONS)}
    pending: list[asyncio.Future[object]] = []
    sent = 0

    async def ship(p: int) -> None:
        events = buffers[p]
        buffers[p] = []
        value = b"[" + b",".join(events) + b"]"
        pending.append(await producer.send(topic, value, partition=p))
        if len(pending) >= 500:
            await asyncio.gather(*pending)
            pending.clear()

    try:
        for n in range(accounts):
            subject = f"mem-{n:07d}"
            p = partition_for(subject, PARTITIONS)
            for _ in range(EVENTS_PER_ACCOUNT):
                at = week_start + timedelta(seconds=rng.randrange(span_s), microseconds=1)
                buffers[p].append(
                    orjson.dumps(
                        {
                            "specversion": "1.0",
                            "id": f"{run}-{sent}",
                            "source": "bench-mem",
                            "type": "tally.request.v1",
                            "subject": subject,
                            "time": at,
                            "data": {"units": 1.0, "route": "/v1/messages", "status": 200},
                        },
                        option=orjson.OPT_UTC_Z,
                    )
                )
                sent += 1
            if len(buffers[p]) >= BATCH_EVENTS:
                await ship(p)
        for p in range(PARTITIONS):
            if buffers[p]:
                await ship(p)
        await asyncio.gather(*pending)
    finally:
        await producer.stop()
    return sent


async def _lag(bootstrap: str, topic: str, group: str) -> int:
    """Messages of `topic` the group has not committed yet."""
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.admin import AIOKafkaAdminClient

    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await consumer.start()
    await admin.start()
    try:
        end = await consumer.end_offsets(tps)
        committed = await admin.list_consumer_group_offsets(group, partitions=tps)
        done = {tp: (meta.offset if meta is not None else 0) for tp, meta in committed.items()}
        return sum(max(0, end[tp] - max(done.get(tp, 0), 0)) for tp in tps)
    finally:
        await consumer.stop()
        await admin.close()


def run(
    bootstrap: str, workdir: pathlib.Path, scale: float, overrides: Mapping[str, str] | None = None
) -> dict[str, float]:
    from deploy.kafka_local import ensure_topics

    workdir = pathlib.Path(workdir) / "memory"
    workdir.mkdir(parents=True, exist_ok=True)
    accounts = max(MIN_ACCOUNTS, int(FULL_ACCOUNTS * scale))
    name = f"bench-mem-{uuid.uuid4().hex[:8]}"
    topic = f"{name}.events"
    asyncio.run(ensure_topics(bootstrap, {topic: PARTITIONS}))
    env = child_env(
        {
            "TALLY_KAFKA_BOOTSTRAP": bootstrap,
            "TALLY_DATA_DIR": str(workdir / "data"),
            "TALLY_EVENTS_TOPIC": topic,
            "TALLY_ROLLUPS_TOPIC": f"{name}.rollups",
            "TALLY_DLQ_TOPIC": f"{name}.dlq",
            "TALLY_CONSUMER_GROUP": name,
            **(overrides or {}),
        }
    )
    with running(
        "tally worker", python_module("deploy.cli", "worker"), env, workdir / "worker.log"
    ) as worker:
        time.sleep(STARTUP_S)
        worker.check()
        _, idle = rss_mib(worker.pid)
        events = asyncio.run(publish(bootstrap, topic, accounts))
        published = time.monotonic()
        deadline = published + TIMEOUT_S * max(scale, 0.1)
        while asyncio.run(_lag(bootstrap, topic, name)) > 0:
            worker.check()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"the worker did not catch up within the time limit (see {workdir})"
                )
            time.sleep(1.0)
        caught_up = time.monotonic() - published
        time.sleep(2.0)  # a last heartbeat, a last flush: all part of its steady state
        worker.check()
        final, peak = rss_mib(worker.pid)
    return {
        "worker_peak_rss_mib": round(peak, 1),
        "worker_idle_rss_mib": round(idle, 1),
        "worker_final_rss_mib": round(final, 1),
        "memory_accounts": float(accounts),
        "memory_events": float(events),
        "memory_catch_up_s": round(caught_up, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory")
    parser.add_argument("--bootstrap", help="a running broker (default: start a local one)")
    parser.add_argument("--scale", type=float, default=0.05)
    parser.add_argument("--set", action="append", default=[], help="TALLY_X=value for the worker")
    args = parser.parse_args()
    overrides = dict(item.split("=", 1) for item in args.set)
    with tempfile.TemporaryDirectory(prefix="tally-bench-mem-") as tmp:
        if args.bootstrap:
            print(
                json.dumps(run(args.bootstrap, pathlib.Path(tmp), args.scale, overrides), indent=2)
            )
            return
        from deploy.kafka_local import LocalKafka
        from deploy.processes import free_port

        broker = LocalKafka(pathlib.Path(tmp), REPO_ROOT / ".tally/kafka/libs", port=free_port())
        broker.start()
        try:
            figures = run(broker.bootstrap, pathlib.Path(tmp), args.scale, overrides)
        finally:
            broker.stop()
        print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
