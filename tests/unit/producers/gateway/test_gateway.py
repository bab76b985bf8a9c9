"""Gateway against an in-memory producer: batching, linger, placement, backpressure, failures."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest

from producers import events
from producers.gateway import (
    Gateway,
    GatewaySendError,
    GatewayStats,
)
from producers.partitioning import partition_for
from producers.settings import ProducerSettings
from schemas.events import CONTENT_TYPE_BATCH, CONTENT_TYPE_SINGLE, MESSAGE_ADAPTER
from tests.unit.producers.gateway.fakes import (
    TOPIC,
    FakeProducer,
    flush_acking,
    make,
    req,
    settle,
    wait_for,
)


async def test_a_full_buffer_goes_out_as_one_batch() -> None:
    fake = FakeProducer()
    async with make(fake, max_batch_events=10) as gw:
        for n in range(35):
            await gw.record(req("acct-1", n))
        await settle()
        assert [len(s.events()) for s in fake.sent] == [10, 10, 10]
        assert gw.stats.events_pending == 5
    assert [len(s.events()) for s in fake.sent] == [10, 10, 10, 5]
    assert fake.delivered_ids() == [f"acct-1-{n}" for n in range(35)]
    for s in fake.sent:
        assert s.topic == TOPIC
        assert s.key == b"acct-1"
        assert s.content_type == CONTENT_TYPE_BATCH
        assert s.explicit_partition
        assert s.partition == partition_for("acct-1", 8)
        MESSAGE_ADAPTER.validate_json(s.value)
    assert fake.stopped
    assert gw.stats == GatewayStats(
        events_recorded=35,
        messages_sent=4,
        events_acked=35,
        bytes_sent=sum(len(s.value) for s in fake.sent),
        events_failed=0,
        events_pending=0,
    )


async def test_linger_sends_a_partial_batch() -> None:
    fake = FakeProducer()
    async with make(fake, max_batch_events=100, linger_ms=300) as gw:
        loop = asyncio.get_running_loop()
        started = loop.time()
        for n in range(3):
            await gw.record(req("acct-1", n))
        await settle()
        assert fake.sent == []
        await wait_for(lambda: len(fake.sent) == 1)
        assert loop.time() - started >= 0.3
        assert [len(s.events()) for s in fake.sent] == [3]
        # Another partition's events linger on their own clock.
        await gw.record(req("acct-000042", 0))
        await wait_for(lambda: gw.stats.events_acked == 4)
        assert len(fake.sent) == 2


async def test_a_lone_event_goes_out_as_a_single_event() -> None:
    fake = FakeProducer()
    async with make(fake, linger_ms=1) as gw:
        await gw.record(req("acct-1", 0))
        await wait_for(lambda: len(fake.sent) == 1)  # by linger, before close flushes
    (sent,) = fake.sent
    assert sent.content_type == CONTENT_TYPE_SINGLE
    assert isinstance(orjson.loads(sent.value), dict)
    assert sent.key == b"acct-1"
    MESSAGE_ADAPTER.validate_json(sent.value)


async def test_batches_are_co_partitioned_and_nothing_is_lost() -> None:
    fake = FakeProducer(partitions=12)
    subjects = [f"acct-{k:06d}" for k in range(300)]
    recorded = []
    async with make(fake, max_batch_events=25, linger_ms=5) as gw:
        assert gw.partitions == 12
        for n in range(5_000):
            event = req(subjects[(n * 7919) % len(subjects)], n)
            recorded.append(event.id)
            await gw.record(event)
            if n % 1_000 == 0:
                await asyncio.sleep(0.01)
    assert sorted(fake.delivered_ids()) == sorted(recorded)
    for s in fake.sent:
        assert all(partition_for(e["subject"], 12) == s.partition for e in s.events())
        assert s.key == s.events()[0]["subject"].encode()
    # Per account, events arrive in the order they were recorded.
    for subject in subjects[:20]:
        order = [int(i.rsplit("-", 1)[1]) for i in fake.delivered_ids() if i.startswith(subject)]
        assert order == sorted(order)


async def test_a_batch_never_exceeds_the_message_size() -> None:
    fake = FakeProducer()
    one = len(events.encode_event(req("acct-1", 0)))
    limit = one * 5
    async with make(fake, max_batch_events=1_000, max_message_bytes=limit) as gw:
        for n in range(100):
            await gw.record(req("acct-1", n))
    assert sum(len(s.events()) for s in fake.sent) == 100
    assert all(len(s.value) <= limit for s in fake.sent)
    assert max(len(s.events()) for s in fake.sent) == 4


async def test_an_event_larger_than_a_message_is_refused() -> None:
    fake = FakeProducer()
    async with make(fake, max_message_bytes=1_024) as gw:
        big = events.request("acct-1", "gw-1", route="/" + "x" * 255, model="m" * 256)
        big = big.model_copy(update={"source": "s" * 256, "id": "i" * 128})
        with pytest.raises(ValueError, match="can never be sent"):
            await gw.record(big)
        assert gw.stats.events_recorded == 0


async def test_record_waits_when_the_buffer_is_full_and_resumes() -> None:
    fake = FakeProducer(auto_ack=False)
    async with make(fake, max_batch_events=10, max_buffered_events=50, linger_ms=10_000) as gw:

        async def produce() -> None:
            for n in range(120):
                await gw.record(req(f"acct-{n % 7}", n))

        task = asyncio.create_task(produce())
        # Waiting for room pushes partial buffers out: once 50 - 38 events were sent,
        # record() has had to wait.
        await wait_for(lambda: sum(len(s.events()) for s in fake.sent) >= 50 - 38)
        assert not task.done()
        assert gw.stats.events_recorded == 50
        assert gw.stats.events_pending == 50
        # Waiting for room pushed out partial buffers too (no wait for linger), the
        # fullest first, until acknowledging what was sent lets record() resume (at
        # 50 - 50 // 4 = 38 pending).
        sent = sum(len(s.events()) for s in fake.sent)
        assert 50 - 38 <= sent < 50
        while not task.done():
            fake.ack_all()
            await asyncio.sleep(0.01)
            assert gw.stats.events_pending <= 50
        await task
        await flush_acking(gw, fake)
    assert sorted(fake.delivered_ids()) == sorted(f"acct-{n % 7}-{n}" for n in range(120))
    assert gw.stats.events_acked == 120


async def record_as_kafka_acks_one_message_at_a_time(
    gw: Gateway, fake: FakeProducer, accounts: int, events: int, room: int
) -> list[int]:
    """Record `events` events of `accounts` accounts while Kafka acknowledges the oldest
    unacknowledged message at each step; every event delivered; the messages' sizes."""

    async def produce() -> None:
        for n in range(events):
            await gw.record(req(f"acct-{n % accounts}", n))

    task = asyncio.create_task(produce())
    await settle()
    while not task.done():
        oldest = next((s.future for s in fake.sent if not s.future.done()), None)
        if oldest is not None:
            oldest.set_result(None)
        await settle()
        assert gw.stats.events_pending <= room
    await task
    await flush_acking(gw, fake)
    expected = sorted(f"acct-{n % accounts}-{n}" for n in range(events))
    assert sorted(fake.delivered_ids()) == expected
    return [len(s.events()) for s in fake.sent]


