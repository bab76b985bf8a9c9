"""POST /api/v1/events' check of a body (query_api/ingest.py): the worker's one rule set.

The native check (`check_events`) must take only bodies the Python reference accepts
whole, with the same events; the reference names each refused element by index with
the dead-letter reason; bodies that are not events at all are 400, too many are 413.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import orjson
import pytest

from processors import decode
from query_api import ingest
from query_api.errors import ApiError
from query_api.ingest import BATCH, JSON, SINGLE, Checked, check_body
from tests.unit.processors.test_native import LIMITS, NOW, _event, _messages

MAX_EVENTS = 1_000


def _reference(raw: bytes, kind: str = JSON) -> Checked:
    return ingest._check_slowly(raw, kind, NOW, LIMITS, MAX_EVENTS)


def _outcome(raw: bytes) -> Checked | str:
    try:
        return check_body(raw, JSON, NOW, LIMITS, MAX_EVENTS)
    except ApiError as refused:
        return refused.code


@pytest.mark.parametrize("seed", range(40))
def test_the_native_check_takes_only_what_the_reference_accepts_whole(seed: int) -> None:
    native_took = 0
    for message in _messages(seed):
        raw = message.value or b""
        found = ingest.check_events(raw, *_bounds(), LIMITS.max_event_bytes)
        try:
            reference: Checked | str = _reference(raw)
        except ApiError as refused:
            reference = refused.code
        if found is None:
            assert _outcome(raw) == reference  # the reference decided
            continue
        native_took += 1
        assert isinstance(reference, Checked), raw[:200]
        assert reference.rejected == []
        native = [(subject, orjson.loads(raw[a:b])) for subject, a, b in found]
        assert native == [(s, orjson.loads(data)) for s, data in reference.events]
    assert native_took or seed % 7 == 0  # most seeds have plainly valid messages


def _bounds() -> tuple[int, int]:
    return LIMITS.on_time_us(NOW)


def _events(n: int) -> list[dict[str, Any]]:
    import random

    rng = random.Random(n)
    return [_event(rng, i, 5) for i in range(n)]


def test_a_valid_body_is_sent_on_as_it_came() -> None:
    docs = _events(30)
    raw = b" [ " + b" ,\n".join(orjson.dumps(d) for d in docs) + b" ] "
    checked = check_body(raw, BATCH, NOW, LIMITS, MAX_EVENTS)
    assert checked.rejected == []
    assert [orjson.loads(data) for _, data in checked.events] == docs
    assert [subject for subject, _ in checked.events] == [d["subject"] for d in docs]
    single = check_body(orjson.dumps(docs[0]), f"{SINGLE}; charset=utf-8", NOW, LIMITS, 1)
    assert single == Checked([(docs[0]["subject"], orjson.dumps(docs[0]))], [])


def test_each_refused_element_is_named_by_index_with_the_dlq_reason() -> None:
    docs: list[Any] = _events(8)
    docs[1] = {k: v for k, v in docs[1].items() if k != "source"}
    docs[2] = {**docs[2], "subject": "no spaces allowed"}
    docs[3] = {**docs[3], "type": "tally.unknown.v1"}
    docs[4] = {**docs[4], "specversion": "0.3"}
    docs[5] = {**docs[5], "time": (NOW + timedelta(hours=1)).isoformat()}
    docs[6] = 17
    checked = check_body(orjson.dumps(docs), JSON, NOW, LIMITS, MAX_EVENTS)
    assert [(r.index, r.code) for r in checked.rejected] == [
        (1, decode.MISSING_ATTRIBUTE),
        (2, decode.INVALID_ATTRIBUTE),
        (3, decode.UNKNOWN_TYPE),
        (4, decode.UNSUPPORTED_SPECVERSION),
        (5, decode.TIME_IN_FUTURE),
        (6, decode.NOT_AN_EVENT),
    ]
    assert all(r.message for r in checked.rejected)
    assert [orjson.loads(data) for _, data in checked.events] == [docs[0], docs[7]]
    late = {**docs[0], "time": (NOW - timedelta(days=40)).isoformat()}
    one = check_body(orjson.dumps(late), SINGLE, NOW, LIMITS, MAX_EVENTS)
    assert (one.events, [(r.index, r.code) for r in one.rejected]) == ([], [(0, decode.TOO_LATE)])


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        (b"{", JSON),
        (b"not json", JSON),
        (b"17", JSON),
        (b'"event"', JSON),
        (b"null", JSON),
        (b"[]", JSON),
        (b"[]", BATCH),
        (b"[{}]", SINGLE),  # an array is a batch
        (b"{}", BATCH),  # a batch is an array
        (b"{}", "text/plain"),
        (b"{}", None),
        (b"{}", "application/x-www-form-urlencoded"),
    ],
)
def test_a_body_that_is_no_event_is_400_invalid_body(raw: bytes, content_type: str | None) -> None:
    with pytest.raises(ApiError) as refused:
        check_body(raw, content_type, NOW, LIMITS, MAX_EVENTS)
    assert (refused.value.status, refused.value.code) == (400, "invalid_body")


def test_more_events_than_the_bound_is_413_whatever_their_validity() -> None:
    valid = b"[" + b",".join(orjson.dumps(d) for d in _events(11)) + b"]"
    junk = b"[" + b",".join([b"1"] * 11) + b"]"
    for raw in (valid, junk):
        with pytest.raises(ApiError) as refused:
            check_body(raw, JSON, NOW, LIMITS, 10)
        assert (refused.value.status, refused.value.code) == (413, "payload_too_large")
    assert len(check_body(valid, JSON, NOW, LIMITS, 11).events) == 11
