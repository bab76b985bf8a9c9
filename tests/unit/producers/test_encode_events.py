"""encode_events (the gateway's batch encoder) decodes to the same events as encode_event."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from producers import events
from producers.events import (
    MAX_PLAIN_EVENT_BYTES,
    AnyEvent,
    encode_event,
    encode_events,
)
from schemas.events import EVENT_ADAPTER, MAX_COUNT, MAX_UNITS

_text = st.text(min_size=1, max_size=40)
_label = st.none() | _text
_units = st.floats(min_value=0, max_value=MAX_UNITS, allow_nan=False, allow_infinity=False)
_opt_units = st.none() | _units
_count = st.none() | st.integers(min_value=0, max_value=MAX_COUNT)
_subject = st.from_regex(r"[A-Za-z0-9_.:-]{1,128}", fullmatch=True)
_zone = st.sampled_from(
    [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-9, minutes=-30))]
)
_time = st.builds(
    lambda at, micro, zone: at.replace(microsecond=micro).astimezone(zone),
    st.datetimes(
        min_value=datetime(2000, 1, 2), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    st.sampled_from([0, 1, 123_456, 999_999]),
    _zone,
)


def _event(kind: int, subject: str, source: str, when: datetime, ident: str, d: Any) -> AnyEvent:
    if kind == 0:
        return events.request(
            subject, source, units=d[0], route=d[1], method=d[2], status=d[3], model=d[4],
            latency_ms=d[5], bytes_in=d[6], bytes_out=d[7], time=when, id=ident,
        )  # fmt: skip
    if kind == 1:
        return events.stream_opened(
            subject, source, d[1] or "s", route=d[2], model=d[4], time=when, id=ident
        )
    return events.stream_closed(
        subject, source, d[1] or "s", units=d[0], duration_ms=d[5], reason=d[4], time=when, id=ident
    )


_events = st.builds(
    _event,
    st.integers(0, 2),
    _subject,
    _text,
    _time,
    _text,
    st.tuples(
        _units,
        _label,
        st.none() | st.text(min_size=1, max_size=16),
        st.none() | st.integers(100, 599),
        _label,
        _opt_units,
        _count,
        _count,
    ),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_events, min_size=1, max_size=5))
def test_batch_encoding_decodes_to_the_same_events(batch: list[AnyEvent]) -> None:
    docs = orjson.loads(encode_events(batch))
    assert [EVENT_ADAPTER.validate_python(doc) for doc in docs] == [
        EVENT_ADAPTER.validate_json(encode_event(e)) for e in batch
    ]
    assert [EVENT_ADAPTER.validate_python(doc) for doc in docs] == batch
    for event in batch:
        assert len(encode_events([event])) - 2 <= MAX_PLAIN_EVENT_BYTES


@settings(max_examples=200, deadline=None)
@given(st.lists(_events, max_size=5))
def test_batch_encoding_writes_what_orjson_writes_for_the_models(batch: list[AnyEvent]) -> None:
    # encode_events hands orjson each event's __dict__ rather than the model (one
    # `default` call fewer per event): the bytes must stay those of the models.
    def fields(value: Any) -> Any:
        return value.__dict__

    assert encode_events(batch) == orjson.dumps(batch, default=fields, option=orjson.OPT_UTC_Z)


def test_the_worker_decodes_both_encodings_alike() -> None:
    from processors.decode import Limits, decode_flat

    now = datetime.now(UTC)
    batch = [
        events.request("acct-1", "gw", units=2, route="/v1/é", time=now.replace(microsecond=0)),
        events.stream_opened(
            "acct-1", "gw", "s1", time=now.astimezone(timezone(timedelta(hours=5)))
        ),
        events.stream_closed("acct-1", "gw", "s1", units=1.5, time=now),
    ]
    old = b"[" + b",".join(encode_event(e) for e in batch) + b"]"
    assert decode_flat(encode_events(batch), now, Limits()) == decode_flat(old, now, Limits())


@pytest.mark.parametrize(
    ("field", "longest"),
    [("id", 128), ("source", 256)],
)
def test_the_size_bound_rests_on_the_models_length_limits(field: str, longest: int) -> None:
    # MAX_PLAIN_EVENT_BYTES assumes these limits: loosening one must fail here.
    base = orjson.loads(encode_event(events.request("a", "gw")))
    EVENT_ADAPTER.validate_python(base | {field: "x" * longest})
    with pytest.raises(ValidationError):
        EVENT_ADAPTER.validate_python(base | {field: "x" * (longest + 1)})


@pytest.mark.parametrize(
    ("kind", "field", "longest"),
    [
        ("request", "route", 256),
        ("request", "model", 256),
        ("request", "method", 16),
        ("opened", "stream_id", 256),
        ("opened", "route", 256),
        ("opened", "model", 256),
        ("closed", "stream_id", 256),
        ("closed", "reason", 256),
    ],
)
def test_the_size_bound_rests_on_the_data_length_limits(
    kind: str, field: str, longest: int
) -> None:
    event = {
        "request": events.request("a", "gw"),
        "opened": events.stream_opened("a", "gw", "s"),
        "closed": events.stream_closed("a", "gw", "s"),
    }[kind]
    base = orjson.loads(encode_event(event))
    ok = base | {"data": base["data"] | {field: "x" * longest}}
    EVENT_ADAPTER.validate_python(ok)
    with pytest.raises(ValidationError):
        EVENT_ADAPTER.validate_python(base | {"data": base["data"] | {field: "x" * (longest + 1)}})


def test_the_subject_pattern_is_ascii_and_bounded() -> None:
    base = orjson.loads(encode_event(events.request("a", "gw")))
    for bad in ("a" * 129, "é"):
        with pytest.raises(ValidationError):
            EVENT_ADAPTER.validate_python(base | {"subject": bad})


async def test_a_batch_too_large_for_one_message_is_split() -> None:
    from benchmarks.micro_producer import _StubProducer
    from producers.gateway import Gateway

    sent: list[bytes] = []

    class Recording(_StubProducer):
        async def send(self, topic: str, value: bytes | None = None, **kw: Any) -> Any:
            sent.append(value or b"")
            return await super().send(topic, value, **kw)

    limit = MAX_PLAIN_EVENT_BYTES + 2
    gateway = Gateway("stub:9092", "t", producer_factory=Recording, spool=False,
                      max_message_bytes=limit)  # fmt: skip
    await gateway.start()
    # Built without validation, so beyond what MAX_PLAIN_EVENT_BYTES assumes.
    big = [
        events.request("acct-1", "gw", route="r").model_copy(
            update={"data": events.RequestData.model_construct(units=1.0, route="r" * 3000)}
        )
        for _ in range(10)
    ]
    for event in big:
        await gateway.record(event)
    await gateway.flush()
    await gateway.close()
    assert all(len(value) <= limit for value in sent)
    assert len(sent) > 1
    decoded = [e for v in sent for e in (orjson.loads(v) if v[:1] == b"[" else [orjson.loads(v)])]
    assert [(d["id"], d["data"]["route"]) for d in decoded] == [(e.id, "r" * 3000) for e in big]