async def test_a_full_buffer_resumes_in_a_block_not_in_tiny_messages() -> None:
    # A wait for room seals partial buffers. Were record() to resume at the first
    # acknowledgement, it would wait again a message later, sealing partial buffers
    # every time: a stream of tiny messages, each costing Kafka as much as a full one.
    # It resumes once a quarter of the buffer is free instead (the buffer holding many
    # messages, as the defaults have it: 100k events, 200 per message).
    fake = FakeProducer(auto_ack=False)
    async with make(fake, max_batch_events=10, max_buffered_events=800) as gw:
        sizes = await record_as_kafka_acks_one_message_at_a_time(gw, fake, 64, 8_000, 800)
    # 800 full messages would do; resuming at each acknowledgement makes several times more.
    assert len(sizes) < 1_200, f"{len(sizes)} messages, {sizes.count(10)} full"


async def test_a_small_buffer_seals_only_the_partial_buffers_it_needs() -> None:
    # 32 accounts over 8 partitions, 100 per message, room for 400: partial buffers
    # together hold up to 8 x 99 events, more than the buffer. Sealing all of them at
    # every wait (as record() once did) sent 561 messages, 1 of them full; 80 would do.
    fake = FakeProducer(auto_ack=False)
    async with make(fake, max_batch_events=100, max_buffered_events=400, linger_ms=10_000) as gw:
        sizes = await record_as_kafka_acks_one_message_at_a_time(gw, fake, 32, 8_000, 400)
    assert len(sizes) < 200, f"{len(sizes)} messages for 8,000 events, {sizes.count(100)} full"


