"""Configuration of `tally up`: the whole stack on one machine."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field

from processors.settings import WorkerSettings

REPO_ROOT = Path(__file__).resolve().parents[1]


class StackSettings(WorkerSettings):
    kafka_libs_dir: Path = Field(
        REPO_ROOT / ".tally" / "kafka" / "libs",
        description="Kafka broker jars, installed by `make setup`.",
    )
    kafka_port: int = Field(9092, ge=1, le=65535, description="Port of the local broker.")
    events_partitions: int = Field(
        8, ge=1, le=1024, description="Partitions of the events topic when Tally creates it."
    )
    api_host: str = Field("127.0.0.1", description="Interface the API listens on.")
    api_port: int = Field(8000, ge=1, le=65535, description="Port the API listens on.")
    demo_rate: float = Field(200.0, gt=0, description="Events/s the --demo gateways send.")
    demo_accounts: int = Field(50, ge=1, description="Accounts the --demo gateways simulate.")
