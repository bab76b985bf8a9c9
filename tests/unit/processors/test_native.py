"""The native fold (native/, tally_fold) against the Python reference it stands in for.

`Pipeline.process` folds natively; `Pipeline(native=False)` folds the
same messages through decode_flat (the models) and RollupBuilder. Both must agree
on everything: rows (parsed, exactly), counts, duplicates, dead letters, offsets.
The messages mix valid events with every kind of near miss the native parser must
hand back to Python, so that accepting one it should not shows up as a difference.
"""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import pytest
from tally_fold import Dedup

from processors.decode import Limits, decode_flat
from processors.dedup import Deduplicator
from processors.pipeline import BatchResult, Message, Pipeline
from schemas.deltas import rows_of
from schemas.events import REQUEST, STREAM_CLOSED, STREAM_OPENED

NOW = datetime(2026, 11, 22, 12, 0, 0, 123_456, tzinfo=UTC)
LIMITS = Limits()


def _time(rng: random.Random) -> str:
    at = NOW - timedelta(seconds=rng.uniform(0, 600))
    text = at.strftime("%Y-%m-%dT%H:%M:%S")
    digits = rng.choice([0, 0, 1, 3, 6])
    if digits:
        text += "." + f"{at.microsecond:06d}"[:digits]
    return text + "Z"


def _measure(rng: random.Random) -> float | int:
    return rng.choice(
        [
            rng.uniform(0, 10),
            rng.randrange(0, 1000),
            # half-way between two millionths: round() goes to even
            rng.randrange(0, 100) * 1e-6 + 5e-7,
            rng.uniform(0, 1e9),
            0.0,
            -0.0,
        ]
    )


def _event(rng: random.Random, i: int, accounts: int) -> dict[str, Any]:
    kind = rng.choice([REQUEST, REQUEST, REQUEST, STREAM_OPENED, STREAM_CLOSED])
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": f"e-{i}-{rng.randrange(1 << 30)}",
        "source": rng.choice(["gw-a", "gw-b"]),
        "subject": f"acct-{rng.randrange(accounts)}",
        "time": _time(rng),
        "type": kind,
    }
    stream = f"s-{rng.randrange(4)}"
    if kind == REQUEST:
        data: dict[str, Any] = {}
        for name, value in (
            ("units", _measure(rng)),
            ("route", rng.choice(["/v1/messages", "/v1/ünïcode", None])),
            ("method", rng.choice(["POST", "GET", None])),
            ("status", rng.choice([200, 429, 500, None])),
            ("model", rng.choice(["small", "large", None])),
            ("latency_ms", rng.choice([_measure(rng), None])),
            ("bytes_in", rng.choice([rng.randrange(0, 10_000), None, 0])),
            ("bytes_out", rng.choice([rng.randrange(0, 10_000), None])),
        ):
            if rng.random() < 0.8:
                data[name] = value
        if data or rng.random() < 0.5:
            doc["data"] = data
    elif kind == STREAM_OPENED:
        doc["data"] = {"stream_id": stream, "route": rng.choice(["/v1/s", None]), "model": "m"}
    else:
        doc["data"] = {"stream_id": stream, "units": _measure(rng)}
        if rng.random() < 0.3:
            doc["data"]["duration_ms"] = rng.choice([12.5, None])
        if rng.random() < 0.3:
            doc["data"]["reason"] = rng.choice(["client", None, ""])
    if rng.random() < 0.05:
        doc["datacontenttype"] = rng.choice(["application/json", None])
    return doc


# Near misses: each is either still valid (and must fold the same) or must go to
# Python (which counts or rejects it, and says why).
def _set_data(name: str, value: Any) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        doc.setdefault("data", {})[name] = value

    return mutate


def _set(name: str, value: Any) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        doc[name] = value

    return mutate


def _drop(name: str) -> Any:
    def mutate(doc: dict[str, Any]) -> None:
        doc.pop(name, None)

    return mutate


def _time_of(text: str) -> Any:
    return _set("time", text)


