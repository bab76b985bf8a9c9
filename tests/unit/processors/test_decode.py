from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any, get_args

import orjson
from hypothesis import given
from hypothesis import strategies as st

from processors import decode
from processors.decode import Limits, decode_message

NOW = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)
LIMITS = Limits()


def _event(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": "e-1",
        "source": "gw",
        "type": "tally.request.v1",
        "subject": "acct-1",
        "time": "2026-03-29T11:59:00Z",
        "data": {"units": 2},
    }
    doc.update(changes)
    return {k: v for k, v in doc.items() if v is not None}


def _reasons(value: bytes) -> list[str]:
    return [r.reason for r in decode_message(value, NOW, LIMITS)[1]]


def test_single_event() -> None:
    events, rejections = decode_message(orjson.dumps(_event()), NOW, LIMITS)
    assert [e.id for e in events] == ["e-1"]
    assert rejections == []


def test_each_rejection_reason() -> None:
    assert _reasons(b"{oops") == [decode.MALFORMED_JSON]
    assert _reasons(b'"a string"') == [decode.NOT_AN_EVENT]
    assert _reasons(b"[]") == [decode.EMPTY_BATCH]
    assert _reasons(b"") == [decode.MALFORMED_JSON]
    assert _reasons(orjson.dumps(_event(id=None))) == [decode.MISSING_ATTRIBUTE]
    assert _reasons(orjson.dumps(_event(type=None))) == [decode.MISSING_ATTRIBUTE]
    assert _reasons(orjson.dumps(_event(type="x.v1"))) == [decode.UNKNOWN_TYPE]
    assert _reasons(orjson.dumps(_event(specversion="2.0"))) == [decode.UNSUPPORTED_SPECVERSION]
    assert _reasons(orjson.dumps(_event(data={"units": -1}))) == [decode.INVALID_ATTRIBUTE]
    future = (NOW + timedelta(minutes=5, seconds=1)).isoformat()
    assert _reasons(orjson.dumps(_event(time=future))) == [decode.TIME_IN_FUTURE]
    late = (NOW - timedelta(days=35, seconds=1)).isoformat()
    assert _reasons(orjson.dumps(_event(time=late))) == [decode.TOO_LATE]
    big = orjson.dumps(_event(data={"units": 1, "route": "r" * 200, "pad": "p" * 70_000}))
    assert _reasons(big) == [decode.OVERSIZED]
    assert _reasons(b" " * 1_000_001) == [decode.OVERSIZED]


def test_time_bounds_are_inclusive() -> None:
    edge_future = (NOW + timedelta(minutes=5)).isoformat()
    edge_late = (NOW - timedelta(days=35)).isoformat()
    assert _reasons(orjson.dumps([_event(time=edge_future), _event(time=edge_late)])) == []


def test_bad_elements_of_a_batch_do_not_take_the_good_ones_down() -> None:
    batch = [_event(id="a"), _event(id="b", subject="bad subject"), 7, _event(id="c")]
    events, rejections = decode_message(orjson.dumps(batch), NOW, LIMITS)
    assert [e.id for e in events] == ["a", "c"]
    assert [(r.reason, r.index) for r in rejections] == [
        (decode.INVALID_ATTRIBUTE, 1),
        (decode.NOT_AN_EVENT, 2),
    ]
    assert orjson.loads(rejections[0].raw)["id"] == "b"
    assert "subject" in rejections[0].detail


def test_whole_message_rejections_keep_the_original_bytes() -> None:
    raw = b'{"specversion": "1.0",  "oops"'
    [rejection] = decode_message(raw, NOW, LIMITS)[1]
    assert rejection.raw == raw
    assert rejection.index is None


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)


@given(json_values)
def test_any_json_is_either_counted_or_rejected_never_raised(doc: Any) -> None:
    # The standard encoder, not orjson: it also writes integers beyond 64 bits.
    events, rejections = decode_message(json.dumps(doc).encode(), NOW, LIMITS)
    if isinstance(doc, list) and doc:
        assert len(events) + len(rejections) == len(doc)
    else:
        assert len(events) + len(rejections) == 1
    assert all(r.reason in get_args(decode.Reason) for r in rejections)
