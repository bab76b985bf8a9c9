"""`tally up`, `tally worker` and `tally sink`: run the pipeline in the foreground.

`tally up` owns the machine's pieces: the local broker (unless
TALLY_KAFKA_BOOTSTRAP names one), a worker, the sink, the API and, with --demo,
simulated gateways. The sink and the API run in one process because the
embedded store admits one process per data path; more `tally worker` processes
may join to share the partitions, since workers never touch the store.
SIGINT/SIGTERM stop everything (a batch not yet committed is simply re-read
next time), then the broker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import faust
import mode
from aiokafka import AIOKafkaConsumer
from mode import Service
from prometheus_client import REGISTRY

from deploy.exceptions import TopicSetupError
from deploy.kafka_local import ensure_topics
from deploy.settings import StackSettings
from deploy.topology import (
    Child,
    Supervisor,
    Topology,
    brokers_for,
    ensure_stack_topics,
    print_banner,
    run_demo,
    up_server,
)
from processors import PipelineCollector, RollupWorker, WorkerSettings, build_app
from schemas import logs
from schemas.gc_tuning import tune_gc
from schemas.settings import TallySettings

log = logging.getLogger("tally.up")


if TYPE_CHECKING:
    # Imported where used: `tally worker` needs neither, and ClickHouse's
    # client costs it a fifth of a second of CPU at start.
    from fastapi import FastAPI

    from processors import Sink
    from schemas.store import Store


def open_store(settings: TallySettings) -> Store:
    from schemas.store import Store

    store = Store(settings.store_url, settings.store_database, settings.clickhouse_cluster or "")
    applied = store.migrate()
    if applied:
        log.info("store migrated to version %d", applied[-1])
    return store


class StatusLine(Service):
    """Prints what has been counted, so a person sees the pipeline work."""

    def __init__(self, worker: RollupWorker, every_s: float = 5.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.worker = worker
        self.every_s = every_s

    @Service.task
    async def _report(self) -> None:
        while not self.should_stop:
            await self.sleep(self.every_s)
            s = self.worker.stats
            print(
                f"tally: counted {s.counted:,} events ({s.duplicates:,} duplicates dropped, "
                f"{s.dead_letters:,} to the DLQ) in {s.flushes:,} flushes",
                flush=True,
            )


class DemoGateways(Service):
    """Simulated gateways sending a steady trickle of realistic traffic."""

    def __init__(self, settings: StackSettings, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.settings = settings

    @Service.task
    async def _send(self) -> None:
        await run_demo(self.settings)


class WorkerProcesses(Service):
    """`tally worker` child processes of `tally up` (--workers N, TALLY_UP_WORKER_PROCESSES).

    Workers never touch the store, so they may run beside the process that holds
    it; each gets a core of its own instead of sharing one with the sink and the
    API. They read the same TALLY_* environment (the broker `tally up` found or
    started included) and die with this process (PDEATHSIG: a kill -9 of `tally up`
    leaves no orphan). One that exits is started again (deploy/topology.py
    `Supervisor`): it resumes at its partitions' committed offsets, as any worker does.
    """

    def __init__(self, count: int, bootstrap: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        env = {k: v for k, v in os.environ.items() if k != "TALLY_METRICS_PORT"}
        env["TALLY_KAFKA_BOOTSTRAP"] = bootstrap
        tally = [sys.executable, "-m", "deploy.cli", "worker"]
        self.processes = Supervisor([Child(f"worker-{i + 1}", tally, env) for i in range(count)])

    async def on_start(self) -> None:
        await asyncio.to_thread(self.processes.start)
        pids = list(self.processes.pids().values())
        log.info("tally up: %d worker processes %s", len(pids), pids)

    @Service.task
    async def _watch(self) -> None:
        while not self.should_stop:
            self.processes.check(time.monotonic())
            await self.sleep(0.5)

    async def on_stop(self) -> None:
        await asyncio.to_thread(self.processes.stop)


class SinkService(Service):
    """The sink as a mode Service, started and stopped with the worker."""

    def __init__(self, sink: Sink, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.sink = sink

    @Service.task
    async def _apply(self) -> None:
        await self.sink.run()

    async def on_stop(self) -> None:
        self.sink.stop()


def new_sink(settings: WorkerSettings, store: Store) -> Sink:
    from processors import Sink

    return Sink(
        store,
        settings.bootstrap,
        settings.rollups_topic,
        settings.events_topic,
        # The embedded store admits one process, so one sink: it needs no group.
        group=None if store.embedded else settings.sink_group_id,
        session_timeout_ms=settings.sink_session_timeout_ms,
    )


def alert_services(
    sink: Sink, store: Store, bootstrap: str, api: FastAPI | None = None
) -> list[Service]:
    """Threshold alerts and webhook deliveries beside the sink (docs/alerts.md); `api`:
    the API app when it runs in this process, whose usage view they read then."""
    from query_api.alerts.evaluator import attach_alerts
    from query_api.app import view_feed

    feed = view_feed(api) if api is not None else None
    service = attach_alerts(sink, store, bootstrap, feed)
    return [service] if service is not None else []


async def ensure_rollups_topic(settings: WorkerSettings) -> None:
    """The rollups topic needs a partition for every events partition (same number)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap)
    try:
        await consumer.start()
    except BaseException:
        await consumer.stop()  # or asyncio warns of an unclosed consumer on exit
        raise
    try:
        partitions = None
        for _ in range(60):
            partitions = consumer.partitions_for_topic(settings.events_topic)
            if partitions:
                break
            await consumer._client.force_metadata_update()
            await asyncio.sleep(0.5)
        if not partitions:
            raise TopicSetupError(
                f"topic {settings.events_topic} does not exist on {settings.bootstrap};",
                "create it (`tally up` does) or set TALLY_EVENTS_TOPIC",
            )
    finally:
        await consumer.stop()
    await ensure_topics(
        settings.bootstrap, {settings.rollups_topic: len(partitions), settings.dlq_topic: 1}
    )


