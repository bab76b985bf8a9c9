"""The deployment shape on a ClickHouse server: `tally migrate`, two `tally worker`, one
`tally sink` and `tally api`, each a process of its own (deploy/compose.yaml, deploy/k8s/),
on one Kafka broker and one server (`clickhouse_server_url`: without Docker, ClickHouse's
own server code from the chdb wheel). Published events with re-sent duplicates must come
back through the API's analytics exactly, totals computed from the events themselves.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.kafka_local import ensure_topics
from deploy.processes import free_port
from deploy.settings import REPO_ROOT
from tests.e2e.test_faults import ADMIN_KEY, TALLY, Stack, _publish, _traffic, _wait_totals

pytestmark = pytest.mark.e2e


@pytest.fixture
def services(
    kafka_bootstrap: str, clickhouse_server_url: str, unique_name: str, tmp_path: Path
) -> Iterator[tuple[Stack, list[subprocess.Popen[bytes]]]]:
    api_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("TALLY_")}
    env.update(
        TALLY_DATA_DIR=str(tmp_path / "data"),
        TALLY_KAFKA_BOOTSTRAP=kafka_bootstrap,
        TALLY_CLICKHOUSE_URL=clickhouse_server_url,
        TALLY_CLICKHOUSE_DATABASE=unique_name,
        TALLY_EVENTS_TOPIC=f"{unique_name}.events",
        TALLY_DLQ_TOPIC=f"{unique_name}.dlq",
        TALLY_ROLLUPS_TOPIC=f"{unique_name}.rollups",
        TALLY_CONSUMER_GROUP=f"{unique_name}-worker",
        TALLY_API_PORT=str(api_port),
        TALLY_ADMIN_KEY=ADMIN_KEY,
        TALLY_WORKER_BATCH_MESSAGES="64",
    )
    topics = {env["TALLY_EVENTS_TOPIC"]: 8, env["TALLY_ROLLUPS_TOPIC"]: 8}
    asyncio.run(ensure_topics(kafka_bootstrap, {**topics, env["TALLY_DLQ_TOPIC"]: 1}))
    migrate = subprocess.run(
        [str(TALLY), "migrate"], cwd=REPO_ROOT, env=env, capture_output=True, timeout=120
    )
    assert migrate.returncode == 0, migrate.stderr
    running: list[subprocess.Popen[bytes]] = []
    try:
        for role in ("worker", "worker", "sink", "api"):
            with (tmp_path / f"{role}-{len(running)}.log").open("ab") as out:
                running.append(
                    subprocess.Popen(
                        [str(TALLY), role],
                        cwd=REPO_ROOT,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                )
        yield Stack(env=env, log=tmp_path, api=f"http://127.0.0.1:{api_port}"), running
    finally:
        for proc in running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in running:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def test_separate_processes_on_a_server_count_exactly(
    services: tuple[Stack, list[subprocess.Popen[bytes]]], kafka_bootstrap: str, tmp_path: Path
) -> None:
    stack, running = services
    events, expected = _traffic(20_000, accounts=200, seed=53)
    topic = stack.env["TALLY_EVENTS_TOPIC"]
    resent = asyncio.run(_publish(kafka_bootstrap, topic, events, 0.05, seed=9))
    got, settle = _wait_totals(stack, expected, timeout_s=180)
    logs = {p.name: p.read_text(errors="replace")[-2000:] for p in tmp_path.glob("*.log")}
    print(f"\n{len(events)} events (+{resent} re-sent) exact after {settle:.1f}s")
    assert all(proc.poll() is None for proc in running), logs
    assert got == expected, logs
