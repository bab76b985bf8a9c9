"""A webhook receiver for the alert tests, run in its own uvicorn process.

`python -m uvicorn tests.webhook_receiver:app --port P` with RECEIVER_SECRET (the
endpoint's whsec_ secret), RECEIVER_LOG (a file: one JSON line per request) and
RECEIVER_FAIL_S (answer 500 until this many seconds after the first request; 0:
never). Every request's signature is verified by `verify`, written from the
Standard Webhooks specification independently of Tally's signing code, including
its timestamp tolerance of five minutes.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from deploy.processes import free_port

TOLERANCE_S = 300
_first: list[float] = []


def verify(secret: str, headers: dict[str, str], body: bytes, now: float) -> bool:
    """True when one `v1,` signature of `webhook-signature` matches and the timestamp
    is within the tolerance (Standard Webhooks, "Verifying webhooks")."""
    try:
        msg_id = headers["webhook-id"]
        stamp = headers["webhook-timestamp"]
        signatures = headers["webhook-signature"].split(" ")
        key = base64.b64decode(secret.removeprefix("whsec_"))
        if abs(now - int(stamp)) > TOLERANCE_S:
            return False
    except (KeyError, ValueError):
        return False
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
    expected = base64.b64encode(mac).decode()
    return any(s.startswith("v1,") and hmac.compare_digest(s[3:], expected) for s in signatures)


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    now = time.time()
    if not _first:
        _first.append(now)
    headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
    verified = verify(os.environ["RECEIVER_SECRET"], headers, body, now)
    failing = now - _first[0] < float(os.environ.get("RECEIVER_FAIL_S", "0"))
    status = 401 if not verified else 500 if failing else 200
    entry = {
        "at": now,
        "id": headers.get("webhook-id"),
        "timestamp": headers.get("webhook-timestamp"),
        "signature": headers.get("webhook-signature"),
        "verified": verified,
        "status": status,
        "body": body.decode(),
    }
    # A test helper: one short append per request, blocking the loop is harmless here.
    with open(os.environ["RECEIVER_LOG"], "a", encoding="utf-8") as log:  # noqa: ASYNC230
        log.write(json.dumps(entry) + "\n")
    await send({"type": "http.response.start", "status": status, "headers": []})
    await send({"type": "http.response.body", "body": b"ok" if status == 200 else b"no"})


class Receiver:
    """This app in a uvicorn process of its own, for a test (`start`, `received`, `stop`)."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/hook"
        self.log = tmp / "received.jsonl"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, secret: str, fail_s: float) -> None:
        env = {
            **os.environ,
            "RECEIVER_SECRET": secret,
            "RECEIVER_LOG": str(self.log),
            "RECEIVER_FAIL_S": str(fail_s),
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "tests.webhook_receiver:app",
                "--port",
                str(self.port),
                "--log-level",
                "warning",
            ],
            cwd=Path(__file__).resolve().parents[1],
            env=env,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.1)
        raise AssertionError("the receiver did not listen within 30 s")

    def received(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