COORDINATOR_WAIT_S = 30.0


async def await_coordinators(
    settings: WorkerSettings, partitions: int, *, sinks: bool = False
) -> None:
    """Wait, quietly, until the broker coordinates the workers' group and transactions
    (and, with `sinks`, the sinks' group: `tally up --store server` runs them apart).

    A new broker creates __consumer_offsets and __transaction_state on first use,
    and clients that arrive while it does retry loudly (GroupCoordinatorNotAvailable
    at ERROR, "Marking the coordinator dead", NotEnoughReplicas on transactional
    sends) though nothing is wrong. Asking first lets the worker start against a
    broker that is ready for it; a broker in service answers at once. After
    COORDINATOR_WAIT_S the worker starts anyway and retries on its own.
    """
    from aiokafka.admin import AIOKafkaAdminClient

    group = settings.consumer_group
    groups = [group, settings.sink_group_id] if sinks else [group]
    # The transactional ids of processors/output.py, one per events partition.
    transactional = [f"{group}.{settings.events_topic}.{p}" for p in range(partitions)]
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap, client_id="tally-up")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + COORDINATOR_WAIT_S
    waiting = "the broker"
    try:
        await admin.start()
        while loop.time() < deadline:
            try:
                for tid in transactional:
                    waiting = f"the transaction coordinator of {tid}"
                    await admin.find_coordinator(tid, coordinator_type=1)
                waiting = f"the coordinator of groups {', '.join(groups)}"
                # One group per request: aiokafka fails to decode an answer describing
                # several groups that have members ("Buffer underrun decoding string").
                described = [await admin.describe_consumer_groups([g]) for g in groups]
                if all(g[0] == 0 for d in described for r in d for g in r.groups):
                    return
            except Exception as exc:  # not available or still loading: expected here
                log.debug("waiting for %s: %r", waiting, exc)
            await asyncio.sleep(0.2)
        log.info("tally up: %s is not ready yet; the worker retries on its own", waiting)
    finally:
        await admin.close()


@asynccontextmanager
async def running_pipeline(
    settings: WorkerSettings, store: Store
) -> AsyncIterator[tuple[RollupWorker, Sink]]:
    """A worker and the sink inside the current event loop (tests, embedding)."""
    await ensure_rollups_topic(settings)
    app, worker = build_app(settings)
    sink = new_sink(settings, store)
    applying = asyncio.ensure_future(sink.run())
    await app.start()
    try:
        yield worker, sink
    finally:
        await app.stop()
        sink.stop()
        await applying


