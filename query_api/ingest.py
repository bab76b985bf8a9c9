"""Events over HTTP (docs/api.md#events-over-http): check a request body with the
worker's own rules, and publish what is valid through the gateway library.

One rule set. A body is checked exactly as the worker checks a Kafka message: first
by the native check (native/ `check_events`, the parse and `check` of the worker's
fold), which takes a body only when every event in it is plainly valid and on time;
any other body goes to the Python reference (processors/decode.py over the models of
schemas/events.py), which decides element by element and names each reason with the
dead-letter codes. The limits are the worker's (`WorkerSettings`: event size,
lateness, future), so an event accepted here is one the worker counts, unless it
crosses the lateness bound between the two checks.

A 202 is a promise that the events will be counted: `Publisher.publish` returns only
once Kafka acknowledged every accepted event (the gateway's `deliver`: idempotent
producer, acks=all, batches per partition by murmur2 of the subject). Otherwise the
answer is 503 and nothing is accepted; events of that body may still reach Kafka, so
a client that retries relies on (source, id) deduplication, which counts them once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import orjson

from processors import (
    NATIVE_MAX_EVENT_BYTES,
    Limits,
    WorkerSettings,
    decode_message,
)
from producers.exceptions import FlushTimeoutError, GatewaySendError
from producers.settings import ProducerSettings
from query_api.errors import ApiError
from schemas.settings import TallySettings

if TYPE_CHECKING:
    from producers.gateway import Gateway, ProducerFactory

try:
    from tally_fold import check_events
except ImportError:  # pragma: no cover - a checkout installed without native/
    check_events = None  # type: ignore[assignment]

log = logging.getLogger("tally.api")

SINGLE = "application/cloudevents+json"
BATCH = "application/cloudevents-batch+json"
JSON = "application/json"
CONTENT_TYPES = (SINGLE, BATCH, JSON)
RETRY_AFTER_S = 5
"""What a 503 asks a client to wait: Kafka outages last seconds at least."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A body element that was not accepted: its index and its dead-letter reason."""

    index: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class Checked:
    """What a body holds: the events to publish, each (subject, its JSON), and the
    elements refused, by index."""

    events: list[tuple[str, bytes]]
    rejected: list[Rejected]


def worker_limits(worker: WorkerSettings, max_body_bytes: int) -> Limits:
    """The worker's limits (processors/app.py builds the same), with the message bound
    lifted to the body bound: a body is not a Kafka message, the gateway splits it."""
    return Limits(
        max_message_bytes=max_body_bytes,
        max_event_bytes=worker.max_event_bytes,
        max_future=timedelta(seconds=worker.max_future_s),
        max_lateness=timedelta(seconds=worker.max_lateness_s),
    )


def invalid_body(message: str) -> ApiError:
    return ApiError(400, "invalid_body", message)


def too_many_events(count: int, limit: int) -> ApiError:
    return ApiError(
        413,
        "payload_too_large",
        f"the body holds {count} events, more than {limit} (TALLY_INGEST_MAX_EVENTS); "
        "send them in several requests",
        {"Connection": "close"},
    )


def media_type(content_type: str | None) -> str:
    """The body's media type, one of CONTENT_TYPES; 400 for any other."""
    kind = (content_type or "").partition(";")[0].strip().lower()
    if kind not in CONTENT_TYPES:
        raise invalid_body(
            f"Content-Type {kind or '(none)'!r} is not accepted; send JSON as "
            f"{SINGLE} (one event), {BATCH} (an array) or {JSON} (either)"
        )
    return kind


def check_body(
    raw: bytes, content_type: str | None, now: datetime, limits: Limits, max_events: int
) -> Checked:
    """The events of a body, checked as the worker checks a message.

    Raises ApiError: 400 invalid_body (wrong media type, not JSON, neither an object
    nor an array, an empty array, a shape its media type excludes), 413 for more than
    `max_events` elements. Element-level problems are `Checked.rejected`.
    """
    kind = media_type(content_type)
    if check_events is not None and limits.max_event_bytes >= NATIVE_MAX_EVENT_BYTES:
        lo, hi = limits.on_time_us(now)
        found = check_events(raw, lo, hi, limits.max_event_bytes)
        if found is not None:
            _check_shape(kind, raw.lstrip()[:1] == b"[", len(found), max_events)
            return Checked([(subject, raw[a:b]) for subject, a, b in found], [])
    return _check_slowly(raw, kind, now, limits, max_events)


def _check_shape(kind: str, batch: bool, count: int, max_events: int) -> None:
    if batch and kind == SINGLE:
        raise invalid_body(f"a JSON array is a batch: send it as {BATCH} (or {JSON})")
    if not batch and kind == BATCH:
        raise invalid_body(f"{BATCH} is a JSON array of events; send one event as {SINGLE}")
    if batch and count == 0:
        raise invalid_body("the array is empty; send at least one event")
    if count > max_events:
        raise too_many_events(count, max_events)


