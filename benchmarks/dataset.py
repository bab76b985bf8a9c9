"""The generated events every throughput comparison reads (one set per `make bench` run).

Events are written straight to Kafka in the shape the gateway library produces:
JSON arrays of up to `BATCH_EVENTS` CloudEvents per message, each message holding
only events of its own partition (murmur2 of the subject, docs/api.md#partitioning). Building
them as plain dicts instead of through the pydantic builders keeps generating 2M
events to seconds; they pass the same validation in the worker.

The shape: accounts chosen uniformly (every account is active, so rollups
aggregate little: close to the worst case for the worker's fold), 90 % requests
with realistic dimensions (an account mostly uses one route and model), streams
opened and closed by the same account, and `DUPLICATE_RATE` of events re-sent
(same source and id, next to the original) for dedup to catch. Event times
spread over the last `span_s` seconds before the run.

A copy of the first `single_events` events, one event per message keyed by
subject, is what the per-event frameworks (faust, quixstreams) consume.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from aiokafka import AIOKafkaProducer

from deploy.kafka_local import ensure_topics
from producers.partitioning import partition_for
from schemas.kafka import COMPRESSION

BATCH_EVENTS = 200
DUPLICATE_RATE = 0.005
STICKY = 0.8
PARTITIONS = 8

FULL_EVENTS = 2_000_000
FULL_ACCOUNTS = 100_000
FULL_SINGLE_EVENTS = 200_000

_ROUTES = (
    ("/v1/messages", "POST"),
    ("/v1/messages", "POST"),
    ("/v1/messages", "POST"),
    ("/v1/embeddings", "POST"),
    ("/v1/messages/count_tokens", "POST"),
    ("/v1/models", "GET"),
)
_MODELS = ("small-1", "small-1", "medium-2", "large-3")
_STATUSES = (200,) * 18 + (429, 500)


@dataclass(frozen=True)
class Dataset:
    topic: str
    """Batch messages, as the gateway library writes them."""
    single_topic: str
    """The first `single_events` events again, one per message keyed by subject."""
    partitions: int
    events: int
    """Events in `topic`, re-sent duplicates included."""
    unique_events: int
    """What the pipeline must count: `events` minus the duplicates."""
    accounts: int
    active_accounts: int
    messages: int
    single_events: int
    stream_events: int
    units_micro: int
    """Sum of every unique event's units in millionths, to check the rollups against."""
    produce_s: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def sizes(scale: float) -> tuple[int, int, int]:
    """(events, accounts, single_events) for a scale; 1.0 is the issue's full size."""
    return (
        max(10_000, int(FULL_EVENTS * scale)),
        max(1_000, int(FULL_ACCOUNTS * scale)),
        max(5_000, int(FULL_SINGLE_EVENTS * scale)),
    )


def _fmt(t: datetime) -> str:
    return t.replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


class _Generator:
    """Deterministic for a seed, apart from the times (relative to `start`)."""

    def __init__(self, seed: int, accounts: int, start: datetime, span_s: float, total: int):
        self.rng = random.Random(seed)
        self.accounts = [f"acct-{i:06d}" for i in range(accounts)]
        self.partition = [partition_for(a, PARTITIONS) for a in self.accounts]
        self.start = start
        self.step = span_s / max(total, 1)
        self.total = total
        self.run = f"b{seed}"
        self.open: dict[int, list[str]] = {}
        self.n = 0
        self.streams = 0
        self.units_micro = 0
        self.seen: set[int] = set()

    def next(self) -> tuple[int, int, dict[str, Any]]:
        """(account index, partition, event)."""
        rng = self.rng
        i = self.n
        self.n += 1
        when = _fmt(self.start + timedelta(seconds=i * self.step))
        roll = rng.random()
        a = rng.randrange(len(self.accounts))
        head: dict[str, Any] = {
            "specversion": "1.0",
            "id": f"{self.run}-{i:x}",
            "source": f"gw-{i % 4}",
            "subject": self.accounts[a],
            "time": when,
        }
        if roll < 0.05:
            stream_id = f"st-{self.run}-{self.streams:x}"
            self.streams += 1
            self.open.setdefault(a, []).append(stream_id)
            head["type"] = "tally.stream.opened.v1"
            head["data"] = {"stream_id": stream_id, "route": "/v1/messages", "model": "large-3"}
        elif roll < 0.10 and self.open:
            a = next(iter(self.open))
            stream_id = self.open[a].pop()
            if not self.open[a]:
                del self.open[a]
            units = round(rng.uniform(0, 40), 3)
            head["subject"] = self.accounts[a]
            head["type"] = "tally.stream.closed.v1"
            head["data"] = {"stream_id": stream_id, "units": units, "duration_ms": 1234.0}
            self.units_micro += round(units * 1_000_000)
        else:
            # An account mostly calls its own route and model (a client app does),
            # sometimes something else.
            if rng.random() < STICKY:
                route, method = _ROUTES[a % len(_ROUTES)]
                model = _MODELS[a % len(_MODELS)]
            else:
                route, method = _ROUTES[rng.randrange(len(_ROUTES))]
                model = _MODELS[rng.randrange(len(_MODELS))]
            status = _STATUSES[rng.randrange(len(_STATUSES))]
            units = float(rng.randint(1, 5)) if status == 200 else 0.0
            head["type"] = "tally.request.v1"
            head["data"] = {
                "units": units,
                "route": route,
                "method": method,
                "status": status,
                "model": model,
                "latency_ms": round(rng.uniform(5, 900), 1),
                "bytes_in": rng.randrange(10_000),
                "bytes_out": rng.randrange(50_000),
            }
            self.units_micro += round(units * 1_000_000)
        self.seen.add(a)
        return a, self.partition[a], head


