"""Ingest benchmark: `POST /api/v1/events` with bodies of 100 events, under wrk.

One `tally api` process (the real app factory and uvicorn settings, its producer to the
bench's broker), loaded by `wrk` (another process) whose Lua script rotates over
pre-built bodies: 100 events each, of many accounts (mixed subjects), every one valid,
so each request is parsed and checked whole, placed on its partitions, and answered
202 only once Kafka acknowledged it (acks=all). The same bodies are sent more than
once over a run: the API takes re-sent events like new ones (the worker deduplicates).

Figures: ingest_http_events_per_s (accepted events per second: 202 answers x 100),
ingest_http_rps, ingest_http_p50_ms, ingest_http_p99_ms, ingest_http_errors (non-202
answers and socket errors; must be 0), ingest_http_cpu_us_per_event (the API
process's CPU time per accepted event: steadier than the rate on a shared machine),
and ingest_http_kafka_events (events on the topic after the run, at least those the
202s promised).

    .venv/bin/python -m benchmarks.run --only ingest --scale 0.2
"""

from __future__ import annotations

import asyncio
import pathlib
import random
import secrets
from datetime import UTC, datetime, timedelta

from benchmarks._procs import child_env, cpu_seconds, python_module, run_wrk, running, wait_http

EVENTS_PER_BODY = 100
BODIES = 500
ACCOUNTS = 10_000
CONNECTIONS = 32
"""Concurrent connections (closed loop): the API batches the events of concurrent
bodies into the same Kafka messages, so it needs a few bodies in flight."""
WRK_THREADS = 1
FULL_DURATION_S = 30.0
MIN_DURATION_S = 8.0
WARMUP_S = 3.0
TOPIC = "tally.events"
PARTITIONS = 8
PATH = "/api/v1/events"

_WRK_SCRIPT = """
local bodies = {}
local i = 0
local key = ""
function init(args)
  for line in io.lines(args[1]) do bodies[#bodies + 1] = line end
  key = args[2]
  i = math.random(#bodies)
end
function request()
  i = i % #bodies + 1
  return wrk.format("POST", wrk.path, {["X-API-Key"] = key,
    ["Content-Type"] = "application/cloudevents-batch+json"}, bodies[i])
end
"""


def write_bodies(path: pathlib.Path) -> None:
    """BODIES lines, each a JSON array of EVENTS_PER_BODY events of random accounts."""
    from producers import events as build
    from producers.events import encode_event

    rng = random.Random(11)
    now = datetime.now(UTC)
    lines = []
    for _ in range(BODIES):
        events = [
            build.request(
                f"bench-{rng.randrange(ACCOUNTS):06d}",
                "gw-bench",
                units=rng.choice([1.0, 2.5]),
                route="/v1/messages",
                method="POST",
                status=200,
                model="small-1",
                latency_ms=rng.randrange(5, 900),
                time=now - timedelta(seconds=rng.randrange(3_600)),
            )
            for _ in range(EVENTS_PER_BODY)
        ]
        lines.append(b"[" + b",".join(encode_event(e) for e in events) + b"]")
    path.write_bytes(b"\n".join(lines) + b"\n")


def wrk(
    url: str, bodies: pathlib.Path, key: str, seconds: float, workdir: pathlib.Path
) -> dict[str, float]:
    args = [
        f"-t{WRK_THREADS}", f"-c{CONNECTIONS}", f"-d{max(1, round(seconds))}s",
        "--timeout", "10s", url, "--", str(bodies), key,
    ]  # fmt: skip
    return run_wrk(workdir / "post_bodies.lua", _WRK_SCRIPT, args, seconds)


async def _events_on(bootstrap: str) -> int:
    """Events on the topic now (batch messages counted by their elements)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        tps = [TopicPartition(TOPIC, p) for p in range(PARTITIONS)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        count = 0
        while [tp for tp in tps if await consumer.position(tp) < end[tp]]:
            for batch in (await consumer.getmany(timeout_ms=1_000, max_records=5_000)).values():
                for record in batch:
                    # A batch message is a JSON array: its elements are the top-level
                    # objects, counted by their "specversion" (one per event).
                    count += record.value.count(b'"specversion"')
        return count
    finally:
        await consumer.stop()


def run(bootstrap: str, workdir: pathlib.Path, scale: float) -> dict[str, float]:
    from deploy.kafka_local import ensure_topics
    from deploy.processes import free_port

    workdir = pathlib.Path(workdir) / "ingest"
    workdir.mkdir(parents=True, exist_ok=True)
    asyncio.run(ensure_topics(bootstrap, {TOPIC: PARTITIONS}))
    bodies = workdir / "bodies.jsonl"
    write_bodies(bodies)
    key = secrets.token_urlsafe(32)
    port = free_port()
    env = child_env(
        {
            "TALLY_KAFKA_BOOTSTRAP": bootstrap,
            "TALLY_EVENTS_TOPIC": TOPIC,
            "TALLY_ADMIN_KEY": key,
            "TALLY_API_PORT": str(port),
            "TALLY_DATA_DIR": str(workdir / "data"),
        }
    )
    duration = max(MIN_DURATION_S, FULL_DURATION_S * min(scale, 1.0))
    with running("tally api", python_module("deploy.cli", "api"), env, workdir / "api.log") as api:
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/healthz", api)
        wrk(f"{url}{PATH}", bodies, key, WARMUP_S, workdir)
        api.check()
        cpu_before = cpu_seconds(api.pid)
        loaded = wrk(f"{url}{PATH}", bodies, key, duration, workdir)
        cpu_used = cpu_seconds(api.pid) - cpu_before
        api.check()
    seconds = loaded["duration_us"] / 1e6
    answered = loaded["requests"] - loaded["status_errors"]
    events = answered * EVENTS_PER_BODY
    return {
        "ingest_http_events_per_s": round(events / seconds, 1),
        "ingest_http_rps": round(loaded["requests"] / seconds, 1),
        "ingest_http_p50_ms": round(loaded["p50_us"] / 1000, 2),
        "ingest_http_p99_ms": round(loaded["p99_us"] / 1000, 2),
        "ingest_http_errors": float(loaded["status_errors"] + loaded["socket_errors"]),
        "ingest_http_cpu_us_per_event": round(cpu_used * 1e6 / max(1.0, events), 2),
        "ingest_http_kafka_events": float(asyncio.run(_events_on(bootstrap))),
    }