DOC_MUTATIONS = [
    _set("specversion", "1.1"),
    _set("type", "tally.unknown.v1"),
    _drop("id"),
    _set("id", ""),
    _set("id", "x" * 128),
    _set("id", "x" * 129),
    _set("id", "é" * 128),  # 256 bytes, 128 characters: valid
    _set("id", "é" * 129),
    _set("source", "s" * 257),
    _set("subject", "bad subject"),
    _set("subject", "a" * 129),
    _set("subject", "ok:a-b_c.d"),
    _set("data", None),
    _drop("data"),
    _set("datacontenttype", "x" * 257),
    _set("datacontenttype", 5),
    _set("extra", 1),
    _time_of("2026-11-22T11:59:00+01:00"),
    _time_of("2026-11-22T10:59:00-01:00"),
    _time_of("2026-11-22T11:59:00.1234567Z"),
    _time_of("2026-11-22T11:59:00.Z"),
    _time_of("2026-11-22t11:59:00Z"),
    _time_of("2026-11-22T11:59:00z"),
    _time_of("2026-11-22 11:59:00Z"),
    _time_of("2026-02-30T11:59:00Z"),
    _time_of("2026-11-22T24:00:00Z"),
    _time_of("2026-11-22T11:59:60Z"),
    _time_of("2026-11-22T12:05:00.123457Z"),  # just past max_future
    _time_of("2026-11-22T12:05:00.123456Z"),  # exactly at it
    _time_of("2026-10-18T12:00:00.123456Z"),  # exactly max_lateness ago
    _time_of("2026-10-18T12:00:00.123455Z"),  # a microsecond more
    _time_of("1969-12-31T23:59:59Z"),
    _time_of(""),
    _time_of(7),
    _set_data("units", None),
    _set_data("units", -1),
    _set_data("units", 1e12),
    _set_data("units", "1"),
    _set_data("units", True),
    _set_data("status", 99),
    _set_data("status", 600),
    _set_data("status", 599),
    _set_data("status", 200.0),
    _set_data("status", True),
    _set_data("bytes_in", -1),
    _set_data("bytes_in", 2**63 - 1),
    _set_data("bytes_in", 2**63),
    _set_data("bytes_out", 1.5),
    _set_data("method", "M" * 16),
    _set_data("method", "M" * 17),
    _set_data("route", ""),
    _set_data("route", "ř" * 256),
    _set_data("route", "ř" * 257),
    _set_data("model", None),
    _set_data("latency_ms", -0.0),
    _set_data("latency_ms", -1.0),
    _set_data("latency_ms", 1e13),
    _set_data("stream_id", "s"),
    _set_data("stream_id", None),
    _set_data("stream_id", ""),
    _set_data("duration_ms", -5),
    _set_data("reason", "r" * 257),
    _set_data("route", None),
    _set_data("unknown", 1),
]

# On the encoded text of one event.
TEXT_MUTATIONS = [
    lambda raw: raw.replace(b'"specversion"', b'"id":"dup","specversion"', 1),
    lambda raw: raw.replace(b'"id":"', b'"id":"\\u0041', 1),
    lambda raw: raw.replace(b'"source":"', b'"source":"\\/', 1),
    lambda raw: raw.replace(b'"subject":"', b'"subject":"\\u0061', 1),
    lambda raw: raw.replace(b"{", b' {\n\t"datacontenttype" : null ,', 1),
    lambda raw: raw.replace(b"1.0", b"1.00", 1),
    lambda raw: raw[:-1],
]


def _message_value(rng: random.Random, events: list[dict[str, Any]]) -> bytes:
    texts = []
    for doc in events:
        if rng.random() < 0.04:
            rng.choice(DOC_MUTATIONS)(doc)
        raw = orjson.dumps(doc)
        if rng.random() < 0.02:
            raw = rng.choice(TEXT_MUTATIONS)(raw)
        texts.append(raw)
    shape = rng.random()
    if shape < 0.05 and texts:
        return texts[0]  # a single event, not an array
    if shape < 0.07:
        return b"[]"
    if shape < 0.09:
        return b"not json"
    if shape < 0.11:
        return b" \n[" + b", ".join(texts) + b"]\r\n"
    return b"[" + b",".join(texts) + b"]"


def _messages(seed: int) -> list[Message]:
    rng = random.Random(seed)
    accounts = rng.choice([3, 50])
    sent: list[dict[str, Any]] = []
    messages = []
    for offset in range(rng.randrange(5, 40)):
        events = []
        for _ in range(rng.choice([1, 2, 20, 60])):
            if sent and rng.random() < 0.05:
                # re-sent, maybe in the same message; mostly recent, some long ago
                recent = sent[-rng.choice([5, 50, 100, len(sent)]) :]
                events.append(dict(rng.choice(recent)))
            else:
                doc = _event(rng, len(sent), accounts)
                sent.append(doc)
                events.append(dict(doc))
        partition = rng.randrange(2)
        messages.append(Message(partition, offset, _message_value(rng, events), offset * 10))
    if rng.random() < 0.2:
        messages.append(Message(0, len(messages), None, 0))
    return messages


