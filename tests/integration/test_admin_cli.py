"""`tally accounts|keys` against a real store: directly, through a live API, and refused
(exit 2, with what to do) when another process holds the embedded store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from pydantic import SecretStr

from deploy.cli import main
from deploy.processes import free_port
from query_api.app import create_app
from query_api.settings import ApiSettings
from schemas.store import Store

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ADMIN_KEY = "cli-admin-key-for-tests-0123456789"
NOTHING_LISTENS = "http://127.0.0.1:1"


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch, store_url: str, unique_name: str) -> str:
    """The store backend's environment: the session store, a database of our own, no API."""
    for name in ("TALLY_ADMIN_KEY", "TALLY_PLANS", "TALLY_DEFAULT_PLAN", "TALLY_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TALLY_CLICKHOUSE_URL", store_url)
    monkeypatch.setenv("TALLY_CLICKHOUSE_DATABASE", unique_name)
    monkeypatch.setenv("TALLY_API_URL", NOTHING_LISTENS)
    return unique_name


def tally(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def tally_json(capsys: pytest.CaptureFixture[str], *argv: str) -> Any:
    code, out, err = tally(capsys, *argv, "--json")
    assert code == 0, err
    return json.loads(out)


def test_store_backend_administers_accounts_and_keys(
    cli_env: str, store_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = tally(capsys, "accounts", "create", "acme", "--plan", "pro")
    assert code == 0, err
    assert "using the store directly" in err
    assert f"no API answers at {NOTHING_LISTENS}" in err
    assert "shown once" in err
    first_key = next(line.split()[-1] for line in out.splitlines() if line.startswith("api key"))

    created = tally_json(capsys, "accounts", "create", "beta")
    assert created["plan"] == "free"
    assert set(created) == {"id", "plan", "api_key"}

    code, _, err = tally(capsys, "accounts", "create", "acme")
    assert code == 1
    assert "exists already" in err.splitlines()[-1]

    code, _, err = tally(capsys, "accounts", "create", "gamma", "--plan", "gold")
    assert code == 1
    assert "known plans: free, max, pro" in err

    assert [a["id"] for a in tally_json(capsys, "accounts", "list")] == ["acme", "beta"]
    code, out, _ = tally(capsys, "accounts", "list")
    assert out.splitlines()[0].split() == ["ID", "PLAN", "CREATED"]

    assert tally_json(capsys, "accounts", "set-plan", "acme", "max") == {
        "id": "acme",
        "plan": "max",
    }
    assert tally_json(capsys, "accounts", "show", "acme")["plan"] == "max"
    code, _, err = tally(capsys, "accounts", "show", "nobody")
    assert code == 1
    assert "no account 'nobody'" in err

    key = tally_json(capsys, "keys", "create", "--account", "acme")
    admin = tally_json(capsys, "keys", "create", "--admin")
    assert admin["admin"] is True
    assert admin["account"] is None
    listed = tally_json(capsys, "keys", "list", "--account", "acme")
    assert {k["key_prefix"] for k in listed} == {key["key_prefix"], first_key.split("_")[1]}

    assert tally_json(capsys, "keys", "revoke", key["key_prefix"]) == {
        "key_prefix": key["key_prefix"],
        "revoked": True,
    }
    code, _, err = tally(capsys, "keys", "revoke", key["key_prefix"])
    assert code == 1
    assert "tally keys list" in err
    revoked = {k["key_prefix"]: k["revoked_at"] for k in tally_json(capsys, "keys", "list")}
    assert revoked[key["key_prefix"]] is not None
    assert len(revoked) == 4

    # What the CLI wrote is what the API reads: the first key works, the revoked one not.
    store = Store(store_url, cli_env)
    try:
        from query_api.accounts import AccountStore

        accounts = AccountStore(store)
        assert accounts.authenticate(first_key) is not None
        assert accounts.authenticate(key["api_key"]) is None
        found = accounts.authenticate(admin["api_key"])
        assert found is not None
        assert found.admin
    finally:
        store.close()


@pytest.fixture
def live_api(store_url: str, unique_name: str) -> Iterator[str]:
    """The real API on a free port, serving a database of its own."""
    settings = ApiSettings(
        admin_key=SecretStr(ADMIN_KEY), clickhouse_url=store_url, clickhouse_database=unique_name
    )
    store = Store(settings.store_url, settings.store_database)
    store.migrate()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(settings, store), host="127.0.0.1", port=port, log_level="warning"
        )
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive(), "the API thread died"
        assert time.monotonic() < deadline, "the API did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        store.close()


def test_http_backend_through_a_live_api(
    live_api: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("TALLY_API_URL", live_api)
    # The API holds the store; the CLI must not need it.
    monkeypatch.setenv("TALLY_CLICKHOUSE_URL", "http://127.0.0.1:1/unused")
    monkeypatch.delenv("TALLY_ADMIN_KEY", raising=False)

    code, _, err = tally(capsys, "accounts", "list", "--admin-key", "wrong-key")
    assert code == 2
    assert "refused the admin key" in err

    monkeypatch.setenv("TALLY_ADMIN_KEY", ADMIN_KEY)
    code, out, err = tally(capsys, "accounts", "create", "acme", "--plan", "pro", "--json")
    assert code == 0, err
    assert f"using the admin API at {live_api}" in err
    assert "shown once" in err
    account_key = json.loads(out)["api_key"]

    code, _, err = tally(capsys, "accounts", "create", "acme")
    assert code == 1
    assert "exists already" in err

    assert tally_json(capsys, "accounts", "set-plan", "acme", "max")["plan"] == "max"
    assert tally_json(capsys, "accounts", "show", "acme")["plan"] == "max"
    usage = httpx.get(f"{live_api}/api/account/usage", headers={"X-API-Key": account_key})
    assert usage.json()["plan"] == "max"

    assert [a["id"] for a in tally_json(capsys, "accounts", "list")] == ["acme"]
    key = tally_json(capsys, "keys", "create", "--account", "acme")
    assert len(tally_json(capsys, "keys", "list", "--account", "acme")) == 2
    code, out, _ = tally(capsys, "keys", "revoke", key["key_prefix"])
    assert code == 0
    assert key["key_prefix"] in out
    refused = httpx.get(f"{live_api}/api/v1/account/usage", headers={"X-API-Key": key["api_key"]})
    assert refused.status_code == 401

    code, _, err = tally(capsys, "keys", "create", "--account", "nobody")
    assert code == 1
    assert "no account 'nobody'" in err

    # An account key is not an admin key.
    code, _, err = tally(capsys, "keys", "list", "--admin-key", account_key)
    assert code == 2
    assert "not an admin key" in err


HOLDER = textwrap.dedent(
    """
    import sys
    from schemas.store import Store
    store = Store(sys.argv[1], "tally")
    store.migrate()
    print("held", flush=True)
    sys.stdin.read()
    """
)


def test_a_store_held_by_another_process_is_refused_with_advice(tmp_path: Path) -> None:
    url = f"chdb://{tmp_path / 'held'}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("TALLY_")},
        "TALLY_CLICKHOUSE_URL": url,
        "TALLY_API_URL": NOTHING_LISTENS,
        "PYTHONPATH": str(REPO),
    }
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, url],
        cwd=REPO,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        done = subprocess.run(
            [sys.executable, "-m", "deploy.cli", "accounts", "list"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "held by another process" in lines[0]
    assert f"no Tally API answers at {NOTHING_LISTENS}" in lines[0]
    assert "TALLY_ADMIN_KEY" in lines[0]
    assert "tally up" in lines[0]
