"""Tally's server path on a real ClickHouse server (`clickhouse_server_url`, tests/conftest.py).

Without Docker that is ClickHouse's own server code from the chdb wheel
(deploy/clickhouse_local.py): `tally migrate`, the sink's INSERT settings, the API's
usage answers (from a view loaded from the server), two writing
processes and a reader, and a restart.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.structs import TopicPartition

from deploy.clickhouse_local import LocalClickHouse
from deploy.processes import free_port
from processors.sink import Sink
from query_api.accounts import AccountStore
from query_api.app import create_app
from query_api.settings import ApiSettings
from schemas.deltas import Delta, encode
from schemas.events import REQUEST, STREAM_CLOSED, STREAM_OPENED
from schemas.rollup_table import INSERT_SETTINGS, MAX_ROWS_PER_INSERT, TABLE, RollupStore
from schemas.store import Store, migrations
from tests.integration.test_sink_insert import _deltas, _Record, _stored

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
NOW = datetime(2026, 3, 29, 12, 0, 30, 250_000, tzinfo=UTC)


def _tally(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deploy.cli", *args],
        cwd=REPO_ROOT,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_tally_migrate_on_the_server(
    clickhouse_server_url: str, unique_name: str, tmp_path: Path
) -> None:
    env = {
        "TALLY_CLICKHOUSE_URL": clickhouse_server_url,
        "TALLY_CLICKHOUSE_DATABASE": unique_name,
        "TALLY_DATA_DIR": str(tmp_path),
    }
    first = _tally(["migrate", "--json"], env)
    assert first.returncode == 0, first.stderr
    versions = [m.version for m in migrations()]
    assert json.loads(first.stdout)["applied"] == versions
    again = _tally(["migrate", "--json"], env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["applied"] == []

    store = Store(clickhouse_server_url, unique_name)
    try:
        tables = store.query(
            "SELECT name, engine FROM system.tables WHERE database = {db:String} ORDER BY name",
            {"db": unique_name},
        )
        assert ("rollup_minute", "AggregatingMergeTree") in tables
        assert {name for name, _ in tables} >= {"accounts", "api_keys", "schema_migrations"}
        assert store.query("SELECT version FROM schema_migrations ORDER BY version") == [
            (v,) for v in versions
        ]
    finally:
        store.close()


def test_the_server_applies_every_insert_setting_the_sink_sends(
    clickhouse_server_url: str, unique_name: str
) -> None:
    """clickhouse-connect drops a setting the server lists as read-only when its value
    is the default, and refuses an unknown one; each must reach the server and hold."""
    store = Store(clickhouse_server_url, unique_name)
    try:
        names = sorted(INSERT_SETTINGS)
        listed = store.query(
            "SELECT name, readonly FROM system.settings WHERE name IN {names:Array(String)}",
            {"names": names},
        )
        assert sorted(listed) == [(name, 0) for name in names]
        row = store._client.query(
            "SELECT " + ", ".join(f"toUInt64(getSetting('{name}'))" for name in names),
            settings=dict(INSERT_SETTINGS),
        ).result_rows[0]
    finally:
        store.close()
    for name, applied in zip(names, row, strict=True):
        sent = INSERT_SETTINGS[name]
        if sent > 2**32:
            # ClickHouse caps block sizes at 2**32 rows (the embedded engine alike): still
            # more than one INSERT may hold, so the whole INSERT stays one block, one part.
            assert applied == 2**32 > MAX_ROWS_PER_INSERT, name
        else:
            assert applied == sent, name


def _usage_rows() -> list[list[Any]]:
    """Deltas' rows for three accounts around NOW, in the sink's layout."""
    rows: list[list[Any]] = []
    for account, minutes in (("acme", (0, 1, 7, 300, 2_000, 9_000)), ("globex", (0, 45, 90))):
        for back in minutes:
            minute = (NOW - timedelta(minutes=back)).replace(second=0, microsecond=0)
            events = 3 + back % 7
            rows.append(
                [account, minute, REQUEST, "/v1/messages", "POST", "m", 200, "", events,
                 events * 1_000_000, 12.5 * events, 30, 90, minute + timedelta(seconds=5), 0]
            )  # fmt: skip
    opened = NOW.replace(second=0, microsecond=0)
    for stream, kind in (("s-1", STREAM_OPENED), ("s-2", STREAM_OPENED), ("s-2", STREAM_CLOSED)):
        rows.append(
            ["acme", opened, kind, "/v1/messages", "", "", 0, stream, 1, 500_000, 0.0, 0, 0,
             opened + timedelta(seconds=1), 0]
        )  # fmt: skip
    return rows


async def _usage_answers(url: str, database: str) -> tuple[list[Any], bool]:
    """Every account's usage, both routes, as the app on that store answers; and
    whether the app reads through a view (the embedded store) rather than the store."""
    store = Store(url, database)
    store.migrate()
    accounts = AccountStore(store)
    keys = {}
    for account, plan in (("acme", "pro"), ("globex", "free"), ("idle", "max")):
        accounts.create(account, plan)
        keys[account], _ = accounts.create_key(account, admin=False)
    messages = encode(Delta(0, 40, int(NOW.timestamp() * 1000) - 2_000, _usage_rows()))
    sink = Sink(store, "127.0.0.1:9", "r", "e")
    sink._gate = sink.gates.take([0])  # as after an assignment of partition 0
    await sink._apply([(TopicPartition("r", 0), [_Record(i, m) for i, m in enumerate(messages)])])

    settings = ApiSettings(clickhouse_url=url, clickhouse_database=database, events_topic="e")
    app = create_app(settings, store, now=lambda: NOW)
    answers: list[Any] = []
    transport = httpx.ASGITransport(app=app)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
            for account, key in keys.items():
                for path in ("/api/v1/account/usage", "/api/account/usage"):
                    response = await client.get(path, headers={"X-API-Key": key})
                    answers.append((account, path, response.status_code, response.json()))
    finally:
        store.close()
    return answers, app.state.services.view is not None


async def test_api_usage_read_from_the_server_equal_the_embedded_answers(
    clickhouse_server_url: str, store_url: str, unique_name: str
) -> None:
    served, served_by_view = await _usage_answers(clickhouse_server_url, unique_name)
    embedded, embedded_by_view = await _usage_answers(store_url, unique_name)
    # Both serve from a view loaded from their store (query_api/view.py).
    assert served_by_view
    assert embedded_by_view
    assert served == embedded
    acme = served[0][3]["data"]
    # Not a comparison of empty answers: today's requests and the open stream are counted.
    assert acme["requests"]["today"] == sum(3 + back % 7 for back in (0, 1, 7, 300))
    assert acme["streams"]["active"] == 1
    assert served[0][3]["meta"]["updated_at"].startswith("2026-03-29T12:00:28")


WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import orjson
    from schemas.rollup_table import RollupStore
    from schemas.store import Store

    url, database, name, inserts, go = sys.argv[1:6]
    rollups = RollupStore(Store(url, database))
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.01)
    first = time.time()
    for i in range(int(inserts)):
        rows = [[f"acct-{k}", 1774000000 // 60 * 60, "t", name, "", "", 200, "", 1, 2, 0.5, 0, 0,
                 1774000000000, i] for k in range(50)]
        rollups.write_json(b"".join(orjson.dumps(r) + b"\\n" for r in rows), len(rows))
    print(first, time.time(), flush=True)
    """
)


