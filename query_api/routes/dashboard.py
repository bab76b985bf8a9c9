"""GET /dashboard: a usage dashboard in the browser, on top of the public JSON API.

One static page (query_api/dashboard/: HTML, CSS, vanilla JS drawing inline SVG)
that calls the API from the browser with the key its user types in, or passes in the
URL fragment (`/dashboard#key=...`, which never reaches the server or its logs). The
server only hands out the files: it sees no key and keeps no state for the page.
Nothing is loaded from elsewhere (the page must work offline), so the Content-Security-
Policy allows this origin only. Kept out of the OpenAPI document: it is not JSON API.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, Response

router = APIRouter(tags=["dashboard"], include_in_schema=False)

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
}

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        # data: for the empty favicon, which keeps browsers from asking for /favicon.ico.
        "img-src 'self' data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    # Small files that change with each release: revalidate rather than serve stale.
    "Cache-Control": "no-cache",
}


@cache
def asset(name: str) -> bytes:
    """A file of the page, read once from the installed package."""
    return (resources.files("query_api") / "dashboard" / name).read_bytes()


def _serve(name: str) -> Response:
    return Response(asset(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)


@router.get("/dashboard")
async def dashboard() -> Response:
    return _serve("index.html")


@router.get("/dashboard/dashboard.js")
async def dashboard_js() -> Response:
    return _serve("dashboard.js")


@router.get("/dashboard/dashboard.css")
async def dashboard_css() -> Response:
    return _serve("dashboard.css")