def _producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        compression_type=COMPRESSION,
        linger_ms=20,
        max_batch_size=1_000_000,
        max_request_size=4_000_000,
        acks=1,
    )


async def produce(
    bootstrap: str, scale: float, seed: int = 5, span_s: float = 120.0, name: str | None = None
) -> Dataset:
    """Generate the events and write both topics; returns what was written."""
    events, accounts, single_events = sizes(scale)
    name = name or f"bench{int(time.time())}"
    topic, single_topic = f"{name}.events", f"{name}.events-single"
    await ensure_topics(bootstrap, {topic: PARTITIONS, single_topic: PARTITIONS})
    gen = _Generator(seed, accounts, datetime.now(UTC) - timedelta(seconds=span_s), span_s, events)
    dup_rng = random.Random(seed + 1)
    buffers: list[list[bytes]] = [[] for _ in range(PARTITIONS)]
    started = time.perf_counter()
    producer = _producer(bootstrap)
    await producer.start()
    pending: list[asyncio.Future[Any]] = []
    messages = written = single = 0

    async def drain(limit: int) -> None:
        if len(pending) >= limit:
            await asyncio.gather(*pending)
            pending.clear()

    try:
        while gen.n < events:
            _, p, doc = gen.next()
            data = orjson.dumps(doc)
            copies = 2 if dup_rng.random() < DUPLICATE_RATE and written + 2 <= events else 1
            for _ in range(copies):
                buffers[p].append(data)
                written += 1
                if len(buffers[p]) >= BATCH_EVENTS:
                    value = b"[" + b",".join(buffers[p]) + b"]"
                    pending.append(await producer.send(topic, value, partition=p))
                    buffers[p] = []
                    messages += 1
            if single < single_events:
                key = doc["subject"].encode()
                pending.append(await producer.send(single_topic, data, key=key, partition=p))
                single += 1
            await drain(5_000)
            if written >= events:
                break
        for p, buf in enumerate(buffers):
            if buf:
                value = b"[" + b",".join(buf) + b"]"
                pending.append(await producer.send(topic, value, partition=p))
                messages += 1
        await drain(0)
        await producer.flush()
    finally:
        await producer.stop()
    duplicates = written - gen.n
    return Dataset(
        topic=topic,
        single_topic=single_topic,
        partitions=PARTITIONS,
        events=written,
        unique_events=written - duplicates,
        accounts=accounts,
        active_accounts=len(gen.seen),
        messages=messages,
        single_events=single,
        stream_events=gen.streams,
        units_micro=gen.units_micro,
        produce_s=time.perf_counter() - started,
    )


def load(doc: dict[str, Any]) -> Dataset:
    return Dataset(**doc)


if __name__ == "__main__":  # a quick look at a generated event
    g = _Generator(5, 10, datetime.now(UTC), 1.0, 10)
    for _ in range(3):
        print(orjson.dumps(g.next()[2]).decode())
