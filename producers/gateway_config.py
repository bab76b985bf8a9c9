"""A gateway's configuration: explicit arguments over `ProducerSettings`, checked once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from producers.kafka_edge import ProducerFactory, kafka_producer_factory
from producers.settings import ProducerSettings
from producers.spool import FsyncPolicy
from producers.spooling import SpoolConfig, SpoolFullPolicy

_SPOOL_SLACK = 65_536
"""Spool room beyond two of the largest messages: record and segment headers."""


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    bootstrap: str
    topic: str
    max_batch: int
    max_buffered: int
    max_bytes: int
    resume_at: int
    """A record() waiting for room resumes once no more events than this are unsafe."""
    linger_s: float
    factory: ProducerFactory
    close_timeout_s: float
    spool: SpoolConfig | None
    """None: spooling is off."""


@dataclass(frozen=True, slots=True)
class Overrides:
    """`Gateway`'s keyword arguments; None: the setting's value."""

    max_batch_events: int | None = None
    linger_ms: float | None = None
    max_buffered_events: int | None = None
    max_message_bytes: int | None = None
    client_id: str | None = None
    producer_factory: ProducerFactory | None = None
    spool: bool | None = None
    spool_dir: Path | str | None = None
    spool_max_bytes: int | None = None
    spool_full_policy: SpoolFullPolicy | None = None
    spool_fsync: FsyncPolicy | None = None
    unreachable_after_s: float | None = None
    close_timeout_s: float | None = None


def resolve(
    bootstrap: str | None, topic: str | None, s: ProducerSettings, o: Overrides
) -> GatewayConfig:
    """Raises ValueError, naming the argument, for a value out of bounds."""
    chosen_bootstrap = bootstrap if bootstrap is not None else s.bootstrap
    chosen_topic = topic if topic is not None else s.events_topic
    max_buffered = _positive(
        "max_buffered_events", o.max_buffered_events, s.producer_max_buffered_events
    )
    max_bytes = _positive("max_message_bytes", o.max_message_bytes, s.producer_max_message_bytes)
    linger = s.producer_linger_ms if o.linger_ms is None else o.linger_ms
    if linger < 0:
        raise ValueError(f"linger_ms must be >= 0, got {linger}")
    factory = o.producer_factory or kafka_producer_factory(
        chosen_bootstrap, max_message_bytes=max_bytes, client_id=o.client_id
    )
    return GatewayConfig(
        bootstrap=chosen_bootstrap,
        topic=chosen_topic,
        max_batch=_positive("max_batch_events", o.max_batch_events, s.producer_max_batch_events),
        max_buffered=max_buffered,
        max_bytes=max_bytes,
        # A record() waiting for room resumes once a quarter of the buffer is free, not
        # at the first acknowledgement: each wait may seal partial buffers, and waits
        # one message apart would send a stream of tiny messages (the Kafka client's cost
        # is mostly per message), slowing the acknowledgements that make room: in the
        # bench, up to 200k messages of ~5 events instead of 5k of 200.
        resume_at=max_buffered - max(1, max_buffered // 4),
        linger_s=linger / 1000,
        factory=factory,
        close_timeout_s=_seconds("close_timeout_s", o.close_timeout_s, s.producer_close_timeout_s),
        spool=_spool_config(chosen_topic, max_bytes, s, o),
    )


def _spool_config(
    topic: str, max_bytes: int, s: ProducerSettings, o: Overrides
) -> SpoolConfig | None:
    unreachable_s = _seconds(
        "unreachable_after_s", o.unreachable_after_s, s.producer_unreachable_after_s
    )
    enabled = s.producer_spool if o.spool is None else o.spool
    chosen_dir = o.spool_dir if o.spool_dir is not None else s.producer_spool_dir
    spool_max = o.spool_max_bytes if o.spool_max_bytes is not None else s.producer_spool_max_bytes
    if enabled and spool_max < 2 * max_bytes + _SPOOL_SLACK:
        raise ValueError(
            f"spool_max_bytes ({spool_max}) must hold at least two of the largest "
            f"messages (max_message_bytes={max_bytes}): at least "
            f"{2 * max_bytes + _SPOOL_SLACK}"
        )
    full_policy: SpoolFullPolicy = o.spool_full_policy or s.producer_spool_full_policy
    if full_policy not in ("block", "reject"):
        raise ValueError(f"spool_full_policy must be 'block' or 'reject', got {full_policy!r}")
    if not enabled:
        return None
    return SpoolConfig(
        directory=(
            Path(chosen_dir).absolute()
            if chosen_dir is not None
            else default_spool_dir(s.data_dir, topic, o.client_id)
        ),
        max_bytes=spool_max,
        fsync=o.spool_fsync or s.producer_spool_fsync,
        full_policy=full_policy,
        unreachable_s=unreachable_s,
        directory_is_default=chosen_dir is None,
    )


def default_spool_dir(data_dir: Path, topic: str, client_id: str | None) -> Path:
    """`<data_dir>/spool/<topic>/<client_id or 'gateway'>`, made safe as a file name."""

    def safe(name: str) -> str:
        return re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".") or "_"

    return (data_dir / "spool" / safe(topic) / safe(client_id or "gateway")).absolute()


def _positive(name: str, value: int | None, default: int) -> int:
    chosen = default if value is None else value
    if chosen < 1:
        raise ValueError(f"{name} must be at least 1, got {chosen}")
    return chosen


def _seconds(name: str, value: float | None, default: float) -> float:
    chosen = default if value is None else value
    if chosen <= 0:
        raise ValueError(f"{name} must be > 0 seconds, got {chosen}")
    return chosen
