"""Local server processes that never outlive the Python process that started them.

`tally up` and the tests run a Kafka broker (deploy/kafka_local.py) and a ClickHouse
server (deploy/clickhouse_local.py) as children. Each must die with its owner, even when
the owner is killed with SIGKILL, or the next run finds its port taken by a ghost:
`ChildServer` forks them from one long-lived thread with PR_SET_PDEATHSIG (see
`Spawner`), records "<pid> <owner pid>" in a pid file so that a later run can clear a
leftover (`kill_stale`), and stops them with SIGTERM first, SIGKILL after a bound.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import pathlib
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Final, Self, TypeVar

from deploy.exceptions import LocalServerError

HOST: Final = "127.0.0.1"
_PR_SET_PDEATHSIG: Final = 1
_T = TypeVar("_T")


# --------------------------------------------------------------------------- ports


def free_port(host: str = HOST, exclude: frozenset[int] = frozenset()) -> int:
    """A port nothing listens on right now (the kernel's choice, never 9092 by luck)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            port: int = sock.getsockname()[1]
        if port not in exclude and port != 9092:
            return port
    raise LocalServerError("could not find a free TCP port")


def free_ports(count: int, host: str = HOST) -> int:
    """The first of `count` consecutive free ports (brokers and API replicas take N, N+1, …)."""
    for _ in range(50):
        base = free_port(host)
        if all(port_is_free(base + i, host) for i in range(count)):
            return base
    raise LocalServerError(f"could not find {count} consecutive free TCP ports")


def port_is_free(port: int, host: str = HOST) -> bool:
    """Whether a server could bind `port`.

    SO_REUSEADDR mirrors what servers set on their sockets, so sockets lingering in
    TIME_WAIT from a previous run do not count as taken; only a live listener does.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno in (errno.EADDRINUSE, errno.EACCES):
                return False
            raise
    return True


def accepts_connections(port: int, host: str = HOST) -> bool:
    # A connect, not a bind: a probe bind could race the server's own bind of the port.
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def tail(path: pathlib.Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    chunk = text.splitlines()[-lines:]
    return "\n".join(chunk) if chunk else f"({path} is empty)"


# --------------------------------------------------------------------------- process care


class Spawner:
    """Forks children from one daemon thread that lives as long as the process.

    A child gets PR_SET_PDEATHSIG=SIGKILL, so the kernel kills it the moment its parent
    dies, however that happens (kill -9 included); nothing in user space has to run. But
    the kernel's "parent" is the *thread* that forked: a child started from a short-lived
    thread (asyncio.to_thread, an executor, a test helper) would be killed as soon as that
    thread ends. Forking from this thread, which only ends with the process, makes the
    signal fire exactly when the process dies. The alternative, a watchdog process reading
    a pipe, costs one more process per child and one more thing to orphan.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[[], _T]) -> _T:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name="tally-spawner", daemon=True
                )
                self._thread.start()
        future: Future[_T] = Future()
        self._jobs.put((fn, future))
        return future.result()

    def _serve(self) -> None:
        while True:
            fn, future = self._jobs.get()
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)


SPAWNER: Final = Spawner()