def run_services(app: faust.App, services: list[Service], settings: TallySettings) -> None:
    """Run the faust app and services until SIGINT/SIGTERM."""
    log_tally_lines()
    try:
        worker = faust.Worker(
            app,
            *services,
            loglevel=settings.log_level,
            quiet=True,
            redirect_stdouts=False,
            logging_config=logs.dict_config(settings.log_format, settings.log_level),
            # faust's start-up spinner writes terminal codes; stdout stays for results.
            stdout=sys.stderr,
        )
        if not sys.stderr.isatty():
            # Into a log file or a pipe (tally up, systemd, kubectl logs) the spinner's
            # cursor codes are only noise in the log.
            worker.spinner = None
        worker.execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


def log_tally_lines() -> None:
    """Tally's own INFO lines (takeovers, resumes) show whatever the libraries' level.

    faust configures the root logger at TALLY_LOG_LEVEL (WARNING by default, its
    INFO is noisy); a handler of our own keeps Tally's lines visible regardless.
    Library lines about retries that are part of normal operation become INFO
    (ExpectedRetries), so a WARNING or ERROR in the log is worth reading.
    """
    tally = logging.getLogger("tally")
    if not tally.handlers:
        tally.addHandler(logs.handler("text"))
        tally.propagate = False
    tally.setLevel(logging.INFO)
    for name, expected in (
        ("aiokafka.producer.sender", ExpectedRetries),
        ("aiokafka.consumer.group_coordinator", Rebalancing),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, expected) for f in logger.filters):
            logger.addFilter(expected())


class ExpectedRetries(logging.Filter):
    """aiokafka's WARNING for a transactional send retried on NotEnoughReplicas, as INFO.

    Kafka (3.6+) verifies each transactional send with the transaction coordinator;
    a worker's next transaction on a partition often starts while the coordinator
    is still writing the previous one's commit markers, and the broker answers that
    send with the retriable NOT_ENOUGH_REPLICAS (for clients of aiokafka's produce
    version). aiokafka retries it shortly after, and succeeds: dozens of such
    WARNINGs a minute under `tally up --demo`, none with the broker's
    transaction.partition.verification.enable=false (measured; the verification
    guards against hanging transactions, so it stays on). The worker's producers
    are all transactional; a real shortage of in-sync replicas that persists
    fails the commit, which the worker logs as an ERROR of its own.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and "NotEnoughReplicasError" in record.getMessage():
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


class Rebalancing(logging.Filter):
    """aiokafka's WARNING for a heartbeat answered "the group is rebalancing", as INFO.

    That answer is how a group member learns that another joined or left (a second
    worker or sink starting, a restart, a scale-out): it rejoins at once, and Kafka's
    own Java client logs the same event at INFO. A member that cannot rejoin is
    reported by the errors that follow.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING and "because it is rebalancing" in str(record.msg):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def run_worker(settings: WorkerSettings, status: bool = False) -> None:
    """`tally worker`: consume events and publish deltas; no store needed.

    `status`: print what has been counted every few seconds, as `tally up` does.
    """
    asyncio.run(ensure_rollups_topic(settings))
    app, worker = build_app(settings)
    metrics_endpoint(settings, worker, None)
    tune_gc()
    run_services(app, [StatusLine(worker)] if status else [], settings)


