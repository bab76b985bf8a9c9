"""A ClickHouse server on 127.0.0.1 from the chdb wheel: no Docker, no clickhouse binary.

It is ClickHouse's own server code (clickhouse-local serving the HTTP interface, see
`deploy/clickhouse_serve.py`), so Tally's server path runs on it unchanged: a URL
`http://127.0.0.1:<port>` for TALLY_CLICKHOUSE_URL, INSERT ... FROM input(), HTTP
settings, several processes writing and reading at once. Everything it owns lives under
``<data_dir>/clickhouse-server`` (beside, never inside, the embedded store's
``<data_dir>/clickhouse``):

    config.xml      rendered on every start (listen address, port)
    data/           the engine's data path; survives restarts
    server.out      the server's stdout/stderr: why a start failed
    server.pid      "<server pid> <owner pid>", to find a server left by a crashed run

Quirks of this server: only the user `default`, without a password; HTTP only (no native
protocol, no `::1`); a query without FORMAT answers TabSeparated, as clickhouse-server does.

Run it standalone with `python -m deploy.clickhouse_local --port 8123 [--data DIR]`.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import secrets
import signal
import sys
import threading
import urllib.parse
import urllib.request
from typing import Final

from deploy.clickhouse_serve import HOST, LISTENER_MARK
from deploy.exceptions import LocalServerError
from deploy.processes import ChildServer, kill_stale, port_is_free, tail
from schemas.settings import DEFAULT_DATA_DIR

__all__ = ["LocalClickHouse", "kill_stale_server", "main", "render_config"]

REPO_ROOT: Final = pathlib.Path(__file__).resolve().parents[1]
SERVE_MODULE: Final = "deploy.clickhouse_serve"


def render_config(*, port: int) -> str:
    """clickhouse-local's config.xml: ClickHouse's HTTP interface on loopback only.

    No <logger>: the engine in library mode writes nothing to it. What it says about a
    failed start (port taken, data directory locked) goes to stderr, i.e. server.out.
    """
    return (
        "<!-- Written by deploy/clickhouse_local.py on every start; edits are overwritten. -->\n"
        f"<clickhouse><listen_host>{HOST}</listen_host><http_port>{port}</http_port></clickhouse>\n"
    )


def kill_stale_server(server_dir: pathlib.Path) -> int | None:
    """SIGKILL a server that a crashed earlier run left on this directory; return its pid."""
    return kill_stale(
        server_dir / "server.pid",
        [SERVE_MODULE, str(server_dir / "data")],
        lambda pid, owner: (
            f"A local ClickHouse server (pid {pid}) started by process {owner} still runs on "
            f"{server_dir}. Stop that process first, or give this one another data directory."
        ),
    )


class LocalClickHouse(ChildServer):
    """One ClickHouse HTTP server on 127.0.0.1, its data under ``data_dir/clickhouse-server``.

    Usable as a context manager. `start()` reuses the data of a previous run, stopped or
    killed. The server process dies with the process that started it, even on SIGKILL.
    """

    def __init__(self, data_dir: pathlib.Path, port: int = 8123) -> None:
        self.data_dir = pathlib.Path(data_dir).resolve()
        self.port = port
        self._token = ""
        super().__init__()

    @property
    def server_dir(self) -> pathlib.Path:
        return self.data_dir / "clickhouse-server"

    @property
    def data_path(self) -> pathlib.Path:
        return self.server_dir / "data"

    @property
    def config_file(self) -> pathlib.Path:
        return self.server_dir / "config.xml"

    @property
    def stdout_file(self) -> pathlib.Path:
        return self.server_dir / "server.out"

    @property
    def pid_file(self) -> pathlib.Path:
        return self.server_dir / "server.pid"

    @property
    def url(self) -> str:
        """What TALLY_CLICKHOUSE_URL takes."""
        return f"http://{HOST}:{self.port}"

    def start(self, timeout: float = 60.0) -> None:
        """Start the server; return once it answers /ping as this launch's server.

        Takes about a second. Safe from a short-lived thread: the server is forked from
        one that lives as long as the process (deploy/processes.py `Spawner`).
        """
        if self.pid is not None:
            return
        self.kill()  # reap a server that died on its own since the last start
        self.data_path.mkdir(parents=True, exist_ok=True)
        kill_stale_server(self.server_dir)
        if not port_is_free(self.port):
            raise LocalServerError(
                f"Cannot start the local ClickHouse server: {HOST}:{self.port} is taken by "
                "another process. If that is a ClickHouse server you want to use, set "
                f"TALLY_CLICKHOUSE_URL={self.url}; otherwise stop that process or choose "
                "another port."
            )
        self.config_file.write_text(
            render_config(port=self.port),
            encoding="utf-8",
        )
        self._token = secrets.token_hex(8)
        self._launch()
        self._wait_ready("ClickHouse server", timeout, self._ours, every_s=0.05)

    def __repr__(self) -> str:
        return f"LocalClickHouse({self.url}, data={self.server_dir}, pid={self.pid})"

    def _launch(self) -> None:
        cmd = [
            sys.executable,
            "-m",
            SERVE_MODULE,
            "--data",
            str(self.data_path),
            "--config-dir",
            str(self.server_dir),
            "--port",
            str(self.port),
            "--token",
            self._token,
            "--parent",
            str(os.getpid()),
        ]
        # The child finds config.xml in server_dir once chdb is imported (clickhouse_serve).
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            part for part in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if part
        )
        self._spawn(cmd, cwd=self.data_path, env=env)

    def _ours(self) -> str | None:
        """None once this launch's server answers; else why not.

        /ping alone could be answered by another server that took the port first; only
        ours runs the listener query marked with this launch's token.
        """
        query = urllib.parse.urlencode(
            {
                "query": "SELECT count() FROM system.processes WHERE query_id != queryID() "
                f"AND position(query, '{LISTENER_MARK}:{self._token}') > 0"
            }
        )
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=2.0) as ping:
                ping.read()
            with urllib.request.urlopen(f"{self.url}/?{query}", timeout=2.0) as answer:
                ours = answer.read().strip() == b"1"
        except OSError as exc:
            return f"{type(exc).__name__}: {exc}"
        return None if ours else f"another server answers on {self.url}"

    def _failure(self, what: str) -> str:
        out = tail(self.stdout_file, 15)
        hint = (
            "Another process took the port; set TALLY_CLICKHOUSE_URL to use a server that "
            "already runs, or free the port."
            if "Address already in use" in out
            else f"Another server holds {self.data_path}; stop it, or use another data directory."
            if "Cannot lock file" in out
            else f"See {self.stdout_file}. Deleting {self.server_dir} starts from an empty "
            "server (all data in it is lost)."
        )
        return f"{what}.\n--- last lines of {self.stdout_file}:\n{out}\n{hint}"


def main(argv: list[str] | None = None) -> int:
    """Run a server in the foreground until Ctrl-C or SIGTERM."""
    parser = argparse.ArgumentParser(
        prog="python -m deploy.clickhouse_local",
        description="A ClickHouse HTTP server on 127.0.0.1 from the chdb wheel (no Docker).",
    )
    parser.add_argument("--port", type=int, default=8123, help="HTTP port (default 8123)")
    parser.add_argument(
        "--data",
        type=pathlib.Path,
        # Tally's own data directory, so `tally up` and this find the same server data.
        default=pathlib.Path(os.environ.get("TALLY_DATA_DIR") or DEFAULT_DATA_DIR),
        help="directory for its state, kept in DATA/clickhouse-server "
        f"(default: TALLY_DATA_DIR, else {DEFAULT_DATA_DIR})",
    )
    args = parser.parse_args(argv)
    server = LocalClickHouse(args.data, port=args.port)
    done = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: done.set())
    try:
        server.start()
    except LocalServerError as exc:
        print(f"clickhouse_local: {exc}", file=sys.stderr)
        return 1
    print(
        f"ClickHouse {server.url} (data {server.data_path}); use "
        f"TALLY_CLICKHOUSE_URL={server.url}. Ctrl-C stops it.",
        flush=True,
    )
    try:
        while not done.wait(0.5):
            if server.pid is None:
                print(f"clickhouse_local: the server exited; see {server.stdout_file}")
                return 1
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
