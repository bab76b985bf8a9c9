"""Gateway.deliver (what POST /api/v1/events publishes through): encoded events batched
and placed as record() places them, and a return only once Kafka acknowledged every
one of them; a refusal or a timeout is raised to that caller alone."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError

from producers.events import encode_event
from producers.gateway import FlushTimeoutError, Gateway, GatewaySendError
from producers.partitioning import partition_for
from tests.unit.producers.gateway.fakes import FakeProducer, make, req, wait_for


def _encoded(subjects: list[str], start: int = 0) -> list[tuple[str, bytes]]:
    return [(s, encode_event(req(s, start + n))) for n, s in enumerate(subjects)]


def _on(fake: FakeProducer) -> list[dict[str, Any]]:
    placed = []
    for sent in fake.sent:
        for event in sent.events():
            assert partition_for(event["subject"], fake.partitions) == sent.partition
            placed.append(event)
    return placed


async def test_deliver_returns_once_kafka_acknowledged_every_event() -> None:
    fake = FakeProducer(auto_ack=False)
    subjects = [f"acct-{n % 7}" for n in range(25)]
    async with make(fake, spool=False, max_batch_events=10, linger_ms=1) as gw:
        delivery = asyncio.create_task(gw.deliver(_encoded(subjects), timeout=10))
        await wait_for(lambda: len(_on(fake)) == 25)  # sealed by size and by linger, sent
        assert not delivery.done()  # everything sent, nothing acknowledged yet
        fake.ack_all()
        await asyncio.wait_for(delivery, 5)
        want = sorted(f"{s}-{n}" for n, s in enumerate(subjects))
        assert sorted(e["id"] for e in _on(fake)) == want


async def test_concurrent_deliveries_share_messages_and_each_waits_for_its_own() -> None:
    fake = FakeProducer(auto_ack=False)
    async with make(fake, spool=False, max_batch_events=1_000, linger_ms=1) as gw:
        first = asyncio.create_task(gw.deliver(_encoded(["a", "b"], 0), timeout=10))
        second = asyncio.create_task(gw.deliver(_encoded(["a", "c"], 10), timeout=10))
        await wait_for(lambda: len(_on(fake)) == 4)
        fake.ack_all()
        await asyncio.wait_for(asyncio.gather(first, second), 5)


async def test_a_refused_message_fails_the_delivery_of_its_events() -> None:
    fake = FakeProducer()
    fake.fail_with = KafkaConnectionError("gone")
    async with make(fake, spool=False, linger_ms=1) as gw:
        with pytest.raises(GatewaySendError):
            await gw.deliver(_encoded(["a", "b", "c"]), timeout=5)
        fake.fail_with = None
        await gw.deliver(_encoded(["a"], 100), timeout=5)
        with pytest.raises(GatewaySendError):  # flush reports what Kafka refused, too
            await gw.flush(timeout=1)


async def test_no_acknowledgement_in_time_raises_flush_timeout() -> None:
    fake = FakeProducer(auto_ack=False)
    async with make(fake, spool=False, linger_ms=1) as gw:
        with pytest.raises(FlushTimeoutError):
            await gw.deliver(_encoded(["a"]), timeout=0.2)
        fake.ack_all()


async def test_deliver_needs_a_gateway_without_spool() -> None:
    fake = FakeProducer()
    gw: Gateway = make(fake)
    async with gw:
        with pytest.raises(RuntimeError, match="spool"):
            await gw.deliver(_encoded(["a"]), timeout=1)


async def test_record_and_deliver_on_one_gateway_lose_nothing() -> None:
    fake = FakeProducer()
    async with make(fake, spool=False, max_batch_events=5, linger_ms=1) as gw:
        for n in range(3):
            await gw.record(req("a", n))
        await gw.deliver(_encoded(["a", "a"], 10), timeout=5)
        await gw.record(req("a", 20))
        await gw.flush(timeout=5)
    assert [e["id"] for e in _on(fake)] == ["a-0", "a-1", "a-2", "a-10", "a-11", "a-20"]
