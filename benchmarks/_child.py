"""Running one measurement in a child process: its own event loop, chdb path and profiler.

A bench module's `child(args) -> dict` runs in `python -m <module> --child '<json>'`
and prints its figures as the last stdout line (`RESULT <json>`). The parent
bounds it in time and, when BENCH_PROFILE names a profiler, wraps it in py-spy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
PREFIX = "RESULT "


def spawn(
    module: str,
    args: dict[str, Any],
    timeout_s: float,
    profile_name: str | None = None,
    log: Path | None = None,
) -> dict[str, Any]:
    """Run `module`'s child() in a subprocess; its figures, or RuntimeError with its output."""
    cmd = [sys.executable, "-m", module, "--child", json.dumps(args)]
    profiler = os.environ.get("BENCH_PROFILE", "")
    if profile_name and profiler == "py-spy" and shutil.which("py-spy", path=_bin_path()):
        RESULTS.mkdir(parents=True, exist_ok=True)
        out = RESULTS / f"{profile_name}.pyspy.txt"
        pyspy = shutil.which("py-spy", path=_bin_path())
        assert pyspy is not None
        # Raw collapsed stacks: greppable, and flamegraph tools read them.
        cmd = [pyspy, "record", "-r", "200", "-f", "raw", "-o", str(out), "--", *cmd]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.monotonic()
    # A session of its own, so a timeout can end the child and anything it started.
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise RuntimeError(
            f"{module} did not finish within {timeout_s:.0f}s; last output:\n{output[-3000:]}"
        ) from None
    if log is not None:
        log.write_text(output, encoding="utf-8")
    for line in reversed(output.splitlines()):
        if line.startswith(PREFIX):
            result: dict[str, Any] = json.loads(line[len(PREFIX) :])
            return result
    raise RuntimeError(
        f"{module} exited {proc.returncode} after {time.monotonic() - started:.0f}s without "
        f"a result; last output:\n{output[-3000:]}"
    )


def _bin_path() -> str:
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])


def main(child: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """The `if __name__ == "__main__"` of a bench module."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        result = child(json.loads(sys.argv[2]))
        print(PREFIX + json.dumps(result), flush=True)
        return
    raise SystemExit(f"usage: python -m {sys.argv[0]} --child '<json>' (run.py does this)")
