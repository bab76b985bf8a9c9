"""Gateway against an in-memory producer: the spool, what happens while Kafka is
unreachable, and after."""

from __future__ import annotations

import asyncio
import os
import signal
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import orjson
import pytest
from aiokafka.errors import (
    KafkaConnectionError,
    MessageSizeTooLargeError,
    OutOfOrderSequenceNumber,
)

from producers import events
from producers.gateway import (
    FlushTimeoutError,
    Gateway,
    GatewaySendError,
    SpoolFullError,
    default_spool_dir,
    install_signal_handlers,
)
from producers.partitioning import partition_for
from producers.settings import ProducerSettings
from producers.spool import SpoolLockedError
from schemas.events import MESSAGE_ADAPTER
from tests.unit.producers.gateway.fakes import (
    TOPIC,
    FakeProducer,
    make,
    per_account_order,
    req,
    settle,
    spool_files,
    wait_for,
)


def test_the_default_spool_is_per_topic_and_client_under_the_data_dir(data_dir: Path) -> None:
    gw = Gateway("x:1", "tally.events", settings=ProducerSettings(), client_id="gw eu/1")
    assert gw.spool_dir == (data_dir / "spool" / "tally.events" / "gw_eu_1").absolute()
    assert default_spool_dir(Path("/d"), "t", None) == Path("/d/spool/t/gateway")
    assert Gateway("x:1", "t", settings=ProducerSettings(), spool=False).spool_dir is None


async def test_kafka_unreachable_spools_then_replays_in_order() -> None:
    fake = FakeProducer()
    subjects = ["acct-1", "acct-000042"]
    async with make(fake, max_batch_events=5) as gw:
        fake.fail_with = KafkaConnectionError("connection refused")
        for n in range(40):
            await gw.record(req(subjects[n % 2], n))
        # Everything recorded is safe: in the spool, none of it waits in memory.
        assert await gw.flush() == 40
        assert gw.spooling
        stats = gw.stats
        assert (stats.events_pending, stats.events_spooled, stats.events_in_spool) == (0, 40, 40)
        assert stats.events_failed == 0
        assert stats.spool_bytes > 0
        assert spool_files(gw)
        # New batches queue behind the spooled ones while Kafka is away.
        for n in range(40, 50):
            await gw.record(req(subjects[n % 2], n))
        assert await gw.flush() == 50

        fake.fail_with = None
        await wait_for(lambda: gw.stats.events_in_spool == 0)
        assert gw.stats.events_replayed == 50
        # Once drained, batches go straight to Kafka again.
        for n in range(50, 60):
            await gw.record(req(subjects[n % 2], n))
        await gw.flush()
        assert not gw.spooling
    acked = fake.acked_ids()
    assert sorted(set(acked)) == sorted(f"{subjects[n % 2]}-{n}" for n in range(60))
    for numbers in per_account_order(acked).values():
        assert numbers == sorted(numbers)
    assert gw.stats.events_acked == 60
    assert spool_files(gw) == []


async def test_unacknowledged_messages_go_to_the_spool_and_are_sent_again() -> None:
    made: list[FakeProducer] = []

    def factory() -> FakeProducer:
        made.append(FakeProducer(auto_ack=bool(made)))  # the first one never answers
        return made[-1]

    gw = Gateway(
        "fake:9092",
        TOPIC,
        settings=ProducerSettings(),
        max_batch_events=5,
        unreachable_after_s=0.2,
        producer_factory=factory,
    )
    async with gw:
        for n in range(25):
            await gw.record(req("acct-1", n))
        await settle()
        assert len(made[0].sent) == 5
        # Nothing acknowledged for unreachable_after_s: the 25 in flight are spooled, the
        # silent producer is dropped, and a new one replays them.
        await wait_for(lambda: gw.stats.events_replayed == 25)
        assert gw.stats.events_spooled == 25
        for n in range(25, 30):
            await gw.record(req("acct-1", n))
    assert made[0].stopped
    assert made[1].acked_ids() == [f"acct-1-{n}" for n in range(30)]
    assert not gw.spooling


