"""Connecting to ClickHouse (embedded chdb or a server) and migrating its schema.

Always through clickhouse-connect: `chdb:///path` gives the in-process engine,
`http(s)://user:pass@host:port/db` a server. Migrations are the ordered SQL files
in `schemas/migrations/`; each applied version is recorded in `schema_migrations`.
"""

from __future__ import annotations

import os
import re
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from schemas.cluster import check_shards, render, valid_cluster
from schemas.exceptions import ClusterDDLError, StoreError
from schemas.settings import redact

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


def migrations() -> list[Migration]:
    """The migrations shipped with Tally, in the order they apply."""
    found = []
    for entry in MIGRATIONS_DIR.iterdir():
        match = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if not match:
            continue
        text = entry.read_text(encoding="utf-8")
        # Strip comments first so a ';' inside one cannot split a statement.
        body = "\n".join(line.split("--", 1)[0] for line in text.splitlines())
        statements = tuple(s.strip() for s in body.split(";") if s.strip())
        found.append(Migration(int(match.group(1)), match.group(2), statements))
    return sorted(found, key=lambda m: m.version)


class Store:
    """A thread-safe handle on one Tally database.

    chdb admits one data path per process and its handles are not meant for
    concurrent use, so every call is serialised by a lock; callers on the event
    loop use `asyncio.to_thread` around these methods.
    """

    def __init__(self, url: str, database: str, cluster: str = "") -> None:
        if not _IDENT.fullmatch(database):
            raise StoreError(
                f"database name {database!r} is not a plain identifier;",
                "use letters, digits and _ (TALLY_CLICKHOUSE_DATABASE)",
                redact(url),
            )
        if not valid_cluster(cluster):
            raise StoreError(
                f"cluster name {cluster!r} is not a plain name;",
                "use letters, digits, _ and - (TALLY_CLICKHOUSE_CLUSTER)",
                redact(url),
            )
        if cluster and url.startswith("chdb:"):
            raise StoreError(
                "TALLY_CLICKHOUSE_CLUSTER needs a ClickHouse server; the embedded store is one "
                "process.",
                "Set TALLY_CLICKHOUSE_URL to http(s)://... or unset the cluster.",
                redact(url),
            )
        self.url = url
        self.database = database
        # '' = one server; otherwise DDL runs ON CLUSTER with replicated engines
        # (schemas/cluster.py says why there are no Distributed tables).
        self.cluster = cluster
        self._lock = threading.Lock()
        try:
            admin = _client(url, None)
            admin.command(render(f"CREATE DATABASE IF NOT EXISTS {database}", cluster))
            self._client = _client(url, database)
        except Exception as exc:
            raise StoreError(
                f"cannot open the ClickHouse store at {redact(url)}: {exc}.",
                "Check TALLY_CLICKHOUSE_URL; an embedded path may be held by another process.",
                redact(url),
            ) from exc

    @property
    def embedded(self) -> bool:
        return self.url.startswith("chdb:")

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        with self._lock:
            return self._client.command(sql, parameters=parameters)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
        with self._lock:
            return [
                tuple(row) for row in self._client.query(sql, parameters=parameters).result_rows
            ]

    def query_blocks(
        self,
        sql: str,
        parameters: dict[str, Any],
        each: Callable[[Sequence[Sequence[Any]]], bool],
    ) -> None:
        """One statement whose rows are handed to `each` a block at a time, never held
        whole: one statement reads one set of parts (a consistent snapshot), however
        large its result. `each` returns False to stop reading."""
        with self._lock, self._client.query_row_block_stream(sql, parameters=parameters) as rows:
            for block in rows:
                if not each(block):
                    break

    def insert(self, table: str, rows: Sequence[Sequence[Any]], columns: Sequence[str]) -> None:
        with self._lock:
            self._client.insert(table, rows, column_names=list(columns))

    def insert_json_rows(
        self,
        table: str,
        columns: Sequence[str],
        structure: str,
        select: str,
        body: bytes,
        settings: Mapping[str, int],
    ) -> None:
        """INSERT INTO table (columns) SELECT select FROM rows that ClickHouse parses.

        `body` is rows in JSONCompactEachRow with the columns of `structure`
        (ClickHouse's "name Type, ..." form); `select` converts them to `columns`.
        Python never builds a row: the server (or the embedded engine) reads the
        bytes. A server gets them as the data of INSERT ... SELECT FROM input();
        the embedded engine reads no inline data for input() (it silently inserts
        nothing), so it reads them from a temporary file, as clickhouse-connect's
        own raw_insert does on chdb.

        The embedded engine gets `settings` in the statement: clickhouse-connect's
        chdb backend applies per-call settings by reading their values from
        system.settings, SETting each and SETting it back: several statements per call.
        """
        into = f"INSERT INTO {table} ({', '.join(columns)})"
        with self._lock:
            if not self.embedded:
                self._client.command(
                    f"{into} SELECT {select} FROM "
                    f"input({_quote(structure)}) FORMAT JSONCompactEachRow",
                    data=body,
                    settings=dict(settings),
                )
                return
            inline = ", ".join(
                f"{_setting(name)} = {int(value)}" for name, value in settings.items()
            )
            if inline:
                into += f" SETTINGS {inline}"
            fd, path = tempfile.mkstemp(prefix="tally-insert-", suffix=".json")
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(body)
                self._client.command(
                    f"{into} SELECT {select} FROM "
                    f"file({_quote(path)}, 'JSONCompactEachRow', {_quote(structure)})"
                )
            finally:
                os.unlink(path)

    def migrate(self) -> list[int]:
        """Apply pending migrations in order; return the versions applied now."""
        if self.cluster:
            self._check_cluster()
        self.command(
            render(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
                "ENGINE = MergeTree ORDER BY version",
                self.cluster,
            )
        )
        done = {row[0] for row in self.query("SELECT version FROM schema_migrations")}
        applied = []
        for migration in migrations():
            if migration.version in done:
                continue
            for statement in migration.statements:
                self.command(render(statement, self.cluster))
            self.insert(
                "schema_migrations", [[migration.version, migration.name]], ["version", "name"]
            )
            applied.append(migration.version)
        if self.cluster:
            self._sync_replicas()
        return applied

    def _check_cluster(self) -> None:
        shards = self.query(
            "SELECT uniqExact(shard_num) FROM system.clusters WHERE cluster = {c:String}",
            {"c": self.cluster},
        )
        try:
            check_shards(self.cluster, int(shards[0][0]) if shards else 0)
        except ClusterDDLError as exc:
            raise StoreError(str(exc), url=redact(self.url)) from exc

    def _sync_replicas(self) -> None:
        # A sink resuming on another replica than its predecessor wrote to must
        # see every part written there first, or it would re-apply deltas whose
        # offset markers it has not fetched yet; waiting here makes sure it has.
        tables = self.query(
            "SELECT table FROM system.replicas WHERE database = {db:String}",
            {"db": self.database},
        )
        for (table,) in tables:
            self.command(f"SYSTEM SYNC REPLICA {self.database}.`{table}`")

    def close(self) -> None:
        with self._lock:
            self._client.close()


def _client(url: str, database: str | None) -> Client:
    # Every time column is UTC; "aware" returns them as aware datetimes from
    # both backends, so no caller ever sees a naive time.
    if url.startswith("chdb:"):
        return clickhouse_connect.get_client(dsn=url, database=database, tz_mode="aware")
    parsed = urlparse(url)
    return clickhouse_connect.get_client(
        host=parsed.hostname or "localhost",
        port=parsed.port or (8443 if parsed.scheme == "https" else 8123),
        username=parsed.username or "default",
        password=parsed.password or "",
        secure=parsed.scheme == "https",
        database=database or "default",
        tz_mode="aware",
    )


def _setting(name: str) -> str:
    if not name.isidentifier():
        raise ValueError(f"{name!r} is not a ClickHouse setting name")
    return name


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
