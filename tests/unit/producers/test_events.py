"""The builders make valid events, and encode_event's JSON decodes back to the same."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from producers import events
from producers.events import encode_event, format_time
from schemas.events import (
    EVENT_ADAPTER,
    MESSAGE_ADAPTER,
    REQUEST,
    STREAM_CLOSED,
    STREAM_OPENED,
    RequestEvent,
    StreamClosedEvent,
    StreamOpenedEvent,
)

T = datetime(2026, 3, 29, 1, 2, 3, 456789, tzinfo=UTC)


def roundtrip(event: RequestEvent | StreamOpenedEvent | StreamClosedEvent) -> None:
    encoded = encode_event(event)
    assert EVENT_ADAPTER.validate_json(encoded) == event
    assert MESSAGE_ADAPTER.validate_json(encoded) == event


def test_request_with_every_field() -> None:
    event = events.request(
        "acct-1",
        "gw-eu-1",
        units=2.5,
        route="/v1/messages",
        method="POST",
        status=200,
        model="small-1",
        latency_ms=12.5,
        bytes_in=100,
        bytes_out=2_000,
        time=T,
        id="e-1",
    )
    assert event.type == REQUEST
    assert event.specversion == "1.0"
    roundtrip(event)
    doc = orjson.loads(encode_event(event))
    assert doc == {
        "specversion": "1.0",
        "id": "e-1",
        "source": "gw-eu-1",
        "type": REQUEST,
        "subject": "acct-1",
        "time": "2026-03-29T01:02:03.456789Z",
        "data": {
            "units": 2.5,
            "route": "/v1/messages",
            "method": "POST",
            "status": 200,
            "model": "small-1",
            "latency_ms": 12.5,
            "bytes_in": 100,
            "bytes_out": 2_000,
        },
    }


def test_request_defaults_omit_none_fields() -> None:
    event = events.request("acct-1", "gw-1")
    doc = orjson.loads(encode_event(event))
    assert doc["data"] == {"units": 1.0}
    assert "datacontenttype" not in doc
    assert len(event.id) <= 128
    assert event.time.tzinfo is not None
    assert abs(event.time - datetime.now(UTC)) < timedelta(seconds=5)
    roundtrip(event)


def test_ids_are_fresh() -> None:
    ids = {events.request("acct-1", "gw-1").id for _ in range(1_000)}
    assert len(ids) == 1_000


def test_integer_numbers_are_accepted() -> None:
    event = events.request("acct-1", "gw-1", units=3, latency_ms=7)
    assert event.data.units == 3.0
    assert event.data.latency_ms == 7.0
    closed = events.stream_closed("acct-1", "gw-1", "s-1", units=2, duration_ms=10)
    assert (closed.data.units, closed.data.duration_ms) == (2.0, 10.0)


def test_stream_events_roundtrip() -> None:
    opened = events.stream_opened(
        "acct-1", "gw-1", "s-1", route="/v1/messages", model="large-3", time=T
    )
    closed = events.stream_closed(
        "acct-1", "gw-1", "s-1", units=4.125, duration_ms=1_500.0, reason="completed", time=T
    )
    assert (opened.type, closed.type) == (STREAM_OPENED, STREAM_CLOSED)
    roundtrip(opened)
    roundtrip(closed)
    assert orjson.loads(encode_event(events.stream_closed("a", "g", "s")))["data"] == {
        "stream_id": "s",
        "units": 0.0,
    }


@pytest.mark.parametrize(
    "kwargs",
    [
        {"subject": "has space"},
        {"subject": ""},
        {"subject": "x" * 129},
        {"source": ""},
        {"units": -1.0},
        {"units": float("nan")},
        {"units": True},
        {"status": 99},
        {"id": "x" * 129},
        {"time": datetime(2026, 1, 1)},
    ],
)
def test_builders_reject_invalid_input(kwargs: dict[str, object]) -> None:
    args: dict[str, object] = {"subject": "acct-1", "source": "gw-1"} | kwargs
    with pytest.raises(ValidationError):
        events.request(**args)  # type: ignore[arg-type]


def test_time_is_encoded_in_utc_with_z() -> None:
    cest = timezone(timedelta(hours=2))
    at = datetime(2026, 3, 29, 3, 2, 3, tzinfo=cest)
    assert format_time(at) == "2026-03-29T01:02:03.000000Z"
    event = events.request("acct-1", "gw-1", time=at)
    assert orjson.loads(encode_event(event))["time"] == "2026-03-29T01:02:03.000000Z"
    assert EVENT_ADAPTER.validate_json(encode_event(event)).time == at
    # A whole second keeps its fraction, so every encoded time has the same shape.
    whole = events.request("acct-1", "gw-1", time=datetime(2026, 3, 29, 1, 2, 3, tzinfo=UTC))
    assert orjson.loads(encode_event(whole))["time"] == "2026-03-29T01:02:03.000000Z"


@given(
    subject=st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True),
    source=st.text(min_size=1, max_size=256),
    units=st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False),
    route=st.none() | st.text(min_size=1, max_size=256),
    status=st.none() | st.integers(min_value=100, max_value=599),
    bytes_in=st.none() | st.integers(min_value=0, max_value=2**53),
    time=st.datetimes(
        min_value=datetime(1970, 1, 2),
        max_value=datetime(9999, 12, 30),
        timezones=st.just(UTC),
    ),
)
def test_any_valid_request_roundtrips(
    subject: str,
    source: str,
    units: float,
    route: str | None,
    status: int | None,
    bytes_in: int | None,
    time: datetime,
) -> None:
    event = events.request(
        subject, source, units=units, route=route, status=status, bytes_in=bytes_in, time=time
    )
    roundtrip(event)
