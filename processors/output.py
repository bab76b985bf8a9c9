"""A worker's transactional output for one events partition (adapter over aiokafka).

Each events partition p has its own transactional producer, id
`<group>.<events topic>.<p>`. Starting it fences any older producer with that id:
a worker that lost p in a rebalance (a zombie) can no longer commit, so two
workers can never both count the same events. One transaction carries the
partition's delta messages, its dead letters and the consumed offset: the sink
(read_committed) sees all of them or none, and a restart resumes exactly at the
committed offset.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from aiokafka import AIOKafkaProducer
from aiokafka.errors import ProducerFenced
from aiokafka.structs import TopicPartition

from processors.exceptions import FencedError
from processors.pipeline import DeadLetter

log = logging.getLogger("tally.worker")

Record = tuple[str, bytes | None, bytes, int | None, list[tuple[str, bytes]]]
"""(topic, key, value, partition or None, headers)."""

# A dead letter must fit in one Kafka record (brokers default to ~1 MB). Larger
# originals (only `oversized` ones can be) keep their first bytes, and the
# `tally-original-bytes` header says how long they were.
DLQ_MAX_VALUE_BYTES = 900_000
DLQ_MAX_DETAIL_CHARS = 1000


def dead_letter_record(
    letter: DeadLetter, key: bytes | None, events_topic: str, dlq_topic: str
) -> Record:
    """The dead-letter topic's record for `letter`: its bytes, why, and where it came from.

    Keyed like the message it came from, so one account's dead letters keep their order.
    """
    rejection = letter.rejection
    headers = [
        ("tally-reason", rejection.reason.encode()),
        # `detail` may quote what the caller sent; backslashreplace keeps any str encodable.
        (
            "tally-detail",
            rejection.detail[:DLQ_MAX_DETAIL_CHARS].encode("utf-8", "backslashreplace"),
        ),
        ("tally-source-topic", events_topic.encode()),
        ("tally-source-partition", str(letter.partition).encode()),
        ("tally-source-offset", str(letter.offset).encode()),
    ]
    if rejection.index is not None:
        headers.append(("tally-batch-index", str(rejection.index).encode()))
    value = rejection.raw
    if len(value) > DLQ_MAX_VALUE_BYTES:
        headers.append(("tally-original-bytes", str(len(value)).encode()))
        value = value[:DLQ_MAX_VALUE_BYTES]
    return (dlq_topic, key, value, None, headers)


class PartitionOutput:
    def __init__(
        self, bootstrap: str, group: str, events_topic: str, partition: int, compression: str | None
    ) -> None:
        self.partition = partition
        self.group = group
        self._events_tp = TopicPartition(events_topic, partition)
        self._transactional_id = f"{group}.{events_topic}.{partition}"
        self._bootstrap = bootstrap
        self._compression = compression
        self._producer: AIOKafkaProducer | None = None
        # One transaction at a time per producer: batches and heartbeats take turns.
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        """Initialise the transactional producer; this is what fences a zombie."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            transactional_id=self._transactional_id,
            compression_type=self._compression,
            max_request_size=2_000_000,
            request_timeout_ms=30_000,
        )
        await producer.start()
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await producer.stop()
            except Exception as exc:  # a fenced or broken producer may refuse to stop cleanly
                log.debug("producer %s stopped with %r", self._transactional_id, exc)

    async def commit(self, records: Sequence[Record], next_offset: int | None) -> None:
        """Send `records` and (if given) the consumed offset in one transaction.

        Raises FencedError when another worker took the partition; any other
        failure propagates after the transaction was aborted, so the caller may
        retry the same records.
        """
        if self._producer is None:
            await self.start()
        producer = self._producer
        assert producer is not None
        try:
            async with producer.transaction():
                for topic, key, value, partition, headers in records:
                    await producer.send(topic, value, key=key, partition=partition, headers=headers)
                if next_offset is not None:
                    await producer.send_offsets_to_transaction(
                        {self._events_tp: next_offset}, self.group
                    )
        except ProducerFenced as exc:
            await self.stop()
            raise FencedError(f"partition {self.partition} was taken over") from exc
        except Exception:
            # The producer may be in an unusable state (e.g. the broker died
            # mid-commit); a fresh one re-initialises and aborts leftovers.
            await self.stop()
            raise
