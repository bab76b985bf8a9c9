"""The cluster DDL variant, checked on the rendered SQL only: no ClickHouse server
(let alone a cluster with Keeper) runs in the unit tier, so what these tests prove
is the text Tally would send, not that a server accepts it."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import pytest
from pydantic import ValidationError

from schemas import store as store_module
from schemas.cluster import check_shards, render
from schemas.exceptions import ClusterDDLError, StoreError
from schemas.settings import TallySettings
from schemas.store import Store, migrations

ZK = "'/clickhouse/tables/{shard}/{database}/{table}', '{replica}'"


def _statement(table: str) -> str:
    for migration in migrations():
        for statement in migration.statements:
            if re.search(rf"CREATE TABLE IF NOT EXISTS {table}\b", statement):
                return statement
    raise AssertionError(f"no migration creates {table}")


def test_single_node_is_the_migration_sql_unchanged() -> None:
    statements = [s for m in migrations() for s in m.statements]
    assert statements  # the loop below must look at something
    for statement in statements:
        assert render(statement, "") is statement


def test_rollups_become_replicated_aggregating_on_cluster() -> None:
    sql = render(_statement("rollup_minute"), "tally")
    assert sql.startswith("CREATE TABLE IF NOT EXISTS rollup_minute ON CLUSTER `tally`\n(")
    assert f"ENGINE = ReplicatedAggregatingMergeTree({ZK})\n" in sql
    assert sql.endswith("ORDER BY (account, minute, type, route, method, model, status, stream_id)")
    assert "PARTITION BY" not in sql  # the sink's one-INSERT-one-part rule still holds


@pytest.mark.parametrize("table", ["accounts", "api_keys"])
def test_directory_tables_keep_their_version_column(table: str) -> None:
    sql = render(_statement(table), "tally")
    assert f"CREATE TABLE IF NOT EXISTS {table} ON CLUSTER `tally`\n(" in sql
    assert f"ENGINE = ReplicatedReplacingMergeTree({ZK}, version)\n" in sql


def test_only_the_header_and_engine_change() -> None:
    # Columns, key order and comments' claims rest on everything else staying put.
    for migration in migrations():
        for statement in migration.statements:
            sql = render(statement, "c1")
            undone = sql.replace(" ON CLUSTER `c1`", "", 1)
            undone = re.sub(
                r"Replicated(\w*)MergeTree\('/clickhouse/tables/\{shard\}/\{database\}/\{table\}',"
                r" '\{replica\}'(?:, )?",
                r"\1MergeTree(",
                undone,
            ).replace("MergeTree()", "MergeTree")
            assert undone == statement


def test_other_ddl_runs_on_cluster_too() -> None:
    assert render("CREATE DATABASE IF NOT EXISTS tally", "c") == (
        "CREATE DATABASE IF NOT EXISTS tally ON CLUSTER `c`"
    )
    assert render("ALTER TABLE rollup_minute ADD COLUMN x UInt8", "c") == (
        "ALTER TABLE rollup_minute ON CLUSTER `c` ADD COLUMN x UInt8"
    )
    assert render("DROP TABLE IF EXISTS old", "c") == "DROP TABLE IF EXISTS old ON CLUSTER `c`"
    assert render("CREATE TABLE t (a UInt8) ENGINE = SummingMergeTree((a)) ORDER BY a", "c") == (
        f"CREATE TABLE t ON CLUSTER `c` (a UInt8) ENGINE = ReplicatedSummingMergeTree({ZK}, (a)"
        ") ORDER BY a"
    )


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO accounts VALUES ('a')",  # no cluster form: would run on one replica
        "CREATE TABLE t (a UInt8) ENGINE = Memory",
        "CREATE TABLE t (a UInt8) ENGINE = ReplicatedMergeTree('/p', 'r') ORDER BY a",
    ],
)
def test_statements_without_a_cluster_form_are_refused(statement: str) -> None:
    with pytest.raises(ClusterDDLError):
        render(statement, "c")


def test_a_cluster_name_that_is_not_a_name_is_refused() -> None:
    with pytest.raises(ClusterDDLError, match="not a plain name"):
        render(_statement("accounts"), "c`; DROP TABLE accounts; --")
    with pytest.raises(ValidationError):
        TallySettings(clickhouse_cluster="two words")
    assert TallySettings(clickhouse_cluster="").clickhouse_cluster == ""


def test_one_shard_only() -> None:
    check_shards("c", 1)
    with pytest.raises(ClusterDDLError, match="knows no cluster"):
        check_shards("c", 0)
    with pytest.raises(ClusterDDLError, match="3 shards"):
        check_shards("c", 3)


def test_the_embedded_store_has_no_cluster_form() -> None:
    with pytest.raises(StoreError, match="needs a ClickHouse server"):
        Store("chdb:///tmp/never-opened", "tally", cluster="c")


class _RecordingClient:
    """Stands in for clickhouse-connect: records the SQL Store sends."""

    def __init__(self, shards: int) -> None:
        self.sql: list[str] = []
        self.shards = shards

    def command(self, sql: str, parameters: dict[str, Any] | None = None) -> None:
        self.sql.append(sql)

    def query(self, sql: str, parameters: dict[str, Any] | None = None) -> Any:
        self.sql.append(sql)
        rows: list[tuple[Any, ...]] = []
        if "system.clusters" in sql:
            rows = [(self.shards,)]
        elif "system.replicas" in sql:
            rows = [("rollup_minute",)]
        return type("Result", (), {"result_rows": rows})()

    def insert(self, table: str, rows: Sequence[Any], column_names: list[str]) -> None:
        self.sql.append(f"INSERT {table}")


def _store(monkeypatch: pytest.MonkeyPatch, cluster: str, shards: int = 1) -> _RecordingClient:
    client = _RecordingClient(shards)
    monkeypatch.setattr(store_module, "_client", lambda url, database: client)
    Store("http://h:8123/tally", "tally", cluster=cluster).migrate()
    return client


def test_store_sends_todays_sql_without_a_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = _store(monkeypatch, "").sql
    expected = [
        "CREATE DATABASE IF NOT EXISTS tally",
        "CREATE TABLE IF NOT EXISTS schema_migrations "
        "(version UInt32, name String, applied_at DateTime64(3, 'UTC') DEFAULT now64(3)) "
        "ENGINE = MergeTree ORDER BY version",
        "SELECT version FROM schema_migrations",
    ]
    for migration in migrations():
        expected += [*migration.statements, "INSERT schema_migrations"]
    assert sent == expected


def test_store_migrates_on_cluster_and_syncs(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = _store(monkeypatch, "c").sql
    ddl = [s for s in sent if s.startswith("CREATE")]
    assert len(ddl) == 9  # the database and eight tables
    assert all(" ON CLUSTER `c`" in s for s in ddl)
    tables = [s for s in ddl if "ENGINE" in s]
    assert len(tables) == 8  # schema_migrations and the seven of the migrations
    assert all(re.search(r"ENGINE = Replicated\w*MergeTree\('/clickhouse/", s) for s in tables)
    assert "system.clusters" in sent[1]  # checked before any table is made
    assert sent[-1] == "SYSTEM SYNC REPLICA tally.`rollup_minute`"


def test_store_refuses_a_sharded_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StoreError, match="2 shards"):
        _store(monkeypatch, "c", shards=2)
