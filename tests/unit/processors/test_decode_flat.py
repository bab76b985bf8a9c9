"""`decode_flat`: the models' verdicts, with each valid event as `Flat` values.

Valid events with one attribute changed to an awkward value (the inputs the native
fold is held to the models with, in test_native_inputs.py) must give the models'
values for accepted events, and the same reasons, details and bytes for rejections.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from hypothesis import strategies as st

from processors.decode import Limits, decode_flat, decode_message, flatten

NOW = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)
LIMITS = Limits(max_event_bytes=2_000)

BASES: dict[str, dict[str, Any]] = {
    "request": {
        "specversion": "1.0",
        "id": "e-1",
        "source": "gw-1",
        "type": "tally.request.v1",
        "subject": "acct_1.a:b-c",
        "time": "2026-03-29T11:59:00.123456Z",
        "datacontenttype": "application/json",
        "ext": {"any": [1, 2]},
        "data": {
            "units": 2.5,
            "route": "/v1/messages",
            "method": "POST",
            "status": 200,
            "model": "m",
            "latency_ms": 12.5,
            "bytes_in": 10,
            "bytes_out": 20,
            "extra": "ignored",
        },
    },
    "opened": {
        "specversion": "1.0",
        "id": "e-2",
        "source": "gw-1",
        "type": "tally.stream.opened.v1",
        "subject": "acct-2",
        "time": "2026-03-29T11:58:00Z",
        "data": {"stream_id": "s-1", "route": "/v1/messages", "model": "m"},
    },
    "closed": {
        "specversion": "1.0",
        "id": "e-3",
        "source": "gw-1",
        "type": "tally.stream.closed.v1",
        "subject": "acct-3",
        "time": "2026-03-29T11:58:30.5+02:00",
        "data": {"stream_id": "s-1", "units": 3, "duration_ms": 1000, "reason": "done"},
    },
}

AWKWARD_VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    1,
    -1,
    99,
    100,
    599,
    600,
    2**53,
    2**60,
    -0.0,
    0.0,
    1.5,
    -1.5,
    1e300,
    "",
    "x",
    "1.0",
    "a\n",
    "bad subject",
    "é",
    "y" * 16,
    "y" * 17,
    "z" * 128,
    "z" * 129,
    "w" * 256,
    "w" * 257,
    "tally.request.v1",
    "tally.stream.opened.v1",
    "tally.stream.closed.v1",
    "2026-03-29T11:59:00Z",
    "2026-03-29t11:59:00.123456789z",
    "2026-03-29 11:59:00+01:00",
    "2026-03-29T11:59:00",
    "2026-03-29",
    "2026-03-29T12:05:00Z",
    "2026-03-29T12:05:00.000001Z",
    "2026-02-22T12:00:00Z",
    "2026-02-22T11:59:59.999999Z",
    [],
    {},
    {"stream_id": "s"},
    {"units": None},
]
AWKWARD = st.sampled_from(AWKWARD_VALUES)
FIELDS_LIST: list[tuple[str, ...]] = [
    ("specversion",),
    ("id",),
    ("source",),
    ("type",),
    ("subject",),
    ("time",),
    ("datacontenttype",),
    ("data",),
    ("data", "units"),
    ("data", "route"),
    ("data", "method"),
    ("data", "status"),
    ("data", "model"),
    ("data", "latency_ms"),
    ("data", "bytes_in"),
    ("data", "bytes_out"),
    ("data", "stream_id"),
    ("data", "duration_ms"),
    ("data", "reason"),
]
FIELDS = st.sampled_from(FIELDS_LIST)
CHANGE = st.tuples(FIELDS, AWKWARD | st.just("<delete>"))


def _mutate(base: dict[str, Any], changes: list[tuple[tuple[str, ...], Any]]) -> dict[str, Any]:
    doc = orjson.loads(orjson.dumps(base))
    for path, value in changes:
        target = doc
        for part in path[:-1]:
            if not isinstance(target.get(part), dict):
                break
            target = target[part]
        else:
            if value == "<delete>":
                target.pop(path[-1], None)
            else:
                # A copy: the values are shared module constants, and a later change
                # must not write into them (that nested them into themselves across
                # examples until orjson refused the depth).
                target[path[-1]] = copy.deepcopy(value)
    return doc


def _both(raw: bytes) -> None:
    events, rejections = decode_message(raw, NOW, LIMITS)
    flat, flat_rejections = decode_flat(raw, NOW, LIMITS)
    assert flat == [flatten(e) for e in events]
    assert flat_rejections == rejections


def test_flat_values_are_the_models_values_on_every_single_change() -> None:
    for base in BASES.values():
        for path in FIELDS_LIST:
            for value in [*AWKWARD_VALUES, "<delete>"]:
                doc = _mutate(base, [(path, value)])
                _both(orjson.dumps(doc))
                _both(orjson.dumps([BASES["opened"], doc]))


def test_the_unchanged_bases_are_valid() -> None:
    raw = orjson.dumps(list(BASES.values()))
    flat, rejections = decode_flat(raw, NOW, LIMITS)
    assert rejections == []
    assert [f.type for f in flat] == [b["type"] for b in BASES.values()]
    request = flat[0]
    assert (request.units, request.latency_ms, request.bytes_in, request.bytes_out) == (
        2.5,
        12.5,
        10,
        20,
    )
    assert flat[2].units == 3.0
    assert isinstance(flat[2].units, float)


def test_time_bounds_are_inclusive() -> None:
    edge = [
        {**BASES["opened"], "time": (NOW + timedelta(minutes=5)).isoformat()},
        {**BASES["opened"], "time": (NOW - timedelta(days=35)).isoformat()},
    ]
    flat, rejections = decode_flat(orjson.dumps(edge), NOW, Limits())
    assert len(flat) == 2
    assert rejections == []


def test_oversized_events_are_rejected() -> None:
    big = {**BASES["request"], "pad": "p" * 3_000}
    _both(orjson.dumps(big))
    _both(orjson.dumps([big, BASES["opened"]]))
    assert decode_flat(orjson.dumps(big), NOW, LIMITS)[1][0].reason == "oversized"
