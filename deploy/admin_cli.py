"""`tally accounts ...` and `tally keys ...`: administer accounts and API keys.

Two backends, chosen on every run (the one used is named on stderr):

- the admin HTTP API, when `TALLY_API_URL` (default http://127.0.0.1:8000) answers
  `/healthz` and an admin key is at hand (`--admin-key` or `TALLY_ADMIN_KEY`);
- otherwise the store itself, through the same operations the API runs
  (query_api/routes/admin.py), so both answer alike.

The embedded chdb store admits one process: while `tally up` or `tally api` holds
it, the CLI can only go through the API, and says so when it cannot.

`--json` prints the API's `data` (an object, or a list for `list`) and nothing else
on stdout. Exit codes: 0 done; 1 the request was refused (unknown account, id
taken, unknown plan...); 2 no way to reach accounts (API/store/configuration).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, TextIO
from urllib.parse import quote, urlparse

import httpx

from query_api.admin_models import ACCOUNT_ID_PATTERN

if TYPE_CHECKING:
    from pydantic import ValidationError

    from query_api.plans import Plan
    from schemas.store import Store

DEFAULT_API_URL = "http://127.0.0.1:8000"
SHOWN_ONCE = (
    "tally: this API key is shown once and cannot be recovered: store it now "
    "(Tally keeps only its hash)."
)
EXIT_REFUSED = 1
EXIT_UNAVAILABLE = 2
_ACCOUNT_ID = re.compile(ACCOUNT_ID_PATTERN)

Json = dict[str, Any]


class AdminCliError(Exception):
    """One line saying what went wrong and what to do; `status` is the HTTP-like status."""

    def __init__(self, message: str, exit_code: int = EXIT_REFUSED, status: int | None = None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.status = status


class Backend(Protocol):
    """What the commands need; both backends return the admin API's `data` shapes."""

    @property
    def description(self) -> str: ...

    def create_account(self, account_id: str, plan: str | None) -> Json: ...

    def list_accounts(self) -> list[Json]: ...

    def get_account(self, account_id: str) -> Json: ...

    def set_plan(self, account_id: str, plan: str) -> Json: ...

    def create_key(self, account_id: str | None, ingest: bool = False) -> Json: ...

    def list_keys(self, account_id: str | None) -> list[Json]: ...

    def revoke_key(self, key_prefix: str) -> Json: ...

    def close(self) -> None: ...


# -- backend: the admin HTTP API ------------------------------------------------------


def _segment(value: str) -> str:
    # Dots too: a client would otherwise fold an id like ".." out of the path.
    return quote(value, safe="").replace(".", "%2E")


