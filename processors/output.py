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

from processors.exceptions import FencedError, OutputClosedError
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


def _abandoned(transaction: asyncio.Future[None]) -> None:
    """What a transaction cut off by `close` ended with no longer matters (its next
    owner settles it); retrieved so that asyncio does not report it as unhandled."""
    if not transaction.cancelled():
        transaction.exception()


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
        # Resolved by close(): a commit in flight or waiting stops waiting then.
        self._closed: asyncio.Future[None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed is not None and self._closed.done()

    async def start(self) -> None:
        """Initialise the transactional producer; this is what fences a zombie.

        Refused once closed: a producer started for a partition this worker let go
        would fence the partition's new owner.
        """
        if self.closed:
            raise OutputClosedError(f"partition {self.partition}: output closed")
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            transactional_id=self._transactional_id,
            compression_type=self._compression,
            max_request_size=2_000_000,
            request_timeout_ms=30_000,
        )
        await producer.start()
        if self.closed:  # closed while it started: it must not outlive the close
            await producer.stop()
            raise OutputClosedError(f"partition {self.partition}: output closed")
        self._producer = producer

    async def close(self) -> None:
        """Let the partition go for good: stop the producer, release every commit.

        aiokafka's `commit_transaction` waits (shielded) on a future that only its
        sender resolves, and `AIOKafkaProducer.stop()` cancels the sender: a commit
        in flight when its producer is stopped would wait forever, and with it the
        batch after it (`RollupWorker._settle_commits`). So `commit` races its
        transaction against this close: once closed, every commit in flight or
        waiting raises OutputClosedError, and nothing starts a producer again.
        Whether a transaction cut off this way lands or is aborted, the next owner's
        producer (or this worker's, after a takeover) settles it before the resume
        offset is read (processors/replay.py), so nothing is lost or counted twice.
        """
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        if not self._closed.done():
            self._closed.set_result(None)
        await self.stop()

    async def stop(self) -> None:
        """Stop the producer; the next commit starts a fresh one (unless closed)."""
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                await producer.stop()
            except Exception as exc:  # a fenced or broken producer may refuse to stop cleanly
                log.debug("producer %s stopped with %r", self._transactional_id, exc)

    async def commit(self, records: Sequence[Record], next_offset: int | None) -> None:
        """Send `records` and (if given) the consumed offset in one transaction.

        Raises FencedError when another worker took the partition, OutputClosedError
        when this output was closed meanwhile (see `close`); any other failure
        propagates after the transaction was aborted, so the caller may retry the
        same records.
        """
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        closed = self._closed
        if self._producer is None:
            await self.start()
        transaction = asyncio.ensure_future(self._transact(records, next_offset))
        try:
            await asyncio.wait([transaction, closed], return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not transaction.done():
                transaction.cancel()  # closed (or this commit cancelled): stop waiting
                transaction.add_done_callback(_abandoned)
        if transaction.cancelled() or not transaction.done():
            raise OutputClosedError(f"partition {self.partition}: output closed mid-commit")
        transaction.result()

    async def _transact(self, records: Sequence[Record], next_offset: int | None) -> None:
        producer = self._producer
        if producer is None:  # closed between start() and here
            raise OutputClosedError(f"partition {self.partition}: output closed")
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
