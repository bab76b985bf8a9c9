"""The local ClickHouse server (deploy/clickhouse_local.py) against the real engine:
data survives stops and kills, a stop lets a running INSERT finish, nothing outlives us."""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import pytest

from deploy.clickhouse_local import LocalClickHouse, kill_stale_server, render_config
from deploy.processes import free_port, port_is_free, process_exited
from tests.orphans import check_dies_with_its_parent, wait_until

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]


def _sql(url: str, sql: str) -> str:
    request = urllib.request.Request(f"{url}/", data=sql.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=30) as answer:
        body: bytes = answer.read()
    return body.decode().strip()


def test_config_is_loopback_http_only() -> None:
    config = render_config(port=18123)
    assert "<listen_host>127.0.0.1</listen_host>" in config
    assert "<http_port>18123</http_port>" in config
    assert "tcp_port" not in config


def test_data_survives_a_stop_and_a_kill(tmp_path: Path) -> None:
    server = LocalClickHouse(tmp_path, port=free_port())
    server.start()
    try:
        assert _sql(server.url, "SELECT 1") == "1"  # no FORMAT: TabSeparated, as on a server
        _sql(server.url, "CREATE TABLE t (x UInt64) ENGINE = MergeTree ORDER BY x")
        _sql(server.url, "INSERT INTO t SELECT number FROM numbers(1000)")
        pid = server.pid
        assert pid is not None
        server.stop()
        assert process_exited(pid)
        assert port_is_free(server.port)

        server.start()
        _sql(server.url, "INSERT INTO t SELECT number FROM numbers(10)")
        server.kill()  # as a crash would
        server.start()
        assert _sql(server.url, "SELECT count(), sum(x) FROM t") == "1010\t499545"
    finally:
        server.kill()


def test_a_stop_lets_a_running_insert_finish(tmp_path: Path) -> None:
    server = LocalClickHouse(tmp_path, port=free_port())
    server.start()
    try:
        _sql(server.url, "CREATE TABLE t (x UInt64) ENGINE = MergeTree ORDER BY x")
        # Four rows, half a second each: still running when the stop begins.
        insert = threading.Thread(
            target=_sql,
            args=(
                server.url,
                "INSERT INTO t SELECT number FROM numbers(4) WHERE sleepEachRow(0.5) = 0 "
                "SETTINGS max_block_size = 1",
            ),
        )
        insert.start()
        assert wait_until(
            lambda: _sql(server.url, "SELECT count() FROM system.processes") == "3", 10
        ), "the INSERT never started"  # the listener, the INSERT, this SELECT
        server.stop()
        insert.join(10)
        server.start()
        assert _sql(server.url, "SELECT count() FROM t") == "4"
    finally:
        server.kill()


def test_a_taken_port_is_refused_with_what_to_do(tmp_path: Path) -> None:
    first = LocalClickHouse(tmp_path / "a", port=free_port())
    first.start()
    try:
        second = LocalClickHouse(tmp_path / "b", port=first.port)
        with pytest.raises(RuntimeError, match=re.escape(second.url)):
            second.start()
        assert second.pid is None
    finally:
        first.kill()


def test_two_servers_cannot_share_a_data_directory(tmp_path: Path) -> None:
    first = LocalClickHouse(tmp_path, port=free_port())
    first.start()
    try:
        second = LocalClickHouse(tmp_path, port=free_port())
        # The pid file names a server whose owner runs: in use, not left over.
        with pytest.raises(RuntimeError, match="still runs on"):
            second.start(timeout=30)
        # Without the pid file, the engine's lock on the data directory refuses it.
        second.pid_file.unlink()
        with pytest.raises(RuntimeError, match="Another server holds"):
            second.start(timeout=30)
        assert second.pid is None
        assert _sql(first.url, "SELECT 1") == "1"
    finally:
        first.kill()


def test_a_server_left_by_a_dead_owner_is_killed(tmp_path: Path) -> None:
    server_dir = tmp_path / "clickhouse-server"
    server_dir.mkdir()
    # A stand-in whose command line names the server module and this data path, as a
    # server left behind by a crashed run on a host without PR_SET_PDEATHSIG would.
    leftover = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "deploy.clickhouse_serve",
         "--data", str(server_dir / "data")]
    )  # fmt: skip
    try:
        dead_owner = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                                    capture_output=True, text=True, check=True)  # fmt: skip
        (server_dir / "server.pid").write_text(f"{leftover.pid} {dead_owner.stdout.strip()}\n")
        assert kill_stale_server(server_dir) == leftover.pid
        assert leftover.wait(10) == -signal.SIGKILL
        assert not (server_dir / "server.pid").exists()
        # A pid file naming an unrelated process is dropped, and nothing is killed.
        (server_dir / "server.pid").write_text(f"{os.getpid()} {os.getpid()}\n")
        assert kill_stale_server(server_dir) is None
        assert not (server_dir / "server.pid").exists()
    finally:
        if leftover.poll() is None:
            leftover.kill()
            leftover.wait()


def test_killed_parent_takes_the_server_down(tmp_path: Path) -> None:
    port = free_port()
    check_dies_with_its_parent(
        "deploy.clickhouse_local.LocalClickHouse",
        "Path(sys.argv[1]), port=int(sys.argv[2])",
        [str(tmp_path / "data"), str(port)],
        port,
        lambda: _sql(f"http://127.0.0.1:{port}", "SELECT 1") == "1",
        tmp_path / "child.err",
    )


def test_the_cli_serves_until_sigterm(tmp_path: Path) -> None:
    port = free_port()
    cli = subprocess.Popen(
        [sys.executable, "-m", "deploy.clickhouse_local", "--port", str(port), "--data", tmp_path],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert cli.stdout is not None
        ready, _, _ = select.select([cli.stdout], [], [], 60)
        line = cli.stdout.readline() if ready else ""
        assert f"TALLY_CLICKHOUSE_URL=http://127.0.0.1:{port}" in line, line
        assert _sql(f"http://127.0.0.1:{port}", "SELECT 1") == "1"
        cli.send_signal(signal.SIGTERM)
        assert cli.wait(30) == 0
        assert port_is_free(port)
        assert not (tmp_path / "clickhouse-server" / "server.pid").exists()
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait()
