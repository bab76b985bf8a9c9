"""Turn one Kafka message value into valid events and rejections (pure, no I/O).

A message holds one CloudEvent or a JSON array of them (CONTRACT §1). Each
rejection keeps the bytes it came from and a machine-readable reason, so the
worker can route it to the dead-letter topic: nothing is dropped silently, and a
bad event in a batch never takes its valid neighbours down with it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import orjson
from pydantic import ValidationError

from schemas.events import (
    EVENT_ADAPTER,
    EVENT_TYPES,
    RequestEvent,
    StreamClosedEvent,
    StreamOpenedEvent,
)

AnyEvent = RequestEvent | StreamOpenedEvent | StreamClosedEvent

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


def decode_message(
    value: bytes | None, now: datetime, limits: Limits
) -> tuple[list[AnyEvent], list[Rejection]]:
    """Validate a message; return its valid events (in order) and its rejections."""
    raw = value or b""
    if len(raw) > limits.max_message_bytes:
        detail = f"message is {len(raw)} bytes, the limit is {limits.max_message_bytes}"
        return [], [Rejection(OVERSIZED, detail, raw)]
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return [], [Rejection(MALFORMED_JSON, f"not valid JSON: {exc}", raw)]
    if isinstance(doc, dict):
        event, rejection = _check(doc, raw, now, limits, None)
        return ([event] if event else []), ([rejection] if rejection else [])
    if not isinstance(doc, list):
        detail = f"expected a CloudEvent object or a JSON array of them, got {type(doc).__name__}"
        return [], [Rejection(NOT_AN_EVENT, detail, raw)]
    if not doc:
        return [], [Rejection(EMPTY_BATCH, "a batch must hold at least one event", raw)]
    events: list[AnyEvent] = []
    rejections: list[Rejection] = []
    for index, item in enumerate(doc):
        element = orjson.dumps(item)
        if not isinstance(item, dict):
            detail = f"batch element is a {type(item).__name__}, not a CloudEvent object"
            rejections.append(Rejection(NOT_AN_EVENT, detail, element, index))
            continue
        if len(element) > limits.max_event_bytes:
            detail = f"event is {len(element)} bytes, the limit is {limits.max_event_bytes}"
            rejections.append(Rejection(OVERSIZED, detail, element, index))
            continue
        event, rejection = _check(item, element, now, limits, index)
        if event:
            events.append(event)
        if rejection:
            rejections.append(rejection)
    return events, rejections


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
    """The clock-dependent rules of CONTRACT §1; None when the time is acceptable."""
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
