"""Freshness benchmark: event time at the gateway -> visible in /api/v1/account/usage.

The real pipeline runs as `tally up` (the sink and the API in one process, the
embedded store admitting one; the worker in a child process of its own,
TALLY_UP_WORKER_PROCESSES=1) against the bench broker, with topics, group and
data dir of its own. A background load process publishes steady traffic,
50,000 events/s, as gateways' batch messages over 50k accounts (see
background_load; scale shortens the 60 s, never the rate). Meanwhile, every
PROBE_INTERVAL_S, a probe event for a fresh probe account (created through the
admin API) is recorded through a Gateway of its own, its CloudEvents `time` taken
at that instant; the probe's account is then polled until `requests.today`
counts it. The delay is the answer's arrival minus the event time (polls every
POLL_S, so it overstates by at most one poll).

Figures: freshness_p50_s, freshness_p99_s, freshness_max_s, freshness_probes,
freshness_lost (probes never seen within PROBE_TIMEOUT_S; counted as that delay),
freshness_pipeline_cores (CPU of `tally up` and its worker process over the probes, in
cores: a pipeline falling behind well under the machine's cores was starved by others),
freshness_load_events_per_s (achieved background rate), freshness_counted_events_per_s
(the pipeline's counting rate meanwhile: below the load rate it falls behind, and the
delay then grows with the run's length, whatever the settings).
What governs the delay (defaults in brackets):
TALLY_PRODUCER_LINGER_MS [20] at the gateway, TALLY_WORKER_FLUSH_INTERVAL_S [0.25]
and TALLY_WORKER_BATCH_MESSAGES [1000] in the worker, then one Kafka transaction,
the sink's read_committed fetch and INSERT, and the API's read.
`python -m benchmarks.freshness --set TALLY_WORKER_FLUSH_INTERVAL_S=0.2` tries a value.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import pathlib
import secrets
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from benchmarks._procs import (
    Child,
    child_env,
    python_module,
    running,
    tail,
    tree_cpu_seconds,
    wait_http,
)

RATE = 50_000.0
FULL_DURATION_S = 60.0
MIN_DURATION_S = 15.0
WARMUP_S = 5.0
"""Load runs this long before the first probe, so probes see the steady state."""
LOAD_ACCOUNTS = 50_000
"""Within the gateway's subject-hash cache (65,536), as a gateway's hot set would be."""
LOAD_PROCESSES = 1
"""Background load processes sharing RATE (the achieved total rate is reported: a
lagging load would flatter the figure). One suffices: it writes pre-formatted batch
messages (see background_load)."""
LINGER_S = 0.02
"""The gateway's default linger (TALLY_PRODUCER_LINGER_MS): one message per partition
this often."""
MAX_MESSAGE_EVENTS = 1_000
"""Most events in one load message (~280 kB); at RATE a linger period holds ~125 per
partition, so only a load catching up after a stall reaches it."""
PROBE_INTERVAL_S = 0.5
POLL_S = 0.02
PROBE_TIMEOUT_S = 30.0
PARTITIONS = 8


# -- the background gateway (its own process: its CPU must not delay the probes) ------


async def background_load(
    bootstrap: str, topic: str, rate: float, duration_s: float, accounts: int
) -> dict[str, float]:
    """Publish request events at `rate` for `duration_s`, as gateways put them on the wire.

    Not through the Gateway class: on a 2-core machine, building and recording 50k
    events/s through it costs the load about a core (measured: ~30 % CPU per process at
    16.7k events/s, three processes), which starves the pipeline under test; the probes
    still go through the Gateway. The wire is the gateway's: per partition, one batch
    message (JSON array, batch content type) per linger period holding only events of
    that partition's subjects, idempotent acks=all, the same compression.
    """
    from aiokafka import AIOKafkaProducer

    from producers.events import format_time
    from producers.partitioning import partition_for
    from schemas.events import CONTENT_TYPE_BATCH
    from schemas.kafka import COMPRESSION

    producer = AIOKafkaProducer(
        bootstrap_servers=bootstrap,
        client_id="bench-load",
        acks="all",
        enable_idempotence=True,
        compression_type=COMPRESSION,
        linger_ms=0,
        max_batch_size=1_000_000,
        max_request_size=1_000_000,
    )
    await producer.start()
    try:
        count = len(await producer.partitions_for(topic))
        subjects: list[list[str]] = [[] for _ in range(count)]
        for i in range(accounts):
            subject = f"load-{i:06d}"
            subjects[partition_for(subject, count)].append(subject)
        run = uuid.uuid4().hex[:10]
        template = (
            '{"specversion":"1.0","id":"' + run + '-%d","source":"bench-load",'
            '"type":"tally.request.v1","subject":"%s","time":"%s","data":{"units":1.0,'
            '"route":"/v1/messages","method":"POST","status":200,"model":"small-1"}}'
        )
        headers = [("content-type", CONTENT_TYPE_BATCH.encode())]
        loop = asyncio.get_running_loop()
        sent = 0
        pending: list[asyncio.Future[Any]] = []
        start = loop.time()
        while (elapsed := loop.time() - start) < duration_s:
            # A loop held up (a starved machine) catches up over several messages:
            # one message of everything due would exceed Kafka's request size.
            due = min(int(elapsed * rate) - sent, count * MAX_MESSAGE_EVENTS)
            if due > 0:
                now = format_time(datetime.now(UTC))
                for p in range(count):
                    n = due // count + (1 if p < due % count else 0)
                    if not n:
                        continue
                    mine = subjects[p]
                    events = [
                        template % (sent + k, mine[(sent + k) % len(mine)], now) for k in range(n)
                    ]
                    sent += n
                    value = ("[" + ",".join(events) + "]").encode()
                    pending.append(
                        await producer.send(
                            topic, value, key=mine[0].encode(), partition=p, headers=headers
                        )
                    )
            pending = [f for f in pending if not f.done() or f.result() is None]
            await asyncio.sleep(LINGER_S)
        await producer.flush()
        for future in pending:
            future.result()  # raises a delivery failure
        elapsed = loop.time() - start
    finally:
        await producer.stop()
    return {"events": float(sent), "seconds": elapsed, "rate": sent / elapsed}


# -- probes ----------------------------------------------------------------------------


async def _probe(
    gateway: Any,
    clients: list[Any],
    polling: asyncio.Semaphore,
    account: str,
    key: str,
    delays: list[float],
    lost: list[str],
) -> None:
    """Record one probe event, then poll every API (`clients`) until each counts it: the
    delay is until the last of them does (visible everywhere)."""
    import httpx

    from producers import events

    sent_at = datetime.now(UTC)
    await gateway.record(events.request(account, "bench-probe", time=sent_at))
    deadline = time.monotonic() + PROBE_TIMEOUT_S
    waiting = list(clients)
    while waiting and time.monotonic() < deadline:
        client = waiting[0]
        try:
            # One poll in flight across all probes: polls must not load the API
            # (which shares its process with the worker and the sink) themselves.
            async with polling:
                response = await client.get("/api/v1/account/usage", headers={"X-API-Key": key})
        except httpx.HTTPError:  # an overloaded API answering late: poll again
            continue
        if response.status_code == 200 and response.json()["data"]["requests"]["today"] >= 1:
            waiting.pop(0)
            continue
        await asyncio.sleep(POLL_S)
    if waiting:
        lost.append(account)
    else:
        delays.append((datetime.now(UTC) - sent_at).total_seconds())


async def _probe_accounts(base: str, admin_key: str, probes: int) -> dict[str, str]:
    """Probe accounts and their keys, made before the load starts (through the admin API)."""
    import httpx

    admin = {"Authorization": f"Bearer {admin_key}"}
    keys: dict[str, str] = {}
    async with httpx.AsyncClient(base_url=base, timeout=60) as client:
        for i in range(probes):
            account = f"probe-{uuid.uuid4().hex[:8]}-{i}"
            made = await client.post(
                "/api/v1/admin/accounts", json={"id": account, "plan": "max"}, headers=admin
            )
            made.raise_for_status()
            keys[account] = made.json()["data"]["api_key"]
    return keys


async def _measure(
    bootstrap: str, topic: str, bases: list[str], keys: dict[str, str], up: Child
) -> tuple[list[float], list[str]]:
    import httpx

    from producers.gateway import Gateway

    delays: list[float] = []
    lost: list[str] = []
    tasks: list[asyncio.Task[None]] = []
    polling = asyncio.Semaphore(1)
    async with contextlib.AsyncExitStack() as stack:
        clients = [
            await stack.enter_async_context(httpx.AsyncClient(base_url=base, timeout=10))
            for base in bases
        ]
        gateway = await stack.enter_async_context(
            Gateway(bootstrap, topic, client_id="bench-probe", spool=False)
        )
        start = time.monotonic()
        for n, (account, key) in enumerate(keys.items()):
            wait = start + n * PROBE_INTERVAL_S - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            up.check()
            tasks.append(
                asyncio.create_task(_probe(gateway, clients, polling, account, key, delays, lost))
            )
        await asyncio.gather(*tasks)
    return delays, lost


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    # Nearest rank: with few probes p99 is the worst but one, never interpolated down.
    rank = max(1, round(q * len(ordered) + 0.5)) if len(ordered) > 1 else 1
    return ordered[min(rank, len(ordered)) - 1]


def up_settings(
    bootstrap: str,
    workdir: pathlib.Path,
    name: str,
    port: int,
    overrides: Mapping[str, str] | None,
) -> dict[str, str]:
    """The environment of the measured `tally up`: topics, group and admin key of its own."""
    topic = f"{name}.events"
    return {
        "TALLY_KAFKA_BOOTSTRAP": bootstrap,
        "TALLY_DATA_DIR": str(workdir / "data"),
        "TALLY_EVENTS_TOPIC": topic,
        "TALLY_ROLLUPS_TOPIC": f"{name}.rollups",
        "TALLY_DLQ_TOPIC": f"{name}.dlq",
        "TALLY_CONSUMER_GROUP": name,
        "TALLY_EVENTS_PARTITIONS": str(PARTITIONS),
        "TALLY_API_PORT": str(port),
        "TALLY_ADMIN_KEY": secrets.token_urlsafe(32),
        # Probes poll their own keys 50 times a second; the API's own per-key
        # limit (50/s by default) would answer some of them 429.
        "TALLY_API_RATE_PER_S": "100000",
        "TALLY_API_RATE_BURST": "100000",
        # The worker in a process of its own (a core for counting, the other for the
        # sink, the API, the broker and the load), as a multi-core machine runs it.
        # With 0 (everything in one process) see docs/performance.md.
        "TALLY_UP_WORKER_PROCESSES": "1",
        **(overrides or {}),
    }


@dataclass(frozen=True)
class Pipeline:
    """What a freshness run measures: the `tally up` command and its settings, the APIs
    a probe must become visible on, and how to read what has been counted."""

    prefix: str
    """Of the figures' names: `<prefix>_p99_s` and so on."""
    topic: str
    command: list[str]
    settings: dict[str, str]
    bases: list[str]
    """The API replicas' base URLs; accounts are made through the first."""
    counted: Callable[[], int]
    """Events the pipeline has counted so far (to compare with the load's rate)."""
    others: tuple[int, ...] = ()
    """Processes of the pipeline that `tally up` did not start (a store server)."""

    def cpu_seconds(self, up: Child) -> float:
        """CPU used so far by `tally up`, every process it started, and `others`."""
        return sum(tree_cpu_seconds(pid) for pid in (up.pid, *self.others))


