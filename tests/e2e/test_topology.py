"""`tally up --brokers 3 --store server --workers 2 --sinks 2 --api-replicas 2`, for real.

Three KRaft brokers, a ClickHouse server, two workers, two fenced sinks and two API
processes, all children of one `tally up`. A key made on one API works on the other;
100,000 events published to the cluster (a tenth re-sent) are counted exactly on both
replicas; then, one fault after another: a SIGKILLed worker, sink and ClickHouse server are
started again by `tally up`, a sink SIGSTOPped past its session timeout loses its
partitions and writes nothing twice once woken, an API replica SIGKILLed leaves the other
answering (each answers from its own view: a snapshot of the store, then tally.rollups)
and, started again, answers the same totals, a broker frozen for 20 s (SIGSTOP) thaws,
the workers are SIGTERMed in turn (a rolling restart), and the broker leading most
partitions dies for good. After each the totals are exact on both replicas and `tally
reconcile` reports no drift; each settle time is printed. SIGTERM stops every child and
leaves no process behind.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
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

from deploy.processes import free_port, free_ports, process_exited
from producers import events as build
from producers.gateway import Gateway

pytestmark = pytest.mark.e2e

ADMIN = "topology-admin-Qm7vX2kP9wL4rT8z"
ACCOUNTS = 20
INITIAL = 100_000
"""Events published before the first fault (and a tenth of them again)."""
BROKER_STOP_S = 20.0


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


def _starts(log: Path, name: str) -> int:
    return log.read_text(errors="replace").count(f"tally up: {name} started")


def _pid(log: Path, banner: dict[str, Any], name: str) -> int:
    """The child's pid now: the banner's, or the one it was last started again with."""
    again = re.findall(
        rf"tally up: {name} started again \(pid (\d+)", log.read_text(errors="replace")
    )
    return int(again[-1]) if again else int(banner["processes"][name])


async def _signal(log: Path, banner: dict[str, Any], name: str, sig: int) -> None:
    """Signal the child as it runs now; one between an exit and its restart is waited for."""
    deadline = time.monotonic() + 60
    while True:
        try:
            os.kill(_pid(log, banner, name), sig)
            return
        except ProcessLookupError:
            assert time.monotonic() < deadline, f"{name} is not running"
            await asyncio.sleep(0.2)


def _broker_pid(tmp_path: Path, broker: int) -> int:
    pid_file = tmp_path / "data" / f"kafka-{broker}" / "broker.pid"
    return int(pid_file.read_text().split()[0])


class Sent:
    """Events published so far: `unique` of them, every tenth sent twice."""

    def __init__(self, bootstrap: str, spool: Path) -> None:
        self.bootstrap = bootstrap
        self.spool = spool
        self.unique = 0

    async def publish(self, count: int) -> None:
        await _publish(self.bootstrap, self.unique, count, self.spool)
        self.unique += count


class Reconcile:
    """`tally reconcile` over everything published, through the API: no drift."""

    def __init__(self, bootstrap: str, api_url: str, started: float) -> None:
        self.bootstrap = bootstrap
        self.api_url = api_url
        self.since = started - 600

    async def check(self, after: str) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.since))
        until = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 600))
        env = {**os.environ, "TALLY_KAFKA_BOOTSTRAP": self.bootstrap, "TALLY_ADMIN_KEY": ADMIN}
        args = ["reconcile", "--from", stamp, "--to", until, "--api-url", self.api_url]
        started = time.monotonic()
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "deploy.cli", *args, "--json", "--quiet"],
            env=env,
            capture_output=True,
            timeout=300,
        )
        assert done.returncode == 0, (after, done.stdout[-2000:], done.stderr[-2000:])
        print(f"  tally reconcile after {after}: no drift ({time.monotonic() - started:.1f}s)")


# Eight faults, each followed by a recount of the whole log: about 5 minutes on a quiet
# 2-core machine, twice that under load.
@pytest.mark.timeout(1500)
async def test_the_production_topology_counts_exactly_through_faults(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TALLY_DATA_DIR": str(tmp_path / "data"),
        "TALLY_KAFKA_PORT": str(free_ports(3)),
        "TALLY_CLICKHOUSE_PORT": str(free_port()),
        "TALLY_API_PORT": str(free_ports(2)),
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

            sent = Sent(bootstrap, spool)
            reconcile = Reconcile(bootstrap, urls[0], time.time())

            # Both workers and both sinks in their groups first, so the faults below are
            # the only disturbances. A second worker joining in the middle of the first
            # large batch is a case of its own: tests/integration/test_worker_join.py.
            await _groups_settled(bootstrap, {"tally-worker": 2, "tally.rollups.sinks": 2})
            await sent.publish(ACCOUNTS)
            await _until_exact(client, urls, keys, sent.unique)
            await sent.publish(INITIAL)
            settle = await _until_exact(client, urls, keys, sent.unique)
            print(f"\n{sent.unique:,} events counted on both replicas after {settle:.1f}s")
            await reconcile.check("before any fault")

            os.kill(_pid(log, banner, "worker-1"), signal.SIGKILL)
            os.kill(_pid(log, banner, "sink-1"), signal.SIGKILL)
            await sent.publish(4_000)
            settle = await _until_exact(client, urls, keys, sent.unique)
            print(f"worker and sink SIGKILLed: exact again after {settle:.1f}s")
            assert _restarted(log, "worker-1")
            assert _restarted(log, "sink-1")
            await reconcile.check("worker and sink SIGKILL")

            # The ClickHouse server dies while the sinks write: tally up starts it again,
            # and the sinks' retries land each INSERT once (its markers say whether).
            os.kill(banner["processes"]["store-server-1"], signal.SIGKILL)
            await sent.publish(2_000)
            settle = await _until_exact(client, urls, keys, sent.unique)
            print(f"ClickHouse server SIGKILLed: exact after {settle:.1f}s")
            assert "is gone; starting it again" in log.read_text(errors="replace")
            await reconcile.check("ClickHouse server SIGKILL")

            # A sink paused past its session timeout: its partitions move to the other
            # sink, which counts on; woken, the paused one must not write what it held.
            sink = _pid(log, banner, "sink-2")
            os.kill(sink, signal.SIGSTOP)
            try:
                await sent.publish(3_000)
                settle = await _until_exact(client, urls, keys, sent.unique)
                print(f"sink-2 stopped: exact without it after {settle:.1f}s")
            finally:
                os.kill(sink, signal.SIGCONT)
            await sent.publish(2_000)
            settle = await _until_exact(client, urls, keys, sent.unique)
            await asyncio.sleep(3)  # anything the woken sink wrote twice shows by now
            assert await _totals(client, urls, keys) == [sent.unique] * 2
            print(f"sink-2 woken: exact after {settle:.1f}s, and still exact")
            await reconcile.check("sink SIGSTOP and SIGCONT")

            # An API replica dies: the other keeps answering (and counting) while it is
            # down; started again, it loads a fresh snapshot of the store, follows
            # tally.rollups from that snapshot's markers and answers the same totals.
            os.kill(_pid(log, banner, "api-1"), signal.SIGKILL)
            await sent.publish(1_000)
            settle = await _until_exact(client, urls[1:], keys, sent.unique)
            print(f"api-1 SIGKILLed: api-2 exact after {settle:.1f}s")
            settle = await _until_exact(client, urls, keys, sent.unique)
            assert _restarted(log, "api-1")
            print(f"api-1 started again: both replicas exact after {settle:.1f}s")
            await reconcile.check("API replica SIGKILL")

            # A broker frozen for 20 s: its partitions get new leaders, publishing goes
            # on; thawed, it catches up as a follower.
            frozen = await _busiest_leader(bootstrap)
            broker = _broker_pid(tmp_path, frozen)
            os.kill(broker, signal.SIGSTOP)
            stopped = time.monotonic()
            try:
                await sent.publish(2_000)
                await asyncio.sleep(max(0.0, BROKER_STOP_S - (time.monotonic() - stopped)))
            finally:
                os.kill(broker, signal.SIGCONT)
            # A gateway that closed while Kafka re-elected kept its batches in the spool:
            # the next one on that spool sends them first, as a long-running gateway would.
            await sent.publish(500)
            settle = await _until_exact(client, urls, keys, sent.unique)
            print(f"broker {frozen} SIGSTOPped for {BROKER_STOP_S:.0f}s: exact after {settle:.1f}s")
            await reconcile.check("broker SIGSTOP")

            # A rolling restart of the workers (SIGTERM, as a deployment does): each
            # stops cleanly, tally up starts it again, and counting goes on meanwhile.
            for name in ("worker-1", "worker-2"):
                before = _starts(log, name)
                await _signal(log, banner, name, signal.SIGTERM)
                await sent.publish(1_000)
                deadline = time.monotonic() + 60
                while _starts(log, name) == before:
                    assert time.monotonic() < deadline, f"{name} was not started again"
                    await asyncio.sleep(0.2)
            settle = await _until_exact(client, urls, keys, sent.unique)
            print(f"workers SIGTERMed in turn: exact after {settle:.1f}s")
            await reconcile.check("rolling SIGTERM of the workers")

            # The broker leading most events partitions dies and stays dead; once its
            # partitions have new leaders (the controller notices within the brokers'
            # session timeout), publishing goes on.
            leader = await _busiest_leader(bootstrap)
            os.kill(_broker_pid(tmp_path, leader), signal.SIGKILL)
            survivors = ",".join(
                a for i, a in enumerate(bootstrap.split(","), start=1) if i != leader
            )
            deadline = time.monotonic() + 60
            while await _still_leads(survivors, leader):
                assert time.monotonic() < deadline, "no new leaders"
                await asyncio.sleep(0.5)
            sent.bootstrap = reconcile.bootstrap = survivors
            await sent.publish(3_000)
            settle = await _until_exact(client, urls, keys, sent.unique)
            print(f"broker {leader} SIGKILLed: exact after {settle:.1f}s")
            await reconcile.check("broker SIGKILL")
    finally:
        exits = [
            line for line in log.read_text(errors="replace").splitlines() if " exited " in line
        ]
        print("\n".join(["children that exited:", *exits]))
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


async def _groups_settled(bootstrap: str, members: dict[str, int]) -> None:
    """Until each consumer group is Stable with the given number of members."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    deadline = time.monotonic() + 120
    found: dict[str, tuple[str, int]] = {}
    try:
        while time.monotonic() < deadline:
            try:
                # One group per request: aiokafka cannot decode an answer describing
                # several groups with members ("Buffer underrun decoding string").
                for name in members:
                    for response in await admin.describe_consumer_groups([name]):
                        for group in response.groups:
                            found[group[1]] = (group[2], len(group[5]))
            except KafkaError:
                pass
            if all(found.get(g) == ("Stable", n) for g, n in members.items()):
                return
            await asyncio.sleep(0.5)
    finally:
        await admin.close()
    raise AssertionError(f"groups not settled: {found}, want {members}")


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
