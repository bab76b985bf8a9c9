"""`tally accounts ...` and `tally keys ...`: administer accounts and API keys.

Two backends, chosen on every run (the one used is named on stderr):

- the admin HTTP API, when `TALLY_API_URL` (default http://127.0.0.1:8000) answers
  `/healthz` and an admin key is at hand (`--admin-key` or `TALLY_ADMIN_KEY`);
- otherwise the store itself, through the same operations the API runs
  (deploy/admin_store.py), so both answer alike.

The embedded chdb store admits one process: while `tally up` or `tally api` holds
it, the CLI can only go through the API, and says so when it cannot.

`--json` prints the API's `data` (an object, or a list for `list`) and nothing else
on stdout. Exit codes: 0 done; 1 the request was refused (unknown account, id
taken, unknown plan...); 2 no way to reach accounts (API/store/configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from deploy.admin_backend import (
    DEFAULT_API_URL,
    Backend,
    HttpBackend,
    Json,
    api_answers,
    api_target,
)
from deploy.admin_store import open_store_backend
from deploy.exceptions import AdminCliError
from query_api.admin_models import ACCOUNT_ID_PATTERN

SHOWN_ONCE = (
    "tally: this API key is shown once and cannot be recovered: store it now "
    "(Tally keeps only its hash)."
)
_ACCOUNT_ID = re.compile(ACCOUNT_ID_PATTERN)

BackendOpener = Callable[[str, bool], Backend]


def choose_backend(
    args: argparse.Namespace,
    environ: Mapping[str, str],
    probe: Callable[[str], bool] = api_answers,
    open_store: BackendOpener = open_store_backend,
) -> tuple[Backend, str]:
    """The backend for this run, and why it was picked (for stderr)."""
    api = api_target(args.api_url, args.admin_key, environ, probe)
    if api.up and api.admin_key is not None:
        return HttpBackend(api.url, api.admin_key), "tally: using the admin API at " + api.url
    backend = open_store(api.url, api.up)
    return backend, f"tally: using {backend.description}: {api.why_not}"


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