def run(
    bootstrap: str,
    workdir: pathlib.Path,
    scale: float,
    overrides: Mapping[str, str] | None = None,
    rate: float = RATE,
) -> dict[str, float]:
    """`overrides`: TALLY_* settings for `tally up`; `rate` below RATE separates the
    pipeline's own latency from a shortage of CPU (development only)."""
    from deploy.processes import free_port

    workdir = pathlib.Path(workdir) / "freshness"
    workdir.mkdir(parents=True, exist_ok=True)
    name = f"bench-fresh-{uuid.uuid4().hex[:8]}"
    port = free_port()
    pipeline = Pipeline(
        prefix="freshness",
        topic=f"{name}.events",
        command=python_module("deploy.cli", "up"),
        settings=up_settings(bootstrap, workdir, name, port, overrides),
        bases=[f"http://127.0.0.1:{port}"],
        # From `tally up`'s status line (every 5 s).
        counted=lambda: _counted(workdir / "up.log"),
    )
    return measure(bootstrap, workdir, scale, pipeline, rate)


def measure(
    bootstrap: str, workdir: pathlib.Path, scale: float, pipeline: Pipeline, rate: float = RATE
) -> dict[str, float]:
    """Run `pipeline` under the background load and probe it; its figures."""
    duration = max(MIN_DURATION_S, FULL_DURATION_S * min(scale, 1.0))
    probes = int(duration / PROBE_INTERVAL_S)
    env = child_env(pipeline.settings)
    with running("tally up", pipeline.command, env, workdir / "up.log") as up:
        for base in pipeline.bases:
            wait_http(f"{base}/healthz", up)
        keys = asyncio.run(
            _probe_accounts(pipeline.bases[0], pipeline.settings["TALLY_ADMIN_KEY"], probes)
        )
        load_args = python_module(
            "benchmarks.freshness", "load", "--bootstrap", bootstrap, "--topic", pipeline.topic,
            "--rate", str(rate / LOAD_PROCESSES),
            "--duration", str(duration + WARMUP_S + PROBE_TIMEOUT_S / 3),
            "--accounts", str(LOAD_ACCOUNTS),
        )  # fmt: skip
        logs = [workdir / f"load-{i}.log" for i in range(LOAD_PROCESSES)]
        with contextlib.ExitStack() as stack:
            loads = [
                stack.enter_context(running(f"gateway {i}", load_args, child_env({}), log))
                for i, log in enumerate(logs)
            ]
            time.sleep(WARMUP_S)
            for load in loads:
                load.check()
            counted_from = (time.monotonic(), pipeline.counted())
            cpu_from = pipeline.cpu_seconds(up)
            delays, lost = asyncio.run(
                _measure(bootstrap, pipeline.topic, pipeline.bases, keys, up)
            )
            counted_to = (time.monotonic(), pipeline.counted())
            cores = (pipeline.cpu_seconds(up) - cpu_from) / (counted_to[0] - counted_from[0])
            codes = [load.proc.wait(timeout=duration + PROBE_TIMEOUT_S + 60) for load in loads]
        rates = [_load_rate(log) for log in logs]
        for code, found, log in zip(codes, rates, logs, strict=True):
            if code != 0 or found is None:
                raise RuntimeError(f"a background gateway failed:\n{tail(log)}")
        up.check()
    # A probe never seen counts as PROBE_TIMEOUT_S: a lower bound, never flattering.
    every = delays + [PROBE_TIMEOUT_S] * len(lost)
    counted = (counted_to[1] - counted_from[1]) / (counted_to[0] - counted_from[0])
    p = pipeline.prefix
    return {
        f"{p}_p50_s": round(statistics.median(every), 3),
        f"{p}_p99_s": round(_quantile(every, 0.99), 3),
        f"{p}_max_s": round(max(every), 3),
        f"{p}_probes": float(len(every)),
        f"{p}_lost": float(len(lost)),
        f"{p}_load_events_per_s": round(sum(r for r in rates if r is not None), 0),
        # Below the load rate, the pipeline falls behind and the delay grows with the
        # run's length.
        f"{p}_counted_events_per_s": round(counted, 0),
        # CPU of the pipeline's processes (Pipeline.cpu_seconds), in cores, over the probes:
        # falling behind while well under the machine's cores means starved by others.
        f"{p}_pipeline_cores": round(cores, 2),
    }


