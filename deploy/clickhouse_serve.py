"""The process `deploy/clickhouse_local.py` starts: ClickHouse's own HTTP server, from chdb.

The chdb-core wheel holds clickhouse-local, which serves ClickHouse's HTTP interface while
one query runs: `SYSTEM START LISTEN HTTP`, then a SELECT that sleeps row by row for ever.
clickhouse-local reads `config.xml` (listen address, port) from the working directory, so
this process enters the directory `LocalClickHouse` renders it into.

The engine blocks the thread that calls it, so the query runs on a thread of its own and
the main thread waits for SIGTERM or SIGINT, or for its parent to go away
(PR_SET_PDEATHSIG covers Linux; the poll covers the rest). A stop is clean: it waits
(bounded) for the queries clients still run, then cancels the listener query with KILL
QUERY over the server's own port, and the process exits 0 once the engine returned (or
after ENGINE_EXIT_S: see `serve`). Exit code 1: the listener query ended by itself, e.g.
the port was taken or another server holds the data directory (the engine printed why).

Imports only chdb and the standard library: the launcher waits for this start-up.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import urllib.request
from typing import Any, Final

HOST: Final = "127.0.0.1"
LISTENER_MARK: Final = "tally-listener"
DRAIN_S: Final = 5.0
"""How long a stop waits for running client queries before it cancels the listener."""
ENGINE_EXIT_S: Final = 1.0
"""How long a stop then waits for the engine to return on its own."""


def listener_sql(token: str) -> str:
    """The statement that serves HTTP until it is cancelled; `token` marks this launch.

    One row per half second: a cancel takes effect within that, and the wake-ups cost
    nothing measurable. max_execution_time=0 lifts any time limit a profile might set.
    """
    return (
        "SYSTEM START LISTEN HTTP; "
        f"SELECT /* {LISTENER_MARK}:{token} */ sleepEachRow(0.5) FROM numbers(1000000000000) "
        "SETTINGS max_block_size = 1, max_execution_time = 0 FORMAT Null"
    )


def _http(port: int, sql: str, timeout: float = 5.0) -> str:
    # POST: the HTTP interface runs a GET read-only, and KILL QUERY is not a read.
    request = urllib.request.Request(f"http://{HOST}:{port}/", data=sql.encode(), method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as answer:
        body: bytes = answer.read()
    return body.decode()


def _others_running(port: int, token: str) -> int:
    return int(
        _http(
            port,
            "SELECT count() FROM system.processes WHERE query_id != queryID() "
            f"AND position(query, '{LISTENER_MARK}:{token}') = 0",
        )
    )


def _stop_listener(port: int, token: str) -> None:
    deadline = time.monotonic() + DRAIN_S
    try:
        while _others_running(port, token) and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        _http(
            port,
            f"KILL QUERY WHERE position(query, '{LISTENER_MARK}:{token}') > 0 "
            "AND query_id != queryID() ASYNC",
        )


def serve(data: str, config_dir: str, port: int, token: str, parent: int) -> int:
    """Serve until told to stop; the process's exit code."""
    # `import chdb` runs a throw-away engine (it asks for the version) that reads
    # config.xml from the working directory too; this server's config is for the real
    # engine only (a <logger> in it went to the throw-away one), so it is entered after.
    from chdb import _chdb

    os.chdir(config_dir)

    # SIGTERM's default action would end the process at once, cutting running INSERTs
    # short, and a Python handler would run only when the main thread runs Python.
    # Blocked in every thread, engine threads included (they inherit the mask), the
    # signals stay pending until the main thread takes them below.
    stop_signals = {signal.SIGTERM, signal.SIGINT}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop_signals)
    query: Any = _chdb.query  # type: ignore[attr-defined]  # a C extension without stubs
    engine = threading.Thread(
        # The format is the HTTP interface's default for queries that name none.
        target=lambda: query(listener_sql(token), "TabSeparated", path=data),
        name="clickhouse-listener",
        daemon=True,
    )
    engine.start()
    while signal.sigtimedwait(stop_signals, 0.2) is None:
        if not engine.is_alive():
            return 1
        if os.getppid() != parent:
            break
    if not engine.is_alive():
        return 1
    try:
        _stop_listener(port, token)
    except OSError as exc:
        print(f"clickhouse_serve: clean stop failed ({exc}); exiting anyway", file=sys.stderr)
        os._exit(0)
    engine.join(ENGINE_EXIT_S)
    if engine.is_alive():
        # Its HTTP server waits for clients' idle keep-alive connections (then exits
        # with code 1 after 5 s). Nothing is left to write: the queries that wrote have
        # returned, and a merge cut short leaves only a temporary part it ignores on start.
        os._exit(0)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--data", required=True, help="the engine's data path")
    parser.add_argument("--config-dir", required=True, help="where config.xml is")
    parser.add_argument("--port", type=int, required=True, help="the http_port of config.xml")
    parser.add_argument("--token", required=True, help="marks this launch's listener query")
    parser.add_argument("--parent", type=int, default=os.getppid(), help="stop when it exits")
    args = parser.parse_args(argv)
    return serve(args.data, args.config_dir, args.port, args.token, args.parent)


if __name__ == "__main__":
    sys.exit(main())
