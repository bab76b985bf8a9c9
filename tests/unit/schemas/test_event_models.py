from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from schemas.events import EVENT_ADAPTER, MESSAGE_ADAPTER, RequestEvent, StreamClosedEvent
from schemas.jsonschema import SCHEMA_PATH, render


def _event(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "gw-eu-1",
        "type": "tally.request.v1",
        "subject": "acct_1.a:b-c",
        "time": "2026-03-29T01:02:03.456Z",
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def test_request_defaults_to_one_unit() -> None:
    event = EVENT_ADAPTER.validate_python(_event())
    assert isinstance(event, RequestEvent)
    assert event.data.units == 1.0
    assert event.time == datetime(2026, 3, 29, 1, 2, 3, 456000, tzinfo=UTC)


def test_time_offsets_are_honoured() -> None:
    event = EVENT_ADAPTER.validate_python(_event(time="2026-03-29T03:02:03+02:00"))
    assert event.time == datetime(2026, 3, 29, 3, 2, 3, tzinfo=timezone(timedelta(hours=2)))
    assert event.time.astimezone(UTC).hour == 1


def test_nanosecond_times_are_accepted() -> None:
    event = EVENT_ADAPTER.validate_python(_event(time="2026-03-29T01:02:03.123456789Z"))
    assert event.time.microsecond == 123456


@pytest.mark.parametrize(
    "changes",
    [
        {"specversion": "0.3"},
        {"id": ""},
        {"id": "x" * 129},
        {"source": "s" * 257},
        {"subject": "has space"},
        {"subject": "x" * 129},
        {"type": "tally.other.v1"},
        {"time": "2026-03-29T01:02:03"},  # no zone
        {"time": "2026-03-29"},
        {"time": 1774746123},  # epoch numbers are not RFC 3339
        {"data": {"units": -0.5}},
        {"data": {"units": True}},
        {"data": {"units": "3"}},
        {"data": {"status": 99}},
        {"type": "tally.stream.opened.v1", "data": {}},
        {"type": "tally.stream.closed.v1", "data": {"stream_id": "s", "units": -1}},
    ],
)
def test_contract_violations_are_rejected(changes: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        EVENT_ADAPTER.validate_python(_event(**changes))


@pytest.mark.parametrize("field", ["specversion", "id", "source", "type", "subject", "time"])
def test_every_required_attribute_is_required(field: str) -> None:
    doc = _event()
    del doc[field]
    with pytest.raises(ValidationError):
        EVENT_ADAPTER.validate_python(doc)


def test_stream_closed_units_default_to_zero_and_extensions_are_ignored() -> None:
    event = EVENT_ADAPTER.validate_python(
        _event(type="tally.stream.closed.v1", data={"stream_id": "s-1"}, traceparent="00-ab")
    )
    assert isinstance(event, StreamClosedEvent)
    assert event.data.units == 0.0


def test_a_batch_is_a_list_of_events() -> None:
    batch = MESSAGE_ADAPTER.validate_python([_event(), _event(id="e-2")])
    assert [e.id for e in batch] == ["e-1", "e-2"]


def test_json_schema_file_is_in_sync_with_the_models() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render(), "run `make schema`"