async def test_close_spools_slow_messages_yet_takes_their_late_acknowledgements() -> None:
    fake = FakeProducer(auto_ack=False)
    gw = make(fake, max_batch_events=5, unreachable_after_s=60)
    await gw.start()
    for n in range(10):
        await gw.record(req("acct-1", n))
    close = asyncio.create_task(gw.close(timeout=4.0))
    # close() spools what is still unacknowledged a second before its deadline ...
    await wait_for(lambda: gw.stats.events_spooled == 10)
    assert not close.done()
    # ... and while it waits, Kafka acknowledges the original messages after all.
    fake.ack_all()
    assert await close == 0
    assert fake.acked_ids() == [f"acct-1-{n}" for n in range(10)]
    assert gw.stats.events_replayed == 10
    assert len(fake.sent) == 2, "nothing was sent twice"


async def test_a_restarted_gateway_replays_what_its_predecessor_spooled_first() -> None:
    down = FakeProducer()
    down.fail_with = TimeoutError("no broker")
    gw = make(down, max_batch_events=4)
    await gw.start()
    for n in range(10):
        await gw.record(req("acct-1", n))
    assert await gw.close() == 10  # nothing raised: all of it is safe on disk
    assert spool_files(gw)

    up = FakeProducer(auto_ack=False)
    gw2 = make(up, max_batch_events=4)
    await gw2.start()
    assert gw2.stats.events_in_spool == 10
    for n in range(10, 14):
        await gw2.record(req("acct-1", n))
    close = asyncio.create_task(gw2.close())
    while not close.done():
        up.ack_all()
        await asyncio.sleep(0.01)
    assert await close == 0
    assert up.acked_ids() == [f"acct-1-{n}" for n in range(14)]
    assert spool_files(gw2) == []


async def test_policy_reject_refuses_and_counts_when_the_spool_is_full() -> None:
    fake = FakeProducer()
    fake.fail_with = KafkaConnectionError("down")
    gw = make(
        fake,
        max_batch_events=5,
        max_message_bytes=4_096,
        spool_max_bytes=2 * 4_096 + 65_536,
        spool_full_policy="reject",
    )
    await gw.start()

    async def record_until_refused() -> tuple[int, SpoolFullError]:
        for n in range(50_000):
            try:
                await gw.record(req("acct-1", n))
            except SpoolFullError as exc:
                return n, exc
            if n % 5 == 4:
                # Let the sender write to the spool (in a thread) as it would in real life.
                await asyncio.sleep(0.001)
        pytest.fail("the spool never filled up")

    accepted, refused = await record_until_refused()
    assert "NOT recorded" in str(refused)
    assert "is full" in str(refused)
    assert refused.event.id == f"acct-1-{accepted}"
    assert gw.stats.events_rejected_spool_full == 1
    assert gw.stats.events_recorded == accepted
    assert gw.stats.spool_bytes <= 2 * 4_096 + 65_536
    with pytest.raises(SpoolFullError):
        await gw.record(req("acct-1", accepted))
    assert gw.stats.events_rejected_spool_full == 2

    fake.fail_with = None
    await wait_for(lambda: gw.stats.events_in_spool == 0 and gw.stats.events_pending == 0)
    await gw.record(req("acct-1", 99_999))
    await gw.close()
    assert sorted(set(fake.acked_ids())) == sorted(
        [f"acct-1-{n}" for n in range(accepted)] + ["acct-1-99999"]
    )


