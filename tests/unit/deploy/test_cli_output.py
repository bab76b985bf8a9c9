"""`tally` commands: --json output on stdout, and operator errors without tracebacks."""

from __future__ import annotations

import errno
import fcntl
import io
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiokafka.errors import KafkaConnectionError, KafkaError

from deploy import cli, cli_support
from deploy.exceptions import LocalServerError, TopicSetupError
from producers.loadgen import LoadgenResult
from schemas.exceptions import OperatorError, StoreError


@pytest.fixture(autouse=True)
def _keep_logging() -> Iterator[None]:
    """cli.main configures logging; give the other tests theirs back."""
    root, tally = logging.getLogger(), logging.getLogger("tally")
    saved = (root.handlers[:], root.level, tally.handlers[:], tally.level, tally.propagate)
    yield
    root.handlers[:], tally.handlers[:] = saved[0], saved[2]
    root.setLevel(saved[1])
    tally.setLevel(saved[3])
    tally.propagate = saved[4]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("TALLY_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TALLY_DATA_DIR", str(tmp_path / "data"))


def _json(out: str) -> Any:
    lines = out.strip().splitlines()
    assert len(lines) == 1, f"stdout must be one JSON line, got {out!r}"
    return json.loads(lines[0])


class FakeStore:
    opened: list[FakeStore] = []

    def __init__(self, url: str, database: str, cluster: str = "") -> None:
        self.url, self.database, self.cluster = url, database, cluster
        self.closed = False
        FakeStore.opened.append(self)

    def migrate(self) -> list[int]:
        return [1, 2]

    def close(self) -> None:
        self.closed = True


def test_migrate_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("schemas.store.Store", FakeStore)
    monkeypatch.setenv("TALLY_CLICKHOUSE_URL", "http://u:secret@db.example:8123/metering")
    assert cli.main(["migrate", "--json"]) == 0
    doc = _json(capsys.readouterr().out)
    assert doc["store"] == "http://u:***@db.example:8123/metering"
    assert doc["database"] == "metering"
    assert doc["applied"] == [1, 2]
    assert doc["version"] >= 2


@pytest.mark.parametrize(("env", "cluster"), [("tally_cluster", "tally_cluster"), ("", "")])
def test_migrate_runs_on_the_configured_cluster(
    monkeypatch: pytest.MonkeyPatch, env: str, cluster: str
) -> None:
    """The migrate Job must create the replicated ON CLUSTER tables the services use."""
    monkeypatch.setattr("schemas.store.Store", FakeStore)
    monkeypatch.setattr(FakeStore, "opened", [])
    monkeypatch.setenv("TALLY_CLICKHOUSE_URL", "http://db.example:8123")
    monkeypatch.setenv("TALLY_CLICKHOUSE_CLUSTER", env)
    assert cli.main(["migrate", "--json"]) == 0
    [store] = FakeStore.opened
    assert store.cluster == cluster
    assert store.closed


