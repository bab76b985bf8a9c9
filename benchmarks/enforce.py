"""`enforce_overhead_us`: the metering middleware's CPU per request with enforcement
on, minus the same with it off (docs/gateway-integration.md#enforcing-plans).

    .venv/bin/python -m benchmarks.enforce [--calls 50000]

The middleware is driven as ASGI, in-process, around an app that answers at once, with
a recorder that takes every event and does nothing: what is timed is the middleware's
own work (metering, plus with enforcement the decision, the local count and charging
the units). 1000 accounts, synced as Tally would answer (none refused), calls spread
over them. Process CPU time, best of three (comparable on a loaded machine). The sync
task does not run during the timing (its interval is an hour): it costs one HTTP
request per interval per 1000 accounts, not per call.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from pathlib import Path
from typing import Any

from producers.asgi import MeteringMiddleware, from_header
from producers.enforcement import Quota, Synced
from producers.enforcement_sync import Enforcement
from schemas.events import AnyEvent

ACCOUNTS = 1000
TARGET_US = 50.0


class _NullRecorder:
    async def record(self, event: AnyEvent) -> None:
        return None


async def _app(scope: Any, receive: Any, send: Any) -> None:
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"x-tally-units", b"1")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


def _enforcement() -> Enforcement:
    e = Enforcement("http://127.0.0.1:9", "bench", sync_interval_s=3600, stale_after_s=3600)
    now = time.time()
    for i in range(ACCOUNTS):
        e.core.apply(
            f"acct-{i}",
            Synced(
                per_minute=10**9,
                minute_start=now // 60 * 60,
                minute_requests=0,
                session=Quota(0, 1e12, now + 3600),
                weekly=Quota(0, 1e12, now + 86_400),
                active_streams=0,
                max_streams=10,
                reflected_until=now - 60,
            ),
            now,
        )
    return e


async def _time(calls: int, enforcement: Enforcement | None) -> float:
    """CPU seconds per call."""
    middleware = MeteringMiddleware(
        _app,
        recorder=_NullRecorder(),
        source="bench",
        account=from_header("x-account-id"),
        enforcement=enforcement,
        max_pending=calls + 1,
    )
    scopes = [
        {
            "type": "http",
            "method": "GET",
            "path": "/v1/items/1",
            "root_path": "",
            "headers": [(b"x-account-id", f"acct-{i % ACCOUNTS}".encode())],
        }
        for i in range(calls)
    ]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    started = time.process_time()
    for n, scope in enumerate(scopes):
        await middleware(scope, receive, send)
        if n % 256 == 0:
            await asyncio.sleep(0)  # let the queue's task hand events on, as a server does
    await middleware.aclose()
    spent = time.process_time() - started
    if enforcement is not None:
        await enforcement.aclose()
    return spent / calls


def measure(calls: int) -> dict[str, float]:
    off = min(asyncio.run(_time(calls, None)) for _ in range(3))
    on = min(asyncio.run(_time(calls, _enforcement())) for _ in range(3))
    return {
        "enforce_off_us": off * 1e6,
        "enforce_on_us": on * 1e6,
        "enforce_overhead_us": max(0.0, on - off) * 1e6,
    }


def run(bootstrap: str, workdir: Path, scale: float) -> dict[str, float]:
    """benchmarks/run.py's entry point (no Kafka: the recorder is a stub)."""
    return measure(max(1000, math.ceil(50_000 * scale)))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.enforce", description=__doc__)
    parser.add_argument("--calls", type=int, default=50_000)
    figures = measure(parser.parse_args().calls)
    for name, value in figures.items():
        print(f"{name}: {value:.1f}")
    print(f"target: enforce_overhead_us <= {TARGET_US:g}")


if __name__ == "__main__":
    main()
