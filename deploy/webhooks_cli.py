"""`tally webhooks create|list|delete|test|deliveries`: webhook endpoints, through the admin API.

Only through a running API (TALLY_API_URL, TALLY_ADMIN_KEY): the signing secret is
encrypted with the key material of the processes that deliver (docs/alerts.md),
and the API is where that is configured. `--json` prints the API's `data`.
Exit codes: 0 done, 1 refused (404, 422), 2 the API is unreachable or refused the key.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from typing import Any, TextIO
from urllib.parse import quote

import httpx

from deploy.admin_backend import answer_json, error_message
from deploy.exceptions import EXIT_REFUSED, EXIT_UNAVAILABLE, AdminCliError

DEFAULT_API_URL = "http://127.0.0.1:8000"
EVENTS = ("usage.threshold.crossed", "usage.threshold.projected")


class WebhooksCliError(AdminCliError):
    """`tally webhooks` could not do what was asked (an operator error: its message says
    what to do); `exit_code` as AdminCliError's."""


def call(
    args: argparse.Namespace,
    method: str,
    path: str,
    body: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> Any:
    env = os.environ if environ is None else environ
    api_url = (args.api_url or env.get("TALLY_API_URL") or DEFAULT_API_URL).rstrip("/")
    key = args.admin_key or env.get("TALLY_ADMIN_KEY")
    if not key:
        raise WebhooksCliError(
            "set TALLY_ADMIN_KEY (or --admin-key) to an admin key of the API", EXIT_UNAVAILABLE
        )
    try:
        with httpx.Client(
            base_url=api_url,
            headers={"X-API-Key": key, "User-Agent": "tally-cli"},
            timeout=60.0,
            transport=transport,
        ) as client:
            response = client.request(method, "/api/v1/admin/webhooks" + path, json=body)
    except httpx.HTTPError as exc:
        raise WebhooksCliError(
            f"the admin API at {api_url} did not answer ({exc}); start the stack "
            "(`tally up`) or set TALLY_API_URL",
            EXIT_UNAVAILABLE,
        ) from None
    doc = answer_json(response)
    if response.is_error:
        code = EXIT_UNAVAILABLE if response.status_code in (401, 403) else EXIT_REFUSED
        raise WebhooksCliError(error_message(response, doc), code)
    if not isinstance(doc, dict) or "data" not in doc:
        raise WebhooksCliError(
            f"{api_url} did not answer like a Tally API; check TALLY_API_URL", EXIT_UNAVAILABLE
        )
    return doc["data"]


def _segment(value: str) -> str:
    return quote(value, safe="").replace(".", "%2E")


def _text(args: argparse.Namespace, data: Any) -> str:
    action = args.action
    if action == "create":
        return (
            f"endpoint {data['id']} -> {data['url']} ({', '.join(data['events'])}; "
            f"account {data['account'] or 'all'})\nsecret (shown once): {data['secret']}"
        )
    if action == "list":
        rows = [
            f"{e['id']}  {e['url']}  {','.join(e['events'])}  {e['account'] or '*'}" for e in data
        ]
        return "\n".join(rows) or "no webhook endpoints"
    if action == "delete":
        return f"deleted {data['id']}"
    if action == "test":
        outcome = "delivered" if data["delivered"] else "NOT delivered"
        detail = f" ({data['error']})" if data["error"] else ""
        return (
            f"test {data['id']}: {outcome}, status {data['status_code']}, "
            f"{data['latency_ms']:.1f} ms{detail}"
        )
    lines = []
    for d in data:
        last = d["log"][0] if d["log"] else None
        latency = f"{last['latency_ms']:.1f} ms" if last else "-"
        lines.append(
            f"{d['id']}  {d['event_type']}  {d['status']}  attempts {d['attempts']}  "
            f"last {d['last_status_code']} {latency}"
        )
    return "\n".join(lines) or "no deliveries"


def execute(
    args: argparse.Namespace,
    out: TextIO,
    environ: Mapping[str, str] | None = None,
    transport: httpx.BaseTransport | None = None,
) -> int:
    action = args.action
    if action == "create":
        body = {"url": args.url, "events": args.events or [EVENTS[0]], "account": args.account}
        data = call(args, "POST", "", body, environ, transport)
    elif action == "list":
        data = call(args, "GET", "", None, environ, transport)
    elif action == "delete":
        data = call(args, "DELETE", f"/{_segment(args.id)}", None, environ, transport)
    elif action == "test":
        data = call(args, "POST", f"/{_segment(args.id)}/test", None, environ, transport)
    else:
        path = f"/{_segment(args.id)}/deliveries?limit={args.limit}"
        data = call(args, "GET", path, None, environ, transport)
    print(json.dumps(data) if args.json else _text(args, data), file=out, flush=True)
    if action == "test" and not data["delivered"]:
        return EXIT_REFUSED
    return 0


def run(args: argparse.Namespace) -> int:
    try:
        return execute(args, sys.stdout)
    except WebhooksCliError as exc:
        print(f"tally: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code


def register(sub: Any) -> None:
    """Add `webhooks` to the `tally` parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="machine output: the API's `data`")
    common.add_argument(
        "--admin-key", metavar="KEY", help="admin key (default $TALLY_ADMIN_KEY; prefer it)"
    )
    common.add_argument(
        "--api-url", metavar="URL", help=f"the API (default $TALLY_API_URL or {DEFAULT_API_URL})"
    )
    hooks = sub.add_parser(
        "webhooks",
        help="webhook endpoints for alerts (Standard Webhooks), through the admin API",
    )
    actions = hooks.add_subparsers(dest="action", required=True, metavar="ACTION")

    def leaf(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name, parents=[common], help=help_text, description=help_text
        )
        parser.set_defaults(run=run)
        return parser

    create = leaf("create", "add an endpoint; prints its signing secret once")
    create.add_argument("url", help="http(s) URL to POST events to")
    create.add_argument(
        "--event", dest="events", action="append", choices=EVENTS, help="event type (repeatable)"
    )
    create.add_argument("--account", help="only this account's events (default: all)")
    leaf("list", "list endpoints (never their secrets)")
    delete = leaf("delete", "delete an endpoint")
    delete.add_argument("id", help="the endpoint id (whep_...)")
    test = leaf("test", "send a signed webhook.test message now; exit 1 if not delivered")
    test.add_argument("id", help="the endpoint id")
    deliveries = leaf("deliveries", "an endpoint's recent deliveries and their attempts")
    deliveries.add_argument("id", help="the endpoint id")
    deliveries.add_argument("--limit", type=int, default=20, help="how many (20)")
