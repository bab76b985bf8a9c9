"""The gateway's edge to aiokafka: the producer it talks to, how its errors are read,
and how a producer is made, replaced and stopped.

Everything the gateway knows about aiokafka beyond the `KafkaProducer` protocol is in
this module; the rest of the gateway sees a producer that sends and futures that
resolve.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from enum import Enum
from typing import Any, Final, Protocol

from aiokafka import errors as kafka_errors

from producers.exceptions import GatewayStartError
from schemas.kafka import BROKER_MESSAGE_MAX_BYTES, COMPRESSION, REQUEST_OVERHEAD_BYTES

log = logging.getLogger("producers.gateway")

Headers = list[tuple[str, bytes]]


class KafkaProducer(Protocol):
    """The part of aiokafka's AIOKafkaProducer the gateway uses (tests inject fakes)."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def partitions_for(self, topic: str) -> set[int]: ...

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Headers | None = None,
    ) -> asyncio.Future[Any]: ...


ProducerFactory = Callable[[], KafkaProducer]
"""Builds a producer; called inside the running event loop by `Gateway.start`, and again
whenever the gateway replaces a producer whose state Kafka no longer accepts."""


def kafka_producer_factory(
    bootstrap: str, *, max_message_bytes: int, client_id: str | None = None
) -> ProducerFactory:
    """The real producer: idempotent, acks=all, snappy when available."""

    def make() -> KafkaProducer:
        from aiokafka import AIOKafkaProducer

        producer: KafkaProducer = AIOKafkaProducer(
            bootstrap_servers=bootstrap,
            client_id=client_id,
            enable_idempotence=True,
            acks="all",
            compression_type=COMPRESSION,
            # We batch ourselves; aiokafka only has to pack our messages into record
            # batches, each kept under the broker's message.max.bytes.
            linger_ms=0,
            max_batch_size=max(16_384, max_message_bytes),
            max_request_size=max(
                BROKER_MESSAGE_MAX_BYTES, max_message_bytes + REQUEST_OVERHEAD_BYTES
            ),
        )
        return producer

    return make


# -- reading errors ---------------------------------------------------------------


class Fault(Enum):
    RETRY = "Kafka is unreachable, or no longer accepts this producer"
    MESSAGE = "the message can never be delivered"


# Kafka rejects the producer's sequence/epoch after an outage (e.g. a batch that expired
# with sequence numbers assigned): these are cured by a new producer, not by waiting.
_PRODUCER_FAULTS: Final = (
    kafka_errors.OutOfOrderSequenceNumber,
    kafka_errors.ProducerFenced,
    kafka_errors.InvalidProducerEpoch,
    kafka_errors.ProducerClosed,
    kafka_errors.IllegalStateError,
)
_RETRY_ERRORS: Final = (
    *_PRODUCER_FAULTS,
    OSError,
    TimeoutError,
    asyncio.CancelledError,
    kafka_errors.KafkaTimeoutError,
)


def classify(error: BaseException) -> Fault:
    """RETRY: spool the message and send it again through a new producer."""
    if isinstance(error, _RETRY_ERRORS):
        return Fault.RETRY
    if isinstance(error, kafka_errors.KafkaError) and (
        error.retriable or type(error) is kafka_errors.KafkaError
    ):
        # A bare KafkaError is what aiokafka's dead sender task leaves behind.
        return Fault.RETRY
    return Fault.MESSAGE


def future_error(future: asyncio.Future[Any]) -> BaseException | None:
    """What a finished delivery failed with; None: acknowledged."""
    if future.cancelled():
        return asyncio.CancelledError("the delivery was cancelled")
    return future.exception()


def retrieve(future: asyncio.Future[Any]) -> None:
    """Done callback for deliveries nobody awaits (their batch is in the spool), which
    would otherwise each log "Future exception was never retrieved"."""
    if not future.cancelled():
        future.exception()


# -- the producer in use ------------------------------------------------------------


