"""Turn one Kafka message value into valid events and rejections (pure, no I/O).

A message holds one CloudEvent or a JSON array of them (docs/api.md#events). Each
rejection keeps the bytes it came from and a machine-readable reason, so the
worker can route it to the dead-letter topic: nothing is dropped silently, and a
bad event in a batch never takes its valid neighbours down with it.

The worker's hot path is `decode_flat`: it checks the common, plainly valid event
by hand, without building a pydantic model (validation ~2.5x cheaper, see
benchmarks/NOTES.md), and hands everything else, valid or not, to the models,
which have the last word. The hand check may only accept what the models accept,
with the very values they would produce; when unsure it declines, and the models
decide (and explain any rejection) as before. tests/unit/processors/
test_decode_flat.py holds the two paths to that.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec
import orjson
from msgspec import Meta, Struct
from pydantic import ValidationError

from schemas.events import (
    EVENT_ADAPTER,
    EVENT_TYPES,
    MAX_COUNT,
    MAX_UNITS,
    REQUEST,
    STREAM_CLOSED,
    STREAM_OPENED,
    SUBJECT_PATTERN,
    RequestEvent,
    StreamClosedEvent,
    StreamOpenedEvent,
    parse_rfc3339,
)

AnyEvent = RequestEvent | StreamOpenedEvent | StreamClosedEvent

log = logging.getLogger("tally.worker")

# Reasons, as written into the dead-letter record's `tally-reason` header.
MALFORMED_JSON = "malformed_json"
NOT_AN_EVENT = "not_an_event"
EMPTY_BATCH = "empty_batch"
OVERSIZED = "oversized"
MISSING_ATTRIBUTE = "missing_attribute"
INVALID_ATTRIBUTE = "invalid_attribute"
UNKNOWN_TYPE = "unknown_type"
UNSUPPORTED_SPECVERSION = "unsupported_specversion"
TIME_IN_FUTURE = "time_in_future"
TOO_LATE = "too_late"
DECODE_FAILED = "decode_failed"
REASONS = (
    MALFORMED_JSON,
    NOT_AN_EVENT,
    EMPTY_BATCH,
    OVERSIZED,
    MISSING_ATTRIBUTE,
    INVALID_ATTRIBUTE,
    UNKNOWN_TYPE,
    UNSUPPORTED_SPECVERSION,
    TIME_IN_FUTURE,
    TOO_LATE,
    DECODE_FAILED,
)


@dataclass(frozen=True, slots=True)
class Rejection:
    reason: str
    detail: str
    raw: bytes
    """The message's bytes, or for one element of a batch, that element re-encoded."""
    index: int | None = None
    """Position in the batch, None when the whole message was rejected."""


@dataclass(frozen=True, slots=True)
class Limits:
    max_message_bytes: int = 1_000_000
    max_event_bytes: int = 64_000
    max_future: timedelta = timedelta(minutes=5)
    max_lateness: timedelta = timedelta(days=35)


Flat = tuple[str, str, str, str, datetime, str, str, str, int, str, float, float, int, int]
"""A valid event as plain values: (source, id, type, subject, time, route, method,
model, status, stream_id, units, latency_ms, bytes_in, bytes_out). Absent
dimensions are '' or 0; `units` is 0.0 for stream.opened; the measures are 0
where the type has none."""


def flatten(event: AnyEvent) -> Flat:
    """The values of a validated model, as `decode_flat` gives them."""
    if isinstance(event, RequestEvent):
        d = event.data
        return (
            event.source,
            event.id,
            event.type,
            event.subject,
            event.time,
            d.route or "",
            d.method or "",
            d.model or "",
            d.status or 0,
            "",
            d.units,
            d.latency_ms or 0.0,
            d.bytes_in or 0,
            d.bytes_out or 0,
        )
    route = getattr(event.data, "route", None) or ""
    model = getattr(event.data, "model", None) or ""
    units = event.data.units if isinstance(event, StreamClosedEvent) else 0.0
    return (
        event.source,
        event.id,
        event.type,
        event.subject,
        event.time,
        route,
        "",
        model,
        0,
        event.data.stream_id,
        units,
        0.0,
        0,
        0,
    )


