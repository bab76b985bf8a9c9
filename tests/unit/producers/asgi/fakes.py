"""MeteringMiddleware's unit tests' fake recorder, test app and raw-ASGI drivers."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producers.asgi import MeteringMiddleware, from_header
from producers.events import encode_event
from schemas.events import (
    EVENT_ADAPTER,
    AnyEvent,
    RequestEvent,
    StreamClosedEvent,
    StreamOpenedEvent,
)

ACCOUNT = {"x-account-id": "acct-1"}


class FakeRecorder:
    """Records in memory; can fail, or hold every record until `gate` is set."""

    def __init__(self) -> None:
        self.events: list[AnyEvent] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def record(self, event: AnyEvent) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        # What goes to Kafka must be a valid event.
        assert EVENT_ADAPTER.validate_json(encode_event(event)) == event
        self.events.append(event)

    def of(self, kind: str) -> list[Any]:
        return [e for e in self.events if e.type == kind]


class BoomError(RuntimeError):
    pass


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/v1/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    @app.post("/v1/messages")
    async def messages(request: Request) -> JSONResponse:
        body = await request.body()
        return JSONResponse({"n": len(body)}, headers={"x-tally-units": "2.5"})

    @app.get("/v1/forbidden")
    async def forbidden() -> None:
        raise HTTPException(403, "no")

    @app.get("/v1/boom")
    async def boom() -> None:
        raise BoomError("endpoint failed")

    @app.get("/v1/authed")
    async def authed(request: Request) -> dict[str, str]:
        request.state.account_id = "acct-state"
        return {"ok": "yes"}

    @app.get("/v1/sse")
    async def sse(request: Request) -> StreamingResponse:
        request.state.tokens = 42

        async def chunks() -> AsyncIterator[str]:
            for i in range(3):
                yield f"data: {i}\n\n"

        return StreamingResponse(chunks(), media_type="text/event-stream")

    @app.get("/v1/download")
    async def download() -> StreamingResponse:
        async def chunks() -> AsyncIterator[bytes]:
            yield b"a" * 10
            yield b"b" * 10

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    @app.get("/healthz")
    async def healthz() -> PlainTextResponse:
        return PlainTextResponse("ok")

    @app.get("/internal/stats")
    async def internal() -> PlainTextResponse:
        return PlainTextResponse("ok")

    sub = FastAPI()

    @sub.get("/things/{thing}")
    async def thing(thing: str) -> dict[str, str]:
        return {"thing": thing}

    app.mount("/v2", sub)
    return app


@asynccontextmanager
async def metered(
    recorder: FakeRecorder, app: ASGIApp | None = None, **options: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, MeteringMiddleware]]:
    options.setdefault("account", from_header("x-account-id"))
    middleware = MeteringMiddleware(
        app if app is not None else make_app(), recorder=recorder, source="gw-test", **options
    )
    transport = httpx.ASGITransport(app=middleware, raise_app_exceptions=False)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            yield client, middleware
    finally:
        await middleware.aclose(timeout=2)


async def wait_for(condition: Any, within_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def run_asgi(
    app: ASGIApp,
    path: str = "/stream",
    *,
    headers: dict[str, str] | None = None,
    client_leaves_after: int | None = None,
    send_fails_after: int | None = None,
) -> list[Message]:
    """One HTTP call with a scripted client: it may disconnect (receive says so once
    `client_leaves_after` body messages arrived) or break (send raises OSError)."""
    sent: list[Message] = []
    body_seen = asyncio.Event()
    request_read = False

    async def receive() -> Message:
        nonlocal request_read
        if not request_read:
            request_read = True
            return {"type": "http.request", "body": b"hello", "more_body": False}
        if client_leaves_after is None:
            await asyncio.Event().wait()  # the client stays until the app finishes
        await body_seen.wait()
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        bodies = sum(m["type"] == "http.response.body" for m in sent)
        if send_fails_after is not None and bodies >= send_fails_after:
            raise OSError("connection reset by peer")
        sent.append(message)
        if client_leaves_after is not None and bodies + 1 >= client_leaves_after:
            body_seen.set()

    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(k.encode(), v.encode()) for k, v in (headers or ACCOUNT).items()],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 80),
    }
    await app(scope, receive, send)
    return sent


def endless_stream(*, fail_after: int | None = None) -> ASGIApp:
    """Streams until the client disconnects (watching receive, as Starlette does)."""

    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})

        async def stream() -> None:
            for i in range(1_000):
                if fail_after is not None and i == fail_after:
                    raise BoomError("generator failed")
                await send({"type": "http.response.body", "body": b"x", "more_body": True})
                await asyncio.sleep(0.001)

        async def disconnect() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass

        streaming = asyncio.create_task(stream())
        watching = asyncio.create_task(disconnect())
        done, pending = await asyncio.wait(
            {streaming, watching}, return_when=asyncio.FIRST_COMPLETED
        )
        for task in pending:
            task.cancel()
        for task in done:
            task.result()

    return app


def streams(recorder: FakeRecorder) -> tuple[RequestEvent, StreamOpenedEvent, StreamClosedEvent]:
    request, opened, closed = recorder.events
    assert isinstance(request, RequestEvent)
    assert isinstance(opened, StreamOpenedEvent)
    assert isinstance(closed, StreamClosedEvent)
    assert opened.data.stream_id == closed.data.stream_id
    assert request.subject == opened.subject == closed.subject
    return request, opened, closed
