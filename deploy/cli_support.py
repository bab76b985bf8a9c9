"""What every `tally` command shares: settings + logging, --json output, operator errors.

A command that fails for a reason an operator can fix (an `OperatorError` of
schemas/exceptions.py: the embedded store held by another process, a bad store
URL, a port taken; or Kafka unreachable) prints one line saying what happened and
what to do, on stderr, and exits 2: no traceback. Anything else is a bug and keeps
its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO, TypeVar

from schemas import logs
from schemas.exceptions import OperatorError, StoreError
from schemas.settings import TallySettings, load

EXIT_UNAVAILABLE = 2

S = TypeVar("S", bound=TallySettings)


def load_service(cls: type[S]) -> S:
    """A service's settings (every problem listed, exit 2), with logging set up from them."""
    settings = load(cls)
    logs.configure(settings.log_format, settings.log_level)
    return settings


def emit(data: Mapping[str, Any], text: str, as_json: bool, out: TextIO | None = None) -> None:
    """A command's result: one JSON document, or the text for people, on stdout."""
    stream = out or sys.stdout
    print(json.dumps(data, default=str) if as_json else text, file=stream, flush=True)


def embedded_path(store_url: str) -> Path | None:
    if not store_url.startswith("chdb:"):
        return None
    return Path(store_url.removeprefix("chdb://").removeprefix("chdb:"))


def store_held(store_url: str) -> bool:
    """True when another process holds the embedded store at `store_url`.

    chdb (like clickhouse-server) holds an exclusive flock on <path>/status while
    it runs; a non-blocking probe tells "held" from any other failure.
    """
    path = embedded_path(store_url)
    if path is None:
        return False
    try:
        fd = os.open(path / "status", os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def explain(exc: BaseException, environ: Mapping[str, str] | None = None) -> str | None:
    """What went wrong and what to do, for a failure the operator can fix; None for a bug.

    The operator's failures are Tally's `OperatorError`s (a `StoreError` held by
    another process named by its `url`), an unreachable Kafka and a port in use.
    Anything else, a plain RuntimeError or KeyError included, is a bug: None, so
    that it keeps its traceback.
    """
    from aiokafka.errors import (
        KafkaConnectionError,
        KafkaTimeoutError,
        NodeNotReadyError,
        RequestTimedOutError,
    )

    env = os.environ if environ is None else environ
    if isinstance(exc, StoreError):
        if exc.url and store_held(exc.url):
            return (
                f"the embedded store {exc.url} is held by another process (a running "
                "`tally up`, `tally api`, `tally sink` or `tally migrate`; chdb admits one "
                "process per data path). Stop that process, or administer through its API "
                "(TALLY_API_URL, TALLY_ADMIN_KEY)."
            )
        return str(exc)
    if isinstance(exc, OperatorError):
        return str(exc)
    unreachable = (KafkaConnectionError, KafkaTimeoutError, NodeNotReadyError, RequestTimedOutError)
    if isinstance(exc, unreachable):
        bootstrap = env.get("TALLY_KAFKA_BOOTSTRAP") or "127.0.0.1:9092 (the default)"
        return (
            f"cannot reach Kafka at {bootstrap} ({exc}). Start a broker "
            "(`tally up` starts one), or set TALLY_KAFKA_BOOTSTRAP to host:port of a running one."
        )
    if isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE:
        return (
            f"a port this command listens on is already in use ({exc.strerror}). Another Tally "
            "process may run: stop it, or choose other ports (TALLY_API_PORT, "
            "TALLY_METRICS_PORT, TALLY_KAFKA_PORT)."
        )
    return None


def guarded(
    run: Callable[[], int], err: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> int:
    """Run a command; an operator-fixable failure becomes one line on stderr and exit 2."""
    try:
        return run()
    except Exception as exc:
        message = explain(exc, environ)
        if message is None:
            raise
        stream = err or sys.stderr
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
        print(f"tally: {message}", file=stream, flush=True)
        return EXIT_UNAVAILABLE