def decode_message(
    value: bytes | None, now: datetime, limits: Limits
) -> tuple[list[AnyEvent], list[Rejection]]:
    """Validate a message; return its valid events (in order) and its rejections."""
    return _decode(value, now, limits, flat=False)


def decode_flat(
    value: bytes | None, now: datetime, limits: Limits
) -> tuple[list[Flat], list[Rejection]]:
    """`decode_message` with each valid event as plain values (the worker's hot path)."""
    return _decode(value, now, limits, flat=True)


def _decode(
    value: bytes | None, now: datetime, limits: Limits, flat: bool
) -> tuple[list[Any], list[Rejection]]:
    # One body for both shapes (events are models, or Flat values when `flat`), so
    # the rules for messages and batches cannot drift apart.
    try:
        return _decode_checked(value or b"", now, limits, flat)
    except Exception as exc:
        # A message this module cannot take apart is a bug here, never a reason to
        # stop counting every other account: it goes to the dead-letter topic whole,
        # to be replayed once the bug is fixed.
        log.exception("a message could not be decoded; it goes to the dead-letter topic")
        raw = value or b""
        detail = f"Tally could not decode this message ({exc!r}); please report it"
        return [], [Rejection(DECODE_FAILED, detail, raw)]


def _decode_checked(
    raw: bytes, now: datetime, limits: Limits, flat: bool
) -> tuple[list[Any], list[Rejection]]:
    if len(raw) > limits.max_message_bytes:
        detail = f"message is {len(raw)} bytes, the limit is {limits.max_message_bytes}"
        return [], [Rejection(OVERSIZED, detail, raw)]
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return [], [Rejection(MALFORMED_JSON, f"not valid JSON: {exc}", raw)]
    if isinstance(doc, dict):
        if flat and len(raw) <= limits.max_event_bytes:
            fast = _fast(doc, now - limits.max_lateness, now + limits.max_future)
            if fast is not None:
                return [fast], []
        event, rejection = _check(doc, raw, now, limits, None)
        if event is None:
            return [], [rejection] if rejection else []
        return [flatten(event) if flat else event], []
    if not isinstance(doc, list):
        detail = f"expected a CloudEvent object or a JSON array of them, got {type(doc).__name__}"
        return [], [Rejection(NOT_AN_EVENT, detail, raw)]
    if not doc:
        return [], [Rejection(EMPTY_BATCH, "a batch must hold at least one event", raw)]
    events: list[Any] = []
    rejections: list[Rejection] = []
    lo, hi = now - limits.max_lateness, now + limits.max_future
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
        if flat:
            fast = _fast(item, lo, hi)
            if fast is not None:
                events.append(fast)
                continue
        event, rejection = _check(item, b"", now, limits, index)
        if event:
            events.append(flatten(event) if flat else event)
        if rejection:
            rejections.append(replace(rejection, raw=elements.original(index)))
    return events, rejections


# A JSON string, or one of the characters that delimit an element at depth 1.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"|[\[\]{},]', re.DOTALL)


