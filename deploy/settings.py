"""Configuration of `tally up`: the whole stack on one machine."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from processors import WorkerSettings
from query_api.settings import ApiSettings

REPO_ROOT = Path(__file__).resolve().parents[1]


class StackSettings(WorkerSettings, ApiSettings):
    kafka_libs_dir: Path = Field(
        REPO_ROOT / ".tally" / "kafka" / "libs",
        description="Kafka broker jars, installed by `make setup`.",
    )
    kafka_port: int = Field(
        9092,
        ge=1,
        le=65535,
        description="Port of the local broker (the first of --brokers N: N ports from it).",
    )
    clickhouse_port: int = Field(
        8123,
        ge=1,
        le=65535,
        description="Port of the local ClickHouse server of `tally up --store server` "
        "(unless TALLY_CLICKHOUSE_URL names a server).",
    )
    events_partitions: int = Field(
        8, ge=1, le=1024, description="Partitions of the events topic when Tally creates it."
    )
    demo_rate: float = Field(200.0, gt=0, description="Events/s the --demo gateways send.")
    demo_accounts: int = Field(50, ge=3, description="Accounts the --demo gateways simulate.")
    up_worker_processes: int = Field(
        0,
        ge=0,
        le=64,
        description="0: `tally up` counts events in its own process (one core for worker, "
        "sink and API). N: it runs N `tally worker` processes instead, which share the "
        "partitions, and keeps the sink and the API: for a machine with cores to spare.",
    )