class HttpBackend:
    def __init__(
        self, api_url: str, admin_key: str, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.api_url,
            headers={"X-API-Key": admin_key, "User-Agent": "tally-cli"},
            timeout=30.0,
            transport=transport,
        )

    @property
    def description(self) -> str:
        return f"the admin API at {self.api_url}"

    def _call(
        self,
        method: str,
        path: str,
        body: Json | None = None,
        params: Mapping[str, str | int] | None = None,
    ) -> Json:
        try:
            response = self._client.request(
                method, "/api/v1/admin" + path, json=body, params=params
            )
        except httpx.HTTPError as exc:
            raise AdminCliError(
                f"the admin API at {self.api_url} did not answer ({exc}); check that the "
                "stack runs, or unset TALLY_ADMIN_KEY to work on the store directly",
                EXIT_UNAVAILABLE,
            ) from None
        if response.status_code == 401:
            raise AdminCliError(
                f"the API at {self.api_url} refused the admin key (401); set TALLY_ADMIN_KEY "
                "(or --admin-key) to the TALLY_ADMIN_KEY the API runs with, or to a key from "
                "`tally keys create --admin`",
                EXIT_UNAVAILABLE,
                401,
            )
        if response.status_code == 403:
            raise AdminCliError(
                "the key given is an account key, not an admin key; set TALLY_ADMIN_KEY "
                "(or --admin-key) to an admin key",
                EXIT_UNAVAILABLE,
                403,
            )
        try:
            doc: Any = response.json()
        except ValueError:
            doc = None
        if response.is_error:
            message = f"the API answered {response.status_code}"
            if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
                message = str(doc["error"].get("message", message))
            raise AdminCliError(message, EXIT_REFUSED, response.status_code)
        if not isinstance(doc, dict) or "data" not in doc:
            raise AdminCliError(
                f"{self.api_url} answered {method} {path} with something that is not a Tally "
                "admin response; check TALLY_API_URL",
                EXIT_UNAVAILABLE,
            )
        return doc

    def create_account(self, account_id: str, plan: str | None) -> Json:
        body: Json = {"id": account_id}
        if plan is not None:
            body["plan"] = plan
        data: Json = self._call("POST", "/accounts", body)["data"]
        return data

    def list_accounts(self) -> list[Json]:
        found: list[Json] = []
        after = ""
        while True:
            doc = self._call("GET", "/accounts", params={"limit": 1000, "after": after})
            found.extend(doc["data"])
            after = (doc.get("meta") or {}).get("next_after") or ""
            if not after:
                return found

    def get_account(self, account_id: str) -> Json:
        data: Json = self._call("GET", f"/accounts/{_segment(account_id)}")["data"]
        return data

    def set_plan(self, account_id: str, plan: str) -> Json:
        data: Json = self._call("PUT", f"/accounts/{_segment(account_id)}", {"plan": plan})["data"]
        return data

    def create_key(self, account_id: str | None, ingest: bool = False) -> Json:
        body: Json = {"admin": True} if account_id is None else {"account": account_id}
        if ingest:
            body = {"ingest": True}
        data: Json = self._call("POST", "/keys", body)["data"]
        return data

    def list_keys(self, account_id: str | None) -> list[Json]:
        params = {"account": account_id} if account_id is not None else None
        data: list[Json] = self._call("GET", "/keys", params=params)["data"]
        return data

    def revoke_key(self, key_prefix: str) -> Json:
        data: Json = self._call("DELETE", f"/keys/{_segment(key_prefix)}")["data"]
        return data

    def close(self) -> None:
        self._client.close()


def api_answers(api_url: str, timeout_s: float = 2.0) -> bool:
    """True when a Tally API answers `/healthz` at `api_url`."""
    try:
        response = httpx.get(api_url.rstrip("/") + "/healthz", timeout=timeout_s)
        return response.status_code == 200 and response.json().get("status") == "ok"
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


# -- backend: the store directly -----------------------------------------------------


class StoreBackend:
    """The API's own operations, run in this process against the store."""

    def __init__(self, store: Store, plans: Mapping[str, Plan], default_plan: str) -> None:
        from query_api.accounts import AccountStore

        self.store = store
        self.accounts = AccountStore(store)
        self.plans = plans
        self.default_plan = default_plan

    @property
    def description(self) -> str:
        return f"the store directly ({_redact(self.store.url)}, database {self.store.database})"

    def _do(self, operation: Callable[..., Any], *args: Any) -> Any:
        from query_api.errors import ApiError

        try:
            return operation(*args)
        except ApiError as exc:
            raise AdminCliError(exc.message, EXIT_REFUSED, exc.status) from None

    def create_account(self, account_id: str, plan: str | None) -> Json:
        from pydantic import ValidationError

        from query_api.admin_models import AccountCreateIn
        from query_api.routes.admin import create_account

        try:
            body = AccountCreateIn(id=account_id, plan=plan)
        except ValidationError as exc:
            raise AdminCliError(_validation_message(exc), EXIT_REFUSED, 422) from None
        out = self._do(create_account, self.accounts, self.plans, self.default_plan, body)
        return _dump(out)

    def list_accounts(self) -> list[Json]:
        from query_api.routes.admin import PAGE_MAX, list_accounts

        found: list[Json] = []
        after = ""
        while True:
            page = self._do(list_accounts, self.accounts, PAGE_MAX, after)
            found.extend(_dump(a) for a in page.data)
            if page.meta.next_after is None:
                return found
            after = page.meta.next_after

    def get_account(self, account_id: str) -> Json:
        from query_api.routes.admin import get_account

        return _dump(self._do(get_account, self.accounts, account_id))

    def set_plan(self, account_id: str, plan: str) -> Json:
        from query_api.admin_models import PlanChangeIn
        from query_api.routes.admin import set_plan

        body = PlanChangeIn(plan=plan)
        return _dump(self._do(set_plan, self.accounts, self.plans, account_id, body))

    def create_key(self, account_id: str | None, ingest: bool = False) -> Json:
        from query_api.admin_models import KeyCreateIn
        from query_api.routes.admin import create_key

        body = KeyCreateIn(admin=True) if account_id is None else KeyCreateIn(account=account_id)
        if ingest:
            body = KeyCreateIn(ingest=True)
        return _dump(self._do(create_key, self.accounts, body))

    def list_keys(self, account_id: str | None) -> list[Json]:
        from query_api.routes.admin import list_keys

        return [_dump(k) for k in self._do(list_keys, self.accounts, account_id)]

    def revoke_key(self, key_prefix: str) -> Json:
        from query_api.routes.admin import revoke_key

        return _dump(self._do(revoke_key, self.accounts, key_prefix))

    def close(self) -> None:
        self.store.close()


