"""producer_events_per_s: the gateway library from one process, vs plain per-event sends.

Both sides get the same pre-built event objects (what a gateway's request handler
holds) and the clock covers encoding, partitioning, batching, sending and the
broker's acknowledgement of every event:
- `Gateway.record` for each event, then `flush()` (defaults: 200-event batch
  messages, 20 ms linger, idempotent acks=all, snappy);
- naive: `AIOKafkaProducer.send(topic, encode_event(e), key=subject)` for each event
  (aiokafka defaults, acks=1, no compression), then `flush()`.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer

from benchmarks import _child
from benchmarks.dataset import PARTITIONS, _Generator
from deploy.kafka_local import ensure_topics
from producers.events import encode_event
from producers.gateway import Gateway
from schemas.events import EVENT_ADAPTER, AnyEvent

TIMEOUT_S = 600.0
FULL_GATEWAY_EVENTS = 1_000_000
FULL_NAIVE_EVENTS = 200_000


def run(bootstrap: str, workdir: Path, scale: float) -> dict[str, float]:
    args = {"bootstrap": bootstrap, "workdir": str(workdir), "scale": scale}
    result = _child.spawn("benchmarks.producer", args, TIMEOUT_S, profile_name="producer")
    return {k: float(v) for k, v in result.items()}


def _events(n: int, accounts: int, seed: int) -> list[AnyEvent]:
    gen = _Generator(seed, accounts, datetime.now(UTC) - timedelta(seconds=60), 60.0, n)
    return [EVENT_ADAPTER.validate_python(gen.next()[2]) for _ in range(n)]


async def _gateway(
    bootstrap: str, topic: str, workdir: Path, events: list[AnyEvent]
) -> tuple[float, float]:
    gateway = Gateway(
        bootstrap, topic, spool_dir=workdir / "producer-spool", client_id="bench-gateway"
    )
    await gateway.start()
    try:
        started, cpu_started = time.perf_counter(), time.process_time()
        for event in events:
            await gateway.record(event)
        await gateway.flush()
        elapsed = time.perf_counter() - started
        # This process's CPU (aiokafka's sending and snappy included): less noisy than wall
        # time on a machine the broker shares.
        cpu = time.process_time() - cpu_started
    finally:
        await gateway.close()
    acked = gateway.stats.events_acked
    if acked != len(events):
        raise RuntimeError(f"gateway acknowledged {acked} of {len(events)} events")
    return elapsed, cpu


async def _naive(bootstrap: str, topic: str, events: list[AnyEvent]) -> float:
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await producer.start()
    try:
        started = time.perf_counter()
        futures = []
        for event in events:
            futures.append(
                await producer.send(topic, encode_event(event), key=event.subject.encode())
            )
        await producer.flush()
        await asyncio.gather(*futures)
        return time.perf_counter() - started
    finally:
        await producer.stop()


async def _measure(bootstrap: str, workdir: Path, scale: float) -> dict[str, Any]:
    n_gateway = max(20_000, int(FULL_GATEWAY_EVENTS * scale))
    n_naive = max(5_000, int(FULL_NAIVE_EVENTS * scale))
    accounts = max(1_000, int(100_000 * scale))
    name = f"bg{uuid.uuid4().hex[:8]}"
    gw_topic, naive_topic = f"{name}.gateway", f"{name}.naive"
    await ensure_topics(bootstrap, {gw_topic: PARTITIONS, naive_topic: PARTITIONS})
    events = _events(n_gateway, accounts, seed=11)
    gateway_s, gateway_cpu_s = await _gateway(bootstrap, gw_topic, workdir, events)
    naive_s = await _naive(bootstrap, naive_topic, events[:n_naive])
    return {
        "producer_events_per_s": n_gateway / gateway_s,
        "producer_events": n_gateway,
        "producer_cpu_us_per_event": gateway_cpu_s / n_gateway * 1e6,
        "producer_naive_events_per_s": n_naive / naive_s,
        "producer_naive_events": n_naive,
    }


def child(args: dict[str, Any]) -> dict[str, Any]:
    return asyncio.run(_measure(args["bootstrap"], Path(args["workdir"]), float(args["scale"])))


if __name__ == "__main__":
    _child.main(child)
