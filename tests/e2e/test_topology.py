"""`tally up --brokers 3 --store server --workers 2 --sinks 2 --api-replicas 2`, for real.

Three KRaft brokers, a ClickHouse server, two workers, two fenced sinks and two API
processes, all children of one `tally up`. A key made on one API works on the other;
events published to the cluster (re-sent copies included) are counted exactly on both
replicas, each from its own view (a snapshot of the store, then `tally.rollups`); a
SIGKILLed worker, sink and ClickHouse server are started again by `tally up`, a sink
SIGSTOPped past its session timeout loses its partitions and writes nothing twice once
woken, a SIGKILLed API replica leaves the other answering and, started again, answers
the same totals, the broker leading most partitions dies for good, and the totals stay
exact through each; SIGTERM stops every child and leaves no process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaError

from deploy.processes import free_port, port_is_free, process_exited
from producers import events as build
from producers.gateway import Gateway

pytestmark = pytest.mark.e2e

ADMIN = "topology-admin-Qm7vX2kP9wL4rT8z"
ACCOUNTS = 20


def _consecutive_free_ports(n: int) -> int:
    for _ in range(50):
        base = free_port()
        if all(port_is_free(base + i) for i in range(n)):
            return base
    raise RuntimeError(f"no {n} consecutive free ports")


async def _totals(client: httpx.AsyncClient, urls: list[str], keys: dict[str, str]) -> list[int]:
    found = []
    for url in urls:
        total = 0
        for key in keys.values():
            try:
                r = await client.get(f"{url}/api/v1/account/usage", headers={"X-API-Key": key})
            except httpx.HTTPError:  # while its store is restarted
                total = -1
                break
            total += r.json()["data"]["requests"]["today"] if r.status_code == 200 else -1
        found.append(total)
    return found


async def _until_exact(
    client: httpx.AsyncClient, urls: list[str], keys: dict[str, str], want: int
) -> float:
    started = time.monotonic()
    got: list[int] = []
    while time.monotonic() - started < 120:
        got = await _totals(client, urls, keys)
        if got == [want] * len(urls):
            return time.monotonic() - started
        await asyncio.sleep(0.5)
    raise AssertionError(f"replicas answer {got}, {want} were sent")


async def _publish(bootstrap: str, start: int, count: int, spool: Path) -> None:
    async with Gateway(bootstrap, spool_dir=spool) as gateway:
        for i in range(start, start + count):
            event = build.request(f"acct-{i % ACCOUNTS}", "gw-topology", id=f"e-{i}")
            await gateway.record(event)
            if i % 10 == 0:
                await gateway.record(event)  # a re-sent copy: counted once


def _restarted(log: Path, name: str) -> bool:
    return f"tally up: {name} started again" in log.read_text(errors="replace")


async def test_the_production_topology_counts_exactly_through_faults(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TALLY_DATA_DIR": str(tmp_path / "data"),
        "TALLY_KAFKA_PORT": str(_consecutive_free_ports(3)),
        "TALLY_CLICKHOUSE_PORT": str(free_port()),
        "TALLY_API_PORT": str(_consecutive_free_ports(2)),
        "TALLY_ADMIN_KEY": ADMIN,
        "TALLY_SINK_SESSION_TIMEOUT_MS": "6000",
    }
    for name in ("TALLY_KAFKA_BOOTSTRAP", "TALLY_CLICKHOUSE_URL"):
        env.pop(name, None)
    log = tmp_path / "up.log"
    spool = tmp_path / "spool"
    args = ["--brokers", "3", "--store", "server", "--workers", "2", "--sinks", "2"]
    with log.open("wb") as err:
        up = await asyncio.to_thread(
            subprocess.Popen,
            [sys.executable, "-m", "deploy.cli", "up", *args, "--api-replicas", "2", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=err,
        )
    try:
        assert up.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(up.stdout.readline), 240)
        assert line, log.read_text(errors="replace")[-3000:]
        banner: dict[str, Any] = json.loads(line)
        urls, bootstrap = banner["api_urls"], banner["kafka_bootstrap"]
        assert len(urls) == 2
        assert len(bootstrap.split(",")) == 3
        async with httpx.AsyncClient(timeout=10) as client:
            for url in urls:
                deadline = time.monotonic() + 60
                while (await _health(client, url)) != 200:
                    assert time.monotonic() < deadline, log.read_text(errors="replace")[-3000:]
                    await asyncio.sleep(0.5)
            keys = {}
            for i in range(ACCOUNTS):
                r = await client.post(
                    f"{urls[i % 2]}/api/v1/admin/accounts",
                    json={"id": f"acct-{i}", "plan": "pro"},
                    headers={"X-API-Key": ADMIN},
                )
                assert r.status_code == 201, r.text
                keys[f"acct-{i}"] = r.json()["data"]["api_key"]

            await _publish(bootstrap, 0, 6_000, spool)
            settle = await _until_exact(client, urls, keys, 6_000)
            print(f"\n6,000 events counted on both replicas after {settle:.1f}s")

            os.kill(banner["processes"]["worker-1"], signal.SIGKILL)
            os.kill(banner["processes"]["sink-1"], signal.SIGKILL)
            await _publish(bootstrap, 6_000, 4_000, spool)
            settle = await _until_exact(client, urls, keys, 10_000)
            print(f"worker and sink SIGKILLed: exact again after {settle:.1f}s")
            assert _restarted(log, "worker-1")
            assert _restarted(log, "sink-1")

            # The ClickHouse server dies while the sinks write: tally up starts it again,
            # and the sinks' retries land each INSERT once (its markers say whether).
            os.kill(banner["processes"]["store-server-1"], signal.SIGKILL)
            await _publish(bootstrap, 10_000, 2_000, spool)
            settle = await _until_exact(client, urls, keys, 12_000)
            print(f"ClickHouse server SIGKILLed: exact after {settle:.1f}s")
            assert "is gone; starting it again" in log.read_text(errors="replace")

            # A sink paused past its session timeout: its partitions move to the other
            # sink, which counts on; woken, the paused one must not write what it held.
            sink = banner["processes"]["sink-2"]
            os.kill(sink, signal.SIGSTOP)
            try:
                await _publish(bootstrap, 12_000, 3_000, spool)
                settle = await _until_exact(client, urls, keys, 15_000)
                print(f"sink-2 stopped: exact without it after {settle:.1f}s")
            finally:
                os.kill(sink, signal.SIGCONT)
            await _publish(bootstrap, 15_000, 2_000, spool)
            settle = await _until_exact(client, urls, keys, 17_000)
            await asyncio.sleep(3)  # anything the woken sink wrote twice shows by now
            assert await _totals(client, urls, keys) == [17_000, 17_000]
            print(f"sink-2 woken: exact after {settle:.1f}s, and still exact")

            # An API replica dies: the other keeps answering (and counting) while it is
            # down; started again, it loads its snapshot, follows the topic and answers
            # the same totals.
            os.kill(banner["processes"]["api-1"], signal.SIGKILL)
            await _publish(bootstrap, 17_000, 1_000, spool)
            settle = await _until_exact(client, urls[1:], keys, 18_000)
            print(f"api-1 SIGKILLed: api-2 exact after {settle:.1f}s")
            settle = await _until_exact(client, urls, keys, 18_000)
            assert _restarted(log, "api-1")
            print(f"api-1 started again: both exact after {settle:.1f}s")

            # The broker leading most events partitions dies and stays dead; once its
            # partitions have new leaders (the controller notices within the brokers'
            # session timeout), publishing goes on.
            leader = await _busiest_leader(bootstrap)
            pid_file = tmp_path / "data" / f"kafka-{leader}" / "broker.pid"
            os.kill(int(pid_file.read_text().split()[0]), signal.SIGKILL)
            survivors = ",".join(
                a for i, a in enumerate(bootstrap.split(","), start=1) if i != leader
            )
            deadline = time.monotonic() + 60
            while await _still_leads(survivors, leader):
                assert time.monotonic() < deadline, "no new leaders"
                await asyncio.sleep(0.5)
            await _publish(survivors, 18_000, 3_000, spool)
            settle = await _until_exact(client, urls, keys, 21_000)
            print(f"broker {leader} SIGKILLed: exact after {settle:.1f}s")
    finally:
        up.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(up.wait, 120)
    assert code == 0, log.read_text(errors="replace")[-3000:]
    for name, pid in banner["processes"].items():
        assert process_exited(pid), name
    assert await asyncio.to_thread(_left_behind, tmp_path) == []


async def _busiest_leader(bootstrap: str, dead: int | None = None) -> int:
    """The broker leading most events partitions; with `dead`, how many it still leads."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (meta,) = await admin.describe_topics(["tally.events"])
    finally:
        await admin.close()
    leaders = Counter(int(p["leader"]) for p in meta["partitions"])
    if dead is not None:
        return leaders[dead]
    return leaders.most_common(1)[0][0]


async def _still_leads(bootstrap: str, broker: int) -> bool:
    try:
        return await _busiest_leader(bootstrap, dead=broker) > 0
    except KafkaError:  # metadata may still send the request to the dead broker
        return True


async def _health(client: httpx.AsyncClient, url: str) -> int:
    try:
        return (await client.get(f"{url}/healthz")).status_code
    except httpx.HTTPError:
        return 0


def _left_behind(data: Path) -> list[int]:
    return [int(p.name) for p in Path("/proc").glob("[0-9]*") if _ours(p, data)]


def _ours(proc: Path, data: Path) -> bool:
    """A live process whose command line or environment names this test's data dir."""
    try:
        cmdline = (proc / "cmdline").read_bytes()
        environ = (proc / "environ").read_bytes()
    except OSError:
        return False
    if process_exited(int(proc.name)):
        return False
    return str(data).encode() in cmdline + environ
