"""The launcher's pure parts, and its refusals, without a broker."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from deploy.kafka_local import (
    LOG4J2_CONFIG,
    LocalKafka,
    TopicSetupError,
    ensure_topics,
    is_formatted,
    kafka_jars,
    kill_stale_broker,
    new_cluster_id,
    read_properties,
    render_server_properties,
)
from deploy.processes import free_port, port_is_free, process_exited


@pytest.fixture
def listener() -> Iterator[int]:
    """A port something else is listening on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture
def fake_libs(tmp_path: Path) -> Path:
    """Jars by name only: enough for the checks before any JVM runs, useless to a JVM."""
    libs = tmp_path / "libs"
    libs.mkdir()
    (libs / "kafka_2.13-4.3.0.jar").write_bytes(b"not a jar")
    return libs


def _formatted(log_dir: Path) -> None:
    log_dir.mkdir(parents=True, exist_ok=True)
    (log_dir / "meta.properties").write_text(
        "#\nnode.id=1\ndirectory.id=x\nversion=1\ncluster.id=abcdefghijklmnopqrstuv\n"
    )


def test_server_properties_describe_a_one_node_kraft_cluster(tmp_path: Path) -> None:
    path = tmp_path / "server.properties"
    path.write_text(
        render_server_properties(port=23456, controller_port=23457, log_dir=tmp_path / "log")
    )
    props = read_properties(path)

    assert props["process.roles"] == "broker,controller"
    assert props["node.id"] == "1"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:23457"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:23456,CONTROLLER://127.0.0.1:23457"
    assert props["advertised.listeners"] == "PLAINTEXT://127.0.0.1:23456"
    assert props["controller.listener.names"] == "CONTROLLER"
    assert props["listener.security.protocol.map"] == "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
    assert props["log.dirs"] == str(tmp_path / "log")
    assert props["num.partitions"] == "8"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
        "share.coordinator.state.topic.min.isr",
    ):
        assert props[key] == "1", key
    assert ":9092" not in path.read_text()


def test_formatted_means_meta_properties_with_cluster_and_node(tmp_path: Path) -> None:
    log_dir = tmp_path / "log"
    assert not is_formatted(log_dir)  # does not even exist
    log_dir.mkdir()
    assert not is_formatted(log_dir)
    (log_dir / "meta.properties").write_text("node.id=1\n")
    assert not is_formatted(log_dir)  # a torn write is not a formatted dir
    _formatted(log_dir)
    assert is_formatted(log_dir)


def test_cluster_ids_look_like_kafkas() -> None:
    ids = {new_cluster_id() for _ in range(200)}
    assert len(ids) == 200
    for cluster_id in ids:
        assert re.fullmatch(r"[A-Za-z0-9_-]{22}", cluster_id)
        assert not cluster_id.startswith("-")


