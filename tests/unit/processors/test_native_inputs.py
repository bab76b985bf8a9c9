"""The native fold must never accept what the models would not, nor count differently.

`Fold.add_message` either declines a message (decode_flat and the models decide
alone) or folds it; then the Python reference must accept every event of it, reject
nothing, and fold the very same rows. The inputs are those of test_decode_flat.py
(one attribute changed to an awkward value, hypothesis combinations and batches) plus
raw JSON that only a byte level parser sees (invalid UTF-8, lone surrogates, huge
numbers, repeated keys). Where a case names whether the fold takes it, agreement is
not left to a decline.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from processors.decode import NATIVE_MAX_EVENT_BYTES, Limits, decode_flat
from processors.pipeline import BatchResult, Message, Pipeline
from schemas.deltas import rows_of
from schemas.events import MAX_UNITS
from tests.unit.processors.test_decode_flat import AWKWARD_VALUES, BASES, FIELDS_LIST, _mutate

NOW = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)
LIMITS = Limits()

# The bases without unknown attributes (the native fold refuses those), and one in
# each time form it takes.
PLAIN: dict[str, dict[str, Any]] = {
    name: {k: v for k, v in base.items() if k != "ext"} for name, base in BASES.items()
}
PLAIN["request"]["data"] = {k: v for k, v in BASES["request"]["data"].items() if k != "extra"}
PLAIN["bare"] = {k: v for k, v in PLAIN["request"].items() if k not in ("data", "datacontenttype")}
PLAIN["nulls"] = {
    **PLAIN["request"],
    "datacontenttype": None,
    "data": {"route": None, "method": None, "status": None, "model": None, "latency_ms": None},
}
PLAIN["offset"] = {**PLAIN["opened"], "time": "2026-03-29T13:58:59.999999+02:00"}
PLAIN["whole"] = {**PLAIN["closed"], "time": "2026-03-29T11:58:00Z"}
EXTRA_VALUES: list[Any] = [
    2**53 - 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    1e16,
    5e-324,
    "\x00",
    "\x01" * 128,
    "é" * 128,
    "é" * 129,
    "😀" * 16,
    "😀" * 17,
    "2026-03-29T11:59:00.1234567Z",
    "2026-03-29T11:59:00.123Z",
    "2026-03-29T11:59:00-00:00",
    "2026-03-29T11:59:00+24:00",
    "2026-03-29T11:59:60Z",
    "2026-02-30T11:59:00Z",
    "2026-03-29T24:00:00Z",
    "2026-03-29T11:59:00z",
    "2026-03-29T11:59:00Z\n",
    "٢٠٢٦-03-29T11:59:00Z",
    "acct 1",
    "acct\n",
    "a" * 128,
    "a" * 129,
    {"stream_id": "s", "units": 1},
    {"units": 1, "other": 2},
]
VALUES = [*AWKWARD_VALUES, *EXTRA_VALUES, "<delete>"]


def _rows(result: BatchResult) -> list[list[Any]]:
    return [row for body, _ in result.bodies for row in rows_of(body)]


def _fold(
    messages: list[Message], native: bool, limits: Limits = LIMITS, now: datetime = NOW
) -> BatchResult:
    p = Pipeline("t", limits, 3_600, 100_000, clock=lambda: now, native=native)
    assert (p._fold is not None) is native  # the fold under test really runs
    p.resume(0, 0)
    return p.process(messages)


def _agree(raw: bytes, limits: Limits = LIMITS, now: datetime = NOW) -> bool:
    """Assert the fold and the reference agree on a message; True when the fold took it."""
    message = [Message(0, 0, raw, 0)]
    native, python = _fold(message, True, limits, now), _fold(message, False, limits, now)
    assert _rows(native) == _rows(python)
    assert (native.counted, native.duplicates, native.by_type) == (
        python.counted,
        python.duplicates,
        python.by_type,
    )
    assert native.dead_letters == python.dead_letters
    if native.fast_messages:
        assert python.dead_letters == []
        assert python.counted + python.duplicates > 0
    return native.fast_messages == 1


def test_the_plain_bases_take_the_native_fold() -> None:
    # It reads UTC times ("...Z") only; a zone offset sends the message to Python.
    utc = {name: base for name, base in PLAIN.items() if base["time"].endswith("Z")}
    assert len(utc) == len(PLAIN) - 2
    for name, base in PLAIN.items():
        assert _agree(orjson.dumps(base)) is (name in utc), name
    assert _agree(orjson.dumps(list(utc.values())))
    assert not _agree(orjson.dumps(list(PLAIN.values())))


def test_the_native_fold_agrees_with_the_models_on_every_single_change() -> None:
    taken = 0
    for base in PLAIN.values():
        for path in FIELDS_LIST:
            for value in VALUES:
                doc = _mutate(base, [(path, value)])
                taken += _agree(orjson.dumps(doc))
                taken += _agree(orjson.dumps([PLAIN["opened"], doc]))
    assert taken > 1_000  # the native fold was exercised, not only declined


@settings(max_examples=400)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(sorted(PLAIN)),
            st.lists(st.tuples(st.sampled_from(FIELDS_LIST), st.sampled_from(VALUES)), max_size=2),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_the_native_fold_agrees_with_the_models_on_batches(
    items: list[tuple[str, list[tuple[tuple[str, ...], Any]]]],
) -> None:
    _agree(orjson.dumps([_mutate(PLAIN[base], changes) for base, changes in items]))


@pytest.mark.parametrize(
    "raw",
    [
        b'[{"id":"\xff"}]',
        b'"\xff"',
        b"[1e400]",
        b"[]",
        b"{}",
        b"null",
        b"",
        b"\xef\xbb\xbf[]",
        b"[" + b"[" * 1100 + b"]" * 1100 + b"]",
    ],
)
def test_malformed_messages_are_declined(raw: bytes) -> None:
    assert not _agree(raw)


def _raw_request(**replace: str) -> bytes:
    # JSON text of a plain request with some attributes' JSON spelled out by hand.
    parts = {
        "specversion": '"1.0"',
        "id": '"e-1"',
        "source": '"gw"',
        "type": '"tally.request.v1"',
        "subject": '"acct-1"',
        "time": '"2026-03-29T11:59:00Z"',
        "data": '{"units":2}',
    }
    parts.update(replace)
    # latin-1: "\xff" stands for the byte 0xff, invalid UTF-8.
    return ("{" + ",".join(f'"{k}":{v}' for k, v in parts.items()) + "}").encode("latin-1")


@pytest.mark.parametrize(
    ("replace", "taken"),
    [
        ({"id": '"\\ud800"'}, False),
        ({"id": '"\\udc00x"'}, False),
        ({"id": '"\\ud83d\\ude00"'}, False),
        ({"id": '"a\\u0000"'}, False),
        ({"id": '"a\\/b"'}, False),
        ({"data": '{"units":1e400}'}, False),
        ({"data": '{"units":1E2}'}, True),
        ({"data": '{"units":-0}'}, True),
        ({"data": '{"units":-0.0}'}, True),
        ({"data": '{"units":2,"units":3}'}, False),
        ({"data": '{"units":2},"data":{"route":"r"}'}, False),
        ({"data": '{"bytes_in":123456789012345678901234567890}'}, False),
        ({"data": '{"bytes_in":18446744073709551615}'}, False),
        ({"data": '{"bytes_in":9223372036854775807}'}, True),
        ({"data": '{"status":200.0}'}, False),
        ({"data": '{"status":2e2}'}, False),
        ({"data": '{"units":9007199254740993}'}, False),
        ({"id": '"a","id":"b"'}, False),
        ({"id": '1,"id":"b"'}, False),
        ({"id": '"b","id":1'}, False),
        ({"type": '"tally.stream.opened.v1","type":"tally.request.v1"'}, False),
        ({"type": '"tally.request.v1","type":"tally.stream.opened.v1"'}, False),
        ({"subject": '"a","subject":"b c"'}, False),
        ({"time": '"2026-03-29T11:59:00Z","time":"2026-03-29T11:59:00"'}, False),
        ({"specversion": '"1.0" '}, True),
        ({"data": '{"units":2,"x":1e400}'}, False),
        ({"data": '{"units":2,"x":"\xff"}'}, False),
        ({"ext": '"\xff"'}, False),
        ({"ext": "1e400"}, False),
        ({"ext": "123456789012345678901234567890"}, False),
    ],
)
def test_byte_level_json_agrees(replace: dict[str, str], taken: bool) -> None:
    # `taken`: whether the native fold takes the message itself. Where it declines,
    # decode_flat decides alone and agreement is trivial; naming which is which keeps
    # the comparisons that matter from turning into declines unnoticed.
    raw = _raw_request(**replace)
    assert _agree(raw) is taken
    assert _agree(b" [ " + raw + b" ,\n" + raw + b"] ") is taken


def test_message_and_event_size_limits() -> None:
    one = orjson.dumps(PLAIN["request"])
    assert _agree(one, Limits(max_event_bytes=NATIVE_MAX_EVENT_BYTES))
    # Below the worst case the fold cannot vouch for element sizes: it is not used.
    smaller = Limits(max_event_bytes=NATIVE_MAX_EVENT_BYTES - 1)
    assert Pipeline("t", smaller, 60, 10)._fold is None
    assert not _agree(one, Limits(max_message_bytes=len(one) - 1))
    # A single event's limit counts the message's own bytes, whitespace included.
    padded = one + b" " * (LIMITS.max_event_bytes - len(one) + 1)
    assert not _agree(padded)
    assert decode_flat(padded, NOW, LIMITS)[1][0].reason == "oversized"


@settings(max_examples=200)
@given(st.text(max_size=300), st.text(max_size=300), st.floats(min_value=0, max_value=MAX_UNITS))
def test_no_accepted_element_reencodes_beyond_the_bound(a: str, b: str, units: float) -> None:
    doc = {**PLAIN["whole"], "id": a[:128] or "x", "source": b[:256] or "y"}
    doc["data"] = {"stream_id": b[:256] or "s", "reason": a[:256], "units": units}
    raw = orjson.dumps([doc])
    taken = _agree(raw)
    # Every such element is valid; the fold takes it unless a string needs an escape.
    assert taken or b"\\" in raw
    assert len(orjson.dumps(orjson.loads(raw)[0])) <= NATIVE_MAX_EVENT_BYTES


@pytest.mark.parametrize(
    "now",
    [
        datetime(1970, 1, 1, 0, 1, tzinfo=UTC),
        datetime(1970, 1, 2, tzinfo=UTC),
        datetime(2105, 12, 31, 23, 59, tzinfo=UTC),
        datetime(2106, 2, 7, 6, 28, tzinfo=UTC),
        datetime(9999, 12, 31, 23, 0, tzinfo=UTC),
    ],
)
def test_minutes_agree_at_the_edges_of_time(now: datetime) -> None:
    # The fold reads UTC ("Z") times in [1970, 2106) only; others go to Python.
    for form in ("%Y-%m-%dT%H:%M:%S.%fZ", "%Y-%m-%dT%H:%M:%S.%f+00:00", "%Y-%m-%dT%H:%M:%SZ"):
        docs, years = [], set()
        for delta in (-61, -60, -59.5, -0.5, -0.000001, 0, 59.999999, 60, 299.999999):
            when = now + timedelta(seconds=delta)
            docs.append({**PLAIN["opened"], "time": when.strftime(form)})
            years.add(when.year)
        taken = form.endswith("Z") and all(1970 <= year < 2106 for year in years)
        assert _agree(orjson.dumps(docs), now=now) is taken


def _messages(seed: int, n: int) -> list[Message]:
    """Batches with rejections, duplicates, offset-zone and late times, by partition."""
    rng = random.Random(seed)
    messages = []
    for offset in range(n):
        partition = offset % 2
        batch: list[Any] = []
        for i in range(rng.randint(1, 30)):
            base = rng.choice(list(PLAIN.values()))
            doc = orjson.loads(orjson.dumps(base))
            doc["id"] = f"e-{rng.randrange(3_000)}"
            doc["source"] = rng.choice(["gw-1", "gw-2"])
            doc["subject"] = f"acct-{rng.randrange(5)}"
            seconds = rng.uniform(-3_600, 200)
            when = NOW + timedelta(seconds=seconds)
            doc["time"] = rng.choice(
                [
                    when.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
                    when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                ]
            )
            if rng.random() < 0.01:  # a zone offset: the fold declines the message
                doc["time"] = when.astimezone(UTC).isoformat()
            if rng.random() < 0.02:
                path = rng.choice(FIELDS_LIST)
                doc = _mutate(doc, [(path, rng.choice(VALUES))])
            if rng.random() < 0.01:
                doc["time"] = (NOW + timedelta(minutes=10)).isoformat()
            batch.append(doc)
            if i == 0 and rng.random() < 0.05:
                batch.append(["not an event"])
        value: bytes | None = orjson.dumps(batch if len(batch) > 1 else batch[0])
        if rng.random() < 0.01:
            value = rng.choice([b"{", b"[]", None, b"7"])
        messages.append(Message(partition, offset // 2, value, 1_000 + offset))
    return messages


def _run(messages: list[Message], native: bool) -> Any:
    steps: list[Any] = []
    p = Pipeline("t", LIMITS, 60, 800, clock=lambda: NOW, native=native)
    assert (p._fold is not None) is native
    p.resume(0, 5)  # offsets 0..4 of partition 0 were counted before a restart
    p.resume(1, 0)
    taken = 0
    for start in range(0, len(messages), 40):
        r = p.process(messages[start : start + 40])
        taken += r.fast_messages
        steps.append(
            (
                repr(sorted(_rows(r), key=repr)),
                r.dead_letters,
                r.next_offsets,
                r.published_until_ms,
                r.counted,
                r.duplicates,
                r.replayed,
                r.by_type,
                p.dedup_keys(),
            )
        )
    assert taken > len(messages) // 2 if native else taken == 0
    return steps


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_pipeline_results_are_identical_with_and_without_the_native_fold(seed: int) -> None:
    messages = _messages(seed, 600)
    native = _run(messages, True)
    assert native == _run(messages, False)
    assert sum(step[4] for step in native) > 1_000
    assert sum(step[5] for step in native) > 100
    assert sum(len(step[1]) for step in native) > 10
