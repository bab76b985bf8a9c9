"""Sinks as a Kafka consumer group: which sink applies which rollups partitions.

Kafka's group protocol spreads the partitions of `tally.rollups` over the sinks
of one group (`TALLY_SINK_GROUP`) and moves a partition when its sink leaves or
stops heartbeating for `TALLY_SINK_SESSION_TIMEOUT_MS`. The group decides who
*should* apply a partition; it cannot stop a sink that was paused or cut off and
still believes it owns one. The store-side fence (processors/sink_fence.py)
decides who *can*: on every assignment the sink takes a new write gate, which
fences off every older writer of those partitions, and only then reads the offset
markers and resumes after them. The group's own committed offsets are never used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiokafka.abc import ConsumerRebalanceListener
from aiokafka.structs import TopicPartition

if TYPE_CHECKING:
    from processors.sink import Sink


class SinkRebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands the sink's partitions over on every rebalance.

    aiokafka runs both callbacks in its coordinator task and waits for them
    before joining (revoked) and before fetching (assigned), so the sink
    finishes or abandons the INSERT in flight before its partitions go, and
    fences and seeks before it reads a record of its new ones.
    """

    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        await self.sink.revoke()

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        await self.sink.assign(assigned)