def metrics_endpoint(
    settings: WorkerSettings, worker: RollupWorker | None, sink: Sink | None
) -> None:
    """TALLY_METRICS_PORT: Prometheus metrics of this process on a port of its own."""
    if settings.metrics_port is None:
        return
    from processors import serve_metrics

    serve_metrics(settings.metrics_port, settings.metrics_host, worker, sink)
    log.info("metrics at http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)


def run_sink(settings: WorkerSettings) -> None:
    """`tally sink`: apply the workers' deltas to the store."""
    store = open_store(settings)
    try:
        asyncio.run(ensure_rollups_topic(settings))
        sink = new_sink(settings, store)
        metrics_endpoint(settings, None, sink)
        tune_gc()
        services: list[Service] = [SinkService(sink)]
        services += alert_services(sink, store, settings.bootstrap)
        run_store_services(services, settings)
    finally:
        store.close()


def run_store_services(services: list[Service], settings: TallySettings) -> None:
    """Run services without a faust app (no worker in this process) until SIGINT/SIGTERM."""
    log_tally_lines()
    try:
        mode.Worker(
            *services,
            loglevel=settings.log_level,
            quiet=True,
            redirect_stdouts=False,
            logging_config=logs.dict_config(settings.log_format, settings.log_level),
        ).execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise


def demo_keys(store: Store, settings: StackSettings) -> list[str]:
    """Demo accounts (the ids the demo gateways use) and fresh keys to try them with."""
    from query_api.accounts import AccountStore

    accounts = AccountStore(store)
    lines = []
    for index, plan in enumerate(("free", "pro", "max")):
        account_id = demo_account_id(index)
        if accounts.get(account_id) is None:
            accounts.create(account_id, plan)
        key, _ = accounts.create_key(account_id, admin=False)
        current = accounts.get(account_id)
        lines.append(f"  {account_id} (plan {current.plan if current else plan}): {key}")
    for index in range(3, settings.demo_accounts):
        if accounts.get(demo_account_id(index)) is None:
            accounts.create(demo_account_id(index), "pro")
    admin, _ = accounts.create_key(None, admin=True)
    lines.append(f"  admin: {admin}")
    return lines


def demo_account_id(index: int) -> str:
    return f"demo-{index:04d}"


def up(
    settings: StackSettings, demo: bool, as_json: bool = False, topology: Topology | None = None
) -> None:
    """`tally up`: broker (unless one is named), worker, sink and API in this process.

    With `as_json` the banner is one JSON line on stdout (keys included), for
    scripts that start a stack and need its addresses. A `topology` with a server
    store runs every piece as a process of its own (deploy/topology.py); with the
    embedded store it may run more brokers and worker processes beside this one.
    """
    topology = topology or Topology()
    if topology.store == "server":
        up_server(topology, settings, demo, as_json)
        return
    if topology.workers > 1:
        settings = settings.model_copy(update={"up_worker_processes": topology.workers})
    # Here, not at the top: `tally worker` and `tally sink` import this module
    # too, and the API's imports (FastAPI, pydantic models) cost each of them
    # about a second of CPU at start.
    from deploy.serve import ApiService, ViewFeedService
    from query_api.app import create_app, view_feed

    with brokers_for(settings, topology.brokers) as bootstrap:
        asyncio.run(ensure_stack_topics(settings, bootstrap))
        # The worker and the demo gateways talk to the broker we just made sure of.
        settings = settings.model_copy(update={"kafka_bootstrap": bootstrap})
        asyncio.run(await_coordinators(settings, settings.events_partitions))
        store = open_store(settings)
        api = create_app(settings, store)
        keys = demo_keys(store, settings) if demo else []
        api_url = f"http://{settings.api_host}:{settings.api_port}"
        print_banner(settings, bootstrap, settings.store_url, [api_url], keys, as_json)
        sink = new_sink(settings, store)
        services: list[Service] = [
            SinkService(sink),
            ApiService(api, settings.api_host, settings.api_port),
        ]
        feed = view_feed(api)
        if feed is not None:  # the API's usage view follows tally.rollups, as every replica's
            services.append(ViewFeedService(feed))
        services += alert_services(sink, store, bootstrap, api)
        if demo:
            services.append(DemoGateways(settings))
        try:
            tune_gc()
            if settings.up_worker_processes:
                # The workers' metrics stay in their processes (TALLY_METRICS_PORT is
                # not passed on: N processes cannot share one port).
                REGISTRY.register(PipelineCollector(None, sink))
                services.append(WorkerProcesses(settings.up_worker_processes, bootstrap))
                run_store_services(services, settings)
            else:
                app, worker = build_app(settings)
                REGISTRY.register(PipelineCollector(worker, sink))
                services.append(StatusLine(worker))
                run_services(app, services, settings)
        finally:
            store.close()
    print("tally: stopped", file=sys.stderr, flush=True)
