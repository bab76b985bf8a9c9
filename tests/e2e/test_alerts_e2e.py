"""Alerts through `tally up`, killed with SIGKILL mid-stream (issue 18's acceptance).

A broker of its own (so it outlives the kills), `tally up` against it, ten accounts on
a small plan with five thresholds, a webhook endpoint created through the admin API,
and a receiver in its own uvicorn process that verifies every signature independently
(tests/webhook_receiver.py) and answers 500 for its first seconds. Gateways publish
paced traffic that takes every account across every threshold of its session and its
week; `tally up` is SIGKILLed mid-stream and started again. Every crossing must arrive
with a 2xx, and no crossing may arrive under two webhook-ids.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import defaultdict
from pathlib import Path

import httpx
import pytest

from deploy.kafka_local import LocalKafka, ensure_topics
from deploy.processes import free_port
from producers import events as build
from producers.gateway import Gateway
from tests.e2e.test_faults import LIBS, Stack, _stack
from tests.integration.test_alerts_webhooks import Receiver

pytestmark = pytest.mark.e2e

ADMIN_KEY = "fault-test-admin-key-0123456789abcdef"
ACCOUNTS = [f"alert-{i:02d}" for i in range(10)]
THRESHOLDS = [20, 40, 60, 80, 100]
PLANS = json.dumps(
    {
        "tiny": {
            "session_limit": 100,
            "weekly_limit": 400,
            "alert_thresholds": THRESHOLDS,
            "session_anchor": "first_request",
            "weekly_anchor": "fixed",
        }
    }
)
ROUNDS, UNITS = 40, 10.0  # per account: 400 units, every threshold of both windows


def _wait_api(stack: Stack, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{stack.api}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    raise AssertionError(f"the API did not answer within {timeout_s}s; see {stack.log}")


def _admin(stack: Stack, method: str, path: str, body: object = None) -> dict[str, object]:
    r = httpx.request(
        method,
        f"{stack.api}/api/v1/admin{path}",
        json=body,
        headers={"X-API-Key": ADMIN_KEY},
        timeout=30,
    )
    assert r.status_code in (200, 201), r.text
    data: dict[str, object] = r.json()["data"]
    return data


async def _publish(bootstrap: str, kill_after: int, kill: object) -> None:
    async with Gateway(bootstrap, "tally.events") as gateway:
        for round_ in range(ROUNDS):
            for account in ACCOUNTS:
                await gateway.record(build.request(account, "gw-1", units=UNITS))
            await gateway.flush()
            if round_ == kill_after:
                assert callable(kill)
                await asyncio.to_thread(kill)
            await asyncio.sleep(0.4)


def test_sigkill_mid_stream_loses_no_crossing_and_never_uses_two_ids(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path / "broker", LIBS, port=free_port())
    broker.start()
    stack = _stack(
        tmp_path,
        TALLY_KAFKA_BOOTSTRAP=broker.bootstrap,
        TALLY_ADMIN_KEY=ADMIN_KEY,
        TALLY_PLANS=PLANS,
        TALLY_WEBHOOK_ALLOW_PRIVATE="true",
        TALLY_WEBHOOK_RETRY_SCHEDULE_S="0.5,1,1,2,2,2,2,2,2,2",
        TALLY_WORKER_BATCH_MESSAGES="4",
    )
    receiver = Receiver(tmp_path)
    try:
        asyncio.run(
            ensure_topics(
                broker.bootstrap, {"tally.events": 8, "tally.rollups": 8, "tally.events.dlq": 1}
            )
        )
        stack.start()
        _wait_api(stack)
        for account in ACCOUNTS:
            _admin(stack, "POST", "/accounts", {"id": account, "plan": "tiny"})
        endpoint = _admin(stack, "POST", "/webhooks", {"url": receiver.url})
        receiver.start(str(endpoint["secret"]), fail_s=5.0)

        def kill_and_restart() -> None:
            stack.kill()
            stack.start()

        started = time.monotonic()
        asyncio.run(_publish(broker.bootstrap, ROUNDS // 3, kill_and_restart))
        _wait_api(stack)
        want = len(ACCOUNTS) * len(THRESHOLDS) * 2
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            ok = {r["id"] for r in receiver.received() if r["status"] == 200}
            if len(ok) >= want:
                break
            time.sleep(0.5)
        time.sleep(3)  # a duplicate id would show up by now
        received = receiver.received()
        elapsed = time.monotonic() - started
    finally:
        stack.stop()
        receiver.stop()
        broker.stop()

    assert all(r["verified"] for r in received), "a signature did not verify"
    ids_of: dict[tuple[str, str, str, int], set[str]] = defaultdict(set)
    delivered: set[tuple[str, str, str, int]] = set()
    for r in received:
        data = json.loads(r["body"])["data"]
        crossing = (data["account"], data["window"], data["window_start"], data["threshold"])
        ids_of[crossing].add(r["id"])
        if r["status"] == 200:
            delivered.add(crossing)
    twice = {c: ids for c, ids in ids_of.items() if len(ids) > 1}
    assert not twice, f"crossings delivered under two ids: {twice}"
    by_account = defaultdict(set)
    for account, window, _, threshold in delivered:
        by_account[account].add((window, threshold))
    every = {(w, t) for w in ("session", "weekly") for t in THRESHOLDS}
    missing = {a: every - by_account[a] for a in ACCOUNTS if by_account[a] != every}
    assert not missing, f"crossings never delivered: {missing}"
    repeats = len([r for r in received if r["status"] == 200]) - len(delivered)
    print(
        f"\n{len(delivered)} crossings delivered in {elapsed:.1f}s through a SIGKILL; "
        f"{len(received)} requests ({repeats} repeated 2xx under the same id)"
    )