class _Elements:
    """The batch elements of one message as bytes: their size and their original text.

    An element's size is its length as orjson re-encodes it, the measure the native
    tiers bound theirs by (NATIVE_MAX_EVENT_BYTES). A dead letter carries the
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


# The hand check mirrors schemas/events.py field by field; keep them in step (the
# unit tests compare both on valid and invalid input). fullmatch, not `$`: Python's
# `$` would let a trailing newline through, the models' (Rust) regex does not.
_SUBJECT = re.compile(SUBJECT_PATTERN.removeprefix("^").removesuffix("$"))
_EXACT_INT = 2**53  # larger ints become floats inexactly: leave them to the models


def _label(value: Any, longest: int) -> bool:
    """None, or a str of 1..longest characters (the models' optional labels)."""
    return value is None or (type(value) is str and 0 < len(value) <= longest)


def _number(value: Any) -> float | None:
    """A `Units` value (strict float in [0, MAX_UNITS]; ints become floats), else None."""
    kind = type(value)
    if kind is float or (kind is int and value < _EXACT_INT):
        return float(value) if 0 <= value <= MAX_UNITS else None
    return None


def _count(value: Any) -> bool:
    """None, or a `NonNegInt` (strict int in [0, MAX_COUNT])."""
    return value is None or (type(value) is int and 0 <= value <= MAX_COUNT)


def _fast(doc: dict[str, Any], lo: datetime, hi: datetime) -> Flat | None:
    """The event's values when it is plainly valid and on time, else None (ask the models)."""
    get = doc.get
    ident, source, subject, when = get("id"), get("source"), get("subject"), get("time")
    if (
        get("specversion") != "1.0"
        or type(ident) is not str
        or not 0 < len(ident) <= 128
        or type(source) is not str
        or not 0 < len(source) <= 256
        or type(subject) is not str
        or _SUBJECT.fullmatch(subject) is None
        or type(when) is not str
    ):
        return None
    kind = get("type")
    content_type = get("datacontenttype")
    if content_type is not None and type(content_type) is not str:
        return None
    try:
        time = parse_rfc3339(when)
    except ValueError:
        return None
    if not lo <= time <= hi:
        return None
    data = get("data", _ABSENT)
    if kind == REQUEST:
        if data is _ABSENT:
            return (source, ident, kind, subject, time, "", "", "", 0, "", 1.0, 0.0, 0, 0)
        if type(data) is not dict:
            return None
        d = data.get
        units = _number(d("units", 1.0))
        latency = d("latency_ms")
        route, method, model = d("route"), d("method"), d("model")
        status, bytes_in, bytes_out = d("status"), d("bytes_in"), d("bytes_out")
        if (
            units is None
            or (latency is not None and (latency := _number(latency)) is None)
            or not _label(route, 256)
            or not _label(method, 16)
            or not _label(model, 256)
            or not (status is None or (type(status) is int and 100 <= status <= 599))
            or not _count(bytes_in)
            or not _count(bytes_out)
        ):
            return None
        return (
            source,
            ident,
            kind,
            subject,
            time,
            route or "",
            method or "",
            model or "",
            status or 0,
            "",
            units,
            latency or 0.0,
            bytes_in or 0,
            bytes_out or 0,
        )
    if type(data) is not dict:
        return None
    stream_id = data.get("stream_id")
    if type(stream_id) is not str or not 0 < len(stream_id) <= 256:
        return None
    if kind == STREAM_OPENED:
        route, model = data.get("route"), data.get("model")
        if not _label(route, 256) or not _label(model, 256):
            return None
        return (source, ident, kind, subject, time, route or "", "", model or "", 0,
                stream_id, 0.0, 0.0, 0, 0)  # fmt: skip
    if kind == STREAM_CLOSED:
        units = _number(data.get("units", 0.0))
        duration, reason = data.get("duration_ms"), data.get("reason")
        if (
            units is None
            or (duration is not None and _number(duration) is None)
            or not (reason is None or (type(reason) is str and len(reason) <= 256))
        ):
            return None
        return (source, ident, kind, subject, time, "", "", "", 0, stream_id, units, 0.0, 0, 0)
    return None


_ABSENT: Any = object()


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


def check_time(time: datetime, now: datetime, limits: Limits) -> tuple[str, str] | None:
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


def _explain(doc: dict[str, Any], exc: ValidationError) -> tuple[str, str]:
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


# The native path: a whole message decoded and validated in C (msgspec) into
# Structs, for the worker's common case. It is never looser than the models, only
# ever stricter: the Structs mirror schemas/events.py but forbid unknown attributes
# (so msgspec parses, and validates, every byte of the message: orjson rejects
# invalid UTF-8 or out-of-range numbers that a skipped value would let through, and
# the element size below has a fixed bound), take `time` in its canonical RFC 3339
# forms only, and bound ints and floats to what orjson reads as such. Anything it
# does not accept, the message goes to `decode_flat` whole, which decides and
# explains exactly as before. tests/unit/processors/test_decode_native.py holds the
# two paths to that.
_NativeUnits = Annotated[float, Meta(ge=0, le=MAX_UNITS)]
_NativeLabel = Annotated[str, Meta(min_length=1, max_length=256)]
_NativeCount = Annotated[int, Meta(ge=0, le=MAX_COUNT)]
_NativeId = Annotated[str, Meta(min_length=1, max_length=128)]
_NativeSource = Annotated[str, Meta(min_length=1, max_length=256)]
# Subject and time are checked per message in one regex call each (`decode_native`);
# here only bounded, so that an element's encoded size is bounded.
_NativeSubject = Annotated[str, Meta(min_length=1, max_length=128)]
_NativeTime = Annotated[str, Meta(max_length=32)]
_NativeContentType = Annotated[str, Meta(max_length=256)]  # the models: any str


class NativeRequestData(Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    units: _NativeUnits = 1.0
    route: _NativeLabel | None = None
    method: Annotated[str, Meta(min_length=1, max_length=16)] | None = None
    status: Annotated[int, Meta(ge=100, le=599)] | None = None
    model: _NativeLabel | None = None
    latency_ms: _NativeUnits | None = None
    bytes_in: _NativeCount | None = None
    bytes_out: _NativeCount | None = None


class NativeStreamOpenedData(Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    stream_id: _NativeLabel
    route: _NativeLabel | None = None
    model: _NativeLabel | None = None


class NativeStreamClosedData(Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    stream_id: _NativeLabel
    units: _NativeUnits = 0.0
    duration_ms: _NativeUnits | None = None
    reason: Annotated[str, Meta(max_length=256)] | None = None


_NO_REQUEST_DATA = NativeRequestData()


class NativeRequest(
    Struct, tag_field="type", tag=REQUEST, frozen=True, forbid_unknown_fields=True, gc=False
):
    specversion: Literal["1.0"]
    id: _NativeId
    source: _NativeSource
    subject: _NativeSubject
    time: _NativeTime
    datacontenttype: _NativeContentType | None = None
    data: NativeRequestData = _NO_REQUEST_DATA


class NativeStreamOpened(
    Struct, tag_field="type", tag=STREAM_OPENED, frozen=True, forbid_unknown_fields=True, gc=False
):
    specversion: Literal["1.0"]
    id: _NativeId
    source: _NativeSource
    subject: _NativeSubject
    time: _NativeTime
    data: NativeStreamOpenedData
    datacontenttype: _NativeContentType | None = None


class NativeStreamClosed(
    Struct, tag_field="type", tag=STREAM_CLOSED, frozen=True, forbid_unknown_fields=True, gc=False
):
    specversion: Literal["1.0"]
    id: _NativeId
    source: _NativeSource
    subject: _NativeSubject
    time: _NativeTime
    data: NativeStreamClosedData
    datacontenttype: _NativeContentType | None = None


NativeEvent = NativeRequest | NativeStreamOpened | NativeStreamClosed
_NATIVE_DECODER = msgspec.json.Decoder(list[NativeEvent] | NativeEvent)

# Per message, all subjects (and all times) joined by a space, which neither may
# hold, checked by one regex call; the count of spaces proves the pieces are the
# events' own values. Times: a subset of the models' RFC 3339 for which
# `parse_rfc3339` is exactly `datetime.fromisoformat` (ASCII digits, upper-case T
# and Z, at most 6 fraction digits: no replacing, no truncating).
_SUBJECT_PIECE = SUBJECT_PATTERN.removeprefix("^").removesuffix("$")
_SUBJECTS = re.compile(f"{_SUBJECT_PIECE}(?: {_SUBJECT_PIECE})*")
_TIME_PIECE = (
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,6})?"
    r"(?:Z|[+-][0-9]{2}:[0-9]{2})"
)
_TIMES = re.compile(f"{_TIME_PIECE}(?: {_TIME_PIECE})*")


def _native_worst_case_bytes() -> int:
    # An element's bytes as the batch path re-encodes it (orjson.dumps of the parsed
    # object): every string at the longest the Structs allow, of the character
    # orjson writes longest ("\u0001", six bytes), the longest numbers. Unknown
    # attributes are refused and a repeated key keeps its last value in both parsers.
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
"""No element the native path accepts re-encodes longer: it is used only when the
event size limit is at least this (the default 64,000 is)."""


def decode_native(
    value: bytes | None, now: datetime, limits: Limits
) -> tuple[list[NativeEvent], list[datetime], list[int]] | None:
    """A message's events, their times and rollup minutes when every one is plainly
    valid and on time (the models would accept them all, with these values); else None:
    then `decode_flat` decides."""
    if (
        value is None
        or len(value) > limits.max_message_bytes
        or limits.max_event_bytes < NATIVE_MAX_EVENT_BYTES
    ):
        return None
    try:
        doc = _NATIVE_DECODER.decode(value)
    except (msgspec.MsgspecError, RecursionError):  # msgspec recurses per nesting level
        return None
    if isinstance(doc, list):
        if not doc:
            return None
        events: list[NativeEvent] = doc
    elif len(value) > limits.max_event_bytes:
        return None  # a single event's limit counts the message's own bytes
    else:
        events = [doc]
    gaps = len(events) - 1
    subjects = " ".join([e.subject for e in events])
    if subjects.count(" ") != gaps or _SUBJECTS.fullmatch(subjects) is None:
        return None
    texts = [e.time for e in events]
    joined = " ".join(texts)
    if joined.count(" ") != gaps or _TIMES.fullmatch(joined) is None:
        return None
    try:
        times = list(map(datetime.fromisoformat, texts))
    except ValueError:  # e.g. a 13th month: the models say why
        return None
    lo, hi = now - limits.max_lateness, now + limits.max_future
    if min(times) < lo or max(times) > hi:
        return None
    if joined.count("Z") == len(texts) and lo >= _MINUTE_SAFE_LO and hi < _MINUTE_SAFE_HI:
        minutes = _minutes_utc(texts)
    else:
        minutes = [int(t.timestamp()) // 60 * 60 for t in times]
    return events, times, minutes


# The rollup's minute is int(time.timestamp()) // 60 * 60 (`RollupBuilder.add_flat`).
# For a UTC time ("...Z") it is the minute its first 16 characters name, looked up
# once per distinct minute: int() truncates the same as flooring from 1970 on, and
# below 2^32 seconds (2106) a float timestamp keeps a whole second's .999999 below
# the next second. Times outside that span are not on time anyway unless the clock
# is: the per-event formula is used then.
_MINUTE_SAFE_LO = datetime(1970, 1, 1, tzinfo=UTC)
_MINUTE_SAFE_HI = datetime(2106, 1, 1, tzinfo=UTC)
_MINUTES: dict[str, int] = {}


def _minutes_utc(texts: list[str]) -> list[int]:
    cache = _MINUTES
    try:
        return [cache[t[:16]] for t in texts]
    except KeyError:
        if len(cache) > 100_000:
            cache.clear()
        for t in texts:
            if t[:16] not in cache:
                cache[t[:16]] = int(datetime.fromisoformat(t[:16] + ":00+00:00").timestamp())
        return [cache[t[:16]] for t in texts]


def flatten_native(event: NativeEvent, time: datetime) -> Flat:
    """A native event's values, as `decode_flat` gives them (for tests and tools)."""
    d = event.data
    if isinstance(d, NativeRequestData):
        return (event.source, event.id, REQUEST, event.subject, time,
                d.route or "", d.method or "", d.model or "", d.status or 0, "", d.units,
                d.latency_ms or 0.0, d.bytes_in or 0, d.bytes_out or 0)  # fmt: skip
    if isinstance(d, NativeStreamOpenedData):
        return (event.source, event.id, STREAM_OPENED, event.subject, time, d.route or "", "",
                d.model or "", 0, d.stream_id, 0.0, 0.0, 0, 0)  # fmt: skip
    return (event.source, event.id, STREAM_CLOSED, event.subject, time, "", "", "", 0,
            d.stream_id, d.units, 0.0, 0, 0)  # fmt: skip
