"""`tally accounts|keys`: parsing, output, errors and backend choice, without a store."""

from __future__ import annotations

import argparse
import io
import json
from typing import Any

import httpx
import pytest

from deploy import admin_backend, admin_cli
from deploy.admin_backend import Backend, HttpBackend
from deploy.admin_cli import SHOWN_ONCE, choose_backend, execute, fields, table
from deploy.admin_store import store_unavailable_message
from deploy.cli import parser
from deploy.exceptions import AdminCliError

KEY = "tly_3f9c2a7b1d04_" + "Q" * 32
CREATED = "2026-02-01T09:30:00.000Z"


class FakeBackend:
    """Records calls; answers like the admin API's `data`."""

    description = "a fake"

    def __init__(self, fail: AdminCliError | None = None) -> None:
        self.calls: list[tuple[str, tuple[Any, ...]]] = []
        self.fail = fail
        self.closed = False

    def _record(self, name: str, *args: Any) -> None:
        self.calls.append((name, args))
        if self.fail is not None:
            raise self.fail

    def create_account(self, account_id: str, plan: str | None) -> dict[str, Any]:
        self._record("create_account", account_id, plan)
        return {"id": account_id, "plan": plan or "free", "api_key": KEY}

    def list_accounts(self) -> list[dict[str, Any]]:
        self._record("list_accounts")
        return [
            {"id": "a", "plan": "pro", "created_at": CREATED},
            {"id": "longer-account-id", "plan": "max", "created_at": CREATED},
        ]

    def get_account(self, account_id: str) -> dict[str, Any]:
        self._record("get_account", account_id)
        return {"id": account_id, "plan": "pro", "created_at": CREATED}

    def set_plan(self, account_id: str, plan: str) -> dict[str, Any]:
        self._record("set_plan", account_id, plan)
        return {"id": account_id, "plan": plan}

    def create_key(self, account_id: str | None, ingest: bool = False) -> dict[str, Any]:
        if ingest:
            self._record("create_key", account_id, ingest)
        else:
            self._record("create_key", account_id)
        return {
            "key_prefix": "3f9c2a7b1d04",
            "api_key": KEY,
            "account": account_id,
            "admin": account_id is None and not ingest,
            "ingest": ingest,
        }

    def list_keys(self, account_id: str | None) -> list[dict[str, Any]]:
        self._record("list_keys", account_id)
        return [
            {
                "key_prefix": "3f9c2a7b1d04",
                "account": "acme",
                "admin": False,
                "created_at": CREATED,
                "revoked_at": None,
            },
            {
                "key_prefix": "aaaaaaaaaaaa",
                "account": None,
                "admin": True,
                "created_at": CREATED,
                "revoked_at": "2026-02-02T00:00:00.000Z",
            },
        ]

    def revoke_key(self, key_prefix: str) -> dict[str, Any]:
        self._record("revoke_key", key_prefix)
        return {"key_prefix": key_prefix, "revoked": True}

    def close(self) -> None:
        self.closed = True


def run(argv: list[str], backend: FakeBackend | None = None) -> tuple[int, str, str, FakeBackend]:
    backend = backend or FakeBackend()
    args = parser().parse_args(argv)
    out, err = io.StringIO(), io.StringIO()
    code = execute(args, backend, out, err)
    return code, out.getvalue(), err.getvalue(), backend


# -- parsing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "call"),
    [
        (["accounts", "create", "acme"], ("create_account", ("acme", None))),
        (["accounts", "create", "acme", "--plan", "pro"], ("create_account", ("acme", "pro"))),
        (["accounts", "list"], ("list_accounts", ())),
        (["accounts", "show", "a.b:c_d-e"], ("get_account", ("a.b:c_d-e",))),
        (["accounts", "set-plan", "acme", "max"], ("set_plan", ("acme", "max"))),
        (["keys", "create", "--account", "acme"], ("create_key", ("acme",))),
        (["keys", "create", "--admin"], ("create_key", (None,))),
        (["keys", "create", "--ingest"], ("create_key", (None, True))),
        (["keys", "list"], ("list_keys", (None,))),
        (["keys", "list", "--account", "acme"], ("list_keys", ("acme",))),
        (["keys", "revoke", "3f9c2a7b1d04"], ("revoke_key", ("3f9c2a7b1d04",))),
    ],
)
def test_each_command_calls_its_operation(argv: list[str], call: tuple[str, Any]) -> None:
    for extra in ([], ["--json"]):
        code, _, _, backend = run(argv + extra)
        assert code == 0
        assert backend.calls == [call]


