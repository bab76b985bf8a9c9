"""The worker's configuration (`tally worker`, and the worker inside `tally up`)."""

from __future__ import annotations

from pydantic import Field

from schemas.settings import TallySettings


class WorkerSettings(TallySettings):
    sink_group: str = Field(
        "",
        description="Kafka consumer group of the sinks writing one store: they split the "
        "rollups partitions between them. Empty: `<rollups topic>.sinks`. Sinks writing "
        "another store from the same topic need a group of their own.",
    )
    sink_session_timeout_ms: int = Field(
        10_000,
        ge=1_000,
        le=300_000,
        description="A sink silent this long loses its rollups partitions to the others "
        "(the broker's group.min.session.timeout.ms, 6 s by default, is the floor).",
    )
    worker_batch_messages: int = Field(
        1_000, ge=1, le=100_000, description="Messages per flush at most (each may hold a batch)."
    )
    worker_flush_interval_s: float = Field(
        0.25,
        gt=0,
        le=60,
        description="Flush at least this often while events arrive (bounds how stale the "
        "usage API is: benchmarks/freshness.py).",
    )
    dedup_window_s: float = Field(
        3_600.0, gt=0, description="A re-sent (source, id) is recognised for at least this long."
    )
    dedup_max_keys: int = Field(
        2_000_000, ge=1_000, description="Keys per partition generation; memory <= 2x this."
    )
    dedup_replay_max_messages: int = Field(
        200_000,
        ge=0,
        description="On taking over a partition, re-read at most this many earlier messages "
        "(within the dedup window) to rebuild dedup memory.",
    )
    max_lateness_s: float = Field(
        35 * 86_400.0, gt=0, description="Events older than this are rejected (too_late)."
    )
    max_future_s: float = Field(
        300.0, ge=0, description="Events further ahead than this are rejected (time_in_future)."
    )
    max_message_bytes: int = Field(1_000_000, ge=1_024, description="Larger messages: oversized.")
    max_event_bytes: int = Field(64_000, ge=512, description="Larger events: oversized.")
    metrics_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        description="Serve Prometheus metrics of `tally worker` / `tally sink` on this port "
        "(at /metrics). Unset: off (`tally up` and `tally api` serve them at the API's /metrics).",
    )
    metrics_host: str = Field(
        "127.0.0.1", description="Interface the TALLY_METRICS_PORT endpoint listens on."
    )

    @property
    def sink_group_id(self) -> str:
        """The sinks' consumer group: TALLY_SINK_GROUP, or `<rollups topic>.sinks`."""
        return self.sink_group or f"{self.rollups_topic}.sinks"
