"""How the gateway library batches, buffers and spools (env prefix `TALLY_`)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator

from schemas.kafka import GATEWAY_MAX_MESSAGE_BYTES
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
        GATEWAY_MAX_MESSAGE_BYTES,
        ge=1_024,
        le=100_000_000,
        description="Largest batch message (bytes of JSON). Keep it below the broker's "
        "message.max.bytes (1 MiB by default) and the processors' message limit.",
    )
    producer_spool: bool = Field(
        True,
        description="Keep batches Kafka cannot take in a disk spool and replay them, in order, "
        "once it answers again. `false`: no spool; undeliverable batches are raised by "
        "`flush`/`close` (GatewaySendError) and lost unless the caller records them again.",
    )
    producer_spool_dir: Path | None = Field(
        None,
        description="The gateway's spool directory, one per gateway process (it is locked). "
        "Unset: `<data_dir>/spool/<topic>/<client id, or 'gateway'>`. A restarted gateway "
        "replays what its predecessor left there, so keep it stable across restarts.",
    )
    producer_spool_max_bytes: int = Field(
        1024**3,
        ge=1024**2,
        description="Largest size of the spool on disk (bytes). At 500 events/s of ~350 bytes "
        "the default holds about 1.5 hours of outage.",
    )
    producer_spool_full_policy: Literal["block", "reject"] = Field(
        "block",
        description="When the spool is full: `block` makes `record` wait (backpressure; "
        "nothing is dropped); `reject` makes `record` raise SpoolFullError at once and "
        "counts the event in `events_rejected_spool_full`: the caller decides.",
    )
    producer_spool_fsync: Literal["always", "batch"] = Field(
        "always",
        description="`always`: spooled batches are fsync'd before they count as safe (survive "
        "a power cut; one fsync per write, ~1 ms on SSDs). `batch`: fsync'd at most once a "
        "second (survive a process crash; a power cut may lose the last second).",
    )
    producer_unreachable_after_s: float = Field(
        5.0,
        gt=0,
        le=3_600,
        description="How long (s) a message may go unacknowledged, or Kafka may fail sends, "
        "before batches go to the spool instead of waiting in memory.",
    )
    producer_close_timeout_s: float = Field(
        30.0,
        gt=0,
        description="How long (s) `close()` and `flush()` wait, by default, for buffered events "
        "to reach Kafka or the spool. Keep it below the grace period of SIGTERM.",
    )

    @field_validator("producer_spool_dir", mode="before")
    @classmethod
    def _no_empty_spool_dir(cls, value: object) -> object:
        # An empty path would be the current directory: never what anyone means.
        if isinstance(value, str) and not value.strip():
            raise ValueError(
                "is empty; unset it for the default spool directory, or set "
                "TALLY_PRODUCER_SPOOL=false to run without a spool"
            )
        return value


class EnforcementSettings(TallySettings):
    """The gateway middleware's enforcement of plans (producers/enforcement_sync.py)."""

    enforce_api_url: str | None = Field(
        None,
        description="Tally's API the gateway reads limits from (POST /api/v1/admin/limits), "
        "e.g. http://tally-api:8000. Unset: `Enforcement.from_settings` refuses to start.",
    )
    enforce_admin_key: SecretStr | None = Field(
        None, description="An admin key of that API (the limits route is admin-only)."
    )
    enforce_sync_interval_s: float = Field(
        1.0,
        gt=0,
        le=60,
        description="How often (s) the gateway reads the limits of its recently active "
        "accounts. The overshoot bound grows with it (docs/gateway-integration.md).",
    )
    enforce_active_within_s: float = Field(
        300.0,
        gt=0,
        description="Accounts with a call in this many seconds are kept in sync; others "
        "are forgotten once Tally reflects all their uses.",
    )
    enforce_stale_after_s: float = Field(
        10.0,
        gt=0,
        description="A last answer from Tally older than this (s) no longer refuses "
        "anything: enforcement fails open while Tally is unreachable (metering goes on).",
    )
    enforce_reflect_margin_s: float = Field(
        2.0,
        ge=0,
        description="A use of this gateway is dropped from its local count once Tally's "
        "reflected time is this many seconds past its event time: at least a call's "
        "latency plus the producer's linger.",
    )
    enforce_timeout_s: float = Field(
        2.0, gt=0, description="Timeout (s) of one limits request to the API."
    )
