"""docs/gateway-integration.md#enforcing-plans, measured: three gateway processes (uvicorn,
MeteringMiddleware with enforcement, a real Gateway publishing to the stack's Kafka)
against one `tally up`, hammered at a fixed rate per gateway.

* `acct-rate` (per_minute 300, calls of 0 units): per UTC minute, the calls the three
  gateways accepted are at most 300 + the documented bound (G-1)·r·(S + D + RTT), with
  D the data delay the API reported during the run; the overshoot and the bound are
  printed side by side.
* `acct-quota` (session limit 100 units, 1 unit per call): once its usage shows the
  session at 100 %, every gateway refuses it within S + RTT, with `quota_exceeded`.
* The 429s and /api/v1/account/usage tell the same story: the same policy fields, the
  count Tally shows is exactly what the gateways accepted (refused calls are not
  metered), `remaining` 0 on both, Retry-After the session's reset.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import orjson
import pytest

from deploy.processes import free_port
from deploy.settings import REPO_ROOT
from tests.e2e.test_faults import ADMIN_KEY, Stack, _stack

pytestmark = pytest.mark.e2e

G = 3
RATE_PER_GATEWAY = 25.0
"""Calls per second each gateway is offered for acct-rate (r)."""
QUOTA_RATE_PER_GATEWAY = 10.0
SYNC_S = 1.0
PER_MINUTE = 300
SESSION_UNITS = 100
HAMMER_S = 12.0
PLANS = {"pro": {"per_minute": PER_MINUTE, "session_limit": SESSION_UNITS}}


@dataclass
class Outcome:
    sent_at: float
    gateway: int
    status: int
    headers: httpx.Headers
    body: bytes


@dataclass
class Run:
    rate: list[Outcome] = field(default_factory=list)
    quota: list[Outcome] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    quota_full_at: float | None = None


def _wait(predicate: object, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if predicate():  # type: ignore[operator]
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = _stack(tmp_path, TALLY_PLANS=orjson.dumps(PLANS).decode(), TALLY_WORKER_BATCH_MESSAGES="64")
    s.start()
    try:
        _wait(lambda: httpx.get(f"{s.api}/readyz", timeout=5).status_code == 200, 120, "readyz")
        yield s
    finally:
        s.stop()


@pytest.fixture
def gateways(stack: Stack, tmp_path: Path) -> Iterator[list[str]]:
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    env = {
        **stack.env,
        "TALLY_KAFKA_BOOTSTRAP": f"127.0.0.1:{stack.env['TALLY_KAFKA_PORT']}",
        "TALLY_ENFORCE_API_URL": stack.api,
        "TALLY_ENFORCE_ADMIN_KEY": ADMIN_KEY,
        "TALLY_ENFORCE_SYNC_INTERVAL_S": str(SYNC_S),
    }
    try:
        for i in range(G):
            port = free_port()
            with (tmp_path / f"gw-{i}.log").open("ab") as out:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "uvicorn",
                            "--factory",
                            "--port",
                            str(port),
                            "--log-level",
                            "warning",
                            "tests.e2e.enforce_gateway:create",
                        ],
                        cwd=REPO_ROOT,
                        env={**env, "GW_SOURCE": f"gw-{i}"},
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:
            _wait(lambda u=url: httpx.get(f"{u}/stats").status_code == 200, 60, f"gateway {url}")
        yield urls
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


def _account(stack: Stack, account: str) -> str:
    r = httpx.post(
        f"{stack.api}/api/v1/admin/accounts",
        json={"id": account, "plan": "pro"},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert r.status_code == 201, r.text
    key: str = r.json()["data"]["api_key"]
    return key


async def _hammer(
    client: httpx.AsyncClient, url: str, gateway: int, account: str, units: float,
    rate: float, until: float, into: list[Outcome],
) -> None:  # fmt: skip
    """Calls at a fixed rate (one every 1/rate s, not waiting for answers)."""
    pending: list[asyncio.Task[None]] = []

    async def one() -> None:
        sent = time.time()
        r = await client.get(
            f"{url}/work", params={"units": units}, headers={"x-account-id": account}
        )
        into.append(Outcome(sent, gateway, r.status_code, r.headers, r.content))

    start = time.monotonic()
    n = 0
    while time.monotonic() < until:
        pending.append(asyncio.create_task(one()))
        n += 1
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
    await asyncio.gather(*pending)


async def _watch(
    client: httpx.AsyncClient, api: str, keys: dict[str, str], run: Run, until: float
) -> None:
    """The API's data delay, and when acct-quota's session shows 100 %."""
    while time.monotonic() < until:
        r = await client.get(
            f"{api}/api/v1/account/usage", headers={"Authorization": f"Bearer {keys['rate']}"}
        )
        run.delays.append(float(r.headers["X-Data-Delay"]))
        if run.quota_full_at is None:
            q = await client.get(
                f"{api}/api/account/usage", headers={"Authorization": f"Bearer {keys['quota']}"}
            )
            if q.json()["session"]["used_percentage"] >= 100:
                run.quota_full_at = time.time()
        await asyncio.sleep(0.25)


async def _load(urls: list[str], api: str, keys: dict[str, str]) -> Run:
    run = Run()
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
    async with httpx.AsyncClient(timeout=10, limits=limits) as client:
        until = time.monotonic() + HAMMER_S
        await asyncio.gather(
            _watch(client, api, keys, run, until),
            *(
                _hammer(client, u, i, "acct-rate", 0.0, RATE_PER_GATEWAY, until, run.rate)
                for i, u in enumerate(urls)
            ),
            *(
                _hammer(client, u, i, "acct-quota", 1.0, QUOTA_RATE_PER_GATEWAY, until, run.quota)
                for i, u in enumerate(urls)
            ),
        )
    return run


def _code(o: Outcome) -> str | None:
    return orjson.loads(o.body)["error"]["code"] if o.status == 429 else None


def test_three_gateways_hold_one_account_to_its_plan(stack: Stack, gateways: list[str]) -> None:
    keys = {"rate": _account(stack, "acct-rate"), "quota": _account(stack, "acct-quota")}
    # One UTC minute for the whole run: the per-minute count is then one number.
    if 60 - time.time() % 60 < HAMMER_S + 3:
        time.sleep(60 - time.time() % 60 + 0.5)
    minute = int(time.time() // 60) * 60
    run = asyncio.run(_load(gateways, stack.api, keys))
    assert all(int(o.sent_at // 60) * 60 == minute for o in run.rate), "the run left its minute"

    # -- per minute: at most L + the bound ------------------------------------------
    accepted = sum(o.status == 200 for o in run.rate)
    refused = [o for o in run.rate if o.status == 429]
    assert all(_code(o) == "rate_limited" for o in refused)
    assert {o.status for o in run.rate} <= {200, 429}
    data_delay = max(run.delays)
    rtt = 0.5  # a limits read's round trip, at most (local API)
    bound = (G - 1) * RATE_PER_GATEWAY * (SYNC_S + data_delay + rtt)
    overshoot = accepted - PER_MINUTE
    print(
        f"\nper-minute limit {PER_MINUTE}: {accepted} accepted by {G} gateways at "
        f"r={RATE_PER_GATEWAY}/s each (S={SYNC_S}s, D<={data_delay:.2f}s): overshoot "
        f"{overshoot} vs bound (G-1)*r*(S+D+RTT) = {bound:.0f}"
    )
    assert accepted >= PER_MINUTE, "refused below the limit"
    assert overshoot <= bound

    # -- the session: every gateway refuses within S + RTT of 100 % -------------------
    assert run.quota_full_at is not None, "acct-quota never reached 100 % during the run"
    late = [o for o in run.quota if o.sent_at > run.quota_full_at + SYNC_S + rtt]
    assert {o.gateway for o in late} == set(range(G))
    assert all(o.status == 429 and _code(o) == "quota_exceeded" for o in late), [
        (o.gateway, o.status, o.sent_at - run.quota_full_at) for o in late if o.status != 429
    ]
    first = {
        g: min(o.sent_at for o in run.quota if o.gateway == g and o.status == 429) for g in range(G)
    }
    print(
        "session 100 % -> each gateway's first refusal after: "
        + ", ".join(f"gw-{g} {first[g] - run.quota_full_at:+.2f}s" for g in sorted(first))
        + f" (documented: within S+RTT = {SYNC_S + rtt}s)"
    )

    # -- the same story: 429 headers and /api/v1/account/usage ----------------------------
    quota_units = sum(o.status == 200 for o in run.quota)
    _wait(lambda: _today(stack, keys["rate"]) == accepted, 30, "acct-rate's count")
    _wait(lambda: _today(stack, keys["quota"]) == quota_units, 30, "acct-quota's count")
    usage = httpx.get(
        f"{stack.api}/api/v1/account/usage", headers={"Authorization": f"Bearer {keys['rate']}"}
    )
    last = refused[-1].headers
    assert usage.headers["RateLimit-Policy"] == last["RateLimit-Policy"]
    assert usage.headers["X-RateLimit-Limit"] == last["X-RateLimit-Limit"] == str(PER_MINUTE)
    assert last["X-RateLimit-Remaining"] == "0"
    assert int(last["X-RateLimit-Reset"]) == minute + 60
    limit = usage.json()["data"]["requests"]["limit"]
    if int(time.time() // 60) * 60 == minute:  # still the run's minute
        assert limit["remaining"] == 0 == int(usage.headers["X-RateLimit-Remaining"])
    session = httpx.get(
        f"{stack.api}/api/account/usage", headers={"Authorization": f"Bearer {keys['quota']}"}
    ).json()["session"]
    assert session["used_percentage"] >= 100
    resets = datetime.fromisoformat(session["resets_at"].replace("Z", "+00:00")).timestamp()
    denial = [o for o in run.quota if o.status == 429][-1]
    assert abs(int(denial.headers["Retry-After"]) - (resets - denial.sent_at)) <= 2


def _today(stack: Stack, key: str) -> int:
    r = httpx.get(f"{stack.api}/api/v1/account/usage", headers={"Authorization": f"Bearer {key}"})
    today: int = r.json()["data"]["requests"]["today"]
    return today