def _counted(log: pathlib.Path) -> int:
    """The events `tally up` last reported counted (0 before its first status line)."""
    found = 0
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("tally: counted "):
            found = int(line.split()[2].replace(",", ""))
    return found


def _load_rate(log: pathlib.Path) -> float | None:
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("LOADJSON "):
            found: float = json.loads(line[len("LOADJSON ") :])["rate"]
            return found
    return None


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.freshness")
    sub = parser.add_subparsers(dest="command")
    load = sub.add_parser("load", help="(internal) the background gateway")
    load.add_argument("--bootstrap", required=True)
    load.add_argument("--topic", required=True)
    load.add_argument("--rate", type=float, required=True)
    load.add_argument("--duration", type=float, required=True)
    load.add_argument("--accounts", type=int, required=True)
    parser.add_argument("--bootstrap", help="a running broker (default: start a local one)")
    parser.add_argument("--scale", type=float, default=0.25)
    parser.add_argument("--set", action="append", default=[], help="TALLY_X=value for tally up")
    parser.add_argument("--rate", type=float, default=RATE, help="background events/s")
    parser.add_argument("--workdir", type=pathlib.Path, help="keep logs here (default: temp)")
    args = parser.parse_args()
    if args.command == "load":
        result = asyncio.run(
            background_load(args.bootstrap, args.topic, args.rate, args.duration, args.accounts)
        )
        print("LOADJSON " + json.dumps(result), flush=True)
        return
    overrides = dict(item.split("=", 1) for item in args.set)
    with tempfile.TemporaryDirectory(prefix="tally-bench-fresh-") as tmp:
        workdir = args.workdir or pathlib.Path(tmp)
        if args.bootstrap:
            figures = run(args.bootstrap, workdir, args.scale, overrides, args.rate)
            print(json.dumps(figures, indent=2))
            return
        from benchmarks._procs import REPO_ROOT
        from deploy.kafka_local import LocalKafka
        from deploy.processes import free_port

        broker = LocalKafka(pathlib.Path(tmp), REPO_ROOT / ".tally/kafka/libs", port=free_port())
        broker.start()
        try:
            figures = run(broker.bootstrap, workdir, args.scale, overrides, args.rate)
        finally:
            broker.stop()
        print(json.dumps(figures, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
