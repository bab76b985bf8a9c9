"""The Gateway's unit tests' in-memory Kafka producer and helpers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka.partitioner import murmur2

from producers import events
from producers.gateway import (
    Gateway,
    Headers,
)
from producers.settings import ProducerSettings
from schemas.events import RequestEvent

TOPIC = "tally.events"


@dataclass
class Sent:
    topic: str
    value: bytes
    key: bytes | None
    partition: int
    explicit_partition: bool
    headers: Headers
    future: asyncio.Future[Any]

    @property
    def content_type(self) -> str:
        return dict(self.headers)["content-type"].decode()

    def events(self) -> list[dict[str, Any]]:
        doc = orjson.loads(self.value)
        return doc if isinstance(doc, list) else [doc]


class FakeProducer:
    """Records sends; acknowledges at once, on demand (`ack_all`), or fails."""

    def __init__(self, partitions: int = 8, *, auto_ack: bool = True) -> None:
        self.partitions = partitions
        self.auto_ack = auto_ack
        self.fail_with: BaseException | None = None
        self.raise_on_send: BaseException | None = None
        self.sent: list[Sent] = []
        self.started = False
        self.stopped = False

    async def start(self) -> None:
        self.started = True

    async def stop(self) -> None:
        self.stopped = True

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(self.partitions))

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Headers | None = None,
    ) -> asyncio.Future[Any]:
        if self.raise_on_send is not None:
            raise self.raise_on_send
        assert value is not None
        explicit = partition is not None
        if partition is None:
            # Kafka's default partitioner, as aiokafka applies it.
            assert key is not None
            partition = (murmur2(key) & 0x7FFFFFFF) % self.partitions
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.sent.append(Sent(topic, value, key, partition, explicit, headers or [], future))
        if self.fail_with is not None:
            future.set_exception(self.fail_with)
        elif self.auto_ack:
            future.set_result(partition)
        return future

    def ack_all(self) -> int:
        pending = [s.future for s in self.sent if not s.future.done()]
        for future in pending:
            future.set_result(None)
        return len(pending)

    def delivered_ids(self) -> list[str]:
        return [e["id"] for s in self.sent for e in s.events()]

    def acked_ids(self) -> list[str]:
        """Ids in messages the fake broker acknowledged, in the order they were sent."""
        return [
            e["id"]
            for s in self.sent
            if s.future.done() and not s.future.cancelled() and s.future.exception() is None
            for e in s.events()
        ]


def make(
    fake: FakeProducer,
    *,
    max_batch_events: int = 10,
    linger_ms: float = 10_000,
    max_buffered_events: int = 100_000,
    max_message_bytes: int | None = None,
    **options: Any,
) -> Gateway:
    return Gateway(
        "fake:9092",
        TOPIC,
        settings=ProducerSettings(),
        max_batch_events=max_batch_events,
        linger_ms=linger_ms,
        max_buffered_events=max_buffered_events,
        max_message_bytes=max_message_bytes,
        producer_factory=lambda: fake,
        **options,
    )


def req(subject: str, n: int, source: str = "gw-1") -> RequestEvent:
    return events.request(subject, source, units=1, id=f"{subject}-{n}")


async def flush_acking(gw: Gateway, fake: FakeProducer) -> None:
    """`flush()`, with Kafka acknowledging whatever it has been sent meanwhile."""
    flush = asyncio.create_task(gw.flush())
    while not flush.done():
        fake.ack_all()
        await asyncio.sleep(0.01)
    await flush


async def settle() -> None:
    # Let the sender and the acknowledgement callbacks run.
    for _ in range(20):
        await asyncio.sleep(0)


async def wait_for(condition: Callable[[], bool], seconds: float = 10) -> None:
    for _ in range(int(seconds / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    pytest.fail(f"condition not met within ~{seconds} s")


def spool_files(gw: Gateway) -> list[Path]:
    assert gw.spool_dir is not None
    return sorted(gw.spool_dir.glob("*.seg")) if gw.spool_dir.exists() else []


def per_account_order(ids: list[str]) -> dict[str, list[int]]:
    """Sequence numbers per account, in delivery order, first delivery of each only."""
    seen: set[str] = set()
    order: dict[str, list[int]] = {}
    for event_id in ids:
        if event_id in seen:
            continue
        seen.add(event_id)
        subject, _, n = event_id.rpartition("-")
        order.setdefault(subject, []).append(int(n))
    return order