async def test_flush_waits_for_acknowledgements() -> None:
    fake = FakeProducer(auto_ack=False)
    async with make(fake) as gw:
        for n in range(15):
            await gw.record(req("acct-1", n))
        flush = asyncio.create_task(gw.flush())
        await wait_for(lambda: len(fake.sent) == 2)
        assert not flush.done()
        fake.ack_all()
        await flush
        assert gw.stats.events_acked == 15


async def test_a_failed_delivery_surfaces_from_flush_and_close() -> None:
    # Without a spool, nothing keeps an undelivered batch: the failure is the caller's.
    # (With one, a TimeoutError means "spool it": see the spool tests below.)
    fake = FakeProducer()
    gw = make(fake, spool=False)
    await gw.start()
    fake.fail_with = TimeoutError("broker gone")
    for n in range(12):
        await gw.record(req("acct-1", n))
    with pytest.raises(GatewaySendError, match="NOT delivered") as caught:
        await gw.flush()
    assert len(caught.value.failed_events) == 12
    assert isinstance(caught.value.causes[0], TimeoutError)
    assert "broker gone" in str(caught.value)
    assert gw.stats.events_failed == 12
    assert gw.stats.events_pending == 0
    # Reported once; the gateway keeps working when Kafka recovers.
    fake.fail_with = None
    await gw.record(req("acct-1", 99))
    await gw.flush()
    fake.fail_with = TimeoutError("again")
    await gw.record(req("acct-1", 100))
    with pytest.raises(GatewaySendError):
        await gw.close()
    assert fake.stopped


async def test_a_send_that_raises_surfaces_too() -> None:
    fake = FakeProducer()
    fake.raise_on_send = RuntimeError("producer closed")
    gw = make(fake, max_batch_events=5)
    await gw.start()
    for n in range(5):
        await gw.record(req("acct-1", n))
    with pytest.raises(GatewaySendError, match="producer closed"):
        await gw.close()
    assert gw.stats.events_failed == 5


async def test_record_refuses_before_start_and_after_close() -> None:
    fake = FakeProducer()
    gw = make(fake)
    with pytest.raises(RuntimeError, match="not started"):
        await gw.record(req("acct-1", 0))
    async with gw:
        await gw.record(req("acct-1", 0))
    with pytest.raises(RuntimeError, match="closed"):
        await gw.record(req("acct-1", 1))
    with pytest.raises(RuntimeError, match="closed"):
        await gw.flush()
    await gw.close()  # closing twice is harmless
    assert fake.delivered_ids() == ["acct-1-0"]


async def test_send_single_lets_kafka_pick_the_partition() -> None:
    fake = FakeProducer()
    async with make(fake) as gw:
        for n, subject in enumerate(["acct-000000", "acct-000001", "acct-000042"]):
            await gw.send_single(req(subject, n))
    assert len(fake.sent) == 3
    for s in fake.sent:
        assert not s.explicit_partition
        assert s.content_type == CONTENT_TYPE_SINGLE
        (event,) = s.events()
        assert s.key == event["subject"].encode()
        # The batching path would have chosen the very same partition.
        assert s.partition == partition_for(event["subject"], 8)
    assert gw.stats.events_acked == 3


async def test_explicit_arguments_override_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TALLY_PRODUCER_MAX_BATCH_EVENTS", "3")
    monkeypatch.setenv("TALLY_EVENTS_TOPIC", "from-env")
    fake = FakeProducer()
    async with Gateway(producer_factory=lambda: fake) as gw:
        assert gw.topic == "from-env"
        for n in range(3):
            await gw.record(req("acct-1", n))
        await settle()
        assert len(fake.sent) == 1
    fake2 = FakeProducer()
    async with Gateway(topic="t", max_batch_events=2, producer_factory=lambda: fake2) as gw:
        for n in range(3):
            await gw.record(req("acct-1", n))
    assert [len(s.events()) for s in fake2.sent] == [2, 1]


async def test_start_failure_is_explained() -> None:
    class Broken(FakeProducer):
        async def partitions_for(self, topic: str) -> set[int]:
            raise ConnectionError("no route to host")

    fake = Broken()
    with pytest.raises(RuntimeError, match="Check that the broker is up"):
        await make(fake).start()
    assert fake.stopped


@pytest.mark.parametrize("name", ["max_batch_events", "max_buffered_events", "max_message_bytes"])
def test_rejects_nonsense_limits(name: str) -> None:
    limits: dict[str, Any] = {name: 0}
    with pytest.raises(ValueError, match="at least 1"):
        Gateway("x:1", "t", settings=ProducerSettings(), **limits)