def test_every_command_takes_the_common_options() -> None:
    for argv in (
        ["accounts", "create", "x"],
        ["accounts", "list"],
        ["accounts", "show", "x"],
        ["accounts", "set-plan", "x", "pro"],
        ["keys", "create", "--admin"],
        ["keys", "list"],
        ["keys", "revoke", "p"],
    ):
        args = parser().parse_args([*argv, "--json", "--admin-key", "k", "--api-url", "http://h"])
        assert args.json is True
        assert args.admin_key == "k"
        assert args.api_url == "http://h"
        assert args.run is admin_cli.run


@pytest.mark.parametrize(
    "argv",
    [
        ["accounts"],
        ["keys"],
        ["accounts", "create"],
        ["accounts", "create", "has space"],
        ["accounts", "create", "x" * 129],
        ["accounts", "create", "acme\n"],
        ["accounts", "set-plan", "acme"],
        ["keys", "create"],
        ["keys", "create", "--admin", "--account", "acme"],
        ["keys", "create", "--account", "bad/id"],
        ["keys", "revoke"],
    ],
)
def test_bad_arguments_are_usage_errors(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(argv)
    assert exited.value.code == 2
    assert "usage: tally" in capsys.readouterr().err


# -- output -----------------------------------------------------------------------------


def test_table_aligns_columns() -> None:
    text = table([["a", "pro"], ["longer-id", "max"]], ["ID", "PLAN"])
    assert text.splitlines() == ["ID         PLAN", "a          pro", "longer-id  max"]


def test_fields_align_labels() -> None:
    assert fields([("id", "a"), ("plan", "pro")]).splitlines() == ["id    a", "plan  pro"]


def test_created_account_prints_the_key_once_with_a_warning() -> None:
    code, out, err, _ = run(["accounts", "create", "acme", "--plan", "pro"])
    assert code == 0
    assert out.count(KEY) == 1
    assert "account     acme" in out
    assert "key prefix  3f9c2a7b1d04" in out
    assert "shown once" in err
    assert KEY not in err


def test_created_key_json_is_the_api_data_and_warns_on_stderr() -> None:
    code, out, err, _ = run(["keys", "create", "--account", "acme", "--json"])
    assert code == 0
    assert json.loads(out) == {
        "key_prefix": "3f9c2a7b1d04",
        "api_key": KEY,
        "account": "acme",
        "admin": False,
        "ingest": False,
    }
    assert err.strip() == SHOWN_ONCE


def test_admin_key_output() -> None:
    _, out, err, _ = run(["keys", "create", "--admin"])
    lines = out.splitlines()
    assert "account     -" in lines
    assert "admin       yes" in lines
    assert "shown once" in err


def test_accounts_list_is_a_table() -> None:
    _, out, _, _ = run(["accounts", "list"])
    assert out.splitlines() == [
        "ID                 PLAN  CREATED",
        f"a                  pro   {CREATED}",
        f"longer-account-id  max   {CREATED}",
    ]


def test_accounts_list_json_is_a_list() -> None:
    _, out, err, _ = run(["accounts", "list", "--json"])
    assert [a["id"] for a in json.loads(out)] == ["a", "longer-account-id"]
    assert err == ""


def test_empty_lists_say_so() -> None:
    class Empty(FakeBackend):
        def list_accounts(self) -> list[dict[str, Any]]:
            return []

        def list_keys(self, account_id: str | None) -> list[dict[str, Any]]:
            return []

    assert "no accounts yet" in run(["accounts", "list"], Empty())[1]
    assert run(["keys", "list"], Empty())[1].strip() == "no keys"
    assert json.loads(run(["keys", "list", "--json"], Empty())[1]) == []


def test_keys_list_shows_dashes_for_no_account_and_not_revoked() -> None:
    _, out, _, _ = run(["keys", "list"])
    header, first, second = out.splitlines()
    assert header.split() == ["PREFIX", "ACCOUNT", "ADMIN", "CREATED", "REVOKED"]
    assert first.split() == ["3f9c2a7b1d04", "acme", "no", CREATED, "-"]
    assert second.split() == ["aaaaaaaaaaaa", "-", "yes", CREATED, "2026-02-02T00:00:00.000Z"]
    assert KEY not in out


def test_show_set_plan_and_revoke_output() -> None:
    assert run(["accounts", "show", "acme"])[1].splitlines() == [
        "account  acme",
        "plan     pro",
        f"created  {CREATED}",
    ]
    assert run(["accounts", "set-plan", "acme", "max"])[1].strip() == (
        "account acme is now on plan max"
    )
    assert "revoked key 3f9c2a7b1d04" in run(["keys", "revoke", "3f9c2a7b1d04"])[1]
    assert json.loads(run(["keys", "revoke", "3f9c2a7b1d04", "--json"])[1]) == {
        "key_prefix": "3f9c2a7b1d04",
        "revoked": True,
    }


# -- errors -----------------------------------------------------------------------------


def test_refusals_are_one_line_with_what_to_do() -> None:
    fail = AdminCliError("no account 'nobody'", status=404)
    code, out, err, _ = run(["accounts", "show", "nobody"], FakeBackend(fail))
    assert code == 1
    assert out == ""
    assert err == "tally: no account 'nobody'; see `tally accounts list`\n"

    fail = AdminCliError("account 'acme' exists already", status=409)
    code, _, err, _ = run(["accounts", "create", "acme", "--json"], FakeBackend(fail))
    assert code == 1
    assert err.count("\n") == 1
    assert "pick another id" in err


def test_unavailable_backend_exits_2() -> None:
    fail = AdminCliError("the admin API did not answer", exit_code=2)
    code, _, err, _ = run(["keys", "list"], FakeBackend(fail))
    assert code == 2
    assert err == "tally: the admin API did not answer\n"


# -- choosing the backend ---------------------------------------------------------------


def _args(*argv: str) -> argparse.Namespace:
    return parser().parse_args(["accounts", "list", *argv])


def _no_store(api_url: str, api_up: bool) -> Backend:
    raise AssertionError("the store must not be opened")


def test_the_api_is_used_when_it_answers_and_a_key_is_set() -> None:
    probed: list[str] = []

    def probe(url: str) -> bool:
        probed.append(url)
        return True

    backend, how = choose_backend(
        _args(), {"TALLY_ADMIN_KEY": "k" * 24, "TALLY_API_URL": "http://api:9/"}, probe, _no_store
    )
    assert isinstance(backend, HttpBackend)
    assert probed == ["http://api:9"]
    assert how == "tally: using the admin API at http://api:9"
    backend.close()

    # Flags win over the environment.
    backend, how = choose_backend(
        _args("--admin-key", "x", "--api-url", "http://other:1"), {}, probe, _no_store
    )
    assert isinstance(backend, HttpBackend)
    assert "http://other:1" in how
    backend.close()


@pytest.mark.parametrize(
    ("api_up", "environ", "reason"),
    [
        (False, {"TALLY_ADMIN_KEY": "k" * 24}, "no API answers at http://127.0.0.1:8000"),
        (True, {}, "the API answers but no admin key was given"),
    ],
)
def test_the_store_is_used_otherwise(api_up: bool, environ: dict[str, str], reason: str) -> None:
    opened: list[tuple[str, bool]] = []
    fake = FakeBackend()

    def opener(api_url: str, up: bool) -> Backend:
        opened.append((api_url, up))
        return fake

    backend, how = choose_backend(_args(), environ, lambda _: api_up, opener)
    assert backend is fake
    assert opened == [("http://127.0.0.1:8000", api_up)]
    assert how == f"tally: using a fake: {reason}"


def test_a_held_store_says_what_happened_and_what_to_do() -> None:
    down = store_unavailable_message("chdb:///d", "http://127.0.0.1:8000", False, "x", held=True)
    assert "held by another process" in down
    assert "no Tally API answers at http://127.0.0.1:8000" in down
    assert "tally up" in down
    assert "TALLY_ADMIN_KEY" in down
    assert "\n" not in down

    up = store_unavailable_message("chdb:///d", "http://127.0.0.1:8000", True, "x", held=True)
    assert "no admin key was given" in up
    assert "--admin-key" in up

    other = store_unavailable_message(
        "http://u:secret@ch:8123/db", "http://a", False, "refused", held=False
    )
    assert "secret" not in other
    assert "refused" in other
    assert "TALLY_CLICKHOUSE_URL" in other


# -- the HTTP backend, against a mock transport -----------------------------------------


def _http(handler: Any) -> HttpBackend:
    return HttpBackend("http://api", "admin-key", transport=httpx.MockTransport(handler))


def test_http_backend_sends_the_key_and_pages_through_accounts() -> None:
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        after = request.url.params.get("after", "")
        if not after:
            return httpx.Response(200, json={"data": [{"id": "a"}], "meta": {"next_after": "a"}})
        return httpx.Response(200, json={"data": [{"id": "b"}], "meta": {"next_after": None}})

    backend = _http(handler)
    assert [a["id"] for a in backend.list_accounts()] == ["a", "b"]
    assert all(r.headers["x-api-key"] == "admin-key" for r in seen)
    assert [r.url.params.get("after") for r in seen] == ["", "a"]
    assert all(r.url.path == "/api/v1/admin/accounts" for r in seen)


def test_http_backend_requests() -> None:
    seen: list[tuple[str, str, Any]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.raw_path.decode(), body))
        return httpx.Response(200, json={"data": {}})

    backend = _http(handler)
    backend.create_account("acme", None)
    backend.create_account("acme", "pro")
    backend.get_account("..")
    backend.set_plan("a:b", "max")
    backend.create_key("acme")
    backend.create_key(None)
    backend.create_key(None, ingest=True)
    backend.list_keys("acme")
    backend.revoke_key("3f9c2a7b1d04")
    assert seen == [
        ("POST", "/api/v1/admin/accounts", {"id": "acme"}),
        ("POST", "/api/v1/admin/accounts", {"id": "acme", "plan": "pro"}),
        ("GET", "/api/v1/admin/accounts/%2E%2E", None),
        ("PUT", "/api/v1/admin/accounts/a%3Ab", {"plan": "max"}),
        ("POST", "/api/v1/admin/keys", {"account": "acme"}),
        ("POST", "/api/v1/admin/keys", {"admin": True}),
        ("POST", "/api/v1/admin/keys", {"ingest": True}),
        ("GET", "/api/v1/admin/keys?account=acme", None),
        ("DELETE", "/api/v1/admin/keys/3f9c2a7b1d04", None),
    ]