def die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn arming PDEATHSIG, or None where prctl does not exist (non-Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    # Resolved before fork: the child must not load libraries or allocate much.
    prctl = ctypes.CDLL(None, use_errno=True).prctl
    parent = os.getpid()

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        # The parent may have died between fork and prctl: then nobody would signal us.
        if os.getppid() != parent:
            os._exit(1)

    return arm


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def proc_cmdline(pid: int) -> list[str]:
    try:
        raw = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def _proc_stat(pid: int) -> list[str]:
    """The fields of /proc/<pid>/stat from the state (field 3) on; [] if there is none."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return []
    # The command name (field 2) may contain spaces and parentheses: split after it.
    return stat.rsplit(")", 1)[1].split()


def proc_ppid(pid: int) -> int | None:
    fields = _proc_stat(pid)
    return int(fields[1]) if fields else None


def process_exited(pid: int) -> bool:
    """Whether every thread of `pid` is gone, so that its sockets are closed.

    Neither an empty cmdline (the kernel drops the address space before the files) nor a
    zombie group leader will do: a JVM's other threads still hold the open files until
    the last of them exits. (A zombie nobody reaps, e.g. under a PID 1 that does not
    reap, counts as exited: it holds nothing.)
    """
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return True
    for tid in tasks:
        try:
            stat = pathlib.Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:
            continue
        if stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
            return False
    return True


def kill_stale(
    pid_file: pathlib.Path, marks: Sequence[str], in_use: Callable[[int, int], str]
) -> int | None:
    """Kill a child that a crashed earlier run left behind; return its pid.

    PDEATHSIG makes this rare (it needs a non-Linux host), but a leftover holds its port
    and its data's lock for ever. The pid file's process counts as the leftover only
    while its command line holds every one of `marks` (pids are reused). One whose owner
    is still its parent and alive belongs to a running stack: a LocalServerError saying
    `in_use(pid, owner)`, not garbage.
    """
    try:
        pid, owner = (int(part) for part in pid_file.read_text().split()[:2])
    except (OSError, ValueError):
        return None
    cmdline = proc_cmdline(pid)
    if not all(mark in cmdline for mark in marks):
        pid_file.unlink(missing_ok=True)  # gone, or the pid belongs to another process now
        return None
    if proc_ppid(pid) == owner and pid_alive(owner):
        raise LocalServerError(in_use(pid, owner))
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not process_exited(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    pid_file.unlink(missing_ok=True)
    return pid


def shutdown(proc: subprocess.Popen[bytes], timeout: float, pid_file: pathlib.Path) -> None:
    """SIGTERM (the server's own clean shutdown), SIGKILL after `timeout` seconds; reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    pid_file.unlink(missing_ok=True)


class ChildServer:
    """The life of one server child: spawn, pid file, stop, kill, context manager.

    Subclasses say where its files live (`pid_file`, `stdout_file`) and how it starts
    (`start`, which calls `_spawn`). `stop_timeout` bounds a clean stop before SIGKILL.
    """

    stop_timeout: float = 15.0

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[Any, ChildServer] | None = None

    @property
    def pid_file(self) -> pathlib.Path:
        raise NotImplementedError

    @property
    def stdout_file(self) -> pathlib.Path:
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """The child's process id while it runs."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    def start(self) -> None:
        raise NotImplementedError

    def stop(self, timeout: float | None = None) -> None:
        """Stop cleanly (SIGTERM), or SIGKILL after `timeout` (default `stop_timeout`)."""
        proc, self._proc = self._proc, None
        self._disarm()
        if proc is not None:
            shutdown(proc, self.stop_timeout if timeout is None else timeout, self.pid_file)

    def kill(self) -> None:
        """SIGKILL the child now, as a crash would, and reap it."""
        proc, self._proc = self._proc, None
        self._disarm()
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
            proc.wait()
            self.pid_file.unlink(missing_ok=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def _spawn(
        self, cmd: Sequence[str], cwd: pathlib.Path, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        preexec = die_with_parent_hook()
        name = type(self).__name__

        def spawn() -> subprocess.Popen[bytes]:
            with self.stdout_file.open("ab") as out:
                out.write(f"--- {time.strftime('%Y-%m-%dT%H:%M:%S%z')} starting {name}\n".encode())
                out.flush()
                return subprocess.Popen(
                    list(cmd),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=None if env is None else dict(env),
                    # Own session: a Ctrl-C in the terminal reaches only the owner, which
                    # then stops what depends on this child before the child itself.
                    start_new_session=True,
                    preexec_fn=preexec,
                )

        proc = SPAWNER.call(spawn)
        self._proc = proc
        self.pid_file.write_text(f"{proc.pid} {os.getpid()}\n", encoding="utf-8")
        # Stop cleanly at interpreter exit if the owner forgot; PDEATHSIG covers crashes.
        self._finalizer = weakref.finalize(self, shutdown, proc, self.stop_timeout, self.pid_file)
        return proc

    def _wait_ready(
        self, what: str, timeout: float, probe: Callable[[], str | None], every_s: float
    ) -> None:
        """Poll `probe` (None once ready, else why not) every `every_s` seconds until it
        says ready. A child that exits, or a `timeout` that passes, kills it and raises
        a LocalServerError that `_failure` words (its logs, and what to do)."""
        deadline = time.monotonic() + timeout
        while True:
            proc = self._proc
            assert proc is not None
            code = proc.poll()
            if code is not None:
                self.kill()
                raise LocalServerError(self._failure(f"The {what} exited with code {code}"))
            why = probe()
            if why is None:
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise LocalServerError(
                    self._failure(f"The {what} was not ready within {timeout:.0f}s ({why})")
                )
            time.sleep(every_s)

    def _failure(self, what: str) -> str:
        """`what` went wrong, with the child's last log lines and what to do next."""
        raise NotImplementedError

    def _disarm(self) -> None:
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