async def test_policy_block_makes_record_wait_and_loses_nothing() -> None:
    fake = FakeProducer()
    fake.fail_with = KafkaConnectionError("down")
    gw = make(
        fake,
        max_batch_events=5,
        max_buffered_events=50,
        max_message_bytes=4_096,
        spool_max_bytes=2 * 4_096 + 65_536,
    )
    await gw.start()
    done = 0

    async def produce() -> None:
        nonlocal done
        for n in range(2_000):
            await gw.record(req(f"acct-{n % 3}", n))
            done += 1

    task = asyncio.create_task(produce())
    # It waits once the spool is full and memory holds max_buffered_events.
    await wait_for(
        lambda: (
            gw.stats.events_pending == 50 and gw.stats.spool_bytes > 2 * 4_096 + 65_536 - 4 * 4_096
        ),
        seconds=30,
    )
    assert done < 2_000
    assert not task.done()
    assert gw.stats.events_pending == 50
    assert gw.stats.spool_bytes > 2 * 4_096 + 65_536 - 4 * 4_096
    assert gw.stats.events_rejected_spool_full == 0

    fake.fail_with = None
    await asyncio.wait_for(task, 30)
    await gw.close()
    assert sorted(set(fake.acked_ids())) == sorted(f"acct-{n % 3}-{n}" for n in range(2_000))
    for numbers in per_account_order(fake.acked_ids()).values():
        assert numbers == sorted(numbers)


async def test_close_is_bounded_and_spools_when_kafka_hangs(data_dir: Path) -> None:
    fake = FakeProducer(auto_ack=False)
    gw = make(fake, max_batch_events=5, unreachable_after_s=60)
    await gw.start()
    for n in range(12):
        await gw.record(req("acct-1", n))
    # Kafka never answers: close gives up after its timeout (the guard only catches a
    # hang) and spools what was not acknowledged.
    assert await asyncio.wait_for(gw.close(timeout=1.0), 20) == 12
    assert fake.stopped
    assert spool_files(gw)


async def test_without_a_spool_close_reports_what_it_could_not_deliver() -> None:
    fake = FakeProducer(auto_ack=False)
    gw = make(fake, max_batch_events=5, spool=False)
    await gw.start()
    for n in range(7):
        await gw.record(req("acct-1", n))
    with pytest.raises(FlushTimeoutError, match="7 event"):
        await gw.flush(timeout=0.1)
    with pytest.raises(GatewaySendError, match="neither acknowledged") as caught:
        await gw.close(timeout=0.2)
    assert len(caught.value.failed_events) == 7


async def test_a_message_kafka_refuses_for_good_is_not_spooled() -> None:
    fake = FakeProducer()
    fake.fail_with = MessageSizeTooLargeError()
    gw = make(fake, max_batch_events=5)
    await gw.start()
    for n in range(5):
        await gw.record(req("acct-1", n))
    with pytest.raises(GatewaySendError, match="NOT delivered"):
        await gw.flush()
    assert gw.stats.events_spooled == 0
    assert gw.stats.events_failed == 5
    fake.fail_with = None
    await gw.close()


async def test_a_producer_kafka_no_longer_accepts_is_replaced() -> None:
    made: list[FakeProducer] = []

    def factory() -> FakeProducer:
        fake = FakeProducer()
        if not made:
            fake.fail_with = OutOfOrderSequenceNumber()
        made.append(fake)
        return fake

    gw = Gateway(
        "fake:9092",
        TOPIC,
        settings=ProducerSettings(),
        max_batch_events=5,
        producer_factory=factory,
    )
    async with gw:
        for n in range(10):
            await gw.record(req("acct-1", n))
        await wait_for(lambda: gw.stats.events_replayed == 10)
    assert len(made) == 2
    assert made[0].stopped
    assert made[1].acked_ids() == [f"acct-1-{n}" for n in range(10)]


async def test_two_gateways_cannot_share_a_spool() -> None:
    async with make(FakeProducer()) as gw:
        with pytest.raises(SpoolLockedError, match=str(gw.spool_dir)):
            await make(FakeProducer()).start()
        await gw.record(req("acct-1", 0))


async def test_sigterm_flushes_and_closes() -> None:
    fake = FakeProducer()
    gw = make(fake, max_batch_events=100)
    await gw.start()
    stopped_taking: list[bool] = []

    async def before_close() -> None:
        stopped_taking.append(True)

    handle = install_signal_handlers(gw, before_close=before_close)
    try:
        for n in range(7):
            await gw.record(req("acct-1", n))
        os.kill(os.getpid(), signal.SIGTERM)
        assert await asyncio.wait_for(handle.wait(), 10) == 0
    finally:
        handle.remove()
    assert handle.received is signal.SIGTERM
    assert stopped_taking == [True]
    assert fake.acked_ids() == [f"acct-1-{n}" for n in range(7)]
    with pytest.raises(RuntimeError, match="closed"):
        await gw.record(req("acct-1", 7))


