"""A new user's `tally up`: ready without any event, and a log with nothing alarming.

A fresh data directory (so a fresh broker, which creates its internal topics on
first use) and no --demo: no event is ever sent. /readyz must reach 200 on its
own, and the whole log, from start through the stop, must hold no WARNING, ERROR
or CRITICAL line: each such line of a clean start is either a real problem or an
expected retry that belongs at INFO.
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

from deploy.processes import free_port
from deploy.settings import REPO_ROOT

pytestmark = pytest.mark.e2e

TALLY = Path(sys.executable).parent / "tally"
READY_WITHIN_S = 90.0
ALARMING = re.compile(r"\b(WARNING|ERROR|CRITICAL)\b|Traceback")


def test_an_idle_tally_up_becomes_ready_and_logs_nothing_alarming(tmp_path: Path) -> None:
    api = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(
        TALLY_DATA_DIR=str(tmp_path / "data"),
        TALLY_KAFKA_PORT=str(free_port()),
        TALLY_API_PORT=api.rsplit(":", 1)[1],
    )
    log = tmp_path / "tally-up.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(TALLY), "up"], cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    started = time.monotonic()
    answer = ""
    try:
        while time.monotonic() - started < READY_WITHIN_S and proc.poll() is None:
            try:
                response = httpx.get(f"{api}/readyz", timeout=5)
                answer = f"{response.status_code} {response.text}"
                if response.status_code == 200:
                    break
            except httpx.TransportError as exc:
                answer = repr(exc)
            time.sleep(0.5)
        ready_after = time.monotonic() - started
        # A few more heartbeats and sink writes, then a clean stop: both in the log too.
        time.sleep(3)
        assert httpx.get(f"{api}/readyz", timeout=5).status_code == 200
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