def _run(
    messages: list[Message], native: bool, resume: int = 0, max_keys: int = 100_000
) -> BatchResult:
    pipeline = Pipeline("t", LIMITS, 3_600, max_keys, clock=lambda: NOW, native=native)
    assert (pipeline._fold is not None) is native  # the fold under test really runs
    for partition in range(2):
        pipeline.resume(partition, resume)
    result = pipeline.process(messages)
    KEYS_LEFT[native] = pipeline.dedup_keys()
    return result


KEYS_LEFT: dict[bool, int] = {}
"""Keys each dedup held after the last `_run` of its kind."""


def _rows(result: BatchResult) -> list[list[Any]]:
    rows = [row for body, _ in result.bodies for row in rows_of(body)]
    assert sum(count for _, count in result.bodies) == len(rows)
    return rows


def _same(native: BatchResult, python: BatchResult) -> None:
    # The comparison proves nothing unless the native fold took messages itself: one
    # that declined everything would hand all of them to the very Python reference it
    # is compared with.
    assert python.fast_messages == 0
    assert native.fast_messages > 0 or python.counted + python.duplicates == 0
    # Row parts may be cut at other places; the rows, in order, are the same.
    assert _rows(native) == _rows(python)
    assert native.counted == python.counted
    assert native.duplicates == python.duplicates
    assert native.replayed == python.replayed
    assert native.by_type == python.by_type
    assert native.next_offsets == python.next_offsets
    assert native.published_until_ms == python.published_until_ms
    assert native.dead_letters == python.dead_letters


@pytest.mark.parametrize("seed", range(60))
def test_the_native_fold_equals_the_python_reference(seed: int) -> None:
    messages = _messages(seed)
    _same(_run(messages, native=True), _run(messages, native=False))


def test_the_native_fold_takes_nearly_every_message_the_models_accept_whole() -> None:
    # It declines only what it cannot borrow or read alike (escaped strings, repeated
    # attributes, zone offsets): over the whole corpus, 781 of the 911 messages the
    # models accept whole. A fold that declined more than it must would still agree
    # with the Python reference, message by message.
    taken = whole = 0
    for seed in range(60):
        messages = _messages(seed)
        taken += _run(messages, native=True).fast_messages
        for message in messages:
            events, rejections = decode_flat(message.value, NOW, LIMITS)
            whole += bool(events) and not rejections
    assert taken >= 0.8 * whole > 0


def test_every_plain_message_takes_the_native_fold() -> None:
    rng = random.Random(5)
    messages = []
    for offset in range(30):
        events = [_event(rng, offset * 100 + i, 20) for i in range(rng.choice([1, 5, 40]))]
        messages.append(Message(offset % 2, offset, orjson.dumps(events), 0))
    native, python = _run(messages, native=True), _run(messages, native=False)
    assert native.fast_messages == len(messages)
    _same(native, python)


@pytest.mark.parametrize("seed", range(20))
def test_dedup_generations_turn_alike_when_keys_run_out(seed: int) -> None:
    # So few keys per generation that they turn within messages, and a re-sent event
    # is forgotten or not depending on exactly when: both dedups must agree.
    messages = _messages(seed)
    native = _run(messages, native=True, max_keys=37)
    python = _run(messages, native=False, max_keys=37)
    _same(native, python)
    assert KEYS_LEFT[True] == KEYS_LEFT[False]
    assert python.duplicates  # re-sent events do occur


@pytest.mark.parametrize(("max_keys", "ids"), [(7, 30), (400, 60)])  # by keys, by time
def test_native_dedup_first_time_equals_the_deduplicators(max_keys: int, ids: int) -> None:
    rng = random.Random(11)
    now = [0.0]
    python = Deduplicator(10.0, max_keys, clock=lambda: now[0])
    native = Dedup(10.0, max_keys, lambda: now[0])
    keys = [(rng.choice("ab"), str(rng.randrange(ids))) for _ in range(3_000)]
    for source, event_id in keys:
        now[0] += rng.choice([0.0, 0.1, 0.7, 2.0])
        assert native.first_time(source, event_id) == python.first_time(source, event_id)
        assert len(native) == len(python)
    with pytest.raises(ValueError, match="must be positive"):
        Dedup(0.0, 7, lambda: 0.0)


