"""`tally up --brokers N --store server --workers N --sinks K --api-replicas M`.

The production topology on one machine, every part its own process as in a deployment:
a KRaft cluster of N brokers (deploy/kafka_cluster.py, or the broker TALLY_KAFKA_BOOTSTRAP
names), a ClickHouse server (deploy/clickhouse_local.py, or the one TALLY_CLICKHOUSE_URL
names), N `tally worker`, K `tally sink` (one consumer group, fenced: processors/
sink_fence.py) and M `tally api` on ports TALLY_API_PORT, +1, ...; with --demo, simulated
gateways in this process.

`tally up` supervises its children (`Supervisor`): one that exits is started again, after
a delay that grows with its restarts (logged, and counted in the status line), and every
child dies with `tally up` (PR_SET_PDEATHSIG), however it ends. SIGINT or SIGTERM stops
them in order: gateways, APIs, workers, sinks, then the store and the brokers.

With the embedded store (the default) one process must hold the store: the sink and the
API stay in `tally up` (deploy/stack.py), and only brokers and workers multiply.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal

from deploy.cli_support import redact
from deploy.kafka_local import LocalKafka, ensure_topics
from deploy.processes import SPAWNER, ChildServer, die_with_parent_hook
from deploy.settings import StackSettings

log = logging.getLogger("tally.up")

Store = Literal["embedded", "server"]
RESTART_DELAY_MAX_S = 30.0
STOP_WAIT_S = 30.0


@dataclass(frozen=True, slots=True)
class Topology:
    """What `tally up` runs; the defaults are the single process."""

    brokers: int = 1
    store: Store = "embedded"
    workers: int = 1
    sinks: int = 1
    api_replicas: int = 1

    def problems(self) -> list[str]:
        """Every reason this topology cannot run, each saying what to do instead."""
        found = []
        for name, value, most in (
            ("--brokers", self.brokers, 9),
            ("--workers", self.workers, 64),
            ("--sinks", self.sinks, 64),
            ("--api-replicas", self.api_replicas, 16),
        ):
            if not 1 <= value <= most:
                found.append(f"{name} must be 1..{most}, got {value}")
        if self.store == "embedded" and (self.sinks > 1 or self.api_replicas > 1):
            found.append(
                "--sinks and --api-replicas above 1 need --store server: the embedded store "
                "admits one process, which holds the sink and the API"
            )
        return found


# --------------------------------------------------------------------------- supervision


@dataclass
class Child:
    """One supervised `tally` command."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    due: float = 0.0
    """When to start it again after an exit (monotonic seconds)."""

    def spawn(self) -> int:
        """Start it; its pid."""
        preexec = die_with_parent_hook()
        argv, env = list(self.argv), dict(self.env)
        # From the long-lived spawner thread: PDEATHSIG follows the forking thread.
        # Their stdout goes to our stderr: ours carries the banner (JSON with --json).
        proc = SPAWNER.call(
            lambda: subprocess.Popen(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=sys.stderr, preexec_fn=preexec
            )
        )
        self.proc = proc
        return proc.pid


