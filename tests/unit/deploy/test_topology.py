"""deploy/topology.py: the flags' rules, and the supervisor's restarts and stop order."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from deploy.topology import Child, Supervisor, Topology


def test_the_defaults_are_the_single_process_and_every_problem_is_named() -> None:
    assert Topology().problems() == []
    assert Topology(3, "server", 2, 2, 2).problems() == []
    problems = Topology(0, "embedded", 65, 2, 2).problems()
    assert problems == [
        "--brokers must be 1..9, got 0",
        "--workers must be 1..64, got 65",
        "--sinks and --api-replicas above 1 need --store server: the embedded store admits "
        "one process, which holds the sink and the API",
    ]


def _child(name: str, code: str) -> Child:
    return Child(name, [sys.executable, "-c", code], {})


def test_a_child_that_exits_starts_again_after_a_growing_delay() -> None:
    supervisor = Supervisor([_child("quitter", "raise SystemExit(3)")])
    supervisor.start()
    child = supervisor.children[0]
    assert child.proc is not None
    child.proc.wait(30)
    supervisor.check(100.0)
    assert (child.proc, child.restarts, child.due) == (None, 1, 100.5)
    supervisor.check(100.4)  # not due yet
    assert child.proc is None
    supervisor.check(100.5)
    assert child.proc is not None
    child.proc.wait(30)
    supervisor.check(200.0)
    assert (child.restarts, child.due) == (2, 201.0)  # 0.5 s, doubling
    assert supervisor.restarts == 2
    supervisor.stop()


def test_stop_ends_children_in_order_and_restarts_nothing(tmp_path: Path) -> None:
    log = tmp_path / "order"
    # Each child notes its name when SIGTERM ends it.
    code = (
        "import signal, sys, time\n"
        "def bye(*_):\n"
        f"    open({str(log)!r}, 'a').write(sys.argv[1] + '\\n'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        f"open({str(log)!r} + '.' + sys.argv[1], 'w').close()\n"
        "time.sleep(60)\n"
    )
    names = ["api-1", "worker-1", "sink-1"]
    supervisor = Supervisor([Child(n, [sys.executable, "-c", code, n], {}) for n in names])
    supervisor.start()
    deadline = time.monotonic() + 30
    while not all(Path(f"{log}.{n}").exists() for n in names):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    supervisor.stop()
    assert log.read_text().split() == names
    supervisor.check(time.monotonic() + 100)
    assert all(child.proc is None for child in supervisor.children)