@pytest.mark.parametrize(("max_keys", "ids"), [(7, 30), (400, 60)])  # by keys, by time
def test_native_dedup_admit_many_equals_the_deduplicators(max_keys: int, ids: int) -> None:
    # A message at a time, the clock still within it: admit_many, or first_time per key
    # where the Deduplicator declines (a generation would turn), as the pipeline asks.
    rng = random.Random(12)
    now = [0.0]
    python = Deduplicator(10.0, max_keys, clock=lambda: now[0])
    native = Dedup(10.0, max_keys, lambda: now[0])
    for _ in range(300):
        now[0] += rng.choice([0.0, 0.1, 0.7, 2.0])
        keys = [(rng.choice("ab"), str(rng.randrange(ids))) for _ in range(rng.randrange(1, 12))]
        sources, event_ids = [k[0] for k in keys], [k[1] for k in keys]
        found = python.admit_many(sources, event_ids)
        if found is None:
            found = [i for i, k in enumerate(keys) if not python.first_time(*k)]
        assert native.admit_many(sources, event_ids) == found
        assert len(native) == len(python)
    with pytest.raises(ValueError, match="differ in length"):
        native.admit_many(["a"], [])


def test_every_near_miss_alone_equals_the_python_reference() -> None:
    # Each mutation on its own, in a message of otherwise valid events: the corpus
    # above mixes them, this makes sure every one is met.
    rng = random.Random(1)
    messages = []
    mutations = [(m, None) for m in DOC_MUTATIONS] + [(None, t) for t in TEXT_MUTATIONS]
    for kind in (REQUEST, STREAM_OPENED, STREAM_CLOSED):
        for doc_mutation, text_mutation in mutations:
            events = []
            while len(events) < 3:
                doc = _event(rng, len(messages) * 3 + len(events), 5)
                if doc["type"] == kind:
                    events.append(doc)
            if doc_mutation is not None:
                doc_mutation(events[1])
            texts = [orjson.dumps(e) for e in events]
            if text_mutation is not None:
                texts[1] = text_mutation(texts[1])
            messages.append(Message(0, len(messages), b"[" + b",".join(texts) + b"]", 0))
    native, python = _run(messages, native=True), _run(messages, native=False)
    _same(native, python)
    # Both outcomes are met: some near misses count, some are dead letters.
    assert python.dead_letters
    assert python.counted > 2 * len(messages)


def test_a_large_fold_is_cut_into_parts_within_the_budget() -> None:
    rng = random.Random(3)
    events = [_event(rng, i, 100_000) for i in range(30_000)]
    messages = [
        Message(0, i, orjson.dumps(events[j : j + 200]), 0)
        for i, j in enumerate(range(0, len(events), 200))
    ]
    native = _run(messages, native=True)
    assert len(native.bodies) > 1
    assert all(len(body) <= 699_800 for body, _ in native.bodies)
    _same(native, _run(messages, native=False))


def test_replayed_messages_are_remembered_not_folded() -> None:
    messages = _messages(5)
    native = _run(messages, native=True, resume=3)
    assert native.replayed == sum(1 for m in messages if m.offset < 3)
    _same(native, _run(messages, native=False, resume=3))


def test_an_empty_batch_is_one_empty_part() -> None:
    result = _run([], native=True)
    assert result.bodies == [(b"", 0)]
    assert _run([], native=False).bodies == [(b"", 0)]


def test_sums_beyond_the_stores_64_bits_go_out_as_several_rows() -> None:
    # Each event is within bounds, their sums are not: 40 events of 10^12 units
    # (4 * 10^19 millionths) and of 2^63 - 1 bytes, all on one row.
    event = {"specversion": "1.0", "source": "g", "subject": "acct-1", "type": REQUEST,
             "time": "2026-11-22T11:59:00Z",
             "data": {"units": 1e12, "bytes_in": 2**63 - 1, "bytes_out": 1}}  # fmt: skip
    value = orjson.dumps([{**event, "id": f"e{i}"} for i in range(40)])
    messages = [Message(0, 0, value, 0)]
    native, python = _run(messages, native=True), _run(messages, native=False)
    _same(native, python)
    rows = _rows(native)
    assert len(rows) == 20  # bytes_in: 40 * (2^63 - 1) is 19 full rows and a rest
    assert all(0 <= row[i] < 2**64 for row in rows for i in (9, 11, 12))
    assert sum(row[8] for row in rows) == 40
    assert sum(row[9] for row in rows) == 40 * 10**18
    assert sum(row[11] for row in rows) == 40 * (2**63 - 1)
    assert sum(row[12] for row in rows) == 40


@pytest.mark.parametrize("native", [True, False])
def test_a_measure_beyond_the_bound_is_a_dead_letter_not_a_stuck_worker(native: bool) -> None:
    event = {"specversion": "1.0", "id": "e", "source": "g", "subject": "acct-1",
             "type": REQUEST, "time": "2026-11-22T11:59:00Z", "data": {"units": 2e13}}  # fmt: skip
    result = _run([Message(0, 0, orjson.dumps([event]), 0)], native=native)
    assert result.counted == 0
    [letter] = result.dead_letters
    assert "units" in letter.rejection.detail
    assert "1000000000000" in letter.rejection.detail
