"""Turn one Kafka message value into valid events and rejections (pure, no I/O).

A message holds one CloudEvent or a JSON array of them (docs/api.md#events). Each
rejection keeps the bytes it came from and a machine-readable reason, so the
worker can route it to the dead-letter topic: nothing is dropped silently, and a
bad event in a batch never takes its valid neighbours down with it.

The pydantic models of schemas/events.py are the one Python statement of what is
valid. The worker's fast path is the native fold (native/src/lib.rs `check`): it
accepts a strict subset of what the models accept, with the very values they
produce, and hands every other message to this module, which decides and explains.
tests/unit/processors/test_native.py holds the two to that.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Final, Literal, NamedTuple

import orjson
from pydantic import ValidationError

from schemas.events import (
    EVENT_ADAPTER,
    EVENT_TYPES,
    MAX_COUNT,
    STREAM_OPENED,
    AnyEvent,
    RequestEvent,
    StreamClosedEvent,
)
from schemas.kafka import WORKER_MAX_MESSAGE_BYTES
from schemas.windows import epoch_micros

log = logging.getLogger("tally.worker")

Reason = Literal[
    "malformed_json",
    "not_an_event",
    "empty_batch",
    "oversized",
    "missing_attribute",
    "invalid_attribute",
    "unknown_type",
    "unsupported_specversion",
    "time_in_future",
    "too_late",
    "decode_failed",
]
"""Why a message or an element was rejected, as written into the dead-letter record's
`tally-reason` header (docs/api.md#dead-letter-topic documents each)."""
MALFORMED_JSON: Final[Reason] = "malformed_json"
NOT_AN_EVENT: Final[Reason] = "not_an_event"
EMPTY_BATCH: Final[Reason] = "empty_batch"
OVERSIZED: Final[Reason] = "oversized"
MISSING_ATTRIBUTE: Final[Reason] = "missing_attribute"
INVALID_ATTRIBUTE: Final[Reason] = "invalid_attribute"
UNKNOWN_TYPE: Final[Reason] = "unknown_type"
UNSUPPORTED_SPECVERSION: Final[Reason] = "unsupported_specversion"
TIME_IN_FUTURE: Final[Reason] = "time_in_future"
TOO_LATE: Final[Reason] = "too_late"
DECODE_FAILED: Final[Reason] = "decode_failed"


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: Reason
    detail: str
    raw: bytes
    """The message's bytes, or for one element of a batch, that element re-encoded."""
    index: int | None = None
    """Position in the batch, None when the whole message was rejected."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_bytes: int = WORKER_MAX_MESSAGE_BYTES
    max_event_bytes: int = 64_000
    max_future: timedelta = timedelta(minutes=5)
    max_lateness: timedelta = timedelta(days=35)

    def on_time_us(self, now: datetime) -> tuple[int, int]:
        """The span of event times on time at `now`, in epoch microseconds, as the
        native check takes it (the worker's fold and the API's ingest check alike)."""
        return epoch_micros(now - self.max_lateness), epoch_micros(now + self.max_future)


class Flat(NamedTuple):
    """A valid event as plain values: absent dimensions are '' or 0, `units` is 0.0
    for stream.opened, the measures are 0 where the type has none."""

    source: str
    id: str
    type: str
    subject: str
    time: datetime
    route: str
    method: str
    model: str
    status: int
    stream_id: str
    units: float
    latency_ms: float
    bytes_in: int
    bytes_out: int


def flatten(event: AnyEvent) -> Flat:
    """The values of a validated model, as `decode_flat` gives them."""
    if isinstance(event, RequestEvent):
        d = event.data
        return Flat(event.source, event.id, event.type, event.subject, event.time,
                    d.route or "", d.method or "", d.model or "", d.status or 0, "", d.units,
                    d.latency_ms or 0.0, d.bytes_in or 0, d.bytes_out or 0)  # fmt: skip
    route = getattr(event.data, "route", None) or ""
    model = getattr(event.data, "model", None) or ""
    units = event.data.units if isinstance(event, StreamClosedEvent) else 0.0
    return Flat(event.source, event.id, event.type, event.subject, event.time, route, "",
                model, 0, event.data.stream_id, units, 0.0, 0, 0)  # fmt: skip


def decode_message(
    value: bytes | None, now: datetime, limits: Limits
) -> tuple[list[AnyEvent], list[Rejection]]:
    """Validate a message; return its valid events (in order) and its rejections."""
    try:
        return _decode(value or b"", now, limits)
    except Exception as exc:
        # A message this module cannot take apart is a bug here, never a reason to
        # stop counting every other account: it goes to the dead-letter topic whole,
        # to be replayed once the bug is fixed.
        log.exception("a message could not be decoded; it goes to the dead-letter topic")
        detail = f"Tally could not decode this message ({exc!r}); please report it"
        return [], [Rejection(DECODE_FAILED, detail, value or b"")]


def decode_flat(
    value: bytes | None, now: datetime, limits: Limits
) -> tuple[list[Flat], list[Rejection]]:
    """`decode_message` with each valid event as plain values (`Flat`)."""
    events, rejections = decode_message(value, now, limits)
    return [flatten(event) for event in events], rejections


def _decode(raw: bytes, now: datetime, limits: Limits) -> tuple[list[AnyEvent], list[Rejection]]:
    if len(raw) > limits.max_message_bytes:
        detail = f"message is {len(raw)} bytes, the limit is {limits.max_message_bytes}"
        return [], [Rejection(OVERSIZED, detail, raw)]
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return [], [Rejection(MALFORMED_JSON, f"not valid JSON: {exc}", raw)]
    if isinstance(doc, dict):
        event, rejection = _check(doc, raw, now, limits, None)
        if event is None:
            return [], [rejection] if rejection else []
        return [event], []
    if not isinstance(doc, list):
        detail = f"expected a CloudEvent object or a JSON array of them, got {type(doc).__name__}"
        return [], [Rejection(NOT_AN_EVENT, detail, raw)]
    if not doc:
        return [], [Rejection(EMPTY_BATCH, "a batch must hold at least one event", raw)]
    events: list[AnyEvent] = []
    rejections: list[Rejection] = []
    max_bytes = limits.max_event_bytes
    elements = _Elements(raw)
    for index, item in enumerate(doc):
        if not isinstance(item, dict):
            detail = f"batch element is a {type(item).__name__}, not a CloudEvent object"
            rejections.append(Rejection(NOT_AN_EVENT, detail, elements.original(index), index))
            continue
        size = elements.size(index, item)
        if size > max_bytes:
            detail = f"event is {size} bytes, the limit is {max_bytes}"
            rejections.append(Rejection(OVERSIZED, detail, elements.original(index), index))
            continue
        event, rejection = _check(item, b"", now, limits, index)
        if event:
            events.append(event)
        if rejection:
            rejections.append(replace(rejection, raw=elements.original(index)))
    return events, rejections


# A JSON string, or one of the characters that delimit an element at depth 1.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)


class _Elements:
    """The batch elements of one message as bytes: their size and their original text.

    An element's size is its length as orjson re-encodes it, the measure the native
    fold bounds its by (NATIVE_MAX_EVENT_BYTES). A dead letter carries the
    element's original bytes, whatever they hold: re-encoding would not be them (a
    huge integer becomes a float) and can fail (orjson nests at most 255 deep
    when encoding, 1024 when parsing). Both are computed only when asked for.
    """

    __slots__ = ("_raw", "_spans")

    def __init__(self, raw: bytes) -> None:
        self._raw = raw
        self._spans: list[tuple[int, int]] | None = None

    def size(self, index: int, item: Any) -> int:
        try:
            return len(orjson.dumps(item))
        except orjson.JSONEncodeError:  # nested deeper than orjson encodes
            start, end = self._span(index)
            return end - start

    def original(self, index: int) -> bytes:
        start, end = self._span(index)
        return self._raw[start:end]

    def _span(self, index: int) -> tuple[int, int]:
        if self._spans is None:
            self._spans = _element_spans(self._raw)
        return self._spans[index]


def _element_spans(raw: bytes) -> list[tuple[int, int]]:
    """[start, end) of each element of a JSON array that orjson parsed, blanks trimmed."""
    spans: list[tuple[int, int]] = []
    depth = 0
    start = -1
    for token in _TOKEN.finditer(raw):
        char = raw[token.start()]
        if char == 0x22:  # a string: its brackets and commas are not structure
            continue
        if char in b"[{":
            depth += 1
            if depth == 1:
                start = token.end()
            continue
        if depth == 1:  # "," or the array's "]" closes an element
            spans.append((start, token.start()))
            start = token.end()
        if char in b"]}":
            depth -= 1
    ws = b" \t\r\n"
    return [_trim(raw, s, e, ws) for s, e in spans]


def _trim(raw: bytes, start: int, end: int, ws: bytes) -> tuple[int, int]:
    while start < end and raw[start] in ws:
        start += 1
    while end > start and raw[end - 1] in ws:
        end -= 1
    return start, end


def _check(
    doc: dict[str, Any], raw: bytes, now: datetime, limits: Limits, index: int | None
) -> tuple[AnyEvent | None, Rejection | None]:
    if index is None and len(raw) > limits.max_event_bytes:
        detail = f"event is {len(raw)} bytes, the limit is {limits.max_event_bytes}"
        return None, Rejection(OVERSIZED, detail, raw, index)
    try:
        event = EVENT_ADAPTER.validate_python(doc)
    except ValidationError as exc:
        reason, detail = _explain(doc, exc)
        return None, Rejection(reason, detail, raw, index)
    late = check_time(event.time, now, limits)
    if late:
        return None, Rejection(late[0], late[1], raw, index)
    return event, None


def check_time(time: datetime, now: datetime, limits: Limits) -> tuple[Reason, str] | None:
    """The clock-dependent rules of docs/api.md#validity; None when the time is acceptable."""
    if time > now + limits.max_future:
        return TIME_IN_FUTURE, (
            f"time {time.isoformat()} is more than {limits.max_future} ahead of {now.isoformat()}"
        )
    if time < now - limits.max_lateness:
        return TOO_LATE, (
            f"time {time.isoformat()} is older than the lateness bound of {limits.max_lateness}"
        )
    return None


