"""The `tally` command: one entry point, each subcommand a thin call into its role."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from deploy.cli_support import emit, guarded, load_service
from schemas import logs
from schemas.settings import load, redact

if TYPE_CHECKING:
    from processors import WorkerSettings


def _up(args: argparse.Namespace) -> int:
    from deploy.settings import StackSettings
    from deploy.stack import up
    from deploy.topology import Topology

    topology = Topology(args.brokers, args.store, args.workers, args.sinks, args.api_replicas)
    problems = topology.problems()
    if problems:
        print("tally: " + "; ".join(problems), file=sys.stderr)
        return 2
    up(load_service(StackSettings), demo=args.demo, as_json=args.json, topology=topology)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from deploy.stack import run_worker
    from processors import WorkerSettings

    settings = load_service(WorkerSettings)
    _status(args, "worker", settings)
    run_worker(settings, status=not args.json)
    return 0


def _status(args: argparse.Namespace, command: str, settings: WorkerSettings) -> None:
    """--json: one status line on stdout as the process starts (logs go to stderr)."""
    if not args.json:
        return
    port = settings.metrics_port
    emit(
        {
            "command": command,
            "status": "starting",
            "kafka_bootstrap": settings.bootstrap,
            "events_topic": settings.events_topic,
            "rollups_topic": settings.rollups_topic,
            "consumer_group": settings.consumer_group,
            "store": redact(settings.store_url) if command == "sink" else None,
            "metrics_url": f"http://{settings.metrics_host}:{port}/metrics" if port else None,
        },
        "",
        as_json=True,
    )


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    from deploy.stack import open_store
    from query_api.alerts.settings import AlertSettings
    from query_api.app import create_app
    from query_api.settings import ApiSettings

    settings = load_service(ApiSettings)
    # The webhook routes read these on first use: a bad one stops the start, as any other.
    load(AlertSettings)
    store = open_store(settings)
    url = f"http://{settings.api_host}:{settings.api_port}"
    emit(
        {"command": "api", "status": "starting", "url": url, "store": redact(settings.store_url)},
        f"tally: API {url} on {redact(settings.store_url)}",
        as_json=args.json,
    )
    uvicorn.run(
        create_app(settings, store),
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
    )
    store.close()
    return 0


def _sink(args: argparse.Namespace) -> int:
    from deploy.stack import run_sink
    from processors import WorkerSettings

    settings = load_service(WorkerSettings)
    _status(args, "sink", settings)
    run_sink(settings)
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from processors import WorkerSettings
    from schemas.store import Store, migrations

    settings = load_service(WorkerSettings)
    # On a cluster the tables must be created ON CLUSTER with replicated engines, as the
    # sink and the API expect them (schemas/cluster.py).
    store = Store(settings.store_url, settings.store_database, settings.clickhouse_cluster or "")
    try:
        applied = store.migrate()
    finally:
        store.close()
    url = redact(settings.store_url)
    emit(
        {
            "store": url,
            "database": settings.store_database,
            "applied": applied,
            "version": max((m.version for m in migrations()), default=0),
        },
        f"store {url} database {settings.store_database} is up to date"
        + (f" (applied migrations {', '.join(map(str, applied))})" if applied else ""),
        as_json=args.json,
    )
    return 0


def _loadgen(args: argparse.Namespace) -> int:
    from producers.loadgen import run_loadgen
    from producers.settings import ProducerSettings

    settings = load_service(ProducerSettings)
    result = asyncio.run(
        run_loadgen(
            settings.bootstrap,
            settings.events_topic,
            gateways=args.gateways,
            accounts=args.accounts,
            rate=args.rate,
            duration_s=args.duration,
            events=args.events,
            seed=args.seed,
            progress=not args.quiet,
        )
    )
    emit(
        {
            "events": result.events,
            "requests": result.requests,
            "streams_opened": result.streams_opened,
            "streams_closed": result.streams_closed,
            "streams_left_open": result.streams_left_open,
            "elapsed_s": round(result.elapsed_s, 3),
            "events_per_s": round(result.rate, 1),
        },
        f"loadgen: sent {result.events:,} events ({result.requests:,} requests, "
        f"{result.streams_opened:,} streams opened, {result.streams_closed:,} closed) in "
        f"{result.elapsed_s:,.1f}s, {result.rate:,.0f} events/s",
        as_json=args.json,
    )
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="tally",
        description="Tally usage metering. Configuration comes from TALLY_* variables "
        "(see docs/configuration.md).",
    )
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole stack on this machine in the foreground")
    up.add_argument("--demo", action="store_true", help="add simulated gateways")
    up.add_argument(
        "--brokers", type=int, default=1, help="local Kafka brokers, one KRaft cluster (1..9)"
    )
    up.add_argument(
        "--store",
        choices=("embedded", "server"),
        default="embedded",
        help="embedded: chdb in this process; server: a ClickHouse server, every piece a "
        "process of its own",
    )
    up.add_argument("--workers", type=int, default=1, help="worker processes (1: in this one)")
    up.add_argument("--sinks", type=int, default=1, help="sink processes (--store server)")
    up.add_argument(
        "--api-replicas", type=int, default=1, help="API processes on ports TALLY_API_PORT, +1, ..."
    )
    up.add_argument(
        "--json", action="store_true", help="print the addresses (and demo keys) as one JSON line"
    )
    up.set_defaults(run=_up)

    worker = sub.add_parser("worker", help="run a processor (consumes tally.events)")
    worker.add_argument("--json", action="store_true", help="print a JSON status line")
    worker.set_defaults(run=_worker)

    sink = sub.add_parser(
        "sink",
        help="apply the workers' rollup deltas to the store (several split the partitions)",
    )
    sink.add_argument("--json", action="store_true", help="print a JSON status line")
    sink.set_defaults(run=_sink)

    api = sub.add_parser("api", help="run the usage API alone (against a ClickHouse server)")
    api.add_argument("--json", action="store_true", help="print a JSON status line")
    api.set_defaults(run=_api)

    migrate = sub.add_parser("migrate", help="create or upgrade the store's schema")
    migrate.add_argument("--json", action="store_true", help="machine output (JSON)")
    migrate.set_defaults(run=_migrate)

    loadgen = sub.add_parser("loadgen", help="simulate gateways publishing traffic")
    loadgen.add_argument("--gateways", type=int, default=4, help="simulated gateways (4)")
    loadgen.add_argument("--accounts", type=int, default=1000, help="simulated accounts (1000)")
    loadgen.add_argument("--rate", type=float, default=None, help="events/s in total (unbounded)")
    loadgen.add_argument("--duration", type=float, default=None, help="seconds to run")
    loadgen.add_argument("--events", type=int, default=None, help="events to send in total")
    loadgen.add_argument("--seed", type=int, default=1, help="random seed (1)")
    loadgen.add_argument("--quiet", action="store_true", help="no progress line")
    loadgen.add_argument(
        "--json", action="store_true", help="machine output: the summary as JSON on stdout"
    )
    loadgen.set_defaults(run=_loadgen)
    from deploy import admin_cli, reconcile_cli, webhooks_cli

    admin_cli.register(sub)
    reconcile_cli.register(sub)
    webhooks_cli.register(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # Text until a service has read TALLY_LOG_FORMAT (cli_support.load_service).
    logs.configure("text")
    code: int = guarded(lambda: args.run(args))
    return code


if __name__ == "__main__":
    sys.exit(main())
