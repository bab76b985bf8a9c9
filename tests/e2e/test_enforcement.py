"""docs/gateway-integration.md#enforcing-plans, measured: three gateway processes (uvicorn,
MeteringMiddleware with enforcement, a real Gateway publishing to the stack's Kafka)
against one `tally up`, hammering ONE account whose plan has both limits: per_minute
300 and a session of 900 units.

One account cannot have both limits bind in the same minute: once the minute's 300
calls are admitted no call is (refused calls are not metered), so the session cannot
grow until the next minute; and once the session is full every call is refused, so the
minute's count stops. The nearest honest design has them bind one after the other, each
on a full UTC minute of the same account:

* minute 1, calls of 1 unit at r = 25/s per gateway: the per-minute limit binds after
  ~300 calls (the session then holds 300 + overshoot of its 900 units). The calls the three
  gateways accepted in the minute are at most 300 + the documented bound
  (G-1)·r·(S + RTT + D), D the data delay the API reported; overshoot and bound printed.
* minute 2, calls of 3 units: Tally's count shows the session at 900 units after at
  most 200 calls, before the minute's 300 (the overshoot may still take the minute's
  accepted calls to 300; a gateway that knows the session is full names it, a full
  quota being decided first). Once
  /api/account/usage shows it at 100 %, every gateway refuses within S + RTT with
  `quota_exceeded`; the units accepted past 900 are at most the same bound in units,
  (G-1)·r·u·(S + RTT + D).
* The 429s and /api/v1/account/usage tell the same story: the same policy fields, the
  count Tally shows is exactly what the gateways accepted (refused calls are not
  metered), `remaining` 0 on both in minute 1, Retry-After the session's reset.
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
from typing import Any

import httpx
import orjson
import pytest

from deploy.processes import free_port
from deploy.settings import REPO_ROOT
from tests.e2e.test_faults import ADMIN_KEY, Stack, _stack

pytestmark = pytest.mark.e2e

G = 3
RATE_PER_GATEWAY = 25.0
"""Calls per second each gateway is offered (r)."""
SYNC_S = 1.0
PER_MINUTE = 300
SESSION_UNITS = 900
RATE_UNITS = 1.0
"""Units per call in minute 1: 300 + overshoot of them leave the session short of 900
unless the overshoot exceeds 600 (measured up to 245 on a loaded 2-core machine)."""
QUOTA_UNITS = 3.0
"""Units per call in minute 2: the session fills within 200 calls, before the minute's 300."""
RATE_S = 10.0
QUOTA_S = 20.0
ACCOUNT = "acct-e2e"
PLANS = {"pro": {"per_minute": PER_MINUTE, "session_limit": SESSION_UNITS}}


@dataclass
class Outcome:
    sent_at: float
    gateway: int
    status: int
    headers: httpx.Headers
    body: bytes
    done_at: float = 0.0


@dataclass
class Run:
    """One phase: every call's outcome, the data delays seen, when the session showed 100 %."""

    calls: list[Outcome] = field(default_factory=list)
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
                            "--timeout-keep-alive",
                            "120",
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


