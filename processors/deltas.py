"""Rollup deltas on the wire: what workers send to the rollups topic (pure).

A worker folds a batch of one events partition into delta rows and publishes them
as one or more messages (each under the Kafka record limit) in one transaction,
together with the consumed offset. The sink applies every committed message once.

Message value (JSON): {"v": 1, "partition": p, "next_offset": n,
"reflected_ms": t, "rows": [[account, minute_s, type, route, method, model,
status, stream_id, events, units_micro, latency_ms_sum, bytes_in, bytes_out,
last_time_ms], ...]}. `reflected_ms` is the time up to which partition p's
events are counted once this message is applied; a message without rows is a
heartbeat that only says that. A delta split into several messages marks its
last one `"final": true`: only then are all of the batch's rows out, so only
then may the sink say partition p is counted up to `next_offset`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

VERSION = 1
# Kafka's default record limit is ~1 MiB; stay well below it with headroom
# for the envelope and the batch framing.
MAX_MESSAGE_BYTES = 700_000


@dataclass(frozen=True, slots=True)
class Delta:
    partition: int
    next_offset: int
    reflected_ms: int
    rows: list[list[Any]]
    final: bool = True
    wire: list[list[Any]] | None = None
    """The rows as they came on the wire (minute in epoch seconds, last_time in epoch
    ms, no offset_end), kept by `decode` for the sink's listeners."""


def _wire_row(row: list[Any]) -> list[Any]:
    # Datetimes become integers: compact, and exact to the millisecond.
    out = list(row[:13])
    out[1] = int(row[1].timestamp())
    out.append(int(row[13].timestamp() * 1000))
    return out


def encode(delta: Delta, max_bytes: int = MAX_MESSAGE_BYTES) -> list[bytes]:
    """One delta as messages of at most `max_bytes` each (at least one message)."""
    head = {
        "v": VERSION,
        "partition": delta.partition,
        "next_offset": delta.next_offset,
        "reflected_ms": delta.reflected_ms,
    }
    encoded_rows = [orjson.dumps(_wire_row(row)) for row in delta.rows]
    messages: list[bytes] = []
    chunk: list[bytes] = []
    size = 0
    budget = max_bytes - 200
    for row in encoded_rows:
        if chunk and size + len(row) + 1 > budget:
            messages.append(_frame(head, chunk, final=False))
            chunk, size = [], 0
        chunk.append(row)
        size += len(row) + 1
    messages.append(_frame(head, chunk, final=True))
    return messages


def _frame(head: dict[str, int], rows: list[bytes], final: bool) -> bytes:
    prefix = orjson.dumps({**head, "final": final})[:-1]  # reopen the object for "rows"
    return prefix + b',"rows":[' + b",".join(rows) + b"]}"


def decode(value: bytes) -> Delta:
    """Parse a delta message; raises ValueError on anything else."""
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"delta message is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("v") != VERSION:
        raise ValueError(
            f"unsupported delta message version {doc.get('v') if isinstance(doc, dict) else doc!r}"
        )
    # The sink decodes every row of every delta: one datetime per distinct minute
    # (a delta holds few), and no per-row helper call.
    minutes: dict[Any, datetime] = {}
    rows: list[list[object]] = []
    append = rows.append
    fromtimestamp = datetime.fromtimestamp
    for wire in doc["rows"]:
        row: list[object] = wire[:13]
        minute = wire[1]
        at = minutes.get(minute)
        if at is None:
            at = minutes[minute] = fromtimestamp(minute, UTC)
        row[1] = at
        row.append(fromtimestamp(wire[13] / 1000, UTC))
        row.append(0)  # offset_end: deltas carry none, markers do
        append(row)
    return Delta(
        int(doc["partition"]),
        int(doc["next_offset"]),
        int(doc["reflected_ms"]),
        rows,
        bool(doc.get("final", True)),
        doc["rows"],
    )