@dataclass
class Supervisor:
    """Starts children, starts again those that exit, stops them in the order given."""

    children: list[Child] = field(default_factory=list)
    servers: list[ChildServer] = field(default_factory=list)
    """Started elsewhere (a local store server), started again here should they die."""
    stopping: bool = False
    server_restarts: int = 0

    def start(self) -> None:
        for child in self.children:
            child.spawn()
            log.info(
                "tally up: %s started (pid %d)", child.name, child.proc.pid if child.proc else 0
            )

    def check(self, now: float) -> None:
        """One round: restart what exited and is due; call it every fraction of a second."""
        for server in self.servers:
            if server.pid is None and not self.stopping:
                log.warning("tally up: %r is gone; starting it again", server)
                server.start()
                self.server_restarts += 1
        for child in self.children:
            proc = child.proc
            if proc is None:
                if now >= child.due and not self.stopping:
                    pid = child.spawn()
                    log.warning(
                        "tally up: %s started again (pid %d, restart %d)",
                        child.name,
                        pid,
                        child.restarts,
                    )
                continue
            code = proc.poll()
            if code is None or self.stopping:
                continue
            child.proc = None
            child.restarts += 1
            delay = min(RESTART_DELAY_MAX_S, 0.5 * 2 ** (child.restarts - 1))
            child.due = now + delay
            log.warning(
                "tally up: %s (pid %d) exited with code %s; starting it again in %.1fs",
                child.name,
                proc.pid,
                code,
                delay,
            )

    def stop(self) -> None:
        """SIGTERM each child in order, waiting for it (SIGKILL past STOP_WAIT_S)."""
        self.stopping = True
        for child in self.children:
            proc, child.proc = child.proc, None
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                log.warning(
                    "tally up: %s did not stop within %.0fs; killed", child.name, STOP_WAIT_S
                )
                proc.kill()
                proc.wait()

    @property
    def restarts(self) -> int:
        return sum(child.restarts for child in self.children) + self.server_restarts

    def pids(self) -> dict[str, int]:
        found = {c.name: c.proc.pid for c in self.children if c.proc is not None}
        for index, server in enumerate(self.servers):
            if server.pid is not None:
                found[f"store-server-{index + 1}"] = server.pid
        return found


# --------------------------------------------------------------------------- the pieces


@contextmanager
def brokers_for(settings: StackSettings, count: int) -> Iterator[str]:
    """The Kafka to use: the one named, one local broker, or a local cluster of `count`."""
    if settings.kafka_bootstrap:
        yield settings.kafka_bootstrap
        return
    if count == 1:
        broker = LocalKafka(settings.data_dir, settings.kafka_libs_dir, port=settings.kafka_port)
        broker.start()
        try:
            yield broker.bootstrap
        finally:
            broker.stop()
        return
    from deploy.kafka_cluster import LocalKafkaCluster

    cluster = LocalKafkaCluster(
        settings.data_dir, settings.kafka_libs_dir, brokers=count, port=settings.kafka_port
    )
    cluster.start()
    try:
        yield cluster.bootstrap
    finally:
        cluster.stop()


@contextmanager
def server_store_for(settings: StackSettings) -> Iterator[tuple[str, ChildServer | None]]:
    """The ClickHouse server to use: the one TALLY_CLICKHOUSE_URL names, or a local one
    (then also the server itself, for the supervisor to start again should it die)."""
    if settings.store_url.startswith(("http://", "https://")):
        yield settings.store_url, None
        return
    from deploy.clickhouse_local import LocalClickHouse

    server = LocalClickHouse(settings.data_dir, port=settings.clickhouse_port)
    server.start()
    try:
        yield server.url, server
    finally:
        server.stop()


async def ensure_stack_topics(settings: StackSettings, bootstrap: str) -> None:
    """The events, rollups and dead-letter topics, created when missing."""
    partitions = settings.events_partitions
    await ensure_topics(
        bootstrap,
        {
            settings.events_topic: partitions,
            settings.rollups_topic: partitions,
            settings.dlq_topic: 1,
        },
    )


def children(
    topology: Topology, settings: StackSettings, bootstrap: str, store_url: str
) -> list[Child]:
    """The supervised processes, in the order they stop: APIs, workers, sinks."""
    base = {k: v for k, v in os.environ.items() if k != "TALLY_METRICS_PORT"}
    base |= {"TALLY_KAFKA_BOOTSTRAP": bootstrap, "TALLY_CLICKHOUSE_URL": store_url}
    tally = [sys.executable, "-m", "deploy.cli"]
    found = [
        Child(
            f"api-{i + 1}", [*tally, "api"], base | {"TALLY_API_PORT": str(settings.api_port + i)}
        )
        for i in range(topology.api_replicas)
    ]
    # --json: one status line at start, not one every few seconds from each worker.
    worker = [*tally, "worker", "--json"]
    found += [Child(f"worker-{i + 1}", worker, base) for i in range(topology.workers)]
    found += [Child(f"sink-{i + 1}", [*tally, "sink"], base) for i in range(topology.sinks)]
    return found


