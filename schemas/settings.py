"""What every Tally service reads from the environment (prefix `TALLY_`).

Each service has one frozen settings class deriving from `TallySettings`; the
fields here are the ones they share (where Kafka and the store are). `load()`
validates everything up front and reports every bad variable at once.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal, TypeVar
from urllib.parse import urlparse

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_DATA_DIR = Path(".tally/data")


class TallySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TALLY_", frozen=True, extra="ignore")

    data_dir: Path = Field(
        DEFAULT_DATA_DIR,
        description="Local state: the embedded ClickHouse store, the local broker's log, spools.",
    )
    kafka_bootstrap: str | None = Field(
        None,
        description="Kafka bootstrap servers (host:port,...). Unset: the local broker on "
        "127.0.0.1:9092 that `tally up` starts.",
    )
    events_topic: str = Field(
        "tally.events", min_length=1, max_length=249, description="Topic gateways publish to."
    )
    dlq_topic: str = Field(
        "tally.events.dlq",
        min_length=1,
        max_length=249,
        description="Dead-letter topic: rejected input with its reason in headers.",
    )
    rollups_topic: str = Field(
        "tally.rollups",
        min_length=1,
        max_length=249,
        description="Workers' rollup deltas for the sink (as many partitions as the events topic).",
    )
    consumer_group: str = Field(
        "tally-worker",
        min_length=1,
        description="Kafka consumer group of the workers (/readyz checks that it has members).",
    )
    clickhouse_url: str | None = Field(
        None,
        description="chdb:///path (embedded) or http(s)://user:pass@host:8123/db. "
        "Unset: chdb://<data_dir>/clickhouse.",
    )

    clickhouse_database: str = Field(
        "tally",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$",
        description="Database inside the store; a server URL's path (/db) takes precedence.",
    )
    clickhouse_cluster: str | None = Field(
        None,
        pattern=r"^([A-Za-z_][A-Za-z0-9_-]{0,63})?$",
        description="Unset or empty: one ClickHouse server. A cluster name (remote_servers): "
        "migrations run ON CLUSTER with Replicated*MergeTree tables; one shard, any number of "
        "replicas (schemas/cluster.py).",
    )

    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "warning",
        description="Level of the libraries' logs (faust, aiokafka); Tally's own lines are "
        "always at info.",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="`text`: one readable line per record; `json`: one JSON object per line "
        "(time, level, logger, message, and the API's request fields) for log shippers.",
    )

    @field_validator("clickhouse_url")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("chdb://", "http://", "https://")):
            raise ValueError("must start with chdb://, http:// or https://")
        return value

    @property
    def bootstrap(self) -> str:
        return self.kafka_bootstrap or "127.0.0.1:9092"

    @property
    def store_url(self) -> str:
        return self.clickhouse_url or f"chdb://{(self.data_dir / 'clickhouse').resolve()}"

    @property
    def store_database(self) -> str:
        if self.clickhouse_url and not self.clickhouse_url.startswith("chdb:"):
            path = urlparse(self.clickhouse_url).path.strip("/")
            if path:
                return path
        return self.clickhouse_database


S = TypeVar("S", bound=BaseSettings)


def load(cls: type[S]) -> S:
    """Build settings from the environment or exit with every problem listed."""
    try:
        return cls()
    except ValidationError as exc:
        prefix = str(cls.model_config.get("env_prefix", ""))
        lines = [f"tally: {exc.error_count()} invalid setting(s) in the environment:"]
        for error in exc.errors(include_url=False):
            name = prefix + "_".join(str(part) for part in error["loc"]).upper()
            # A secret (the admin key) refused for being weak is still never echoed.
            got = "" if _is_secret(cls, error["loc"]) else f" (got {error.get('input')!r})"
            lines.append(f"  {name}: {error['msg']}{got}")
        lines.append("Fix these variables (see docs/configuration.md) and start again.")
        print("\n".join(lines), file=sys.stderr)
        raise SystemExit(2) from None


def _is_secret(cls: type[BaseSettings], loc: tuple[int | str, ...]) -> bool:
    field = cls.model_fields.get(str(loc[0])) if loc else None
    return field is not None and "SecretStr" in str(field.annotation)