class _Conn:
    """One keep-alive HTTP/1.1 connection with a minimal client: on a loaded 2-core
    machine httpx's CPU per call (~1 ms) alone kept the offered rate below the limit."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    async def get(self, request: bytes) -> tuple[int, httpx.Headers, bytes]:
        self.writer.write(request)
        head = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        headers = httpx.Headers([tuple(line.split(": ", 1)) for line in head[1:] if line])
        body = await self.reader.readexactly(int(headers.get("content-length", "0")))
        return status, headers, body


async def _hammer(
    url: str, gateway: int, account: str, units: float, rate: float, until: float,
    into: list[Outcome],
) -> None:  # fmt: skip
    """Calls at a fixed rate (one every 1/rate s, not waiting for answers), on a pool of
    keep-alive connections."""
    host, port = url.removeprefix("http://").split(":")
    request = (
        f"GET /work?units={units} HTTP/1.1\r\nhost: {host}\r\nx-account-id: {account}\r\n\r\n"
    ).encode()
    idle: asyncio.Queue[_Conn] = asyncio.Queue()
    for _ in range(32):
        idle.put_nowait(_Conn(*await asyncio.open_connection(host, int(port))))
    pending: list[asyncio.Task[None]] = []

    async def one(conn: _Conn) -> None:
        sent = time.time()
        try:
            status, headers, body = await conn.get(request)
        except (OSError, asyncio.IncompleteReadError) as exc:
            into.append(Outcome(sent, gateway, 0, httpx.Headers(), repr(exc).encode(), sent))
            conn = _Conn(*await asyncio.open_connection(host, int(port)))
        else:
            into.append(Outcome(sent, gateway, status, headers, body, time.time()))
        idle.put_nowait(conn)

    start = time.monotonic()
    n = 0
    while time.monotonic() < until:
        pending.append(asyncio.create_task(one(await idle.get())))
        n += 1
        await asyncio.sleep(max(0.0, start + n / rate - time.monotonic()))
    await asyncio.gather(*pending)
    while not idle.empty():
        idle.get_nowait().writer.close()


async def _watch(client: httpx.AsyncClient, api: str, key: str, run: Run, until: float) -> None:
    """The API's data delay, and when the account's session shows 100 %."""
    while time.monotonic() < until:
        r = await client.get(
            f"{api}/api/v1/account/usage", headers={"Authorization": f"Bearer {key}"}
        )
        run.delays.append(float(r.headers["X-Data-Delay"]))
        if run.quota_full_at is None:
            q = await client.get(
                f"{api}/api/account/usage", headers={"Authorization": f"Bearer {key}"}
            )
            if q.json()["session"]["used_percentage"] >= 100:
                run.quota_full_at = time.time()
        await asyncio.sleep(0.25)


async def _load(urls: list[str], api: str, key: str, units: float, seconds: float) -> Run:
    """Every gateway called at RATE_PER_GATEWAY for `seconds`, the usage watched."""
    run = Run()
    async with httpx.AsyncClient(timeout=10) as client:
        until = time.monotonic() + seconds
        await asyncio.gather(
            _watch(client, api, key, run, until),
            *(
                _hammer(u, i, ACCOUNT, units, RATE_PER_GATEWAY, until, run.calls)
                for i, u in enumerate(urls)
            ),
        )
    return run


def _code(o: Outcome) -> str | None:
    return orjson.loads(o.body)["error"]["code"] if o.status == 429 else None


def _peak_rate(calls: list[Outcome], window_s: float) -> float:
    """The most calls one gateway answered within any `window_s`, per second."""
    peak = 0
    for g in range(G):
        times = sorted(o.done_at for o in calls if o.gateway == g)
        j = 0
        for i, t in enumerate(times):
            while times[j] < t - window_s:
                j += 1
            peak = max(peak, i - j + 1)
    return peak / window_s


def _usage(stack: Stack, key: str, path: str = "/api/v1/account/usage") -> httpx.Response:
    return httpx.get(f"{stack.api}{path}", headers={"Authorization": f"Bearer {key}"})


def _counted_after(stack: Stack, key: str, at: float) -> bool:
    updated = _usage(stack, key).json()["meta"]["updated_at"]
    return datetime.fromisoformat(updated.replace("Z", "+00:00")).timestamp() > at


def _limits(stack: Stack) -> dict[str, Any]:
    """The account as POST /api/v1/admin/limits answers it (exact session units)."""
    r = httpx.post(
        f"{stack.api}/api/v1/admin/limits",
        json={"accounts": [ACCOUNT]},
        headers={"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert r.status_code == 200, r.text
    found: dict[str, Any] = r.json()["accounts"][ACCOUNT]
    return found


def _session_units(stack: Stack) -> float:
    return int(_limits(stack)["session"]["used_micro"]) / 1_000_000


@dataclass(frozen=True)
class Bound:
    """(G-1)·r·(S + RTT + D) with the run's measured r, RTT and D (calls or, times the
    units per call, units)."""

    r: float
    rtt: float
    d: float

    @property
    def window(self) -> float:
        return SYNC_S + self.rtt + self.d

    def calls(self) -> float:
        return (G - 1) * self.r * self.window

    def text(self, units: float = 1.0) -> str:
        u = f"*{units:g}" if units != 1 else ""
        return (
            f"(G-1)*r{'*u' if u else ''}*(S+RTT+D) = {G - 1}*{self.r:.1f}{u}*"
            f"({SYNC_S}+{self.rtt:.2f}+{self.d:.2f}) = {self.calls() * units:.0f}"
        )


def _bound(run: Run, gateways: list[str]) -> Bound:
    rtt = max(httpx.get(f"{u}/stats").json()["sync_seconds_max"] for u in gateways)
    d = max(run.delays)
    r = max(RATE_PER_GATEWAY, _peak_rate(run.calls, SYNC_S + rtt + d))
    return Bound(r, rtt, d)


def _healthy(run: Run) -> None:
    broken = [o for o in run.calls if o.status == 0]
    assert len(broken) <= 0.05 * len(run.calls), [o.body for o in broken[:3]]


def _counted(stack: Stack, key: str, run: Run) -> None:
    end = max(o.done_at for o in run.calls)
    _wait(lambda: _counted_after(stack, key, end + 1), 60, "Tally to count the phase")


def test_three_gateways_hold_one_account_to_both_limits(stack: Stack, gateways: list[str]) -> None:
    key = _account(stack, ACCOUNT)
    # Each gateway syncs with its topic's partition count: judged per partition.
    assert all(httpx.get(f"{u}/stats").json()["partitions"] > 0 for u in gateways)
    # Minute 1 with room to count it before it ends (answers may lag on a loaded machine).
    if 60 - time.time() % 60 < RATE_S + 25:
        time.sleep(60 - time.time() % 60 + 0.5)
    minute = int(time.time() // 60) * 60

    # -- minute 1: the per-minute limit, at most L + the bound -----------------------
    rate = asyncio.run(_load(gateways, stack.api, key, RATE_UNITS, RATE_S))
    assert max(o.done_at for o in rate.calls) < minute + 60, "minute 1 left its minute"
    _healthy(rate)
    _counted(stack, key, rate)
    counted = round(_session_units(stack) / RATE_UNITS)  # every call so far: 1 unit
    seen = sum(o.status == 200 for o in rate.calls)
    refused = [o for o in rate.calls if o.status == 429]
    # A call whose answer was lost may have been accepted: Tally's count decides.
    assert seen <= counted <= seen + sum(o.status == 0 for o in rate.calls)
    bound = _bound(rate, gateways)
    waits = sorted(o.done_at - o.sent_at for o in rate.calls)
    print(
        f"\nminute 1, per_minute {PER_MINUTE}, {G} gateways, one account: {counted} accepted "
        f"(Tally's count), overshoot {counted - PER_MINUTE} vs bound {bound.text()}; call "
        f"latency p50 {waits[len(waits) // 2]:.2f}s, max {waits[-1]:.2f}s"
    )
    assert counted >= PER_MINUTE, "refused below the limit"
    assert counted - PER_MINUTE <= bound.calls()
    assert counted < SESSION_UNITS, "overshoot past 600: the session filled in minute 1"
    assert refused
    assert all(_code(o) == "rate_limited" for o in refused)
    usage = _usage(stack, key)
    last = refused[-1].headers
    assert usage.headers["RateLimit-Policy"] == last["RateLimit-Policy"]
    assert usage.headers["X-RateLimit-Limit"] == last["X-RateLimit-Limit"] == str(PER_MINUTE)
    assert last["X-RateLimit-Remaining"] == "0"
    assert int(last["X-RateLimit-Reset"]) == minute + 60
    if int(time.time() // 60) * 60 == minute:  # still minute 1
        limit = usage.json()["data"]["requests"]["limit"]
        assert limit["remaining"] == 0 == int(usage.headers["X-RateLimit-Remaining"])
        assert _limits(stack)["minute"]["requests"] == counted

    # -- minute 2: the session, refused by every gateway within S + RTT of 100 % ----
    time.sleep(max(0.0, minute + 60.2 - time.time()))
    quota = asyncio.run(_load(gateways, stack.api, key, QUOTA_UNITS, QUOTA_S))
    _healthy(quota)
    _counted(stack, key, quota)
    used = _session_units(stack)
    seen2 = sum(o.status == 200 for o in quota.calls)
    assert used == counted * RATE_UNITS + seen2 * QUOTA_UNITS or any(
        o.status == 0 for o in quota.calls
    ), (used, counted, seen2)
    full = quota.quota_full_at
    assert full is not None, "the session never showed 100 % in minute 2"
    bound2 = _bound(quota, gateways)
    first = {
        g: min(o.done_at for o in quota.calls if o.gateway == g and o.status == 429)
        for g in range(G)
    }
    print(
        f"minute 2, session {SESSION_UNITS} units, calls of {QUOTA_UNITS:g}: {used:g} units "
        f"used ({seen2} calls accepted in the minute), overshoot {used - SESSION_UNITS:g} "
        f"units vs bound {bound2.text(QUOTA_UNITS)}; session at 100 % in "
        "/api/account/usage; each gateway's first refusal: "
        + ", ".join(f"gw-{g} {first[g] - full:+.2f}s" for g in sorted(first))
        + f" (documented: refusing by S+RTT = {SYNC_S + bound2.rtt:.2f}s after)"
    )
    assert used >= SESSION_UNITS, "refused below the session limit"
    assert used - SESSION_UNITS <= bound2.calls() * QUOTA_UNITS
    # Not asserted: seen2 < PER_MINUTE. Tally's count shows the session full after at most
    # 200 calls of minute 2, but the gateways' overshoot past it (within the bound above)
    # may take the minute's accepted calls to 300 too (one run did). Past S + RTT after
    # 100 %, the session is what every refusal names (a full quota is decided first).
    late = [o for o in quota.calls if o.sent_at > full + SYNC_S + bound2.rtt and o.status]
    assert {o.gateway for o in late} == set(range(G))
    assert all(_code(o) == "quota_exceeded" for o in late), [
        (o.gateway, o.status, o.sent_at - full) for o in late if o.status != 429
    ]
    session = _usage(stack, key, "/api/account/usage").json()["session"]
    assert session["used_percentage"] >= 100
    resets = datetime.fromisoformat(session["resets_at"].replace("Z", "+00:00")).timestamp()
    denial = [o for o in quota.calls if o.status == 429][-1]
    assert denial.headers["RateLimit-Policy"] == _usage(stack, key).headers["RateLimit-Policy"]
    # Decided between sending and the answer; Retry-After is rounded up.
    retry = int(denial.headers["Retry-After"])
    assert resets - denial.done_at <= retry <= resets - denial.sent_at + 1
