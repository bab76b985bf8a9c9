"""A single-node KRaft Kafka broker run from the Maven jars in `.tally/kafka/libs`.

`tally up` and the test suite use it when no Kafka is given (`TALLY_KAFKA_BOOTSTRAP`,
`TALLY_TEST_KAFKA_BOOTSTRAP`) and no Docker engine exists. Everything the broker owns lives
under ``<data_dir>/kafka``:

    server.properties   rendered on every start (ports may change between runs)
    log/                log.dirs; holds meta.properties once formatted, and the topic data
    server.log          the broker's own log (deploy/kafka/log4j2.properties)
    broker.out          the JVM's stdout/stderr: crashes that happen before log4j is up
    broker.pid          "<java pid> <owner pid>", to find a broker left by a crashed run

The broker never outlives the Python process that started it, even when that process is
killed with SIGKILL (deploy/processes.py).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import pathlib
import shutil
import subprocess
import threading
import uuid
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final, TypeVar

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaError, TopicAlreadyExistsError, for_code

from deploy.exceptions import LocalServerError, TopicSetupError
from deploy.processes import (
    HOST,
    ChildServer,
    accepts_connections,
    free_port,
    kill_stale,
    port_is_free,
    tail,
)

__all__ = [
    "LOG4J2_CONFIG",
    "LocalKafka",
    "Quorum",
    "TopicSetupError",
    "ensure_topics",
    "is_formatted",
    "kafka_jars",
    "kill_stale_broker",
    "new_cluster_id",
    "read_properties",
    "render_server_properties",
]

LOG4J2_CONFIG: Final = pathlib.Path(__file__).resolve().parent / "kafka" / "log4j2.properties"
NODE_ID: Final = 1
_T = TypeVar("_T")


# --------------------------------------------------------------------------- pure helpers


@dataclass(frozen=True, slots=True)
class Quorum:
    """The KRaft cluster one broker+controller node belongs to (deploy/kafka_cluster.py):
    every node a voter (`voters`: node id -> controller port on HOST). `replication`
    holds for every topic, with `min.insync.replicas` 2 from three nodes on, so that an
    acknowledged write survives the loss of any one broker."""

    node_id: int
    voters: Mapping[int, int]
    cluster_id: str

    @property
    def replication(self) -> int:
        return min(3, len(self.voters))

    @property
    def min_insync(self) -> int:
        return 2 if self.replication >= 3 else 1


def render_server_properties(
    *,
    port: int,
    controller_port: int,
    log_dir: pathlib.Path,
    num_partitions: int = 8,
    quorum: Quorum | None = None,
) -> str:
    """The broker+controller configuration of a KRaft node on loopback (alone by default)."""
    node_id = quorum.node_id if quorum else NODE_ID
    voters = quorum.voters if quorum else {NODE_ID: controller_port}
    replication = str(quorum.replication if quorum else 1)
    min_insync = str(quorum.min_insync if quorum else 1)
    settings = {
        "process.roles": "broker,controller",
        "node.id": str(node_id),
        # A static voter set: `--standalone` formatting would conflict with it.
        "controller.quorum.voters": ",".join(
            f"{voter}@{HOST}:{voter_port}" for voter, voter_port in sorted(voters.items())
        ),
        "listeners": f"PLAINTEXT://{HOST}:{port},CONTROLLER://{HOST}:{controller_port}",
        "advertised.listeners": f"PLAINTEXT://{HOST}:{port}",
        "controller.listener.names": "CONTROLLER",
        "inter.broker.listener.name": "PLAINTEXT",
        "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "log.dirs": str(log_dir),
        "num.partitions": str(num_partitions),
        # Every topic, internal ones included, as replicated as the cluster allows.
        "default.replication.factor": replication,
        "min.insync.replicas": min_insync,
        "offsets.topic.replication.factor": replication,
        "transaction.state.log.replication.factor": replication,
        "transaction.state.log.min.isr": min_insync,
        "share.coordinator.state.topic.replication.factor": replication,
        "share.coordinator.state.topic.min.isr": min_insync,
        # The defaults (50 each) cost seconds of startup and hundreds of files for nothing.
        "offsets.topic.num.partitions": str(num_partitions),
        "transaction.state.log.num.partitions": str(num_partitions),
        # Nobody else will join: a consumer group need not wait for more members.
        "group.initial.rebalance.delay.ms": "0",
        # After a kill the restarted broker cannot register until the controller expired
        # the dead one's session (default 9 s, then 13 s to restart). Heartbeats never leave
        # the machine here, so a shorter session only fails on multi-second JVM stalls.
        "broker.heartbeat.interval.ms": "1000",
        "broker.session.timeout.ms": "5000",
    }
    lines = ["# Written by deploy/kafka_local.py on every start; edits are overwritten."]
    lines += [f"{key}={value}" for key, value in settings.items()]
    return "\n".join(lines) + "\n"


def read_properties(path: pathlib.Path) -> dict[str, str]:
    """Parse the simple key=value files Kafka writes (no continuation lines)."""
    result: dict[str, str] = {}
    with contextlib.suppress(FileNotFoundError):
        for raw in path.read_text(encoding="utf-8").splitlines():
            line = raw.strip()
            if not line or line.startswith(("#", "!")) or "=" not in line:
                continue
            key, _, value = line.partition("=")
            result[key.strip()] = value.strip()
    return result


def is_formatted(log_dir: pathlib.Path) -> bool:
    """Whether `kafka-storage format` already ran on this log dir.

    Formatting again would need a new cluster id and would orphan the existing data, so
    a restart must recognise the dir by the meta.properties that formatting leaves.
    """
    meta = read_properties(log_dir / "meta.properties")
    return bool(meta.get("cluster.id")) and bool(meta.get("node.id"))


def new_cluster_id() -> str:
    """A 22-character cluster id, the same shape as `kafka-storage random-uuid`."""
    while True:
        text = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode("ascii").rstrip("=")
        # Kafka never issues ids starting with '-': the CLI would parse them as an option.
        if not text.startswith("-"):
            return text


def kafka_jars(libs_dir: pathlib.Path) -> list[pathlib.Path]:
    """The broker jars, or a LocalServerError saying how to get them."""
    jars = sorted(libs_dir.glob("*.jar")) if libs_dir.is_dir() else []
    if not any(jar.name.startswith("kafka_") for jar in jars):
        raise LocalServerError(
            f"No Kafka broker jars in {libs_dir} (expected kafka_2.13-*.jar and its "
            "dependencies). Run `make setup` in the repository root: it copies them from "
            "Maven Central as listed in deploy/kafka/pom.xml. Or point TALLY_KAFKA_BOOTSTRAP "
            "at a Kafka broker you already run."
        )
    return jars


def find_java() -> str:
    java_home = os.environ.get("JAVA_HOME")
    if java_home and os.access(pathlib.Path(java_home) / "bin" / "java", os.X_OK):
        return str(pathlib.Path(java_home) / "bin" / "java")
    found = shutil.which("java")
    if found is None:
        raise LocalServerError(
            "`java` not found (PATH, JAVA_HOME): the local Kafka broker needs a JDK 17 or "
            "newer. Install one, or point TALLY_KAFKA_BOOTSTRAP at an existing broker."
        )
    return found


# --------------------------------------------------------------------------- leftovers


def kill_stale_broker(kafka_dir: pathlib.Path) -> int | None:
    """Kill a broker that a crashed earlier run left on this data dir; return its pid."""
    return kill_stale(
        kafka_dir / "broker.pid",
        ["kafka.Kafka", str(kafka_dir / "server.properties")],
        lambda pid, owner: (
            f"The Kafka data dir {kafka_dir} is in use by a running broker (pid {pid}) "
            f"of process {owner}. Stop that stack first, use another data dir, or set "
            "TALLY_KAFKA_BOOTSTRAP to use that broker."
        ),
    )


# --------------------------------------------------------------------------- readiness


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine to completion from sync code, even inside a running event loop.

    `LocalKafka.start()` is synchronous but gets called from async code too (`tally up`,
    async fixtures): a private loop in a helper thread works in both cases.
    """
    future: Future[_T] = Future()

    def target() -> None:
        try:
            future.set_result(asyncio.run(factory()))
        except BaseException as exc:
            future.set_exception(exc)

    thread = threading.Thread(target=target, name="tally-kafka-probe", daemon=True)
    thread.start()
    thread.join()
    return future.result()