def _explain(doc: dict[str, Any], exc: ValidationError) -> tuple[Reason, str]:
    if doc.get("specversion") != "1.0" and "specversion" in doc:
        return UNSUPPORTED_SPECVERSION, f'specversion must be "1.0", got {doc["specversion"]!r}'
    kind = doc.get("type")
    if "type" not in doc:
        return MISSING_ATTRIBUTE, "type: required attribute is missing"
    if kind not in EVENT_TYPES:
        return UNKNOWN_TYPE, f"type {kind!r} is not one of {', '.join(EVENT_TYPES)}"
    errors = exc.errors(include_url=False)
    first = errors[0]
    # loc starts with the union tag (the event type); the attribute path follows.
    path = ".".join(str(part) for part in first["loc"][1:]) or "event"
    reason = MISSING_ATTRIBUTE if first["type"] == "missing" else INVALID_ATTRIBUTE
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return reason, f"{path}: {first['msg']}{more}"


def _native_worst_case_bytes() -> int:
    # An element's bytes as the batch path re-encodes it (orjson.dumps of the parsed
    # object), for the longest element the native fold accepts: every string at the
    # longest its `check` allows, of the character orjson writes longest ("\u0001",
    # six bytes), the longest numbers. It refuses unknown attributes.
    ctl = "\x01"
    big_float = 1.2345678901234567e-300
    envelope = {
        "specversion": "1.0",
        "id": ctl * 128,
        "source": ctl * 256,
        "subject": ctl * 128,
        "time": ctl * 32,
        "datacontenttype": ctl * 256,
        "type": STREAM_OPENED,
    }
    label = ctl * 256
    data: list[dict[str, Any]] = [
        {
            "units": big_float,
            "route": label,
            "method": ctl * 16,
            "status": 599,
            "model": label,
            "latency_ms": big_float,
            "bytes_in": MAX_COUNT,
            "bytes_out": MAX_COUNT,
        },
        {"stream_id": label, "route": label, "model": label},
        {"stream_id": label, "units": big_float, "duration_ms": big_float, "reason": label},
    ]
    return max(len(orjson.dumps({**envelope, "data": d})) for d in data)


NATIVE_MAX_EVENT_BYTES = _native_worst_case_bytes()
"""No element the native fold accepts re-encodes longer: the fold is used only when
the event size limit is at least this (the default 64,000 is), so that it never
accepts an element this module would reject as oversized."""
