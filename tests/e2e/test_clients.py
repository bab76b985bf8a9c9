"""docs/api.md#client-compatibility: users' clients, unchanged, against `tally up --demo`.

Starts the stack the way a new user does (its own local broker, embedded store,
demo gateways), reads the API URL and demo keys it prints, and runs the
contract's Python client, its JavaScript client under Node, and a menu-bar style
poller of /api/account/usage. Ctrl-C (SIGINT) must then stop everything cleanly.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from deploy.processes import free_port

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
TALLY = Path(sys.executable).parent / "tally"

PYTHON_CLIENT = """
import requests
r = requests.get(f"{base}/api/v1/account/usage", headers={"X-API-Key": key})
limit = r.json()["data"]["requests"]["limit"]
pct = (1 - limit["remaining"] / limit["per_minute"]) * 100
print(f"rate limit used: {pct:.1f}% (resets {limit['resets_at']})")
"""

JS_CLIENT = """
const { data } = await fetch(`${base}/api/v1/account/usage`, { headers: { "X-API-Key": key } })
  .then((r) => r.json());
console.log(data.streams.active >= data.streams.max
  ? "all stream slots in use"
  : `${data.streams.max - data.streams.active} stream slots free`);
"""

POLLER = """
import json, sys, time, urllib.request
from datetime import datetime, timezone
for _ in range(3):
    req = urllib.request.Request(f"{base}/api/account/usage",
                                 headers={"Authorization": f"Bearer {key}"})
    usage = json.load(urllib.request.urlopen(req))
    session = usage["session"]
    if session["resets_at"] is None:
        left = "no session running"
    else:
        reset = datetime.fromisoformat(session["resets_at"].replace("Z", "+00:00"))
        left = f"resets in {int((reset - datetime.now(timezone.utc)).total_seconds())}s"
    print(f"{usage['plan']} session {session['used_percentage']:.1f}% {left}")
    time.sleep(0.5)
"""


@pytest.fixture
def demo_stack(tmp_path: Path) -> Iterator[tuple[str, dict[str, str], subprocess.Popen[str]]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(
        TALLY_DATA_DIR=str(tmp_path / "data"),
        TALLY_KAFKA_PORT=str(free_port()),
        TALLY_API_PORT=str(free_port()),
        TALLY_DEMO_RATE="400",
    )
    proc = subprocess.Popen(
        [str(TALLY), "up", "--demo"],
        cwd=REPO,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    base, keys = "", {}
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and not (base and "admin" in keys):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if found := re.search(r"API (http://\S+)", line):
                base = found.group(1)
            if found := re.match(r"\s+(\S+)(?: \(plan \w+\))?: (tly_\S+)", line):
                keys[found.group(1)] = found.group(2)
        printed = "".join(lines)
        assert base, "tally up printed no API URL:\n" + printed
        assert keys, "tally up printed no demo keys:\n" + printed
        yield base, keys, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(30)


def _run(cmd: list[str], prelude: str, code: str, suffix: str, tmp: Path) -> str:
    script = tmp / f"client{suffix}"
    script.write_text(prelude + textwrap.dedent(code))
    done = subprocess.run([*cmd, str(script)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_contract_clients_work_unchanged_against_the_demo(
    demo_stack: tuple[str, dict[str, str], subprocess.Popen[str]], tmp_path: Path
) -> None:
    base, keys, proc = demo_stack
    account = next(name for name in keys if name != "admin")
    key = keys[account]

    # Ready means the store answers and the worker has reported: traffic is counted.
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                break
        except httpx.TransportError:
            pass
        time.sleep(1)
    else:
        raise AssertionError("the stack never became ready")
    deadline = time.monotonic() + 60
    today = 0
    while time.monotonic() < deadline and today == 0:
        usage = httpx.get(f"{base}/api/v1/account/usage", headers={"X-API-Key": key}).json()
        today = usage["data"]["requests"]["today"]
        time.sleep(1)
    assert today > 0, "demo traffic is not being counted"
    metrics = httpx.get(f"{base}/metrics").text
    counted = re.search(
        r'^tally_events_counted_total\{type="tally.request.v1"\} (\S+)$', metrics, re.M
    )
    assert counted, "worker metrics missing from /metrics"
    assert float(counted.group(1)) > 0
    assert 'tally_api_request_seconds_count{method="GET",route="/api/v1/account/usage"' in metrics

    prelude = f"base = {base!r}\nkey = {key!r}\n"
    out = _run([sys.executable], prelude, PYTHON_CLIENT, ".py", tmp_path)
    assert re.fullmatch(r"rate limit used: \d+\.\d% \(resets \S+Z\)\n", out), out

    node = shutil.which("node")
    assert node, "node is required for the JavaScript client (installed on every machine here)"
    js_prelude = f"const base = {base!r};\nconst key = {key!r};\n"
    out = _run([node], js_prelude, JS_CLIENT, ".mjs", tmp_path)
    assert re.fullmatch(r"(all stream slots in use|\d+ stream slots free)\n", out), out

    out = _run([sys.executable], prelude, POLLER, "_poller.py", tmp_path)
    rows = out.splitlines()
    assert len(rows) == 3
    assert all(
        re.fullmatch(r"\w+ session \d+\.\d% (resets in \d+s|no session running)", r) for r in rows
    ), out

    # Ctrl-C: a clean stop, nothing left behind.
    proc.send_signal(signal.SIGINT)
    assert proc.wait(60) == 0
    assert proc.stdout is not None
    assert "stopped" in proc.stdout.read()
