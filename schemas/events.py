"""The events gateways publish to Kafka (docs/api.md#events), as pydantic v2 models.

These models are the single source of truth: the processors validate with them,
the producer library builds them, and `schemas/event.schema.json` is generated
from them for gateways written in other languages.

Rules that depend on the clock (not too far in the future, not too late) are not
part of the model: see `schemas.validation.check_time`.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    WithJsonSchema,
)

REQUEST = "tally.request.v1"
STREAM_OPENED = "tally.stream.opened.v1"
STREAM_CLOSED = "tally.stream.closed.v1"
EVENT_TYPES = (REQUEST, STREAM_OPENED, STREAM_CLOSED)

CONTENT_TYPE_SINGLE = "application/cloudevents+json"
CONTENT_TYPE_BATCH = "application/cloudevents-batch+json"

SUBJECT_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"

# RFC 3339 demands a zone ("Z" or ±hh:mm); Python's parser alone would accept a
# naive time or a bare date, which would silently meter in the host's zone.
_RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})")


def _parse_rfc3339(value: Any) -> Any:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("time must carry a zone (RFC 3339), e.g. 2026-03-29T01:02:03.456Z")
        return value
    match = _RFC3339.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(
            "time must be an RFC 3339 string with a zone, e.g. 2026-03-29T01:02:03.456Z"
        )
    # This runs for every event the worker validates: the common canonical form
    # ("...T...Z", at most 6 fraction digits) goes to fromisoformat untouched.
    text = value
    if "z" in text or "t" in text or " " in text:
        text = text.replace("z", "Z").replace("t", "T").replace(" ", "T")
    frac = match.group(1)  # the only "." the pattern admits, with its digits
    if frac is not None and len(frac) > 7:
        # Python keeps microseconds; nanosecond digits beyond that are dropped.
        text = text.replace(frac, frac[:7], 1)
    return datetime.fromisoformat(text)


parse_rfc3339 = _parse_rfc3339
"""The `time` attribute's parser, for fast paths that must agree with the models."""


def _finite(value: float) -> float:
    if not math.isfinite(value):
        raise ValueError("must be a finite number")
    return value


Rfc3339 = Annotated[
    datetime,
    BeforeValidator(_parse_rfc3339),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]
# The largest measure (units, latency_ms, duration_ms) and byte count one event may
# carry. The store sums units in millionths and bytes in UInt64 columns: an event
# beyond these could not be stored at all, and once folded it would stop the worker
# at every restart. Far above any real request; refused with a reason instead.
MAX_UNITS = 1e12
MAX_COUNT = 2**63 - 1
# bool is a subclass of int in Python; strict numbers keep `true` from counting as 1.
Units = Annotated[float, Field(ge=0, le=MAX_UNITS, strict=True), AfterValidator(_finite)]
NonNegInt = Annotated[int, Field(ge=0, le=MAX_COUNT, strict=True)]
Label = Annotated[str, Field(min_length=1, max_length=256)]


class _Data(BaseModel):
    # Gateways may add fields before we know them; unknown data fields are ignored.
    model_config = ConfigDict(frozen=True, extra="ignore")


class RequestData(_Data):
    units: Units = 1.0
    route: Label | None = None
    method: Annotated[str, Field(min_length=1, max_length=16)] | None = None
    status: Annotated[int, Field(ge=100, le=599, strict=True)] | None = None
    model: Label | None = None
    latency_ms: Units | None = None
    bytes_in: NonNegInt | None = None
    bytes_out: NonNegInt | None = None


class StreamOpenedData(_Data):
    stream_id: Annotated[str, Field(min_length=1, max_length=256)]
    route: Label | None = None
    model: Label | None = None


class StreamClosedData(_Data):
    stream_id: Annotated[str, Field(min_length=1, max_length=256)]
    units: Units = 0.0
    duration_ms: Units | None = None
    reason: Annotated[str, Field(max_length=256)] | None = None


class _Envelope(BaseModel):
    # CloudEvents allows extension attributes; they are accepted and ignored.
    model_config = ConfigDict(frozen=True, extra="ignore")

    specversion: Literal["1.0"]
    id: Annotated[str, Field(min_length=1, max_length=128)]
    source: Annotated[str, Field(min_length=1, max_length=256)]
    subject: Annotated[str, Field(pattern=SUBJECT_PATTERN)]
    time: Rfc3339
    datacontenttype: str | None = None


class RequestEvent(_Envelope):
    type: Literal["tally.request.v1"]
    data: RequestData = RequestData()


class StreamOpenedEvent(_Envelope):
    type: Literal["tally.stream.opened.v1"]
    data: StreamOpenedData


class StreamClosedEvent(_Envelope):
    type: Literal["tally.stream.closed.v1"]
    data: StreamClosedData


AnyEvent = RequestEvent | StreamOpenedEvent | StreamClosedEvent
"""A valid event of any Tally type, as a model."""

Event = Annotated[AnyEvent, Field(discriminator="type")]
"""One CloudEvent of any Tally type; `type` selects the model."""

EVENT_ADAPTER: TypeAdapter[AnyEvent] = TypeAdapter(Event)
MESSAGE_ADAPTER: TypeAdapter[Any] = TypeAdapter(Event | list[Event])
