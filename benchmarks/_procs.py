"""Child processes for the service benchmarks (api, freshness, memory).

Every service under test runs as its own process, as in production: the
benchmark process only drives load and measures. Children get a fresh
environment (no TALLY_* inherited from the caller, so a developer's settings
cannot leak into a figure), die with the benchmark (PDEATHSIG), run in a
session of their own, and are stopped by their own process-group id.
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from deploy.processes import die_with_parent_hook, free_port, port_is_free

if TYPE_CHECKING:
    from deploy.clickhouse_local import LocalClickHouse

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def child_env(extra: Mapping[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = str(REPO_ROOT)
    env.update(extra)
    return env


def python_module(module: str, *args: str) -> list[str]:
    """`python -m module args` with this interpreter (the venv's)."""
    return [sys.executable, "-m", module, *args]


class Child:
    """One child process, its output in `log`; `stop()` is idempotent."""

    def __init__(
        self, name: str, args: Sequence[str], env: Mapping[str, str], log: pathlib.Path
    ) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._out = log.open("ab")
        self.proc = subprocess.Popen(
            list(args),
            env=dict(env),
            cwd=REPO_ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=die_with_parent_hook(),
        )
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check(self) -> None:
        """Raise with the log's tail if the child has died."""
        if not self.alive():
            raise RuntimeError(
                f"{self.name} (pid {self.pid}) exited with {self.proc.returncode}; "
                f"its log {self.log} ends with:\n{tail(self.log)}"
            )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout)
        # Whatever the child started in its own session goes too (by its group id).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        self._out.close()
        return self.proc.returncode


@contextlib.contextmanager
def running(
    name: str, args: Sequence[str], env: Mapping[str, str], log: pathlib.Path
) -> Iterator[Child]:
    child = Child(name, args, env, log)
    try:
        yield child
    finally:
        child.stop()


@contextlib.contextmanager
def clickhouse_server(workdir: pathlib.Path) -> Iterator[LocalClickHouse]:
    """A ClickHouse server of the bench's own (deploy/clickhouse_local.py: ClickHouse's
    server code from the chdb wheel) on a free port, its data under `workdir`; it dies
    with the process that started it."""
    from deploy.clickhouse_local import LocalClickHouse

    server = LocalClickHouse(workdir, port=free_port())
    server.start()
    try:
        yield server
    finally:
        server.stop()


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (`tally up --api-replicas N` listens
    on TALLY_API_PORT, +1, ...)."""
    for _ in range(50):
        base = free_port()
        if all(port_is_free(base + i) for i in range(count)):
            return base
    raise RuntimeError(f"no {count} consecutive free ports")


def tail(path: pathlib.Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def wait_http(url: str, child: Child, timeout: float = 120.0, status: int = 200) -> None:
    """Wait until `url` answers `status` (the child must stay alive meanwhile)."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        child.check()
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == status:
                    return
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (OSError, urllib.error.URLError) as exc:
            last = str(exc)
        time.sleep(0.25)
    raise TimeoutError(
        f"{child.name} did not answer {url} with {status} within {timeout:.0f}s ({last}); "
        f"its log {child.log} ends with:\n{tail(child.log)}"
    )


def rss_mib(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) of a live process in MiB, from /proc/<pid>/status."""
    found: dict[str, float] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(value.split()[0]) / 1024  # kB
    return found["VmRSS"], found["VmHWM"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a live process (all its threads) has used."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        # Fields after the parenthesised name; utime and stime are the 14th and 15th.
        fields = stat.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_pids(pid: int) -> list[int]:
    """`pid` and every live descendant (from /proc/<pid>/task/<tid>/children)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in pathlib.Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by `pid` and its live descendants (a child that exited
    meanwhile is not counted: take it over a window in which none does)."""
    total = 0.0
    for each in tree_pids(pid):
        with contextlib.suppress(OSError):
            total += cpu_seconds(each)
    return total


# -- wrk --------------------------------------------------------------------------------

WRK_DONE = """
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "status_errors": %d, ' ..
    '"socket_errors": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\\n',
    summary.requests, summary.duration, e.status,
    e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""
"""The Lua every wrk run ends with: its summary as one `WRKJSON {...}` line."""


def run_wrk(
    script: pathlib.Path, lua: str, options: Sequence[str], seconds: float
) -> dict[str, float]:
    """Run wrk with `lua` (plus WRK_DONE) written to `script` and `options` (threads,
    connections, duration, url, `--` and the script's arguments); its summary."""
    if shutil.which("wrk") is None:
        raise RuntimeError(
            "wrk is not installed: `apt-get install -y wrk` (Debian), or run `make bench` as root"
        )
    script.write_text(lua + WRK_DONE, encoding="ascii")
    args = ["wrk", "-s", str(script), *options]
    out = subprocess.run(args, capture_output=True, text=True, timeout=seconds + 60, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("WRKJSON "):
            found: dict[str, float] = json.loads(line[len("WRKJSON ") :])
            return found
    raise RuntimeError(f"wrk gave no summary (exit {out.returncode}):\n{out.stdout}\n{out.stderr}")