def _check_slowly(raw: bytes, kind: str, now: datetime, limits: Limits, max_events: int) -> Checked:
    """The Python reference: processors/decode.py decides, element by element."""
    try:
        doc: Any = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise invalid_body(f"the body is not JSON: {exc}") from None
    if isinstance(doc, dict):
        items: list[Any] = [doc]
    elif isinstance(doc, list):
        items = doc
    else:
        raise invalid_body(
            f"the body is a JSON {type(doc).__name__}; send a CloudEvent object or an array of them"
        )
    _check_shape(kind, isinstance(doc, list), len(items), max_events)
    _, rejections = decode_message(raw, now, limits)
    rejected: dict[int, Rejected] = {}
    for rejection in rejections:
        indexes = range(len(items)) if rejection.index is None else (rejection.index,)
        for index in indexes:
            rejected.setdefault(index, Rejected(index, rejection.reason, rejection.detail))
    events = [
        (item["subject"], orjson.dumps(item))
        for index, item in enumerate(items)
        if index not in rejected
    ]
    return Checked(events, sorted(rejected.values(), key=lambda r: r.index))


def unavailable(reason: str) -> ApiError:
    return ApiError(
        503,
        "unavailable",
        f"Kafka did not take the events ({reason}); none was accepted. Retry after "
        f"Retry-After seconds: re-sent events are counted once, by (source, id)",
        {"Retry-After": str(RETRY_AFTER_S)},
    )


class Publisher:
    """The API's gateway to Kafka, made on first use (a process that never ingests
    opens no producer) and made again after Kafka refused a message: an idempotent
    producer whose sequence Kafka refused does not recover by itself.

    No spool: the HTTP client holds the events until its 202, so the API keeps none
    on disk; a body Kafka does not acknowledge in `timeout_s` is answered 503.
    """

    def __init__(
        self,
        settings: TallySettings,
        producer: ProducerSettings,
        timeout_s: float,
        factory: ProducerFactory | None = None,
        make: Callable[..., Gateway] | None = None,
    ) -> None:
        self._bootstrap = settings.bootstrap
        self._topic = settings.events_topic
        self._producer = producer
        self._factory = factory
        self._make = make
        self.timeout_s = timeout_s
        self._gateway: Gateway | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()

    async def publish(self, events: list[tuple[str, bytes]]) -> None:
        """Return once Kafka acknowledged every event; 503 ApiError otherwise."""
        if not events:
            return
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:
                # Served from another event loop than before (a test client running each
                # request in a loop of its own): the producer and lock are unusable here.
                self._gateway, self._lock = None, asyncio.Lock()
            self._loop = loop
        gateway = self._gateway or await self._open()
        try:
            await gateway.deliver(events, self.timeout_s)
        except FlushTimeoutError:
            raise unavailable(f"no acknowledgement within {self.timeout_s:g}s") from None
        except GatewaySendError as exc:
            await self._discard(gateway)
            raise unavailable(f"a message was refused: {exc.causes[0]!r}") from None
        except RuntimeError as exc:  # closed under us (a discard, or shutting down)
            raise unavailable(str(exc)) from None

    async def _open(self) -> Gateway:
        async with self._lock:
            if self._gateway is not None:
                return self._gateway
            from producers.gateway import Gateway

            make = self._make or Gateway
            gateway = make(
                self._bootstrap,
                self._topic,
                settings=self._producer,
                producer_factory=self._factory,
                spool=False,
                client_id="tally-api-ingest",
            )
            try:
                async with asyncio.timeout(self.timeout_s):
                    await gateway.start()
            except (TimeoutError, RuntimeError, OSError) as exc:
                with contextlib.suppress(Exception):
                    await gateway.close(timeout=1.0)
                raise unavailable(f"cannot connect to {self._bootstrap}: {exc}") from None
            log.info("ingest: producing to %s at %s", self._topic, self._bootstrap)
            self._gateway = gateway
            return gateway

    async def _discard(self, gateway: Gateway) -> None:
        if self._gateway is gateway:
            self._gateway = None
            with contextlib.suppress(Exception):
                await gateway.close(timeout=1.0)

    async def close(self) -> None:
        """Wait (within the gateway's close timeout) for what is in flight; for shutdown.
        Every 202 was answered after its acknowledgement, so nothing promised is here."""
        gateway, self._gateway = self._gateway, None
        if gateway is not None:
            with contextlib.suppress(Exception):
                await gateway.close()


@dataclass(frozen=True, slots=True)
class Ingest:
    """What POST /api/v1/events needs: the worker's limits, the bounds, the publisher."""

    limits: Limits
    max_events: int
    publisher: Publisher
