"""The gateway library: record events, and they reach Kafka batched, in order, at least once.

Events are buffered per partition, the one Kafka's default partitioner picks for
key = subject (docs/api.md#partitioning), and each buffer goes out as one batch message with an
explicit partition, so a batch only ever holds events of its own partition. The
producer is idempotent (acks=all), so broker-side retries never duplicate a
message; consumers deduplicate re-sent events by (source, id).

    async with Gateway("127.0.0.1:9092", "tally.events") as gateway:
        await gateway.record(events.request("acct-1", "gw-eu-1", units=2))

Durability. Metering is billing: an event lost is revenue lost, a duplicate is counted
once. When Kafka leaves a message unacknowledged for `unreachable_after_s`, or fails it
with a connection-type error, the gateway starts *spooling*: the messages not yet
acknowledged, then every new batch, are appended to a bounded disk queue
(`producers.spool`, one directory per gateway process) instead of piling up in memory.
A replay task sends the spool, oldest first, as soon as Kafka answers, and removes
records only once the broker acknowledged them; when the spool is empty, batches go
straight to Kafka again. Per partition, batches keep their recording order through all
of this, except when Kafka fails a message while later ones got through: it is sent again
after them. A gateway started on a spool that a crashed predecessor left behind replays
it first. The producer that stopped answering is abandoned, and a new one made once Kafka
accepts connections, so nothing waits inside the Kafka client during an outage (aiokafka
would retry it in a tight loop while partitions have no leader, and often comes back
with an idempotence state the broker refuses). A message it had in flight may have
reached Kafka all the same: it then arrives twice, and is counted once.

An event is *safe* once Kafka acknowledged it or it is in the spool (fsync'd, with the
default `TALLY_PRODUCER_SPOOL_FSYNC=always`). `flush()` and `close()` wait, within a
timeout, until every recorded event is safe, and return how many events remain in the
spool. Until then an event lives in memory only, and a SIGKILL loses it: at most
`max_buffered_events`, in practice the last linger period, or while Kafka is silent the
last `unreachable_after_s` of traffic. When the spool is full, `record` waits (policy
`block`) or raises SpoolFullError (policy `reject`).

Shutdown: `install_signal_handlers(gateway)` flushes and closes the gateway on SIGTERM and
SIGINT (see there). Without it, a SIGTERM kills the process with the buffers unflushed.

This module is the front door; each job is a module of its own:

    producers.batching      per-partition buffers, the three encodings, linger
    producers.sending       the sender task, in-flight batches
    producers.spooling      spooling batches while Kafka is unreachable
    producers.spool_format  a batch as a spool record
    producers.replay        the spool back to Kafka
    producers.kafka_edge    aiokafka: the producer, its errors, replacing and stopping it
    producers.ledger        the counts (what is safe), and the waits on them
    producers.lifecycle     NEW -> STARTING -> RUNNING -> DRAINING -> CLOSED
    producers.shutdown      close()'s report and errors, signal handlers
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, NoReturn, Self

from producers.batches import Batch, Receipt
from producers.batching import Batcher
from producers.events import batch_encoder, encode_event
from producers.exceptions import (
    FlushTimeoutError,
    GatewaySendError,
    GatewayStartError,
    SpoolFullError,
)
from producers.gateway_config import Overrides, default_spool_dir, resolve
from producers.kafka_edge import (
    Headers,
    KafkaProducer,
    Link,
    ProducerFactory,
    kafka_producer_factory,
)
from producers.ledger import Ledger
from producers.lifecycle import Lifecycle, State
from producers.replay import Replayer
from producers.sending import Sender
from producers.settings import ProducerSettings
from producers.shutdown import (
    ShutdownHandle,
    Where,
    install_signal_handlers,
    raise_failures,
    report_close,
)
from producers.spool import FsyncPolicy
from producers.spooling import Spooler, SpoolFullPolicy
from schemas.events import AnyEvent
from schemas.kafka import COMPRESSION

# An Enum member read through its class costs ~0.1 µs on CPython 3.11, a tenth of what
# record() costs per event: the hot path compares with this alias.
_RUNNING: Final = State.RUNNING

__all__ = [
    "COMPRESSION",
    "FlushTimeoutError",
    "Gateway",
    "GatewaySendError",
    "GatewayStartError",
    "GatewayStats",
    "Headers",
    "KafkaProducer",
    "ProducerFactory",
    "ShutdownHandle",
    "SpoolFullError",
    "SpoolFullPolicy",
    "default_spool_dir",
    "install_signal_handlers",
    "kafka_producer_factory",
]


@dataclass(frozen=True, slots=True)
class GatewayStats:
    events_recorded: int
    """Events accepted by `record` and `send_single`."""
    messages_sent: int
    """Kafka messages handed to the producer (a batch counts once; replays count again)."""
    events_acked: int
    """Events in messages the broker acknowledged, replayed ones included."""
    bytes_sent: int
    """Bytes of message values handed to the producer."""
    events_failed: int = 0
    """Events in messages Kafka refused for good (raised by flush/close)."""
    events_pending: int = 0
    """Events recorded but not yet safe: neither acknowledged, failed nor spooled."""
    events_spooled: int = 0
    """Events written to the spool (since start)."""
    events_replayed: int = 0
    """Events from the spool that the broker acknowledged (since start)."""
    events_in_spool: int = 0
    """Events in the spool now, waiting for Kafka (a predecessor's included)."""
    spool_bytes: int = 0
    """Size of the spool on disk now."""
    events_rejected_spool_full: int = 0
    """`record` calls refused with SpoolFullError (policy `reject`)."""


class Gateway:
    """Batching, partition-aware, backpressured, spooling producer of Tally events.

    Explicit arguments override `settings` (default: `ProducerSettings()` from the
    environment). The topic's partition count is read once at start: events are
    placed as Kafka's default partitioner would place them for that count.
    """

    def __init__(
        self,
        bootstrap: str | None = None,
        topic: str | None = None,
        *,
        settings: ProducerSettings | None = None,
        max_batch_events: int | None = None,
        linger_ms: float | None = None,
        max_buffered_events: int | None = None,
        max_message_bytes: int | None = None,
        client_id: str | None = None,
        producer_factory: ProducerFactory | None = None,
        spool: bool | None = None,
        spool_dir: Path | str | None = None,
        spool_max_bytes: int | None = None,
        spool_full_policy: SpoolFullPolicy | None = None,
        spool_fsync: FsyncPolicy | None = None,
        unreachable_after_s: float | None = None,
        close_timeout_s: float | None = None,
    ) -> None:
        overrides = Overrides(
            max_batch_events=max_batch_events,
            linger_ms=linger_ms,
            max_buffered_events=max_buffered_events,
            max_message_bytes=max_message_bytes,
            client_id=client_id,
            producer_factory=producer_factory,
            spool=spool,
            spool_dir=spool_dir,
            spool_max_bytes=spool_max_bytes,
            spool_full_policy=spool_full_policy,
            spool_fsync=spool_fsync,
            unreachable_after_s=unreachable_after_s,
            close_timeout_s=close_timeout_s,
        )
        config = resolve(bootstrap, topic, settings or ProducerSettings(), overrides)
        self._config: Final = config
        self.bootstrap: Final = config.bootstrap
        self.topic: Final = config.topic
        self.spool_dir: Final[Path | None] = (
            config.spool.directory if config.spool is not None else None
        )
        """Where batches wait while Kafka is unreachable; None: spooling is off."""
        self._max_buffered: Final = config.max_buffered
        self._lifecycle = Lifecycle()
        self._ledger = Ledger(config.topic, config.resume_at)
        self._link = Link(config.factory, config.bootstrap, config.topic)
        self._sender = Sender(self._ledger, self._link, config.topic)
        self._batcher = Batcher(
            self._ledger,
            self._sender.enqueue,
            max_batch=config.max_batch,
            max_bytes=config.max_bytes,
            linger_s=config.linger_s,
        )
        self._spooler: Spooler | None = None
        self._replayer: Replayer | None = None
        if config.spool is not None:
            self._spooler = Spooler(
                config.spool, self._ledger, self._sender, self._link, config.bootstrap
            )
            self._sender.diversion = self._spooler
            self._replayer = Replayer(self._spooler, self._ledger, self._link, config.bootstrap)
        self._tasks: list[asyncio.Task[None]] = []

    # -- lifecycle -------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Open the spool, connect, learn the topic's partitions. Called by `async with`.

        A spool left non-empty by an earlier process is replayed before anything
        recorded now. Raises SpoolLockedError when another process uses the spool.
        """
        state = self._lifecycle.state
        if state is not State.NEW:
            raise RuntimeError(f"Gateway is {state.value}; a Gateway can be started only once")
        self._lifecycle.move(State.STARTING)
        try:
            await self._open()
        except BaseException:
            self._lifecycle.move(State.NEW)
            raise
        self._lifecycle.move(State.RUNNING)

    async def _open(self) -> None:
        spooler = self._spooler
        if spooler is not None:
            await spooler.open()
        try:
            waiting = (
                f" {spooler.events} spooled event(s) wait in {self.spool_dir} for the next start."
                if spooler is not None and spooler.events
                else ""
            )
            partitions = await self._link.connect(waiting)
        except BaseException:
            if spooler is not None:
                await spooler.close()
            raise
        # Looked up here, in this module, at each start: tests swap it for the Python modes.
        self._batcher.open(partitions, batch_encoder(partitions, self._config.max_bytes))
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._sender.run(), name=f"tally-gateway-sender-{self.topic}"),
            loop.create_task(self._batcher.linger(), name=f"tally-gateway-linger-{self.topic}"),
        ]
        if spooler is not None:
            assert self._replayer is not None
            spooler.partitions = partitions
            self._tasks += [
                loop.create_task(spooler.watchdog(), name=f"tally-gateway-watchdog-{self.topic}"),
                loop.create_task(self._replayer.run(), name=f"tally-gateway-replay-{self.topic}"),
            ]
            spooler.replay_leftovers()

    # `timeout` bounds waiting for acknowledgements *and* spooling what is left when it
    # runs out, which an outer asyncio.timeout could only cancel (hence ASYNC109).
    async def close(self, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Make every recorded event safe, then disconnect; returns the events left spooled.

        Waits up to `timeout` seconds (default `close_timeout_s`) for buffered events to be
        acknowledged by Kafka or written to the spool, then, while Kafka keeps taking
        them, for the spool to drain. What stays in the spool is replayed by the next
        Gateway started on the same spool directory. Raises GatewaySendError for events
        Kafka refused for good, and for events that were neither acknowledged nor spooled
        in time (no spool, or a full one): those may be lost.
        """
        lifecycle = self._lifecycle
        if lifecycle.state is State.DRAINING:
            # A second caller (a signal handler and `async with`, say) waits for the first.
            await lifecycle.closed.wait()
        if lifecycle.state is State.CLOSED:
            return self._left_in_spool
        if lifecycle.state is State.NEW:
            lifecycle.move(State.CLOSED)
            return 0
        if lifecycle.state is State.STARTING:
            raise RuntimeError("Gateway is starting: close it once start() has returned")
        lifecycle.move(State.DRAINING)
        loop = asyncio.get_running_loop()
        budget = self._config.close_timeout_s if timeout is None else timeout
        deadline = loop.time() + budget
        unsafe: list[bytes] = []
        try:
            await self._drain(deadline, budget)
        finally:
            unsafe = await self._disconnect(deadline)
        spooler = self._spooler
        report_close(
            self._where,
            self._left_in_spool,
            spooler.disk_bytes if spooler is not None else 0,
            f"{self._ledger.recorded} event(s) recorded, {self._ledger.acked} acknowledged "
            f"by Kafka, {len(unsafe)} not safe",
        )
        raise_failures(self._where, self._ledger.take_failures(), unsafe, budget)
        return self._left_in_spool

    async def _drain(self, deadline: float, budget: float) -> None:
        """close(): every event safe by `deadline`, spooling what Kafka did not take by
        then; then the spool drained while Kafka takes it."""
        # Keep a little of the budget to spool what Kafka did not take by then.
        safe = await self._wait_safe(deadline - min(2.0, budget / 4))
        if not safe and self._spooler is not None:
            self._spooler.begin("the gateway is closing", renew=False)
            safe = await self._wait_safe(deadline)
        if safe and self._replayer is not None:
            await self._replayer.wait_drained(deadline)

    async def _disconnect(self, deadline: float) -> list[bytes]:
        """close(): stop the tasks and the producer, close the spool; the events that
        are not safe."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._link.wait_retired()
        unsafe = self._sender.unsent_events() + self._batcher.unsealed_events()
        remaining = max(deadline - asyncio.get_running_loop().time(), 2.0)
        spooler = self._spooler
        try:
            await self._link.close(abandon=self.spooling, timeout=remaining)
            if spooler is not None:
                await spooler.close()
        finally:
            self._lifecycle.move(State.CLOSED)
            # record() calls waiting for room wake up to learn that the gateway closed.
            self._ledger.room.set()
        return unsafe

    async def flush(self, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Send everything buffered; wait until each event is acknowledged or spooled.

        Returns the number of events in the spool, waiting for Kafka. Raises
        GatewaySendError (once) for every message Kafka refused for good since the last
        flush; the events in it were not delivered and may be recorded again. Raises
        FlushTimeoutError after `timeout` seconds (default `close_timeout_s`); the events
        are then still buffered and still being sent.
        """
        if self._lifecycle.state is not State.RUNNING:
            self._refuse()
        loop = asyncio.get_running_loop()
        budget = self._config.close_timeout_s if timeout is None else timeout
        if not await self._wait_safe(loop.time() + budget):
            raise_failures(self._where, self._ledger.take_failures())
            unacked = self._ledger.unacked
            raise FlushTimeoutError(
                f"{unacked} event(s) for topic {self.topic!r} were neither acknowledged "
                f"by Kafka at {self.bootstrap} nor spooled within {budget:.1f}s; they are "
                "still buffered and being sent. Check the broker; with the spool disabled "
                "(TALLY_PRODUCER_SPOOL=false) they wait in memory until Kafka answers.",
                unacked,
            )
        raise_failures(self._where, self._ledger.take_failures())
        return self._spooler.events if self._spooler is not None else 0

    @property
    def partitions(self) -> int:
        """The topic's partition count, known once started (0 before)."""
        return self._batcher.partitions

    @property
    def spooling(self) -> bool:
        """Whether batches currently go to the spool (Kafka unreachable, or replaying)."""
        return self._spooler is not None and self._spooler.spooling

    @property
    def stats(self) -> GatewayStats:
        ledger, spooler = self._ledger, self._spooler
        return GatewayStats(
            events_recorded=ledger.recorded,
            messages_sent=ledger.messages,
            events_acked=ledger.acked,
            bytes_sent=ledger.bytes_sent,
            events_failed=ledger.failed,
            events_pending=ledger.unacked,
            events_spooled=ledger.spooled,
            events_replayed=ledger.replayed,
            events_in_spool=spooler.events if spooler is not None else 0,
            spool_bytes=spooler.disk_bytes if spooler is not None else 0,
            events_rejected_spool_full=ledger.rejected,
        )

    # -- recording -------------------------------------------------------------

    async def record(self, event: AnyEvent) -> None:
        """Buffer `event` for its account's partition; waits while the buffer is full.

        Raises ValueError for an event too large for any message (or, with the native
        encoder, one built without validation that no JSON can carry), RuntimeError when
        the gateway is not open, SpoolFullError when Kafka is unreachable, the spool is
        full and the policy is `reject`. Delivery failures are raised by `flush`/`close`.
        """
        ledger = self._ledger
        if (
            self._lifecycle.state is not _RUNNING
            or ledger.spool_full
            or ledger.unacked >= self._max_buffered
        ):
            await self._admit(event)
        if self._batcher.add(event):
            # A tight loop of record() never yields otherwise; let the sender run.
            await asyncio.sleep(0)

    async def send_single(self, event: AnyEvent) -> None:
        """Send `event` alone, keyed by subject, placed by Kafka's own partitioner.

        What a minimal gateway in another language does; acknowledged by `flush`.
        """
        await self._admit(event)
        ledger = self._ledger
        ledger.recorded += 1
        ledger.unacked += 1
        self._sender.enqueue(Batch(None, event.subject.encode(), [encode_event(event)]))

    async def deliver(self, events: Sequence[tuple[str, bytes]], timeout: float) -> None:  # noqa: ASYNC109
        """Send encoded events, each (subject, its JSON), and return once Kafka
        acknowledged every one of them: for a server that promises, by answering, that
        its events will be counted (query_api/ingest.py).

        They are batched and placed as `record` places events, with everybody else's.
        Raises GatewaySendError when Kafka refused a message holding some of them, and
        FlushTimeoutError when they were not all acknowledged within `timeout` seconds
        (room in the buffer included); either way some may still reach Kafka, so a
        caller that tells its client "not accepted" relies on (source, id)
        deduplication for the retry. Only for a gateway without a spool: a spooled event
        is safe, but not acknowledged (RuntimeError otherwise).
        """
        if self._spooler is not None:
            raise RuntimeError("deliver() needs a Gateway without a spool (spool=False)")
        if self._lifecycle.state is not _RUNNING:
            self._refuse()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        ledger = self._ledger
        while ledger.unacked >= self._max_buffered:
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise FlushTimeoutError("no room in the gateway's buffer", ledger.unacked)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(remaining):
                    await self._wait_for_room()
        receipt = Receipt(loop)
        self._batcher.add_raws(events, receipt)
        if receipt.pending == 0:
            return
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0.0)):
                error = await asyncio.shield(receipt.done)
        except TimeoutError:
            raise FlushTimeoutError(
                f"Kafka at {self.bootstrap} did not acknowledge the events within {timeout}s",
                ledger.unacked,
            ) from None
        if error is not None:
            raise GatewaySendError(
                f"Kafka at {self.bootstrap} refused a message of these events: {error!r}",
                (),
                (error,),
            )

    # -- internals ---------------------------------------------------------------

    @property
    def _where(self) -> Where:
        return Where(self.topic, self.bootstrap, self.spool_dir, self._spooler is not None)

    @property
    def _left_in_spool(self) -> int:
        return self._spooler.left if self._spooler is not None else 0

    async def _admit(self, event: AnyEvent) -> None:
        """Return once the gateway may take `event`: it is running and its buffer has
        room (waiting for that). Raises RuntimeError when it is not running, and
        SpoolFullError when the spool is full and the policy is `reject`."""
        if self._lifecycle.state is not _RUNNING:
            self._refuse()
        ledger = self._ledger
        if ledger.spool_full:
            self._maybe_reject(event)
        while ledger.unacked >= self._max_buffered:
            await self._wait_for_room()
            if ledger.spool_full:
                self._maybe_reject(event)

    def _refuse(self) -> NoReturn:
        state = self._lifecycle.state
        if state is State.NEW or state is State.STARTING:
            raise RuntimeError(
                "Gateway is not started: use `async with Gateway(...) as gw` "
                "or `await gw.start()` first"
            )
        raise RuntimeError(
            f"Gateway is {state.value}: it records nothing more; start a new Gateway to "
            "record more events"
        )

    def _maybe_reject(self, event: AnyEvent) -> None:
        spooler = self._spooler
        if spooler is None or spooler.config.full_policy != "reject":
            return
        self._ledger.rejected += 1
        raise SpoolFullError(
            f"event {event.id!r} of {event.subject!r} was NOT recorded: Kafka at "
            f"{self.bootstrap} is unreachable and the spool {self.spool_dir} is full "
            f"({spooler.disk_bytes} of {spooler.config.max_bytes} bytes). Keep the event and "
            "retry later, or fail the request; TALLY_PRODUCER_SPOOL_MAX_BYTES sets the bound "
            "and TALLY_PRODUCER_SPOOL_FULL_POLICY=block makes record() wait instead.",
            event,
        )

    async def _wait_for_room(self) -> None:
        self._batcher.seal_for_room()
        room = self._ledger.room
        room.clear()
        await room.wait()
        if self._lifecycle.state is not State.RUNNING:
            self._refuse()

    async def _wait_safe(self, deadline: float) -> bool:
        """Until every recorded event is acknowledged, failed or spooled; False at deadline."""
        self._batcher.seal_all()
        return await self._ledger.wait_safe(deadline)
