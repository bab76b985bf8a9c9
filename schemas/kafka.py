"""Kafka settings the gateway (producers/) and the worker (processors/) must agree on.

Both sides import from here, so that neither reaches into the other's internals: the
compression every Tally producer asks for, and the message size bounds that decide
whether a batch the gateway writes is one the broker stores and the worker accepts.
"""

from __future__ import annotations

from typing import Final

from aiokafka.codec import has_snappy

# Snappy, not lz4: aiokafka 0.14 compresses lz4 at level 9 (LZ4 HC, no setting to
# change it), 1.2 µs per event of a 200-event batch against 0.12 µs for snappy, for
# 13 % against 17 % of the JSON size (benchmarks/NOTES.md); both need `cramjam`,
# without which asking for either fails at construction: then send uncompressed.
COMPRESSION: Final[str | None] = "snappy" if has_snappy() else None
"""`compression_type` for every AIOKafkaProducer Tally makes."""

BROKER_MESSAGE_MAX_BYTES: Final = 1_048_576
"""The broker's default `message.max.bytes` (1 MiB): a larger record batch is refused."""

WORKER_MAX_MESSAGE_BYTES: Final = 1_000_000
"""The worker's default bound on one message (`TALLY_MAX_MESSAGE_BYTES`); a larger
message is dead-lettered as oversized."""

GATEWAY_MAX_MESSAGE_BYTES: Final = 900_000
"""The gateway's default largest batch message: below both bounds above, with room
for the record batch's own headers."""

REQUEST_OVERHEAD_BYTES: Final = 65_536
"""Room a produce request needs beyond its largest message (headers, framing)."""
