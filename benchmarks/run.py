"""`make bench`: every benchmark in one run, on one broker, over one generated dataset.

    .venv/bin/python -m benchmarks.run [--scale 1.0] [--only processor,limit,...] [--keep]

Starts one local Kafka broker (deploy/kafka_local.py) in a temporary directory,
writes the dataset (benchmarks/dataset.py), runs each bench in turn (the heavy ones
in child processes of their own), prints a table with the issue's targets and
writes `benchmarks/results/latest.json`: one flat object of figures, plus
"machine" (where and how it was measured) and "errors" (benches that failed; the
others still run). `--scale 1.0` is the issue's full size (2M events over 100k
accounts); 0.05 is a quick development run. `BENCH_PROFILE=py-spy` records each
child process's stacks into benchmarks/results/<bench>.pyspy.txt.

These are measurements, not tests: nothing here fails the build. Figures taken
while other work loads the machine are only indicative.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import dataset as datasets
from deploy.kafka_local import LocalKafka
from deploy.processes import free_port

REPO = Path(__file__).resolve().parents[1]
KAFKA_LIBS = REPO / ".tally" / "kafka" / "libs"
RESULTS = REPO / "benchmarks" / "results"

# (name, module, needs the dataset). Order matters only for load: the dataset
# benches read the same topic one after the other, never at once.
BENCHES: tuple[tuple[str, str, bool], ...] = (
    ("limit", "benchmarks.limit", True),
    ("processor", "benchmarks.processor", True),
    ("server_processor", "benchmarks.processor_server", True),
    ("faust_naive", "benchmarks.faust_naive", True),
    ("quix", "benchmarks.quix", True),
    ("producer", "benchmarks.producer", False),
    ("api", "benchmarks.api", False),
    ("api_replica", "benchmarks.api_replica", False),
    ("ingest", "benchmarks.ingest", False),
    ("abuse", "benchmarks.abuse", False),
    ("freshness", "benchmarks.freshness", False),
    ("freshness_replicas", "benchmarks.freshness_replicas", False),
    ("memory", "benchmarks.memory", False),
    ("view_memory", "benchmarks.view_memory", False),
    ("enforce", "benchmarks.enforce", False),
)

# (figure, ">=" or "<=", target): the targets.
TARGETS: tuple[tuple[str, str, float], ...] = (
    ("processor_events_per_s", ">=", 200_000),
    ("processor_vs_limit", ">=", 0.5),
    ("processor_vs_faust_naive", ">=", 10),
    ("processor_vs_quixstreams", ">=", 3),
    ("producer_events_per_s", ">=", 300_000),
    ("api_rps", ">=", 2_000),
    ("api_p99_ms", "<=", 25),
    ("ingest_http_events_per_s", ">=", 100_000),
    ("api_abuse_p99_ratio", "<=", 3),
    ("api_abuse_good_errors", "<=", 0),
    ("freshness_p99_s", "<=", 1.0),
    # The server topology (ClickHouse server instead of the embedded store).
    ("server_processor_events_per_s", ">=", 200_000),
    ("api_replica_rps", ">=", 3_000),
    ("api_replica_p99_ms", "<=", 10),
    ("freshness_replicas_p99_s", "<=", 1.0),
    ("worker_peak_rss_mib", "<=", 1_024),
    ("enforce_overhead_us", "<=", 50),
)

# ratio name -> (numerator, denominator)
RATIOS = {
    "processor_vs_limit": ("processor_events_per_s", "limit_events_per_s"),
    "processor_vs_faust_naive": ("processor_events_per_s", "faust_naive_events_per_s"),
    "processor_vs_quixstreams": ("processor_events_per_s", "quixstreams_events_per_s"),
    "producer_vs_naive": ("producer_events_per_s", "producer_naive_events_per_s"),
    "api_replica_vs_embedded": ("api_replica_rps", "api_rps"),
    "api_replica_cpu_vs_embedded": ("api_replica_cpu_us_per_request", "api_cpu_us_per_request"),
    "server_processor_vs_embedded": ("server_processor_events_per_s", "processor_events_per_s"),
    "freshness_replicas_vs_embedded": ("freshness_replicas_p99_s", "freshness_p99_s"),
}


def machine(scale: float) -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_mib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                memory_mib = int(line.split()[1]) // 1024
    except OSError:
        pass
    jars = sorted(KAFKA_LIBS.glob("kafka_2.13-*.jar"))
    kafka = jars[0].name.removeprefix("kafka_2.13-").removesuffix(".jar") if jars else "unknown"
    return {
        "cpu": cpu or platform.processor(),
        "cores": os.cpu_count(),
        "memory_mib": memory_mib,
        "python": platform.python_version(),
        "kafka": kafka,
        "os": platform.platform(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "scale": scale,
        "load_avg_at_start": os.getloadavg()[0],
    }


def _fmt(value: float) -> str:
    if abs(value) >= 1_000:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:,.1f}"
    return f"{value:,.3g}"


def table(results: dict[str, Any], errors: dict[str, str]) -> str:
    lines = [f"{'figure':<34} {'value':>14}  {'target':<12} result", "-" * 72]
    targeted = {name for name, _, _ in TARGETS}
    for name, op, target in TARGETS:
        value = results.get(name)
        if value is None:
            lines.append(f"{name:<34} {'-':>14}  {op} {_fmt(target):<9} NOT RUN")
            continue
        ok = value >= target if op == ">=" else value <= target
        verdict = "PASS" if ok else "FAIL"
        lines.append(f"{name:<34} {_fmt(value):>14}  {op} {_fmt(target):<9} {verdict}")
    lines.append("-" * 72)
    for name, value in sorted(results.items()):
        if name not in targeted and isinstance(value, int | float):
            lines.append(f"{name:<34} {_fmt(value):>14}")
    for name, error in errors.items():
        lines.append(f"ERROR in {name}: {error.strip().splitlines()[-1][:200]}")
    return "\n".join(lines)


def _call(name: str, fn: Callable[[], dict[str, float]], errors: dict[str, str]) -> dict[str, Any]:
    print(f"bench: {name} ...", flush=True)
    started = time.monotonic()
    try:
        figures = fn()
    except Exception:
        errors[name] = traceback.format_exc()
        print(f"bench: {name} FAILED:\n{errors[name]}", file=sys.stderr, flush=True)
        return {}
    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in figures.items() if isinstance(v, int | float))
    print(f"bench: {name} done in {time.monotonic() - started:.0f}s: {shown}", flush=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__)
    parser.add_argument("--scale", type=float, default=1.0, help="1.0 = the issue's full size")
    names = ",".join(b[0] for b in BENCHES)
    parser.add_argument("--only", default="", help=f"comma-separated, of {names}")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--output", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    chosen = [b for b in BENCHES if not args.only or b[0] in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {b[0] for b in BENCHES}
    if unknown:
        parser.error(f"unknown bench(es) {sorted(unknown)}; choose from {[b[0] for b in BENCHES]}")

    workdir = Path(tempfile.mkdtemp(prefix="tally-bench-"))
    results: dict[str, Any] = {}
    errors: dict[str, str] = {}
    info = machine(args.scale)
    broker = LocalKafka(workdir / "broker", KAFKA_LIBS, port=free_port(), heap="1g")
    print(f"bench: scale {args.scale}, workdir {workdir}", flush=True)
    try:
        broker.start()
        print(f"bench: Kafka at {broker.bootstrap}", flush=True)
        ds = None
        if any(needs for _, _, needs in chosen):
            produced = _call(
                "dataset",
                lambda: _dataset(broker.bootstrap, args.scale),
                errors,
            )
            if produced:
                ds = datasets.load(produced.pop("dataset"))
                results.update(produced)
        for name, module_name, needs in chosen:
            if needs and ds is None:
                continue
            try:
                module = importlib.import_module(module_name)
            except ImportError as exc:
                errors[name] = f"{module_name} is missing: {exc}"
                continue
            bench_dir = workdir / name
            bench_dir.mkdir(exist_ok=True)
            if needs:
                fn = lambda m=module, d=bench_dir: m.run(broker.bootstrap, d, args.scale, ds)  # noqa: E731
            else:
                fn = lambda m=module, d=bench_dir: m.run(broker.bootstrap, d, args.scale)  # noqa: E731
            results.update(_call(name, fn, errors))
    finally:
        broker.stop()
        if args.keep:
            print(f"bench: kept {workdir}", flush=True)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    for ratio, (num, den) in RATIOS.items():
        if results.get(num) and results.get(den):
            results[ratio] = results[num] / results[den]
    print()
    print(table(results, errors))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    doc = {**{k: results[k] for k in sorted(results)}, "machine": info, "errors": errors}
    args.output.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    print(f"\nbench: wrote {args.output}", flush=True)
    return 0


def _dataset(bootstrap: str, scale: float) -> dict[str, Any]:
    ds = asyncio.run(datasets.produce(bootstrap, scale))
    return {
        "dataset": ds.as_dict(),
        "dataset_events": ds.events,
        "dataset_unique_events": ds.unique_events,
        "dataset_accounts": ds.accounts,
        "dataset_active_accounts": ds.active_accounts,
        "dataset_messages": ds.messages,
        "dataset_stream_events": ds.stream_events,
        "dataset_produce_s": ds.produce_s,
    }


if __name__ == "__main__":
    raise SystemExit(main())
