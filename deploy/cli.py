"""The `tally` command: one entry point, each subcommand a thin call into its role."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from schemas.settings import load


def _up(args: argparse.Namespace) -> int:
    from deploy.settings import StackSettings
    from deploy.stack import up

    up(load(StackSettings), demo=args.demo)
    return 0


def _worker(args: argparse.Namespace) -> int:
    from deploy.stack import run_worker
    from processors.settings import WorkerSettings

    run_worker(load(WorkerSettings))
    return 0


def _api(args: argparse.Namespace) -> int:
    import uvicorn

    from deploy.stack import open_store
    from query_api.app import create_app
    from query_api.settings import ApiSettings

    settings = load(ApiSettings)
    store = open_store(settings)
    print(f"tally: API http://{settings.api_host}:{settings.api_port} on {settings.store_url}")
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
    from processors.settings import WorkerSettings

    run_sink(load(WorkerSettings))
    return 0


def _migrate(args: argparse.Namespace) -> int:
    from deploy.stack import open_store
    from processors.settings import WorkerSettings

    settings = load(WorkerSettings)
    store = open_store(settings)
    print(f"store {settings.store_url} database {settings.store_database} is up to date")
    store.close()
    return 0


def _loadgen(args: argparse.Namespace) -> int:
    from producers.loadgen import run_loadgen
    from producers.settings import ProducerSettings

    settings = load(ProducerSettings)
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
    print(result)
    return 0


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(
        prog="tally",
        description="Tally usage metering. Configuration comes from TALLY_* variables "
        "(see README, 'Configuration').",
    )
    sub = root.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="run the whole stack on this machine in the foreground")
    up.add_argument("--demo", action="store_true", help="add simulated gateways")
    up.set_defaults(run=_up)

    worker = sub.add_parser("worker", help="run a processor (consumes tally.events)")
    worker.set_defaults(run=_worker)

    sink = sub.add_parser(
        "sink", help="apply the workers' rollup deltas to the store (one per store)"
    )
    sink.set_defaults(run=_sink)

    api = sub.add_parser("api", help="run the usage API alone (against a ClickHouse server)")
    api.set_defaults(run=_api)

    migrate = sub.add_parser("migrate", help="create or upgrade the store's schema")
    migrate.set_defaults(run=_migrate)

    loadgen = sub.add_parser("loadgen", help="simulate gateways publishing traffic")
    loadgen.add_argument("--gateways", type=int, default=4, help="simulated gateways (4)")
    loadgen.add_argument("--accounts", type=int, default=1000, help="simulated accounts (1000)")
    loadgen.add_argument("--rate", type=float, default=None, help="events/s in total (unbounded)")
    loadgen.add_argument("--duration", type=float, default=None, help="seconds to run")
    loadgen.add_argument("--events", type=int, default=None, help="events to send in total")
    loadgen.add_argument("--seed", type=int, default=1, help="random seed (1)")
    loadgen.add_argument("--quiet", action="store_true", help="no progress line")
    loadgen.set_defaults(run=_loadgen)
    from deploy import admin_cli, reconcile_cli

    admin_cli.register(sub)
    reconcile_cli.register(sub)
    return root


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("tally").setLevel(logging.INFO)
    code: int = args.run(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
