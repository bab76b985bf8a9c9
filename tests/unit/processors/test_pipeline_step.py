from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from processors.decode import Limits
from processors.pipeline import BatchResult, Message, Pipeline
from schemas.deltas import rows_of
from schemas.rollup_table import COLUMNS

NOW = datetime(2026, 3, 29, 12, 0, tzinfo=UTC)


def _event(event_id: str, subject: str = "acct-1", **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "specversion": "1.0",
        "id": event_id,
        "source": "gw",
        "type": "tally.request.v1",
        "subject": subject,
        "time": "2026-03-29T11:59:30Z",
        "data": {"units": 1.25},
    }
    doc.update(changes)
    return doc


def _pipeline() -> Pipeline:
    pipeline = Pipeline(
        "events", Limits(), dedup_window_s=60, dedup_max_keys=100, clock=lambda: NOW
    )
    for partition in range(2):
        pipeline.resume(partition, 0)
    return pipeline


def _rows(result: BatchResult) -> list[dict[str, object]]:
    """The batch's delta rows by column name (the wire layout: no offset_end)."""
    return [
        dict(zip(COLUMNS, row, strict=False)) for body, _ in result.bodies for row in rows_of(body)
    ]


def _deltas(result: BatchResult) -> dict[tuple[object, ...], dict[str, object]]:
    return {(row["account"], row["type"]): row for row in _rows(result)}


def test_counts_units_exactly_and_drops_duplicates() -> None:
    pipeline = _pipeline()
    batch = orjson.dumps([_event("1"), _event("2"), _event("1")])
    result = pipeline.process([Message(0, 0, batch), Message(0, 1, orjson.dumps(_event("2")))])
    delta = _deltas(result)[("acct-1", "tally.request.v1")]
    assert delta["events"] == 2
    assert delta["units_micro"] == 2_500_000
    assert delta["minute"] == int(datetime(2026, 3, 29, 11, 59, tzinfo=UTC).timestamp())
    assert result.duplicates == 2
    assert result.next_offsets == {0: 2}


def test_stream_cost_counts_and_rejections_become_dead_letters() -> None:
    pipeline = _pipeline()
    closed = _event("3", type="tally.stream.closed.v1", data={"stream_id": "s", "units": 4})
    result = pipeline.process(
        [
            Message(1, 10, orjson.dumps(closed)),
            Message(1, 11, b"garbage"),
        ]
    )
    assert _deltas(result)[("acct-1", "tally.stream.closed.v1")]["units_micro"] == 4_000_000
    [letter] = result.dead_letters
    assert (letter.partition, letter.offset, letter.rejection.reason) == (1, 11, "malformed_json")
    assert result.next_offsets == {1: 12}


def test_messages_below_the_resume_offset_are_not_counted_again_but_remembered() -> None:
    pipeline = Pipeline("events", Limits(), 60, 100, clock=lambda: NOW)
    pipeline.resume(0, 5)
    replay = [Message(0, offset, orjson.dumps(_event(f"e{offset}"))) for offset in range(5)]
    result = pipeline.process(replay)
    assert result.replayed == 5
    assert result.counted == 0
    assert _deltas(result) == {}
    # A re-send of an event counted before the restart is still a duplicate.
    result = pipeline.process(
        [Message(0, 5, orjson.dumps(_event("e3"))), Message(0, 6, orjson.dumps(_event("new")))]
    )
    assert (result.counted, result.duplicates) == (1, 1)


@pytest.mark.parametrize("native", [True, False])
def test_remembered_history_makes_its_valid_events_duplicates(native: bool) -> None:
    # What a takeover re-reads (Resumer.replay feeds Pipeline.remember): a batch
    # message, a single event with an offset time (not the native fold's), and a
    # message whose second event is invalid: only valid events are remembered.
    pipeline = Pipeline("events", Limits(), 60, 100, clock=lambda: NOW, native=native)
    pipeline.resume(0, 3)
    pipeline.remember(0, orjson.dumps([_event("a"), _event("b")]))
    pipeline.remember(0, orjson.dumps(_event("c", time="2026-03-29T13:59:30+02:00")))
    pipeline.remember(0, orjson.dumps([_event("d"), _event("x", subject="bad subject")]))
    assert pipeline.dedup_keys() == 4
    again = [_event(i) for i in ("a", "b", "c", "d", "x", "new")]
    result = pipeline.process([Message(0, 3, orjson.dumps(again))])
    assert (result.counted, result.duplicates) == (2, 4)


def test_dimensions_are_kept_apart() -> None:
    pipeline = _pipeline()
    a = _event("a", data={"units": 1, "route": "/v1/x", "status": 200, "model": "m"})
    b = _event("b", data={"units": 1, "route": "/v1/x", "status": 500, "model": "m"})
    result = pipeline.process([Message(0, 0, orjson.dumps([a, b]))])
    assert sorted((r["route"], r["status"], r["events"]) for r in _rows(result)) == [
        ("/v1/x", 200, 1),
        ("/v1/x", 500, 1),
    ]
