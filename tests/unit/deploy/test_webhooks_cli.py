"""`tally webhooks` (deploy/webhooks_cli.py) against a stand-in admin API."""

from __future__ import annotations

import io
import json

import httpx
import pytest

from deploy.cli import parser
from deploy.webhooks_cli import EXIT_REFUSED, EXIT_UNAVAILABLE, WebhooksCliError, execute

ENV = {"TALLY_ADMIN_KEY": "k" * 32, "TALLY_API_URL": "http://api"}
ENDPOINT = {
    "id": "whep_1",
    "url": "https://hooks.example.com/t",
    "events": ["usage.threshold.crossed"],
    "account": None,
    "created_at": "2026-12-07T04:44:57.473Z",
}


def api(seen: list[httpx.Request]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        path, method = request.url.path, request.method
        if request.headers["x-api-key"] != ENV["TALLY_ADMIN_KEY"]:
            return httpx.Response(401, json={"error": {"code": "unauthorized", "message": "no"}})
        if (method, path) == ("POST", "/api/v1/admin/webhooks"):
            body = json.loads(request.content)
            return httpx.Response(201, json={"data": {**ENDPOINT, **body, "secret": "whsec_x"}})
        if (method, path) == ("GET", "/api/v1/admin/webhooks"):
            return httpx.Response(200, json={"data": [ENDPOINT]})
        if path == "/api/v1/admin/webhooks/whep_1/test":
            out = {"id": "msg_1", "delivered": False, "status_code": 500, "latency_ms": 3.2}
            return httpx.Response(200, json={"data": {**out, "error": ""}})
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no whep_2"}})

    return httpx.MockTransport(handle)


def run(argv: list[str], seen: list[httpx.Request]) -> tuple[int, str]:
    args = parser().parse_args(argv)
    out = io.StringIO()
    code = execute(args, out, ENV, api(seen))
    return code, out.getvalue()


def test_create_prints_the_secret_once_and_sends_the_body() -> None:
    seen: list[httpx.Request] = []
    code, text = run(
        [
            "webhooks",
            "create",
            "https://hooks.example.com/t",
            "--event",
            "usage.threshold.projected",
            "--account",
            "acme",
        ],
        seen,
    )
    assert code == 0
    assert "whsec_x" in text
    assert json.loads(seen[0].content) == {
        "url": "https://hooks.example.com/t",
        "events": ["usage.threshold.projected"],
        "account": "acme",
    }


def test_json_is_the_apis_data() -> None:
    code, text = run(["webhooks", "list", "--json"], [])
    assert code == 0
    assert json.loads(text) == [ENDPOINT]


def test_a_failed_test_delivery_exits_1() -> None:
    code, text = run(["webhooks", "test", "whep_1"], [])
    assert code == EXIT_REFUSED
    assert "NOT delivered, status 500" in text


def test_refusals_and_a_missing_key() -> None:
    with pytest.raises(WebhooksCliError, match="no whep_2") as refused:
        run(["webhooks", "delete", "whep_2"], [])
    assert refused.value.exit_code == EXIT_REFUSED
    args = parser().parse_args(["webhooks", "list"])
    with pytest.raises(WebhooksCliError, match="TALLY_ADMIN_KEY") as missing:
        execute(args, io.StringIO(), {}, api([]))
    assert missing.value.exit_code == EXIT_UNAVAILABLE
