"""GET /dashboard (query_api/routes/dashboard.py): the files, their headers, and that the
page's script calls only routes the API has. The store is a mock: serving the page
never touches it (the browser calls the JSON API, tested elsewhere)."""

from __future__ import annotations

import re
from unittest.mock import MagicMock

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from query_api.app import create_app
from query_api.routes.dashboard import asset
from query_api.settings import ApiSettings
from schemas.store import Store

SVG_NAMESPACE = "http://www.w3.org/2000/svg"


@pytest.fixture
def app() -> FastAPI:
    store = MagicMock(spec=Store)
    return create_app(ApiSettings(), store)


@pytest.fixture
def client(app: FastAPI) -> TestClient:
    return TestClient(app)


def _csp(header: str) -> dict[str, list[str]]:
    directives: dict[str, list[str]] = {}
    for part in header.split(";"):
        name, *values = part.split()
        directives[name] = values
    return directives


@pytest.mark.parametrize(
    ("path", "content_type"),
    [
        ("/dashboard", "text/html; charset=utf-8"),
        ("/dashboard/dashboard.js", "text/javascript; charset=utf-8"),
        ("/dashboard/dashboard.css", "text/css; charset=utf-8"),
    ],
)
def test_the_page_and_its_assets_are_served_with_a_self_only_policy(
    client: TestClient, path: str, content_type: str
) -> None:
    response = client.get(path)
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["x-content-type-options"] == "nosniff"
    policy = _csp(response.headers["content-security-policy"])
    assert policy["default-src"] == ["'self'"]
    assert policy["script-src"] == ["'self'"]
    assert policy["style-src"] == ["'self'"]
    assert policy["connect-src"] == ["'self'"]
    # Nothing inline or from elsewhere: only 'self' (and data: for the empty favicon).
    for name, values in policy.items():
        assert "'unsafe-inline'" not in values, name
        assert "'unsafe-eval'" not in values, name
        assert all(v in ("'self'", "'none'", "data:") for v in values), (name, values)


def test_the_page_asks_for_a_key_and_loads_only_its_own_assets(client: TestClient) -> None:
    html = client.get("/dashboard").text
    assert 'type="password"' in html
    references = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert references, "the page references no script or stylesheet"
    for ref in references:
        if ref.startswith("data:"):
            continue
        assert ref.startswith("/dashboard/"), ref
        assert client.get(ref).status_code == 200, ref
    assert "<script>" not in html, "inline scripts are refused by the page's own CSP"
    assert "style=" not in html, "inline styles are refused by the page's own CSP"


def test_nothing_is_loaded_from_another_origin() -> None:
    for name in ("index.html", "dashboard.js", "dashboard.css"):
        text = asset(name).decode()
        urls = set(re.findall(r"(?:https?:)?//[A-Za-z0-9.-]+\.[a-z]{2,}[^\s\"'`)]*", text))
        assert urls <= {"//www.w3.org/2000/svg", SVG_NAMESPACE}, (name, urls)
        assert "@import" not in text, name
        assert "@font-face" not in text, name


def test_the_script_calls_only_routes_the_api_has(app: FastAPI) -> None:
    script = asset("dashboard.js").decode()
    block = re.search(r"const ENDPOINTS = \{(.*?)\};", script, re.S)
    assert block, "dashboard.js lost its ENDPOINTS table"
    endpoints = re.findall(r'"(/[^"]*)"', block.group(1))
    assert len(endpoints) >= 6
    # Every JSON route is in the OpenAPI document (only the dashboard itself is not).
    get_routes = {path for path, ops in app.openapi()["paths"].items() if "get" in ops}
    assert "/api/v1/account/usage" in get_routes
    assert set(endpoints) <= get_routes, set(endpoints) - get_routes
    # Every fetch goes through ENDPOINTS: no path literal elsewhere in the script.
    outside = script.replace(block.group(0), "")
    assert not re.findall(r"[\"'`]/(?:api|readyz|healthz)[^\"'`]*", outside)


def test_every_element_the_script_fills_is_on_the_page() -> None:
    script = asset("dashboard.js").decode()
    html = asset("index.html").decode()
    ids = set(re.findall(r'id="([^"]+)"', html))
    used = set(re.findall(r"(?:el|setText)\(\"([a-z-]+)\"", script))
    used |= {f"{p}-{s}" for p in ("session", "weekly") for s in ("gauge", "used-percentage")}
    assert used, "found no element lookups in dashboard.js"
    assert used <= ids, used - ids


def test_every_number_has_a_stable_test_id() -> None:
    html = asset("index.html").decode()
    testids = set(re.findall(r'data-testid="([^"]+)"', html))
    assert {
        "session-used-percentage",
        "session-resets-at",
        "weekly-used-percentage",
        "weekly-resets-at",
        "plan",
        "streams-active",
        "streams-max",
        "requests-today",
        "requests-this-week",
        "requests-this-month",
        "limit-per-minute",
        "limit-remaining",
        "data-delay",
        "chart-minute-total-requests",
        "chart-hour-total-requests",
        "top-accounts",
        "ready-status",
    } <= testids


def test_the_dashboard_is_not_in_the_openapi_document(app: FastAPI) -> None:
    assert not [p for p in app.openapi()["paths"] if p.startswith("/dashboard")]
