"""`tally up` and `tally worker`: run the pipeline in the foreground.

`tally up` owns the machine's pieces: the local broker (unless
TALLY_KAFKA_BOOTSTRAP names one), the worker and, with --demo, simulated
gateways. Everything runs in one process because the embedded store admits one
process per data path. SIGINT/SIGTERM stop the faust worker (which stops
consuming; un-flushed messages are simply re-read next time), then the broker.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import faust
from mode import Service

from deploy.kafka_local import LocalKafka, ensure_topics
from deploy.serve import ApiService
from deploy.settings import StackSettings
from processors.app import RollupWorker, build_app
from processors.settings import WorkerSettings
from query_api.app import create_app
from schemas.settings import TallySettings
from schemas.store import Store

log = logging.getLogger("tally.up")


def open_store(settings: TallySettings) -> Store:
    store = Store(settings.store_url, settings.store_database)
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
        from producers.loadgen import run_loadgen

        await run_loadgen(
            self.settings.bootstrap,
            self.settings.events_topic,
            gateways=2,
            accounts=self.settings.demo_accounts,
            rate=self.settings.demo_rate,
            duration_s=None,
            events=None,
            seed=7,
            progress=False,
            account_ids=[demo_account_id(i) for i in range(self.settings.demo_accounts)],
        )


@contextmanager
def kafka_for(settings: StackSettings) -> Iterator[str]:
    """The broker to use: the configured one, or a local one for the duration."""
    if settings.kafka_bootstrap:
        yield settings.kafka_bootstrap
        return
    broker = LocalKafka(
        settings.data_dir / "kafka", settings.kafka_libs_dir, port=settings.kafka_port
    )
    broker.start()
    try:
        yield broker.bootstrap
    finally:
        broker.stop()


def run_worker(
    settings: WorkerSettings,
    extra: list[Service] | None = None,
    build_extra: Callable[[RollupWorker], list[Service]] | None = None,
    store: Store | None = None,
) -> None:
    """Run the faust worker (plus extra services) until SIGINT/SIGTERM."""
    store = store or open_store(settings)
    app, worker = build_app(settings, store)
    services = list(extra or [])
    if build_extra is not None:
        services.extend(build_extra(worker))
    logging.getLogger("tally").setLevel(logging.INFO)
    try:
        faust.Worker(
            app, *services, loglevel="warning", quiet=True, redirect_stdouts=False
        ).execute_from_commandline()
    except SystemExit as exc:
        if exc.code not in (0, None):
            raise
    finally:
        store.close()


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


def up(settings: StackSettings, demo: bool) -> None:
    with kafka_for(settings) as bootstrap:
        asyncio.run(
            ensure_topics(
                bootstrap,
                {settings.events_topic: settings.events_partitions, settings.dlq_topic: 1},
            )
        )
        # The worker and the demo gateways talk to the broker we just made sure of.
        settings = settings.model_copy(update={"kafka_bootstrap": bootstrap})
        print(f"tally: Kafka bootstrap {bootstrap}  (topic {settings.events_topic})", flush=True)
        print(f"tally: store {settings.store_url} database {settings.store_database}", flush=True)
        print("tally: press Ctrl-C to stop", flush=True)
        store = open_store(settings)
        api = create_app(settings, store)
        print(
            f"tally: API http://{settings.api_host}:{settings.api_port}  (OpenAPI at /docs)",
            flush=True,
        )
        if demo:
            print("tally: demo API keys (shown once):", flush=True)
            print("\n".join(demo_keys(store, settings)), flush=True)
        extra: list[Service] = [ApiService(api, settings.api_host, settings.api_port)]
        if demo:
            extra.append(DemoGateways(settings))
        run_worker(settings, extra, build_extra=lambda worker: [StatusLine(worker)], store=store)
    print("tally: stopped", file=sys.stderr, flush=True)
