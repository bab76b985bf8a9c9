"""A new user's `tally up`: ready without any event, and a log with nothing alarming.

A fresh data directory (so a fresh broker, which creates its internal topics on
first use) and no --demo: no event is ever sent. /readyz must reach 200 on its
own (on every API replica), and the whole log, from start through the stop, must
hold no WARNING, ERROR or CRITICAL line and no terminal control codes: each such
line of a clean start is either a real problem or an expected retry that belongs
at INFO. Both the one-process default and the production topology (a 3-broker
cluster, where coordinators and `NotEnoughReplicas` answers come and go while the
cluster settles) are started.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from deploy.processes import free_port, free_ports
from deploy.settings import REPO_ROOT

pytestmark = pytest.mark.e2e

TALLY = Path(sys.executable).parent / "tally"
READY_WITHIN_S = 150.0
ALARMING = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback|\x1b\[")
TOPOLOGY = ["--brokers", "3", "--store", "server", "--workers", "2", "--sinks", "2"]


def _ready(apis: list[str]) -> str:
    """'200 …' once every replica's /readyz says 200, else the first other answer."""
    for api in apis:
        try:
            response = httpx.get(f"{api}/readyz", timeout=5)
        except httpx.TransportError as exc:
            return f"{api}: {exc!r}"
        if response.status_code != 200:
            return f"{api}: {response.status_code} {response.text}"
    return "200 on every replica"


@pytest.mark.parametrize(
    ("arguments", "replicas"), [([], 1), (TOPOLOGY, 2)], ids=["default", "topology"]
)
def test_an_idle_tally_up_becomes_ready_and_logs_nothing_alarming(
    tmp_path: Path, arguments: list[str], replicas: int
) -> None:
    port = free_ports(replicas)
    apis = [f"http://127.0.0.1:{port + n}" for n in range(replicas)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(
        TALLY_DATA_DIR=str(tmp_path / "data"),
        TALLY_KAFKA_PORT=str(free_ports(3)),
        TALLY_CLICKHOUSE_PORT=str(free_port()),
        TALLY_API_PORT=str(port),
    )
    log = tmp_path / "tally-up.log"
    command = [str(TALLY), "up", *arguments, "--api-replicas", str(replicas)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    started = time.monotonic()
    answer = ""
    try:
        while time.monotonic() - started < READY_WITHIN_S and proc.poll() is None:
            answer = _ready(apis)
            if answer.startswith("200"):
                break
            time.sleep(0.5)
        ready_after = time.monotonic() - started
        # A few more heartbeats and sink writes, then a clean stop: both in the log too.
        time.sleep(3)
        assert _ready(apis).startswith("200"), _ready(apis)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)
    text = log.read_text(errors="replace")
    assert answer.startswith("200"), f"not ready within {READY_WITHIN_S:.0f}s: {answer}\n{text}"
    print(f"ready {ready_after:.1f}s after `tally up` started; exit code {proc.returncode}")
    alarming = [line for line in text.splitlines() if ALARMING.search(line)]
    assert not alarming, "\n".join(alarming)
    assert proc.returncode == 0, text
