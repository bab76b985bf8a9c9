"""The no-orphans check shared by the local launchers' tests (Kafka, ClickHouse).

A launcher started from a thread that then ends is the hard case for
PR_SET_PDEATHSIG (the signal follows the thread, not the process): the server must
outlive its starter thread, and die with its parent process all the same.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from deploy.processes import port_is_free, process_exited
from deploy.settings import REPO_ROOT

CHILD = textwrap.dedent(
    """
    import sys, threading, time
    from pathlib import Path
    from {module} import {launcher} as Launcher

    server = Launcher({arguments})
    starter = threading.Thread(target=server.start)
    starter.start()
    starter.join()
    print(server.pid, flush=True)
    time.sleep(300)
    """
)


def wait_until(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether `condition()` held within `seconds` (polled every 50 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return bool(condition())


def check_dies_with_its_parent(
    launcher: str,
    arguments: str,
    argv: Sequence[str],
    port: int,
    serving: Callable[[], bool],
    errors: Path,
) -> None:
    """Start `launcher` ("module.Class") with `arguments` (Python source reading
    sys.argv, given `argv`) in a child from a thread that ends; check it serves;
    SIGKILL the child; the server must exit and free `port` within 5 s."""
    module, name = launcher.rsplit(".", 1)
    code = CHILD.format(module=module, launcher=name, arguments=arguments)
    with errors.open("wb") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", code, *argv], cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=err
        )
    pid = 0
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 60)
        line = child.stdout.readline() if ready else b""
        assert line.strip().isdigit(), f"no server: {line!r}\n{errors.read_text()[-3000:]}"
        pid = int(line)
        time.sleep(1.0)  # would the server die with its starter thread? It must not.
        assert not process_exited(pid)
        assert serving()

        child.send_signal(signal.SIGKILL)
        child.wait(10)
        assert wait_until(lambda: process_exited(pid), 5), f"{name} survived its parent"
        assert wait_until(lambda: port_is_free(port), 5), f"port {port} still taken"
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if pid and not process_exited(pid):
            os.kill(pid, signal.SIGKILL)