def _envelope(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "docs": "/docs"}}


@pytest.mark.parametrize(
    ("status", "body", "exit_code", "says"),
    [
        (404, _envelope("not_found", "no account 'x'"), 1, "no account 'x'"),
        (409, _envelope("conflict", "exists already"), 1, "exists already"),
        (401, _envelope("unauthorized", "Invalid"), 2, "refused the admin key"),
        (403, _envelope("forbidden", "no"), 2, "an account key, not an admin key"),
        (500, None, 1, "answered 500"),
    ],
)
def test_http_backend_errors(status: int, body: Any, exit_code: int, says: str) -> None:
    backend = _http(lambda _: httpx.Response(status, json=body))
    with pytest.raises(AdminCliError) as raised:
        backend.get_account("x")
    assert raised.value.exit_code == exit_code
    assert raised.value.status == status
    assert says in raised.value.message


def test_http_backend_unreachable_or_not_tally() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(AdminCliError) as raised:
        _http(refuse).list_keys(None)
    assert raised.value.exit_code == 2
    assert "did not answer" in raised.value.message

    with pytest.raises(AdminCliError) as raised:
        _http(lambda _: httpx.Response(200, text="<html>")).list_keys(None)
    assert raised.value.exit_code == 2
    assert "TALLY_API_URL" in raised.value.message


def test_nothing_listens_means_no_api() -> None:
    assert admin_backend.api_answers("http://127.0.0.1:1", timeout_s=0.5) is False
