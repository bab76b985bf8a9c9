"""What travels between the gateway's parts: a batch (one Kafka message's events), a
batch waiting for the sender, a batch Kafka has not acknowledged yet, and the message
a batch becomes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Final

import orjson

from producers.kafka_edge import Headers
from schemas.events import CONTENT_TYPE_BATCH, CONTENT_TYPE_SINGLE

SINGLE_HEADERS: Final[Headers] = [("content-type", CONTENT_TYPE_SINGLE.encode())]
BATCH_HEADERS: Final[Headers] = [("content-type", CONTENT_TYPE_BATCH.encode())]


class Receipt:
    """Tells one `Gateway.deliver` call when every message holding its events settled.

    `pending` counts the batches (sealed or still buffering) that hold some of its
    events; each settles once, acknowledged or refused. `done` gets None once all were
    acknowledged, or the first refusal's error: never an exception set on the future,
    so a caller that stopped waiting (a timeout) leaves nothing unretrieved behind.
    """

    __slots__ = ("done", "pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.done: asyncio.Future[BaseException | None] = loop.create_future()
        self.pending = 0

    def settle(self, error: BaseException | None) -> None:
        if self.done.done():
            return
        if error is not None:
            self.done.set_result(error)
            return
        self.pending -= 1
        if self.pending == 0:
            self.done.set_result(None)


class Batch:
    """One message's events: encoded one by one, or as the whole message `value`."""

    __slots__ = ("_events", "count_hint", "key", "partition", "receipts", "value")

    def __init__(
        self,
        partition: int | None,
        key: bytes,
        events: list[bytes] | None = None,
        *,
        value: bytes | None = None,
        count: int = 0,
        receipts: list[Receipt] | None = None,
    ) -> None:
        self.partition = partition
        """None: Kafka's partitioner places it by key (`send_single`)."""
        self.key = key
        self._events = events
        self.value = value
        """The batch message, encoded in one go; None: join `events`."""
        self.count_hint = count
        self.receipts = receipts
        """The `deliver` calls waiting for this message; None: nobody waits."""

    @property
    def events(self) -> list[bytes]:
        """Each event's JSON, as the spool and GatewaySendError hold them."""
        if self._events is None:
            # Only off the hot path (spooling, failures): an orjson round trip gives back
            # each element's bytes exactly as they are in `value`.
            assert self.value is not None
            self._events = [orjson.dumps(doc) for doc in orjson.loads(self.value)]
        return self._events

    @property
    def count(self) -> int:
        return len(self._events) if self._events is not None else self.count_hint


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A batch waiting for the sender."""

    batch: Batch
    original: asyncio.Future[Any] | None = None
    """The delivery of an earlier direct send of this very batch, still in the producer:
    the spooled copy is only sent again if that one fails."""


@dataclass(frozen=True, slots=True)
class InFlight:
    """A batch the producer took, awaiting Kafka's acknowledgement."""

    batch: Batch
    since: float


@dataclass(frozen=True, slots=True)
class Message:
    value: bytes
    headers: Headers


def message(batch: Batch) -> Message:
    """The Kafka message for `batch`: a lone event as itself, more as a JSON array."""
    if batch.value is not None:
        return Message(batch.value, BATCH_HEADERS)
    if len(batch.events) == 1:
        return Message(batch.events[0], SINGLE_HEADERS)
    return Message(b"[" + b",".join(batch.events) + b"]", BATCH_HEADERS)
