"""What the API checks before it reads a request body: the body's size, and, on the
admin routes, the caller.

FastAPI reads and parses a route's whole body before it resolves the route's
dependencies (the key check among them), so without this layer anyone could make
the API buffer and parse any amount of JSON before being told 401. Here:

- A body over `max_body_bytes` is refused with 413 `payload_too_large`: by its
  Content-Length before a byte is read, and, for a chunked (or under-declared) body,
  as soon as the bytes received pass the limit; nothing past the limit is read.
- A request with a body to an admin route, or to POST /api/v1/events, has its key
  checked (and its right to the route, 403) before the app runs; it is refused unread.
  The caller found is left on the request's state, so the route's own dependency
  neither checks nor charges it twice.
- POST /api/v1/events has a limit of its own, `ingest_max_body_bytes` (bodies of
  events); every other route `max_body_bytes`.

A new body route gets the size limit, and joins `PRE_AUTH` if it authenticates the
way `deps.principal` does.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import NamedTuple

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from query_api.accounts import Principal
from query_api.deps import Services, admin_principal, authenticate, ingest_principal
from query_api.errors import ApiError, error_response, payload_too_large

EVENTS_PATH = "/api/v1/events"


class PreAuth(NamedTuple):
    """Callers of paths under `prefix` are checked before their body is read."""

    prefix: str
    check: Callable[[Principal], Awaitable[Principal]]
    charge: bool
    """Whether a valid key is charged to the API's own rate limit (deps.authenticate)."""


PRE_AUTH = (
    PreAuth("/api/v1/admin/", admin_principal, charge=True),
    PreAuth(EVENTS_PATH, ingest_principal, charge=False),
)

_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class BodyTooLargeError(HTTPException):
    """A body passed the limit while being read. An HTTPException, so FastAPI's body
    reading re-raises it as it is (it turns other errors into 400) and the app's
    handler answers it with the error envelope."""

    def __init__(self, limit: int, setting: str) -> None:
        refused = payload_too_large(limit, setting)
        super().__init__(413, refused.message, refused.headers)


def declared_length(scope: Scope) -> int | None:
    """The Content-Length header as a number; None when absent or unreadable (the
    server refuses a malformed one itself; counting the bytes still applies)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _has_body(scope: Scope) -> bool:
    length = declared_length(scope)
    if length is not None:
        return length > 0
    return any(name == b"transfer-encoding" for name, _ in scope["headers"])


class RequestGuard:
    """The ASGI layer described in the module docstring. Cheap when there is no body:
    one header scan, no wrapper around `receive`."""

    def __init__(self, app: ASGIApp, services: Services) -> None:
        self.app = app
        self.services = services
        self.max_body_bytes = services.settings.api_max_body_bytes
        self.max_events_bytes = services.settings.ingest_max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in _NO_BODY_METHODS:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        events = path == EVENTS_PATH
        limit = self.max_events_bytes if events else self.max_body_bytes
        setting = "TALLY_INGEST_MAX_BODY_BYTES" if events else "TALLY_API_MAX_BODY_BYTES"
        length = declared_length(scope)
        if length is not None and length > limit:
            await _answer(send, payload_too_large(limit, setting))
            return
        pre = next((p for p in PRE_AUTH if path.startswith(p.prefix)), None)
        if pre is not None and _has_body(scope):
            try:
                caller = await authenticate(Request(scope), self.services, charge=pre.charge)
                await pre.check(caller)
            except ApiError as refused:
                # The body stays unread: closing beats draining it to keep the connection.
                refused.headers = {**refused.headers, "Connection": "close"}
                await _answer(send, refused)
                return
        started = False
        received = 0

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLargeError(limit, setting)
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLargeError:
            # Read outside FastAPI's handlers (a plain ASGI route): answer it here,
            # unless an answer is under way already.
            if started:
                raise
            await _answer(send, payload_too_large(limit, setting))


async def _answer(send: Send, error: ApiError) -> None:
    response = error_response(error.status, error.code, error.message, error.headers)
    await send(
        {
            "type": "http.response.start",
            "status": response.status_code,
            "headers": response.raw_headers,
        }
    )
    await send({"type": "http.response.body", "body": response.body})