async def _broker_ready(bootstrap: str, request_timeout: float, brokers: int = 1) -> str | None:
    """None once the broker answers metadata listing `brokers` registered brokers, else why.

    An open port proves little: the listener binds long before the broker has joined the
    quorum and can create a topic.
    """
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=int(request_timeout * 1000),
        client_id="tally-kafka-probe",
    )
    try:
        async with asyncio.timeout(request_timeout):
            await admin.start()
            cluster: dict[str, Any] = await admin.describe_cluster()
    except (KafkaError, OSError, TimeoutError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    registered = len(cluster.get("brokers") or [])
    if registered < brokers:
        return f"metadata lists {registered} of {brokers} brokers yet"
    if cluster.get("controller_id", -1) < 0:
        return "metadata names no active controller yet"
    return None


# --------------------------------------------------------------------------- the broker


class LocalKafka(ChildServer):
    """One broker+controller JVM on 127.0.0.1, with its data under ``data_dir/kafka``.

    Usable as a context manager. `start()` reuses the data of a previous run (stopped or
    killed) on the same dir; it formats storage only the first time.
    """

    stop_timeout = 30.0

    def __init__(
        self,
        data_dir: pathlib.Path,
        libs_dir: pathlib.Path,
        port: int = 9092,
        controller_port: int | None = None,
        heap: str = "512m",
        quorum: Quorum | None = None,
    ) -> None:
        self.data_dir = pathlib.Path(data_dir).resolve()
        self.libs_dir = pathlib.Path(libs_dir).resolve()
        self.port = port
        self.heap = heap
        self.quorum = quorum
        if quorum is not None:
            controller_port = quorum.voters[quorum.node_id]
        self._requested_controller_port = controller_port
        self.controller_port: int | None = controller_port
        super().__init__()

    # Paths ------------------------------------------------------------------------------

    @property
    def kafka_dir(self) -> pathlib.Path:
        if self.quorum is None:
            return self.data_dir / "kafka"
        return self.data_dir / f"kafka-{self.quorum.node_id}"

    @property
    def log_dir(self) -> pathlib.Path:
        return self.kafka_dir / "log"

    @property
    def properties_file(self) -> pathlib.Path:
        return self.kafka_dir / "server.properties"

    @property
    def server_log(self) -> pathlib.Path:
        return self.kafka_dir / "server.log"

    @property
    def stdout_file(self) -> pathlib.Path:
        return self.kafka_dir / "broker.out"

    @property
    def pid_file(self) -> pathlib.Path:
        return self.kafka_dir / "broker.pid"

    @property
    def bootstrap(self) -> str:
        return f"{HOST}:{self.port}"

    # Lifecycle --------------------------------------------------------------------------

    def start(self, timeout: float = 90.0, wait: bool = True) -> None:
        """Start the broker and return once it serves metadata as a registered broker.

        Blocks for a few seconds. Async callers may use `await asyncio.to_thread(b.start)`:
        the broker does not die with that worker thread (see deploy.processes.Spawner).
        `wait=False` returns once it runs: a node of a cluster cannot be ready before a
        majority of its quorum runs too (`wait_ready`).
        """
        if self.pid is not None:
            return
        self.kill()  # reap a broker that died on its own since the last start
        kafka_jars(self.libs_dir)
        java = find_java()
        self.kafka_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        kill_stale_broker(self.kafka_dir)
        self._check_port(self.port, "Kafka broker")
        self.controller_port = self._pick_controller_port()
        self.properties_file.write_text(
            render_server_properties(
                port=self.port,
                controller_port=self.controller_port,
                log_dir=self.log_dir,
                quorum=self.quorum,
            ),
            encoding="utf-8",
        )
        if not is_formatted(self.log_dir):
            self._format(java, timeout)
        self._launch(java)
        if wait:
            self.wait_ready(timeout)

    def __repr__(self) -> str:
        return f"LocalKafka({self.bootstrap}, data={self.kafka_dir}, pid={self.pid})"

    # Internals --------------------------------------------------------------------------

    def _check_port(self, port: int, what: str) -> None:
        if port_is_free(port):
            return
        raise LocalServerError(
            f"Cannot start the local {what}: {HOST}:{port} is already taken by "
            "another process. If that is a Kafka broker you want to use, set "
            f"TALLY_KAFKA_BOOTSTRAP={HOST}:{port} and no local broker is started; "
            "otherwise stop that process or choose another port."
        )

    def _pick_controller_port(self) -> int:
        if self._requested_controller_port is not None:
            self._check_port(self._requested_controller_port, "Kafka controller")
            return self._requested_controller_port
        # Keep the previous run's port when it is free: the controller endpoint recorded in
        # the metadata log then stays true, and the rendered config stays stable.
        previous = read_properties(self.properties_file).get("controller.quorum.voters", "")
        _, _, old = previous.rpartition(":")
        if old.isdigit() and int(old) != self.port and port_is_free(int(old)):
            return int(old)
        return free_port(exclude=frozenset({self.port}))

    def _java_args(self, java: str) -> list[str]:
        return [
            java,
            # What Kafka's own start scripts pass (KAFKA_HEAP_OPTS, KAFKA_JVM_PERFORMANCE_OPTS).
            # A heap that starts small keeps G1's concurrent marking busy as it grows:
            # ~4 CPU s of the bench's broker's first half minute, on a 2-core machine.
            f"-Xmx{self.heap}",
            f"-Xms{self.heap}",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-XX:InitiatingHeapOccupancyPercent=35",
            "-XX:+ExplicitGCInvokesConcurrent",
            "-XX:+ExitOnOutOfMemoryError",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            f"-Dkafka.logs.dir={self.kafka_dir}",
            "-cp",
            f"{self.libs_dir}{os.sep}*",
        ]

    def _format(self, java: str, timeout: float) -> None:
        cmd = [
            *self._java_args(java),
            "kafka.tools.StorageTool",
            "format",
            "--ignore-formatted",
            "-t",
            self.quorum.cluster_id if self.quorum else new_cluster_id(),
            "-c",
            str(self.properties_file),
        ]
        try:
            result = subprocess.run(
                cmd, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise LocalServerError(
                f"Formatting Kafka storage in {self.log_dir} took over {timeout:.0f}s."
            ) from exc
        if result.returncode != 0 or not is_formatted(self.log_dir):
            output = (result.stdout + result.stderr).strip()[-3000:]
            raise LocalServerError(
                f"Formatting Kafka storage in {self.log_dir} failed "
                f"(exit code {result.returncode}):\n{output}\n"
                f"Check the jars in {self.libs_dir} (`make setup` restores them) and that "
                f"{self.kafka_dir} is writable."
            )

    def _launch(self, java: str) -> None:
        self._spawn([*self._java_args(java), "kafka.Kafka", str(self.properties_file)],
                    cwd=self.kafka_dir)  # fmt: skip

    def wait_ready(self, timeout: float, brokers: int = 1) -> None:
        """Return once this broker serves metadata listing `brokers` registered brokers."""

        def probe() -> str | None:
            if not accepts_connections(self.port):
                return f"nothing listens on {self.bootstrap} yet"
            # Only ask Kafka once something listens: aiokafka logs every refused connect.
            return _run_coroutine(lambda: _broker_ready(self.bootstrap, 3.0, brokers))

        self._wait_ready("Kafka broker", timeout, probe, every_s=0.2)

    def _failure(self, what: str) -> str:
        log = tail(self.server_log)
        out = tail(self.stdout_file, 15)
        hint = (
            "The port was taken by another process meanwhile; set TALLY_KAFKA_BOOTSTRAP to "
            "use an existing broker, or free the port."
            if "Address already in use" in log + out
            else f"See {self.server_log}. `make setup` restores the jars; deleting "
            f"{self.kafka_dir} starts from an empty broker (all events in it are lost)."
        )
        return (
            f"{what}.\n--- last lines of {self.server_log}:\n{log}\n"
            f"--- last lines of {self.stdout_file}:\n{out}\n{hint}"
        )


# --------------------------------------------------------------------------- topics


# `timeout` bounds a retry loop over fresh connections and shapes the error message; an
# outer asyncio.timeout would only say "cancelled" (hence the ASYNC109 exemption).
async def ensure_topics(
    bootstrap: str,
    topics: Mapping[str, int],
    timeout: float = 30.0,  # noqa: ASYNC109
    configs: Mapping[str, Mapping[str, str]] | None = None,
) -> None:
    """Create the missing topics with the given partition counts; wait until all are usable.

    `configs`: topic configs a topic is created with (e.g. cleanup.policy=compact for
    tally.alerts); an existing topic keeps its own.

    Existing topics are kept as they are (more partitions than asked is fine). One with
    fewer partitions raises TopicSetupError: events keyed by account would map to other
    partitions than the producers assume. Connection problems and a broker still warming up
    are retried until `timeout`; concurrent creation by another process is harmless.
    """
    for name, partitions in topics.items():
        if partitions < 1:
            raise ValueError(f"topic {name!r}: partitions must be >= 1, not {partitions}")
    if not topics:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        remaining = deadline - loop.time()
        try:
            async with asyncio.timeout(max(remaining, 0.1)):
                pending = await _ensure_topics_once(
                    bootstrap, topics, request_timeout=remaining, configs=configs or {}
                )
        except TopicSetupError:
            raise
        except (KafkaError, OSError, TimeoutError) as exc:
            pending = f"{type(exc).__name__}: {exc}"
        if pending is None:
            return
        if loop.time() >= deadline:
            raise TopicSetupError(
                f"Could not create/verify topics {sorted(topics)} on {bootstrap} within "
                f"{timeout:.0f}s: {pending}. Is the broker running and reachable?",
                f"Check TALLY_KAFKA_BOOTSTRAP (now {bootstrap}).",
            )
        await asyncio.sleep(0.25)


async def _ensure_topics_once(
    bootstrap: str,
    topics: Mapping[str, int],
    request_timeout: float,
    configs: Mapping[str, Mapping[str, str]],
) -> str | None:
    """One round: None when every topic is ready, else what we are still waiting for."""
    admin = AIOKafkaAdminClient(
        bootstrap_servers=bootstrap,
        request_timeout_ms=max(int(request_timeout * 1000), 1000),
        client_id="tally-ensure-topics",
    )
    try:
        await admin.start()
        cluster: dict[str, Any] = await admin.describe_cluster()
        brokers = len(cluster.get("brokers") or [])
        if brokers == 0:
            return "no broker registered yet"
        # All topics (a null topic list): naming topics would let the broker auto-create
        # them with its default partition count before we do.
        described = await admin.describe_topics()
        existing = {str(t["topic"]): t for t in described}
        for name, wanted in topics.items():
            meta = existing.get(name)
            if meta is None:
                continue
            code = int(meta["error_code"])
            if code != 0:
                error = for_code(code)
                if error.retriable:
                    return f"topic {name!r}: {error.__name__}"
                raise TopicSetupError(
                    f"Topic {name!r} on {bootstrap} is unusable: {error.__name__}: "
                    f"{error.description}",
                    f"Check TALLY_KAFKA_BOOTSTRAP (now {bootstrap}).",
                )
            have = len(meta["partitions"])
            if have < wanted:
                raise TopicSetupError(
                    f"Topic {name!r} on {bootstrap} has {have} partitions, {wanted} are "
                    "needed. Partitions can only be added, and adding them moves accounts to "
                    "other partitions: recreate the topic (losing its events) or add them "
                    "deliberately with kafka-topics --alter."
                )
        missing = [name for name in topics if name not in existing]
        if missing:
            replication = min(brokers, 3)
            response = await admin.create_topics(
                [
                    NewTopic(
                        name, topics[name], replication, topic_configs=dict(configs.get(name, {}))
                    )
                    for name in missing
                ]
            )
            for entry in response.to_object()["topic_errors"]:
                code = int(entry["error_code"])
                if code in (0, TopicAlreadyExistsError.errno):
                    continue
                error = for_code(code)
                message = entry.get("error_message") or error.description
                if error.retriable:
                    return f"creating {entry['topic']!r}: {error.__name__}: {message}"
                raise TopicSetupError(
                    f"Kafka at {bootstrap} refused to create topic {entry['topic']!r}: "
                    f"{error.__name__}: {message}",
                    f"Check TALLY_KAFKA_BOOTSTRAP (now {bootstrap}).",
                )
            # Re-read: another process may have won the race with a different shape.
            return "waiting for the new topics to appear in metadata"
        for name in topics:
            meta = existing[name]
            leaderless = [p["partition"] for p in meta["partitions"] if p["leader"] < 0]
            if leaderless:
                return f"topic {name!r}: partitions {leaderless} have no leader yet"
        return None
    finally:
        await admin.close()