def test_free_port_is_bindable_and_never_9092() -> None:
    port = free_port()
    assert port != 9092
    assert port_is_free(port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_free_port_honours_exclusions() -> None:
    first = free_port()
    assert free_port(exclude=frozenset({first})) != first


def test_a_listening_port_is_not_free(listener: int) -> None:
    assert not port_is_free(listener)


@pytest.mark.parametrize("layout", ["missing", "empty", "only-deps"])
def test_missing_jars_say_run_make_setup(tmp_path: Path, layout: str) -> None:
    libs = tmp_path / "libs"
    if layout != "missing":
        libs.mkdir()
    if layout == "only-deps":
        (libs / "slf4j-api-2.0.17.jar").write_bytes(b"")
    with pytest.raises(RuntimeError, match="make setup") as info:
        LocalKafka(tmp_path / "data", libs, port=free_port()).start()
    assert str(libs) in str(info.value)
    assert "TALLY_KAFKA_BOOTSTRAP" in str(info.value)
    assert not (tmp_path / "data").exists()  # refused before touching anything


def test_jars_found(fake_libs: Path) -> None:
    assert [jar.name for jar in kafka_jars(fake_libs)] == ["kafka_2.13-4.3.0.jar"]


def test_a_taken_port_names_tally_kafka_bootstrap(
    tmp_path: Path, fake_libs: Path, listener: int
) -> None:
    broker = LocalKafka(tmp_path, fake_libs, port=listener)
    with pytest.raises(RuntimeError) as info:
        broker.start()
    message = str(info.value)
    assert f"127.0.0.1:{listener} is already taken" in message
    assert f"TALLY_KAFKA_BOOTSTRAP=127.0.0.1:{listener}" in message
    assert broker.pid is None


def test_a_taken_controller_port_is_refused(tmp_path: Path, fake_libs: Path, listener: int) -> None:
    broker = LocalKafka(tmp_path, fake_libs, port=free_port(), controller_port=listener)
    with pytest.raises(RuntimeError, match="already taken"):
        broker.start()


def test_bootstrap_and_layout(tmp_path: Path) -> None:
    broker = LocalKafka(tmp_path, tmp_path / "libs", port=23456)
    assert broker.bootstrap == "127.0.0.1:23456"
    assert broker.log_dir == tmp_path.resolve() / "kafka" / "log"
    assert broker.pid is None
    broker.stop()  # never started: nothing to do
    broker.kill()


def test_log4j2_config_ships_with_the_package() -> None:
    text = LOG4J2_CONFIG.read_text()
    assert "${sys:kafka.logs.dir" in text
    assert "server.log" in text


def _fake_broker(props: Path) -> subprocess.Popen[bytes]:
    """A process whose command line looks like our broker's, for the pid-file logic."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(60)", "kafka.Kafka", str(props)]
    )
    # Until it has exec'd, the child still shows pytest's command line.
    deadline = time.monotonic() + 10
    while b"kafka.Kafka" not in Path(f"/proc/{proc.pid}/cmdline").read_bytes():
        assert time.monotonic() < deadline, "the fake broker never started"
        time.sleep(0.01)
    return proc


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_stale_broker_of_a_dead_owner_is_killed(tmp_path: Path) -> None:
    fake = _fake_broker(tmp_path / "server.properties")
    try:
        (tmp_path / "broker.pid").write_text(f"{fake.pid} {_dead_pid()}\n")
        assert kill_stale_broker(tmp_path) == fake.pid
        assert fake.wait(5) == -9
        assert not (tmp_path / "broker.pid").exists()
    finally:
        fake.kill()
        fake.wait()


def test_a_broker_with_a_live_owner_is_left_alone(tmp_path: Path) -> None:
    fake = _fake_broker(tmp_path / "server.properties")
    try:
        (tmp_path / "broker.pid").write_text(f"{fake.pid} {os.getpid()}\n")
        with pytest.raises(RuntimeError, match="in use by a running broker"):
            kill_stale_broker(tmp_path)
        assert fake.poll() is None
    finally:
        fake.kill()
        fake.wait()


def test_a_pid_file_naming_another_program_is_ignored(tmp_path: Path) -> None:
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "broker.pid").write_text(f"{other.pid} {_dead_pid()}\n")
        assert kill_stale_broker(tmp_path) is None
        assert other.poll() is None
        assert not (tmp_path / "broker.pid").exists()
    finally:
        other.kill()
        other.wait()


def test_process_exited_counts_unreaped_zombies_as_gone() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        assert not process_exited(proc.pid)
        proc.kill()
        deadline = time.monotonic() + 5
        while not process_exited(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert process_exited(proc.pid)  # a zombie until the wait() below
    finally:
        proc.kill()
        proc.wait()
    assert process_exited(proc.pid)


def test_no_or_garbled_pid_file(tmp_path: Path) -> None:
    assert kill_stale_broker(tmp_path) is None
    (tmp_path / "broker.pid").write_text("garbage")
    assert kill_stale_broker(tmp_path) is None


# The next two run a real (if short-lived) JVM: `java` is part of the dev setup anyway.


def test_a_failing_format_reports_the_tool_output(tmp_path: Path, fake_libs: Path) -> None:
    broker = LocalKafka(tmp_path, fake_libs, port=free_port())
    with pytest.raises(RuntimeError, match="Formatting Kafka storage") as info:
        broker.start()
    assert "StorageTool" in str(info.value)  # the JVM's own complaint is quoted
    assert broker.pid is None


def test_a_broker_dying_at_startup_reports_its_log(tmp_path: Path, fake_libs: Path) -> None:
    broker = LocalKafka(tmp_path, fake_libs, port=free_port())
    _formatted(broker.log_dir)  # skip formatting: go straight to launching the broker
    with pytest.raises(RuntimeError, match="exited with code") as info:
        broker.start(timeout=30)
    assert "kafka.Kafka" in str(info.value)  # "Could not find or load main class ..."
    assert "broker.out" in str(info.value)
    assert broker.pid is None
    assert not broker.pid_file.exists()


async def test_ensure_topics_rejects_nonsense_counts() -> None:
    with pytest.raises(ValueError, match="partitions must be >= 1"):
        await ensure_topics("127.0.0.1:1", {"x": 0})


async def test_ensure_topics_with_nothing_to_do_needs_no_broker() -> None:
    await ensure_topics("127.0.0.1:1", {})


async def test_ensure_topics_gives_up_on_an_absent_broker() -> None:
    with pytest.raises(TopicSetupError, match=r"within 2s.*reachable"):
        await ensure_topics(f"127.0.0.1:{free_port()}", {"x": 1}, timeout=2)