async def test_a_spool_replays_into_a_topic_that_gained_partitions() -> None:
    down = FakeProducer(partitions=8)
    down.fail_with = KafkaConnectionError("down")
    gw = make(down, max_batch_events=50)
    await gw.start()
    subjects = [f"acct-{k:06d}" for k in range(40)]
    for n, subject in enumerate(subjects):
        await gw.record(req(subject, n))
    assert await gw.close() == 40

    wider = FakeProducer(partitions=12)
    async with make(wider) as gw2:
        await wait_for(lambda: gw2.stats.events_in_spool == 0)
    assert sorted(wider.acked_ids()) == sorted(f"{s}-{n}" for n, s in enumerate(subjects))
    for sent in wider.sent:
        # Each account lands where record() would place it now.
        assert {partition_for(e["subject"], 12) for e in sent.events()} == {sent.partition}


async def test_a_spooled_message_kafka_refuses_for_good_is_set_aside() -> None:
    down = FakeProducer()
    down.fail_with = KafkaConnectionError("down")
    gw = make(down, max_batch_events=5)
    await gw.start()
    for n in range(5):
        await gw.record(req("acct-1", n))
    assert await gw.close() == 5

    refusing = FakeProducer()
    refusing.fail_with = MessageSizeTooLargeError()
    gw2 = make(refusing, max_batch_events=5)
    await gw2.start()
    await wait_for(lambda: gw2.stats.events_in_spool == 0)
    assert gw2.stats.events_failed == 5
    with pytest.raises(GatewaySendError, match="NOT delivered") as caught:
        await gw2.close()
    assert len(caught.value.failed_events) == 5
    assert gw2.spool_dir is not None
    kept = (gw2.spool_dir / "undeliverable.jsonl").read_bytes().splitlines()
    assert [orjson.loads(line)["id"] for line in kept] == [f"acct-1-{n}" for n in range(5)]


def test_an_empty_spool_dir_is_refused_not_taken_for_the_cwd(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TALLY_PRODUCER_SPOOL_DIR", " ")
    with pytest.raises(ValueError, match="TALLY_PRODUCER_SPOOL=false"):
        ProducerSettings()


async def test_events_only_python_writes_keep_their_place(encoding: str) -> None:
    fake = FakeProducer()
    now = datetime.now(UTC)
    zones = [UTC, timezone(timedelta(hours=2)), UTC, timezone(timedelta(hours=-5)), UTC]
    recorded = [
        events.request("acct-1", "gw-1", id=f"e{n}", time=now.astimezone(zone))
        for n, zone in enumerate(zones)
    ]
    async with make(fake) as gw:
        for event in recorded:
            await gw.record(event)
    (sent,) = fake.sent
    decoded = MESSAGE_ADAPTER.validate_json(sent.value)
    assert isinstance(decoded, list)
    assert [e.id for e in decoded] == [f"e{n}" for n in range(5)]
    assert all(d.time == now for d in decoded)


async def test_an_event_no_json_can_carry_is_refused_where_it_is_recorded(
    encoding: str,
) -> None:
    if encoding != "native":
        pytest.skip("the deferred Python mode meets it only when sealing; flush() reports it")
    fake = FakeProducer()
    bad = events.request("acct-1", "gw-1").model_copy(
        update={"data": events.RequestData.model_construct(units=1.0, bytes_in=2**64)}
    )
    async with make(fake) as gw:
        await gw.record(req("acct-1", 0))
        with pytest.raises(ValueError, match=r"cannot be written as JSON.*not recorded"):
            await gw.record(bad)
        await gw.record(req("acct-1", 1))
        assert gw.stats.events_recorded == 2
    assert fake.delivered_ids() == ["acct-1-0", "acct-1-1"]