def test_migrate_text(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr("schemas.store.Store", FakeStore)
    assert cli.main(["migrate"]) == 0
    assert "is up to date (applied migrations 1, 2)" in capsys.readouterr().out


def test_loadgen_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    seen: dict[str, Any] = {}

    async def fake_run(bootstrap: str, topic: str, **kwargs: Any) -> LoadgenResult:
        seen.update(kwargs, bootstrap=bootstrap)
        return LoadgenResult(
            requests=90, streams_opened=6, streams_closed=4, streams_left_open=2, elapsed_s=2.0
        )

    monkeypatch.setattr("producers.loadgen.run_loadgen", fake_run)
    assert cli.main(["loadgen", "--events", "100", "--json"]) == 0
    assert _json(capsys.readouterr().out) == {
        "events": 100,
        "requests": 90,
        "streams_opened": 6,
        "streams_closed": 4,
        "streams_left_open": 2,
        "elapsed_s": 2.0,
        "events_per_s": 50.0,
    }
    assert seen["events"] == 100
    assert seen["progress"] is True  # on stderr: --json keeps stdout clean anyway


def test_worker_json_status_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    ran: list[Any] = []
    monkeypatch.setattr("deploy.stack.run_worker", lambda s, status: ran.append((s, status)))
    monkeypatch.setenv("TALLY_METRICS_PORT", "9464")
    monkeypatch.setenv("TALLY_KAFKA_BOOTSTRAP", "kafka-1:9092")
    assert cli.main(["worker", "--json"]) == 0
    doc = _json(capsys.readouterr().out)
    assert doc["command"] == "worker"
    assert doc["status"] == "starting"
    assert doc["kafka_bootstrap"] == "kafka-1:9092"
    assert doc["metrics_url"] == "http://127.0.0.1:9464/metrics"
    assert len(ran) == 1
    assert ran[0][1] is False  # --json: no periodic text lines on stdout


def test_sink_without_json_prints_nothing_on_stdout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("deploy.stack.run_sink", lambda settings: None)
    assert cli.main(["sink"]) == 0
    assert capsys.readouterr().out == ""


def test_log_format_comes_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("deploy.stack.run_sink", lambda settings: None)
    monkeypatch.setenv("TALLY_LOG_FORMAT", "json")
    assert cli.main(["sink"]) == 0
    formatter = logging.getLogger("tally").handlers[0].formatter
    assert type(formatter).__name__ == "JsonFormatter"


def test_kafka_unreachable_is_one_line_and_exit_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def unreachable(settings: Any, status: bool) -> None:
        raise KafkaConnectionError("Unable to bootstrap from [('nowhere', 9092)]")

    monkeypatch.setattr("deploy.stack.run_worker", unreachable)
    monkeypatch.setenv("TALLY_KAFKA_BOOTSTRAP", "nowhere:9092")
    assert cli.main(["worker"]) == 2
    err = capsys.readouterr().err
    assert "tally: cannot reach Kafka at nowhere:9092" in err
    assert "TALLY_KAFKA_BOOTSTRAP" in err
    assert "Traceback" not in err


def test_bad_settings_exit_2_listing_the_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TALLY_CLICKHOUSE_URL", "mysql://db")
    monkeypatch.setenv("TALLY_LOG_FORMAT", "xml")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["migrate"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "TALLY_CLICKHOUSE_URL: Value error, must start with chdb://" in err
    assert "TALLY_LOG_FORMAT" in err


def test_a_held_embedded_store_is_named_from_the_error_url(tmp_path: Path) -> None:
    path = tmp_path / "clickhouse"
    path.mkdir()
    url = f"chdb://{path}"
    (path / "status").touch()
    # Another process's chdb holds this flock while it runs; here, the test does.
    other = os.open(path / "status", os.O_RDONLY)
    fcntl.flock(other, fcntl.LOCK_EX)
    try:
        assert cli_support.store_held(url)
        # The message does not name the store: the URL comes from the attribute.
        message = cli_support.explain(StoreError("Code: 36. (BAD_ARGUMENTS)", url=url))
    finally:
        os.close(other)
    assert not cli_support.store_held(url)
    assert message is not None
    assert f"the embedded store {url} is held by another process" in message
    assert "Stop that process" in message


def test_a_store_error_that_is_not_a_lock_keeps_its_message_and_hint() -> None:
    error = StoreError(
        "cannot open the ClickHouse store at http://db:8123: refused.",
        "Check TALLY_CLICKHOUSE_URL.",
        url="http://db:8123",
    )
    assert error.url == "http://db:8123"
    assert cli_support.explain(error) == (
        "cannot open the ClickHouse store at http://db:8123: refused. Check TALLY_CLICKHOUSE_URL."
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (
            OSError(errno.EADDRINUSE, "Address already in use"),
            "already in use (Address already in use). Another Tally process may run",
        ),
        (
            TopicSetupError("Could not create/verify topics ['t'] on x:1 within 30s", "Check X."),
            "within 30s Check X.",
        ),
        (LocalServerError("No Kafka broker jars in /x.", "Run `make setup`."), "Run `make setup`"),
        (KafkaConnectionError("refused"), "cannot reach Kafka at 127.0.0.1:9092 (the default)"),
    ],
)
def test_operator_errors_are_explained(error: Exception, expected: str) -> None:
    message = cli_support.explain(error, environ={})
    assert message is not None
    assert expected in message


def test_an_operator_error_prints_its_hint_and_exits_2() -> None:
    def refused() -> int:
        raise OperatorError("the port 9092 is taken.", "Stop the other broker.")

    err = io.StringIO()
    assert cli_support.guarded(refused, err=err) == cli_support.EXIT_UNAVAILABLE
    assert err.getvalue() == "tally: the port 9092 is taken. Stop the other broker.\n"


@pytest.mark.parametrize(
    "bug",
    [
        KeyError("a bug"),
        RuntimeError("No Kafka broker jars: a message that reads like a hint"),
        ValueError("x"),
        KafkaError("an aiokafka state error"),
    ],
)
def test_bugs_keep_their_traceback(bug: Exception) -> None:
    def broken() -> int:
        raise bug

    err = io.StringIO()
    with pytest.raises(type(bug)) as raised:
        cli_support.guarded(broken, err=err)
    assert raised.value is bug
    assert raised.traceback  # the bug's own frames, not one line on stderr
    assert err.getvalue() == ""
    assert cli_support.explain(bug) is None


def test_up_json_is_one_line_with_addresses_and_demo_keys(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import contextlib

    from deploy import stack

    @contextlib.contextmanager
    def brokers_for(settings: Any, brokers: int = 1) -> Iterator[str]:
        yield "kafka-1:9092"

    async def ensure_stack_topics(settings: Any, bootstrap: str) -> None:
        return None

    async def await_coordinators(settings: Any, partitions: int) -> None:
        return None

    ran: list[Any] = []
    monkeypatch.setattr(stack, "brokers_for", brokers_for)
    monkeypatch.setattr(stack, "ensure_stack_topics", ensure_stack_topics)
    monkeypatch.setattr(stack, "await_coordinators", await_coordinators)
    monkeypatch.setattr(stack, "open_store", lambda settings: FakeStore("u", "d"))
    # `up` imports the API where it runs it (so `tally worker` need not): patch it there.
    monkeypatch.setattr("query_api.app.create_app", lambda settings, store: None)
    monkeypatch.setattr(stack, "demo_keys", lambda store, settings: ["tk_a", "tk_b"])
    monkeypatch.setattr(stack, "build_app", lambda settings: (None, None))
    monkeypatch.setattr(stack, "new_sink", lambda settings, store: None)
    monkeypatch.setattr("query_api.app.view_feed", lambda api: None)
    monkeypatch.setattr(stack.REGISTRY, "register", lambda collector: None)
    monkeypatch.setattr(stack, "alert_services", lambda sink, store, bootstrap, api: [])
    monkeypatch.setattr(stack, "run_services", lambda app, services, settings: ran.append(1))
    assert cli.main(["up", "--demo", "--json"]) == 0
    doc = _json(capsys.readouterr().out)
    assert doc["command"] == "up"
    assert doc["api_url"] == "http://127.0.0.1:8000"
    assert doc["kafka_bootstrap"] == "kafka-1:9092"
    assert doc["demo_keys"] == ["tk_a", "tk_b"]
    assert ran == [1]
