"""Hostile input is data: whatever bytes a message holds, the worker counts or dead-letters.

A fuzzing harness over decode -> fold -> dead-letter record, on the native fold and
on the Python reference. Every message must end as counted events (or duplicates) and
dead letters with a reason, never as an exception: one exception stops the worker,
which restarts, reads the same message and stops again, for every account.

Two generators: raw bytes, and near misses of valid events (nesting deeper than
orjson encodes or parses, NaN and Infinity, 1e400, integers beyond 64 bits, invalid
UTF-8, a byte order mark, repeated attributes, lone surrogates, huge strings), alone
or inside batches of valid events. The examples per property are bounded so that the
file runs in seconds; TALLY_FUZZ_EXAMPLES raises them for a longer hunt.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processors.decode import Limits, Rejection, decode_flat, decode_message
from processors.output import DLQ_MAX_VALUE_BYTES, dead_letter_record
from processors.pipeline import BatchResult, Message, Pipeline
from schemas.deltas import rows_of

NOW = datetime(2026, 12, 6, 12, 0, tzinfo=UTC)
LIMITS = Limits()
EXAMPLES = int(os.environ.get("TALLY_FUZZ_EXAMPLES", "400"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _nested(depth: int, opener: bytes = b"[") -> bytes:
    if opener == b"[":
        return b"[" * depth + b"]" * depth
    return b'{"a":' * depth + b"1" + b"}" * depth


# Raw JSON text that a valid event's attribute is replaced with.
NEAR_MISSES: list[bytes] = [
    _nested(300),
    _nested(1100),
    _nested(254),
    _nested(256),
    _nested(300, b"{"),
    b"NaN",
    b"Infinity",
    b"-Infinity",
    b"1e400",
    b"-1e400",
    b"123456789012345678901234567890",
    b"-123456789012345678901234567890",
    b"18446744073709551616",
    b"9223372036854775808",
    b'"\xff\xfe"',
    b'"\xc3"',
    b'"\\ud800"',
    b'"\\udc00x"',
    b'"a\\u0000b"',
    b'"' + b"x" * 70_000 + b'"',
    b'"\xef\xbb\xbfbom"',
    b"null",
    b"[]",
    b"[5]",
    b"{}",
    # serde reads a struct from an array too: an event spelled as its values in order
    b'["1.0","tally.request.v1","e-x","gw","acct","2026-12-06T11:59:00Z"]',
    b'"1.0","specversion":"0.3"',
    b'"a","id":"b"',
]
ATTRIBUTES = ["ext", "id", "source", "subject", "time", "type", "specversion", "data", "data.units"]
PLACEHOLDER = "__tally_fuzz__"


def _event(i: int, subject: str = "acct-1") -> dict[str, Any]:
    return {
        "specversion": "1.0",
        "id": f"e-{i}",
        "source": "gw-fuzz",
        "type": "tally.request.v1",
        "subject": subject,
        "time": "2026-12-06T11:59:00Z",
        "data": {"units": 1},
    }


def _with(doc: dict[str, Any], attribute: str, text: bytes) -> bytes:
    """The event's JSON text with one attribute's value spelled as `text`."""
    doc = {**doc, "data": dict(doc["data"])}
    if attribute == "data.units":
        doc["data"]["units"] = PLACEHOLDER
    else:
        doc[attribute] = PLACEHOLDER
    return orjson.dumps(doc).replace(f'"{PLACEHOLDER}"'.encode(), text)


@st.composite
def near_miss_messages(draw: st.DrawFn) -> bytes:
    elements = []
    for i in range(draw(st.integers(1, 4))):
        doc = _event(draw(st.integers(0, 30)) * 10 + i, draw(st.sampled_from(["a", "b", "c"])))
        if draw(st.booleans()):
            attribute = draw(st.sampled_from(ATTRIBUTES))
            elements.append(_with(doc, attribute, draw(st.sampled_from(NEAR_MISSES))))
        elif draw(st.integers(0, 4)) == 0:
            elements.append(draw(st.sampled_from(NEAR_MISSES)))  # a bare value as an element
        else:
            elements.append(orjson.dumps(doc))
    shape = draw(st.sampled_from(["single", "batch", "batch", "bom", "spaced"]))
    if shape == "single":
        return elements[0]
    body = b"[" + b",".join(elements) + b"]"
    if shape == "bom":
        return b"\xef\xbb\xbf" + body
    if shape == "spaced":
        return b" [ " + b" ,\n ".join(elements) + b" ]\t"
    return body


hostile_bytes = st.one_of(
    st.binary(max_size=3000),
    near_miss_messages(),
    # Valid JSON of any shape, and bytes cut from a valid message.
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
        max_leaves=20,
    ).map(lambda doc: json.dumps(doc).encode()),  # json: any int, NaN and Infinity too
    st.tuples(near_miss_messages(), st.integers(0, 100)).map(lambda t: t[0][: t[1]]),
)


def _elements(value: bytes | None) -> int:
    """How many outcomes a message must have: one per batch element, else one."""
    raw = value or b""
    if len(raw) > LIMITS.max_message_bytes:
        return 1
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return 1
    return len(doc) if isinstance(doc, list) and doc else 1


def _check_rejection(value: bytes, rejection: Rejection) -> None:
    assert rejection.reason
    assert rejection.detail
    if rejection.index is None:
        assert rejection.raw == value  # the whole message, byte for byte
        return
    # One element of a batch: its own bytes, as they stood in the message.
    assert rejection.raw in value
    assert orjson.loads(rejection.raw) == orjson.loads(value)[rejection.index]


def _run(messages: list[Message], native: bool) -> BatchResult:
    pipeline = Pipeline("t", LIMITS, 3_600, 100_000, clock=lambda: NOW, native=native)
    assert (pipeline._fold is not None) is native
    for partition in range(2):
        pipeline.resume(partition, 0)
    return pipeline.process(messages)


@FUZZ
@given(hostile_bytes)
def test_decoding_any_bytes_accounts_for_every_element(value: bytes) -> None:
    for decode in (decode_flat, decode_message):
        events, rejections = decode(value, NOW, LIMITS)
        assert len(events) + len(rejections) == _elements(value)
        for rejection in rejections:
            _check_rejection(value, rejection)


@FUZZ
@given(st.lists(hostile_bytes, min_size=1, max_size=6))
def test_the_pipeline_counts_or_dead_letters_every_element_on_both_tiers(
    values: list[bytes],
) -> None:
    messages = [Message(i % 2, i // 2, value, i) for i, value in enumerate(values)]
    native, python = _run(messages, native=True), _run(messages, native=False)
    for result in (native, python):
        outcomes = result.counted + result.duplicates + len(result.dead_letters)
        assert outcomes == sum(_elements(v) for v in values)
        assert result.next_offsets == {m.partition: m.offset + 1 for m in messages}
        for letter in result.dead_letters:
            value = values[letter.offset * 2 + letter.partition]
            _check_rejection(value, letter.rejection)
            topic, key, dlq_value, partition, headers = dead_letter_record(
                letter, b"k", "tally.events", "tally.events.dlq"
            )
            assert (topic, key, partition) == ("tally.events.dlq", b"k", None)
            assert dlq_value == letter.rejection.raw[:DLQ_MAX_VALUE_BYTES]
            named = dict(headers)
            assert named["tally-reason"] == letter.rejection.reason.encode()
            assert named["tally-source-offset"] == str(letter.offset).encode()
    rows = [[row for body, _ in r.bodies for row in rows_of(body)] for r in (native, python)]
    assert rows[0] == rows[1]
    assert native.counted == python.counted
    assert native.dead_letters == python.dead_letters


def test_the_reported_poison_messages_are_dead_letters() -> None:
    # Each of these stopped every worker: orjson encodes at most 255 levels deep, so
    # re-encoding a batch element nested deeper raised.
    valid = orjson.dumps(_event(1))
    poison = {
        "nested array": _nested(300),
        "batch of a valid event and a nested array": b"[" + valid + b"," + _nested(300) + b"]",
        "nested object": _nested(300, b"{"),
    }
    for name, value in poison.items():
        events, rejections = decode_flat(value, NOW, LIMITS)
        assert len(events) + len(rejections) == _elements(value), name
        assert rejections, name
        for rejection in rejections:
            _check_rejection(value, rejection)
    # A valid event whose extension attribute nests deeply is valid: counted, alone
    # and inside a batch.
    deep = _with(_event(2), "ext", _nested(300))
    for value in (deep, b"[" + deep + b"," + valid + b"]"):
        events, rejections = decode_flat(value, NOW, LIMITS)
        assert rejections == []
        assert len(events) == _elements(value)


def test_a_dead_letters_element_bytes_are_the_original_text() -> None:
    # Re-encoding would change them: a huge integer becomes a float, spacing goes.
    element = b'{ "specversion" : "1.0", "big": 123456789012345678901234567890 }'
    value = b"[" + orjson.dumps(_event(1)) + b",\n  " + element + b"  ]"
    _, rejections = decode_flat(value, NOW, LIMITS)
    assert [(r.index, r.raw) for r in rejections] == [(1, element)]


def test_a_bug_in_decoding_is_a_dead_letter_not_a_stopped_worker(monkeypatch: Any) -> None:
    from processors import decode

    def broken(*_: Any) -> Any:
        raise RuntimeError("a bug")

    monkeypatch.setattr(decode, "_decode", broken)
    value = b'[{"id": 1}]'
    events, rejections = decode_flat(value, NOW, LIMITS)
    assert events == []
    assert [(r.reason, r.raw, r.index) for r in rejections] == [("decode_failed", value, None)]
    assert "RuntimeError('a bug')" in rejections[0].detail