class Link:
    """The gateway's current producer: made at start, abandoned when Kafka stops
    answering (`drop`), made anew once it answers again (`renew`).

    `broken` (no producer) holds from `drop` until `renew` succeeds; nothing is sent
    meanwhile, so nothing waits inside the Kafka client during an outage.
    """

    def __init__(self, factory: ProducerFactory, bootstrap: str, topic: str) -> None:
        self._factory = factory
        self._bootstrap = bootstrap
        self._topic = topic
        self.producer: KafkaProducer | None = None
        self._retired: set[asyncio.Task[None]] = set()

    @property
    def broken(self) -> bool:
        return self.producer is None

    async def connect(self, waiting: str) -> int:
        """Start the first producer; the topic's partition count. `waiting` ends the
        error message (what the spool holds for the next start)."""
        producer = self._factory()
        try:
            await producer.start()
            partitions = await producer.partitions_for(self._topic)
        except Exception as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise GatewayStartError(
                f"cannot produce to topic {self._topic!r} at {self._bootstrap}: {exc!r}.",
                "Check that the broker is up and the topic exists (`tally up` creates it), "
                f"or set TALLY_KAFKA_BOOTSTRAP / TALLY_EVENTS_TOPIC.{waiting}",
            ) from exc
        count = len(partitions or ())
        if count == 0 or set(partitions) != set(range(count)):
            await producer.stop()
            raise GatewayStartError(
                f"topic {self._topic!r} at {self._bootstrap} reports partitions "
                f"{sorted(partitions or ())}; expected 0..n-1.",
                "Check the topic.",
            )
        self.producer = producer
        return count

    def drop(self) -> None:
        """Abandon the producer (what it holds is in the spool); `renew` makes another."""
        old, self.producer = self.producer, None
        if old is not None:
            task = asyncio.get_running_loop().create_task(stop(old, abandon=True, timeout=5.0))
            self._retired.add(task)
            task.add_done_callback(self._retired.discard)

    async def renew(self, *, quiet: bool) -> bool:
        """A new producer once Kafka accepts connections; False while it does not.
        `quiet`: the failure was already logged."""
        new = self._factory()
        try:
            await new.start()
            await new.partitions_for(self._topic)
        except Exception as exc:
            if not quiet:
                log.warning(
                    "cannot reach Kafka at %s yet (%r); the spool waits, trying again",
                    self._bootstrap,
                    exc,
                )
            await stop(new, abandon=True, timeout=2.0)
            return False
        self.producer = new
        log.info("connected to Kafka at %s; replaying the spool", self._bootstrap)
        return True

    async def wait_retired(self) -> None:
        """Until the producers `drop` abandoned have stopped."""
        for task in list(self._retired):
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self, *, abandon: bool, timeout: float) -> None:  # noqa: ASYNC109
        """Stop the producer in use (`abandon`: without waiting for what it holds)."""
        if self.producer is not None:
            await stop(self.producer, abandon=abandon, timeout=timeout)


async def stop(producer: KafkaProducer, *, abandon: bool, timeout: float) -> None:  # noqa: ASYNC109
    """Stop `producer` within `timeout`; `abandon`: fail what it still holds first."""
    if abandon:
        # Kafka is away and what the producer still holds is in the spool: a graceful
        # stop would wait for those messages until Kafka comes back.
        _fail_pending(producer)
    try:
        async with asyncio.timeout(timeout):
            await producer.stop()
    except TimeoutError:
        log.warning("the Kafka producer did not stop within %.1fs; abandoning it", timeout)
        _fail_pending(producer)
        await _force_close(producer)
    except Exception as exc:
        log.warning("stopping the Kafka producer failed: %r", exc)


# -- aiokafka internals ---------------------------------------------------------------
#
# Why: not speed, shutdown. An abandoned producer's stop() first waits until Kafka takes
# every message its accumulator holds, which during an outage is never (the gateway has
# those messages in its spool already). aiokafka 0.14 (requirements.lock) has no public
# way to drop them, so the two functions below use its private attributes:
# AIOKafkaProducer._message_accumulator (its `_batches` dict of deques, `_pending_batches`
# set and `fail_all`; each batch's `future`, `_drain_waiter` and `retry_count`), and
# AIOKafkaProducer._sender.sender_task and .client.
#
# If aiokafka renames or reshapes them, both degrade to doing nothing (getattr with
# defaults, errors suppressed) and nothing is lost, since the spool holds the messages.
# What breaks is timing: each producer abandoned in an outage takes its whole stop
# timeout (5 s; at close, what is left of close_timeout_s) and logs "did not stop
# within"; close() waits for those, so it then takes seconds longer and may run out of
# budget for draining the spool. No test asserts that timing: after an aiokafka upgrade,
# run tests/integration/test_gateway_outage.py and compare the close() time it prints.


def _fail_pending(producer: KafkaProducer) -> None:
    """Resolve what aiokafka's accumulator holds, so that stop() does not wait for Kafka.

    Best effort (other producers, e.g. test fakes, lack these attributes). aiokafka's own
    `fail_all` does the work; around it, the bookkeeping aiokafka's callbacks expect, lest
    they log a KeyError or unretrieved exceptions for every batch.
    """
    accumulator: Any = getattr(producer, "_message_accumulator", None)
    if accumulator is None or not callable(getattr(accumulator, "fail_all", None)):
        return
    error = kafka_errors.KafkaConnectionError(
        "abandoned by the gateway: Kafka was unreachable; the messages are spooled"
    )
    with contextlib.suppress(Exception):
        queued = [b for batches in accumulator._batches.values() for b in batches]
        # A batch sent once and queued again for a retry still has the callback that
        # removes it from _pending_batches when it completes.
        accumulator._pending_batches.update(b for b in queued if b.retry_count > 0)
        batches = [*queued, *accumulator._pending_batches]
        accumulator.fail_all(error)
        for batch in batches:
            for future in (batch.future, batch._drain_waiter):
                if future.done() and not future.cancelled():
                    future.exception()


async def _force_close(producer: KafkaProducer) -> None:
    """A producer whose stop() hung: cancel its sender task, close its connections."""
    sender = getattr(producer, "_sender", None)
    task = getattr(sender, "sender_task", None)
    if isinstance(task, asyncio.Task):
        task.cancel()
    client = getattr(producer, "client", None)
    close = getattr(client, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2.0):
                await close()
