"""How the gateway library batches and buffers (env prefix `TALLY_`)."""

from __future__ import annotations

from pydantic import Field

from schemas.settings import TallySettings


class ProducerSettings(TallySettings):
    producer_max_batch_events: int = Field(
        200,
        ge=1,
        le=100_000,
        description="Events per Kafka message: a partition's buffer is sent as one batch "
        "message once it holds this many events.",
    )
    producer_linger_ms: float = Field(
        20,
        ge=0,
        le=60_000,
        description="Longest time (ms) an event waits in a partition's buffer for the batch "
        "to fill before it is sent anyway. Higher: fewer, larger messages; lower: less delay.",
    )
    producer_max_buffered_events: int = Field(
        100_000,
        ge=1,
        description="Events recorded but not yet acknowledged by Kafka, at most. When full, "
        "`record` waits for acknowledgements (backpressure); events are never dropped.",
    )
    producer_max_message_bytes: int = Field(
        900_000,
        ge=1_024,
        le=100_000_000,
        description="Largest batch message (bytes of JSON). Keep it below the broker's "
        "message.max.bytes (1 MiB by default) and the processors' message limit.",
    )