def test_two_processes_write_at_once_and_a_reader_sees_the_sum(
    clickhouse_server_url: str, unique_name: str, tmp_path: Path
) -> None:
    store = Store(clickhouse_server_url, unique_name)
    store.migrate()
    go = tmp_path / "go"
    inserts = 40
    args = [clickhouse_server_url, unique_name]
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, *args, name, str(inserts), str(go)],
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name in ("w1", "w2")
    ]
    try:
        for writer in writers:
            assert writer.stdout is not None
            line = writer.stdout.readline()
            assert line.strip() == "ready", line + (writer.stderr.read() if writer.stderr else "")
        go.touch()
        seen = [0]
        while any(w.poll() is None for w in writers):
            (total,) = store.query(f"SELECT sum(events) FROM {TABLE}")[0]
            assert total >= seen[-1]  # INSERTs land whole, and never go away
            seen.append(total)
            time.sleep(0.01)
        spans = []
        for writer in writers:
            out, err = writer.communicate(timeout=60)
            assert writer.returncode == 0, err
            spans.append([float(x) for x in out.split()])
    finally:
        for writer in writers:
            if writer.poll() is None:
                writer.kill()
                writer.wait()
    # Both wrote while the other did: each started before the other finished.
    (start1, end1), (start2, end2) = spans
    assert start1 < end2
    assert start2 < end1
    # Merges fold rows of one key as they go: sums are what every reader reads.
    rows = store.query(
        f"SELECT route, uniqExact(account), sum(events), sum(units_micro), max(offset_end) "
        f"FROM {TABLE} GROUP BY route ORDER BY route"
    )
    assert rows == [(name, 50, inserts * 50, inserts * 100, inserts - 1) for name in ("w1", "w2")]
    assert store.query(f"SELECT sum(events) FROM {TABLE}") == [(2 * inserts * 50,)]
    store.close()


async def test_the_sinks_writes_survive_a_server_restart(tmp_path: Path) -> None:
    server = LocalClickHouse(tmp_path, port=free_port())
    server.start()
    try:
        store = Store(server.url, "tally")
        store.migrate()
        messages = [m for delta in _deltas() for m in encode(delta)]
        sink = Sink(store, "127.0.0.1:9", "r", "e")
        sink._gate = sink.gates.take([0])  # as after an assignment of partition 0
        await sink._apply(
            [(TopicPartition("r", 0), [_Record(i, m) for i, m in enumerate(messages)])]
        )
        before = _stored(store)
        resume = RollupStore(store).resume_offsets("r")
        assert before
        assert resume == {0: len(messages)}
        store.close()

        for restart in (server.stop, server.kill):
            restart()
            server.start()
            store = Store(server.url, "tally")
            assert store.migrate() == []
            assert _stored(store) == before
            # The offset markers came back with the deltas: the sink resumes after them.
            assert RollupStore(store).resume_offsets("r") == resume
            store.close()
    finally:
        server.kill()