def api_urls(topology: Topology, settings: StackSettings) -> list[str]:
    return [
        f"http://{settings.api_host}:{settings.api_port + i}" for i in range(topology.api_replicas)
    ]


# --------------------------------------------------------------------------- tally up


def up_server(topology: Topology, settings: StackSettings, demo: bool, as_json: bool) -> None:
    """`tally up --store server ...`: every piece a process of its own, supervised here."""
    from deploy.stack import await_coordinators, demo_keys, open_store

    with (
        brokers_for(settings, topology.brokers) as bootstrap,
        server_store_for(settings) as (url, server),
    ):
        asyncio.run(ensure_stack_topics(settings, bootstrap))
        settings = settings.model_copy(update={"kafka_bootstrap": bootstrap, "clickhouse_url": url})
        # Before any child: clients that arrive while the brokers create their internal
        # topics retry loudly though nothing is wrong.
        asyncio.run(await_coordinators(settings, settings.events_partitions, sinks=True))
        store = open_store(settings)  # migrated before any child reads or writes it
        try:
            keys = demo_keys(store, settings) if demo else []
        finally:
            store.close()
        supervisor = Supervisor(children(topology, settings, bootstrap, url))
        if server is not None:
            supervisor.servers.append(server)
        supervisor.start()
        print_banner(
            settings,
            bootstrap,
            url,
            api_urls(topology, settings),
            keys,
            as_json,
            processes=supervisor.pids(),
            running=f"{topology.workers} workers, {topology.sinks} sinks, "
            f"{topology.api_replicas} API processes; ",
        )
        try:
            asyncio.run(_supervise(supervisor, settings, demo))
        finally:
            supervisor.stop()
    print("tally: stopped", file=sys.stderr, flush=True)


async def _supervise(supervisor: Supervisor, settings: StackSettings, demo: bool) -> None:
    """Until SIGINT/SIGTERM: restart what exits; run the demo gateways if asked."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    gateways = asyncio.create_task(run_demo(settings)) if demo else None
    try:
        while not stop.is_set():
            # In a thread: starting a server again takes a second or so.
            await asyncio.to_thread(supervisor.check, time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.25)
    finally:
        supervisor.stopping = True
        if gateways is not None:
            gateways.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gateways


async def run_demo(settings: StackSettings) -> None:
    """Simulated gateways sending a steady trickle of realistic traffic to the demo accounts."""
    from deploy.stack import demo_account_id
    from producers.loadgen import run_loadgen

    await run_loadgen(
        settings.bootstrap,
        settings.events_topic,
        gateways=2,
        accounts=settings.demo_accounts,
        rate=settings.demo_rate,
        duration_s=None,
        events=None,
        seed=7,
        progress=False,
        account_ids=[demo_account_id(i) for i in range(settings.demo_accounts)],
    )


def print_banner(
    settings: StackSettings,
    bootstrap: str,
    store_url: str,
    urls: list[str],
    keys: list[str],
    as_json: bool,
    processes: dict[str, int] | None = None,
    running: str = "",
) -> None:
    """What `tally up` started, on stdout: lines for people, or one JSON line for scripts.

    `processes`: the children's pids by name; `running`: what runs, for the text.
    """
    if as_json:
        banner = {
            "command": "up",
            "status": "starting",
            "api_url": urls[0],
            "api_urls": urls,
            "docs_url": f"{urls[0]}/docs",
            "kafka_bootstrap": bootstrap,
            "events_topic": settings.events_topic,
            "store": redact(store_url),
            "database": settings.store_database,
            "processes": processes or {},
            "demo_keys": keys,
        }
        print(json.dumps(banner), flush=True)
        return
    print(f"tally: Kafka bootstrap {bootstrap}  (topic {settings.events_topic})", flush=True)
    print(f"tally: store {redact(store_url)} database {settings.store_database}", flush=True)
    print(f"tally: {running}press Ctrl-C to stop", flush=True)
    for url in urls:
        print(f"tally: API {url}  (OpenAPI at /docs)", flush=True)
    if keys:
        print("tally: demo API keys (shown once):", flush=True)
        print("\n".join(keys), flush=True)