def _dump(model: Any) -> Json:
    dumped: Json = model.model_dump(mode="json")
    return dumped


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where or 'request'}: {error.get('msg')}")
    return "; ".join(parts)


def _redact(url: str) -> str:
    parsed = urlparse(url)
    if parsed.password:
        return url.replace(f":{parsed.password}@", ":***@")
    return url


@contextlib.contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Capture what native code (chdb) writes to fd 2, e.g. its lock failure."""
    captured: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield captured
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def _held(text: str) -> bool:
    return "Cannot lock file" in text or "already running" in text


def store_unavailable_message(
    store_url: str, api_url: str, api_up: bool, detail: str, held: bool
) -> str:
    """Why the store could not be opened, and what to do instead (one line)."""
    if api_up:
        why = f"the API at {api_url} answers but no admin key was given"
        todo = (
            "set TALLY_ADMIN_KEY (or pass --admin-key) to the admin key the API runs with "
            "(restart it with TALLY_ADMIN_KEY set if it has none)"
        )
    else:
        why = f"no Tally API answers at {api_url}"
        todo = (
            "start the stack (`tally up`, or `tally api`) with TALLY_ADMIN_KEY set and run this "
            "again with the same TALLY_ADMIN_KEY (and TALLY_API_URL if it is elsewhere)"
        )
    if held:
        return (
            f"the embedded store {store_url} is held by another process (a running `tally up`, "
            f"`tally api` or `tally worker`; chdb admits one) and {why}. To fix: {todo}; or stop "
            "the process holding it."
        )
    return (
        f"cannot open the store {_redact(store_url)} ({detail}) and {why}. To fix: check "
        f"TALLY_CLICKHOUSE_URL / TALLY_CLICKHOUSE_DATABASE, or {todo}."
    )


def open_store_backend(api_url: str, api_up: bool) -> StoreBackend:
    from query_api.plans import load_plans
    from query_api.settings import ApiSettings
    from schemas.settings import load
    from schemas.store import Store, StoreError

    settings = load(ApiSettings)
    store_url = settings.store_url
    detail = ""
    with _native_stderr() as native:
        try:
            store = Store(store_url, settings.store_database, settings.clickhouse_cluster or "")
            store.migrate()
        except StoreError as exc:
            store = None
            detail = str(exc.__cause__ or exc)
        except Exception as exc:  # a server that refuses a migration, say
            store = None
            detail = f"{type(exc).__name__}: {exc}"
    noise = "".join(native).strip()
    if store is None:
        held = store_url.startswith("chdb:") and (_held(noise) or _held(detail))
        detail = detail.splitlines()[0] if detail else (noise.splitlines() or ["unknown"])[-1]
        raise AdminCliError(
            store_unavailable_message(store_url, api_url, api_up, detail, held), EXIT_UNAVAILABLE
        )
    if noise:
        print(noise, file=sys.stderr)
    return StoreBackend(store, load_plans(settings.plans), settings.default_plan)


BackendOpener = Callable[[str, bool], Backend]


def choose_backend(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    probe: Callable[[str], bool] = api_answers,
    open_store: BackendOpener = open_store_backend,
) -> tuple[Backend, str]:
    """The backend for this run, and why it was picked (for stderr)."""
    api_url = (args.api_url or environ.get("TALLY_API_URL") or DEFAULT_API_URL).rstrip("/")
    admin_key = args.admin_key or environ.get("TALLY_ADMIN_KEY") or None
    api_up = probe(api_url)
    if api_up and admin_key:
        return HttpBackend(api_url, admin_key), "tally: using the admin API at " + api_url
    backend = open_store(api_url, api_up)
    reason = (
        "the API answers but no admin key was given" if api_up else f"no API answers at {api_url}"
    )
    return backend, f"tally: using {backend.description}: {reason}"


# -- the commands ----------------------------------------------------------------------


@dataclass
class Output:
    """What a command produced: `data` for --json, `text` for people."""

    data: Json | list[Json]
    text: str
    shown_once: bool = False
    hints: dict[int, str] = field(default_factory=dict)


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    """Left-aligned columns, two spaces apart, no trailing blanks."""
    widths = [len(h) for h in header]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [list(header), *rows]
    ]
    return "\n".join(lines)


def fields(pairs: Sequence[tuple[str, str]]) -> str:
    width = max(len(label) for label, _ in pairs)
    return "\n".join(f"{label.ljust(width)}  {value}".rstrip() for label, value in pairs)


def _or_dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def _key_prefix(api_key: str) -> str:
    from query_api.keys import prefix_of

    return prefix_of(api_key) or "-"


def accounts_create(backend: Backend, args: argparse.Namespace) -> Output:
    data = backend.create_account(args.id, args.plan)
    text = fields(
        [
            ("account", data["id"]),
            ("plan", data["plan"]),
            ("key prefix", _key_prefix(data["api_key"])),
            ("api key", data["api_key"]),
        ]
    )
    return Output(data, text, shown_once=True)


def accounts_list(backend: Backend, args: argparse.Namespace) -> Output:
    data = backend.list_accounts()
    if not data:
        return Output(data, "no accounts yet; create one with `tally accounts create ID`")
    rows = [[a["id"], a["plan"], a["created_at"]] for a in data]
    return Output(data, table(rows, ["ID", "PLAN", "CREATED"]))


def accounts_show(backend: Backend, args: argparse.Namespace) -> Output:
    data = backend.get_account(args.id)
    text = fields(
        [("account", data["id"]), ("plan", data["plan"]), ("created", data["created_at"])]
    )
    return Output(data, text)


def accounts_set_plan(backend: Backend, args: argparse.Namespace) -> Output:
    data = backend.set_plan(args.id, args.plan)
    return Output(data, f"account {data['id']} is now on plan {data['plan']}")


def keys_create(backend: Backend, args: argparse.Namespace) -> Output:
    data = backend.create_key(args.account, ingest=args.ingest)
    rows = [
        ("key prefix", data["key_prefix"]),
        ("account", _or_dash(data.get("account"))),
        ("admin", "yes" if data.get("admin") else "no"),
    ]
    if data.get("ingest"):
        rows.append(("ingest", "yes: sends events (POST /api/v1/events), reads nothing"))
    text = fields([*rows, ("api key", data["api_key"])])
    return Output(data, text, shown_once=True)


def keys_list(backend: Backend, args: argparse.Namespace) -> Output:
    data = backend.list_keys(args.account)
    if not data:
        return Output(data, "no keys")
    rows = [
        [
            k["key_prefix"],
            _or_dash(k.get("account")),
            "yes" if k.get("admin") else ("no (ingest)" if k.get("ingest") else "no"),
            k["created_at"],
            _or_dash(k.get("revoked_at")),
        ]
        for k in data
    ]
    return Output(data, table(rows, ["PREFIX", "ACCOUNT", "ADMIN", "CREATED", "REVOKED"]))


def keys_revoke(backend: Backend, args: argparse.Namespace) -> Output:
    data = backend.revoke_key(args.prefix)
    return Output(data, f"revoked key {data['key_prefix']}: it is refused from the next request on")


# What to do after a refusal, by command and status.
HINTS: dict[str, dict[int, str]] = {
    "accounts create": {409: "pick another id, or see `tally accounts show ID`"},
    "accounts show": {404: "see `tally accounts list`"},
    "accounts set-plan": {404: "see `tally accounts list`"},
    "keys create": {404: "create the account first with `tally accounts create ID`"},
    "keys list": {404: "see `tally accounts list`"},
    "keys revoke": {404: "see `tally keys list` for the prefixes of active keys"},
}


def execute(args: argparse.Namespace, backend: Backend, out: TextIO, err: TextIO) -> int:
    """Run the parsed command on `backend`; print the result or a one-line error."""
    try:
        result: Output = args.admin_command(backend, args)
    except AdminCliError as exc:
        message = exc.message
        hint = HINTS.get(args.admin_name, {}).get(exc.status or 0)
        if hint:
            message = f"{message}; {hint}"
        print(f"tally: {message}", file=err)
        return exc.exit_code
    if args.json:
        print(json.dumps(result.data, indent=2), file=out)
    else:
        print(result.text, file=out)
    if result.shown_once:
        print(SHOWN_ONCE, file=err)
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        backend, how = choose_backend(args, os.environ)
    except AdminCliError as exc:
        print(f"tally: {exc.message}", file=sys.stderr)
        return exc.exit_code
    print(how, file=sys.stderr)
    try:
        return execute(args, backend, sys.stdout, sys.stderr)
    finally:
        backend.close()


# -- the parser ------------------------------------------------------------------------


def account_id(value: str) -> str:
    if not _ACCOUNT_ID.fullmatch(value):
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an account id: 1-128 characters of A-Z a-z 0-9 _ . : -"
        )
    return value


def _common() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json", action="store_true", help="machine output: the admin API's JSON `data`"
    )
    common.add_argument(
        "--admin-key",
        metavar="KEY",
        help="admin key for the API (default $TALLY_ADMIN_KEY; prefer the variable, "
        "a key on the command line lands in shell history)",
    )
    common.add_argument(
        "--api-url",
        metavar="URL",
        help=f"the API to administer (default $TALLY_API_URL or {DEFAULT_API_URL})",
    )
    return common


_BACKENDS = (
    "Goes through the admin API when it answers at TALLY_API_URL and TALLY_ADMIN_KEY "
    "is set; otherwise opens the store directly."
)


def register(sub: Any) -> None:
    """Add `accounts` and `keys` to the `tally` parser's subparsers."""
    common = _common()

    def leaf(
        group: Any,
        command: str,
        name: str,
        handler: Callable[[Backend, argparse.Namespace], Output],
        help_text: str,
    ) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(
            name, parents=[common], help=help_text, description=f"{help_text}. {_BACKENDS}"
        )
        parser.set_defaults(run=run, admin_command=handler, admin_name=f"{command} {name}")
        return parser

    accounts = sub.add_parser(
        "accounts", help="create, list and change accounts", description=_BACKENDS
    )
    acc = accounts.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = leaf(
        acc, "accounts", "create", accounts_create, "create an account and its first API key"
    )
    create.add_argument("id", type=account_id, help="the account id (the events' subject)")
    create.add_argument("--plan", help="its plan (default $TALLY_DEFAULT_PLAN, i.e. free)")
    leaf(acc, "accounts", "list", accounts_list, "list every account")
    show = leaf(acc, "accounts", "show", accounts_show, "show one account")
    show.add_argument("id", type=account_id, help="the account id")
    set_plan = leaf(acc, "accounts", "set-plan", accounts_set_plan, "change an account's plan")
    set_plan.add_argument("id", type=account_id, help="the account id")
    set_plan.add_argument("plan", help="the new plan")

    keys = sub.add_parser("keys", help="create, list and revoke API keys", description=_BACKENDS)
    ks = keys.add_subparsers(dest="action", required=True, metavar="ACTION")
    kcreate = leaf(ks, "keys", "create", keys_create, "create an API key (shown once)")
    owner = kcreate.add_mutually_exclusive_group(required=True)
    owner.add_argument("--account", type=account_id, metavar="ID", help="a key of this account")
    owner.add_argument("--admin", action="store_true", help="an admin key")
    owner.add_argument(
        "--ingest", action="store_true", help="an ingest key: sends events, reads nothing"
    )
    klist = leaf(ks, "keys", "list", keys_list, "list keys (prefixes, never the keys)")
    klist.add_argument("--account", type=account_id, metavar="ID", help="only this account's")
    revoke = leaf(
        ks, "keys", "revoke", keys_revoke, "revoke a key: refused from the next request on"
    )
    revoke.add_argument("prefix", help="the key's prefix (see `tally keys list`)")
