"""MeteringMiddleware with a fake recorder: what each kind of call records, and that
metering failures never reach the response."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producers.asgi import Call, MeteringMiddleware, MeteringStats, from_header, from_state
from producers.events import AnyEvent, encode_event
from schemas.events import (
    EVENT_ADAPTER,
    REQUEST,
    STREAM_CLOSED,
    STREAM_OPENED,
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


@pytest.fixture
def recorder() -> FakeRecorder:
    return FakeRecorder()


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


async def test_a_json_call_records_one_request_event(recorder: FakeRecorder) -> None:
    before = datetime.now(UTC)
    async with metered(recorder) as (client, middleware):
        response = await client.get("/v1/items/7", headers=ACCOUNT)
        assert response.json() == {"item": 7}
        assert await middleware.drain(2) == 0
    [event] = recorder.events
    assert isinstance(event, RequestEvent)
    assert (event.subject, event.source, event.type) == ("acct-1", "gw-test", REQUEST)
    data = event.data
    assert (data.route, data.method, data.status, data.units) == (
        "/v1/items/{item_id}",
        "GET",
        200,
        1,
    )
    assert data.bytes_out == len(response.content)
    assert data.bytes_in == 0
    assert data.latency_ms is not None
    assert 0 <= data.latency_ms < 5_000
    assert before <= event.time <= datetime.now(UTC)
    assert middleware.stats.calls_metered == middleware.stats.events_recorded == 1


@pytest.mark.parametrize(
    ("path", "status", "route"),
    [
        ("/v1/items/1", 200, "/v1/items/{item_id}"),
        ("/v1/items/not-a-number", 422, "/v1/items/{item_id}"),
        ("/v1/forbidden", 403, "/v1/forbidden"),
        # No template: one constant label, never the raw path (it may hold a token).
        ("/nowhere/42", 404, "unmatched"),
        ("/reset/tok_s3cr3t/ann@example.com", 404, "unmatched"),
        ("/v2/things/abc", 200, "/v2/things/{thing}"),
    ],
)
async def test_status_and_route_template(
    recorder: FakeRecorder, path: str, status: int, route: str
) -> None:
    async with metered(recorder) as (client, middleware):
        assert (await client.get(path, headers=ACCOUNT)).status_code == status
        await middleware.drain(2)
    [event] = recorder.events
    assert (event.data.status, event.data.route) == (status, route)


async def test_405_reports_the_route_that_exists(recorder: FakeRecorder) -> None:
    async with metered(recorder) as (client, middleware):
        assert (await client.delete("/v1/items/3", headers=ACCOUNT)).status_code == 405
        await middleware.drain(2)
    [event] = recorder.events
    assert (event.data.status, event.data.route, event.data.method) == (
        405,
        "/v1/items/{item_id}",
        "DELETE",
    )


async def test_unmatched_route_label_keeps_404_paths_out_of_the_dimensions(
    recorder: FakeRecorder,
) -> None:
    async with metered(recorder, unmatched_route="(unmatched)") as (client, middleware):
        await client.get("/wp-admin/evil.php", headers=ACCOUNT)
        await middleware.drain(2)
    assert [e.data.route for e in recorder.events] == ["(unmatched)"]


async def test_exception_records_500_and_is_reraised(recorder: FakeRecorder) -> None:
    middleware = MeteringMiddleware(
        make_app(), recorder=recorder, source="gw-test", account=from_header("x-account-id")
    )
    # Driven directly: the exception must come out of the middleware unchanged.
    with pytest.raises(BoomError, match="endpoint failed"):
        await run_asgi(middleware, "/v1/boom", headers=ACCOUNT)
    await middleware.aclose(2)
    [event] = recorder.events
    assert (event.data.status, event.data.route) == (500, "/v1/boom")


async def test_exception_inside_fastapi_stack_records_500(recorder: FakeRecorder) -> None:
    # add_middleware puts us inside Starlette's ServerErrorMiddleware: the exception
    # passes through before any response was started.
    app = make_app()
    stats = MeteringStats()
    app.add_middleware(
        MeteringMiddleware,
        recorder=recorder,
        source="gw-test",
        account=from_header("x-account-id"),
        stats=stats,
    )
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
        assert (await client.get("/v1/boom", headers=ACCOUNT)).status_code == 500
        assert (await client.get("/v1/items/2", headers=ACCOUNT)).status_code == 200
        await wait_for(lambda: stats.events_recorded == 2)
    assert [e.data.status for e in recorder.events] == [500, 200]


async def test_units_from_header_callable_and_defaults(recorder: FakeRecorder) -> None:
    async with metered(recorder) as (client, middleware):
        await client.post("/v1/messages", content=b"12345", headers=ACCOUNT)
        await middleware.drain(2)
    [event] = recorder.events
    assert (event.data.units, event.data.bytes_in, event.data.method) == (2.5, 5, "POST")

    recorder.events.clear()
    async with metered(
        recorder,
        units=lambda call: 7 if call.status == 200 else 0,
        model=lambda call: call.request_header("x-model"),
    ) as (client, middleware):
        await client.get("/v1/items/1", headers={**ACCOUNT, "x-model": "m-large"})
        await client.get("/v1/items/x", headers=ACCOUNT)
        await middleware.drain(2)
    assert [(e.data.units, e.data.model) for e in recorder.events] == [
        (7.0, "m-large"),
        (0.0, None),
    ]


@pytest.mark.parametrize("bad", ["-1", "lots", "nan", "inf", "2e13"])
async def test_a_bad_units_header_charges_the_default(recorder: FakeRecorder, bad: str) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"x-tally-units", bad.encode())],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})

    async with metered(recorder, app) as (client, middleware):
        assert (await client.get("/", headers=ACCOUNT)).text == "ok"
        await middleware.drain(2)
    assert [e.data.units for e in recorder.events] == [1.0]
    assert middleware.stats.errors == 1


async def test_account_from_request_state(recorder: FakeRecorder) -> None:
    async with metered(recorder, account=from_state("account_id")) as (client, middleware):
        await client.get("/v1/authed")
        await client.get("/v1/items/1")  # sets no account: not metered
        await middleware.drain(2)
    assert [e.subject for e in recorder.events] == ["acct-state"]
    assert middleware.stats.calls_without_account == 1


async def test_calls_without_account_or_with_a_bad_one_are_not_metered(
    recorder: FakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    def account(call: Call) -> str | None:
        value = call.request_header("x-account-id")
        if value == "explode":
            raise KeyError("resolver bug")
        return value

    async with metered(recorder, account=account) as (client, middleware):
        assert (await client.get("/v1/items/1")).status_code == 200
        assert (
            await client.get("/v1/items/1", headers={"x-account-id": "explode"})
        ).status_code == 200
        assert (
            await client.get("/v1/items/1", headers={"x-account-id": "has space"})
        ).status_code == 200
        assert (await client.get("/v1/items/1", headers=ACCOUNT)).status_code == 200
        await middleware.drain(2)
    assert [e.subject for e in recorder.events] == ["acct-1"]
    stats = middleware.stats
    assert (stats.calls_without_account, stats.errors, stats.calls_metered) == (2, 2, 1)
    assert "has space" in caplog.text


async def test_unmetered_paths(recorder: FakeRecorder) -> None:
    async with metered(recorder, unmetered_paths=["/healthz", "/internal/*"]) as (client, mw):
        for path in ("/healthz", "/internal/stats", "/v1/items/5"):
            assert (await client.get(path, headers=ACCOUNT)).status_code == 200
        await mw.drain(2)
    assert [e.data.route for e in recorder.events] == ["/v1/items/{item_id}"]
    assert mw.stats.calls_skipped == 2


def streams(recorder: FakeRecorder) -> tuple[RequestEvent, StreamOpenedEvent, StreamClosedEvent]:
    request, opened, closed = recorder.events
    assert isinstance(request, RequestEvent)
    assert isinstance(opened, StreamOpenedEvent)
    assert isinstance(closed, StreamClosedEvent)
    assert opened.data.stream_id == closed.data.stream_id
    assert request.subject == opened.subject == closed.subject
    return request, opened, closed


async def test_sse_stream_records_request_open_and_close(recorder: FakeRecorder) -> None:
    async with metered(recorder, stream_units=from_state("tokens")) as (client, middleware):
        response = await client.get("/v1/sse", headers=ACCOUNT)
        assert response.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
        await middleware.drain(2)
    request, opened, closed = streams(recorder)
    assert (request.data.status, request.data.route, request.data.units) == (200, "/v1/sse", 1)
    assert request.data.bytes_out is None
    assert opened.data.route == "/v1/sse"
    assert (closed.data.units, closed.data.reason) == (42.0, "completed")
    assert closed.data.duration_ms is not None
    assert closed.time >= opened.time
    assert (middleware.stats.streams_opened, middleware.stats.streams_closed) == (1, 1)


async def test_a_stream_without_account_is_not_metered_and_asks_once(
    recorder: FakeRecorder,
) -> None:
    asked: list[str] = []

    def account(call: Call) -> str | None:
        asked.append(call.scope["path"])
        return None

    async with metered(recorder, account=account) as (client, middleware):
        assert (await client.get("/v1/sse")).status_code == 200
        await middleware.drain(2)
    assert recorder.events == []
    assert asked == ["/v1/sse"]
    assert (middleware.stats.calls_without_account, middleware.stats.streams_opened) == (1, 0)


async def test_chunked_response_is_a_stream_unless_disabled(recorder: FakeRecorder) -> None:
    async with metered(recorder) as (client, middleware):
        assert len((await client.get("/v1/download", headers=ACCOUNT)).content) == 20
        await middleware.drain(2)
    _, _, closed = streams(recorder)
    assert closed.data.reason == "completed"

    recorder.events.clear()
    async with metered(recorder, chunked_streams=False) as (client, middleware):
        await client.get("/v1/download", headers=ACCOUNT)
        await client.get("/v1/sse", headers=ACCOUNT)  # still a stream by content type
        await middleware.drain(2)
    assert [e.type for e in recorder.events] == [REQUEST, REQUEST, STREAM_OPENED, STREAM_CLOSED]
    assert recorder.events[0].data.bytes_out == 20


async def test_predicate_decides_what_is_a_stream(recorder: FakeRecorder) -> None:
    async with metered(
        recorder, is_stream=lambda call: call.scope["path"].endswith("/1"), chunked_streams=False
    ) as (client, middleware):
        await client.get("/v1/items/1", headers=ACCOUNT)
        await client.get("/v1/items/2", headers=ACCOUNT)
        await middleware.drain(2)
    assert [e.type for e in recorder.events] == [REQUEST, STREAM_OPENED, STREAM_CLOSED, REQUEST]


# -- raw ASGI: disconnects, failures mid-stream ------------------------------------


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


async def test_client_disconnect_closes_the_stream(recorder: FakeRecorder) -> None:
    middleware = MeteringMiddleware(
        endless_stream(), recorder=recorder, source="gw-test", account=from_header("x-account-id")
    )
    sent = await run_asgi(middleware, client_leaves_after=3)
    await middleware.aclose(2)
    assert sum(m["type"] == "http.response.body" for m in sent) >= 3
    request, _, closed = streams(recorder)
    assert request.data.status == 200
    assert closed.data.reason == "client_disconnect"


async def test_broken_connection_closes_the_stream_and_reraises(recorder: FakeRecorder) -> None:
    middleware = MeteringMiddleware(
        endless_stream(), recorder=recorder, source="gw-test", account=from_header("x-account-id")
    )
    with pytest.raises(OSError, match="reset by peer"):
        await run_asgi(middleware, send_fails_after=2)
    await middleware.aclose(2)
    _, _, closed = streams(recorder)
    assert closed.data.reason == "client_disconnect"


async def test_exception_mid_stream_closes_it_as_error(recorder: FakeRecorder) -> None:
    middleware = MeteringMiddleware(
        endless_stream(fail_after=2),
        recorder=recorder,
        source="gw-test",
        account=from_header("x-account-id"),
    )
    with pytest.raises(BoomError):
        await run_asgi(middleware)
    await middleware.aclose(2)
    request, _, closed = streams(recorder)
    assert request.data.status == 200  # the response had started
    assert closed.data.reason == "error"


async def test_cancelled_call_closes_the_stream(recorder: FakeRecorder) -> None:
    middleware = MeteringMiddleware(
        endless_stream(), recorder=recorder, source="gw-test", account=from_header("x-account-id")
    )
    task = asyncio.create_task(run_asgi(middleware))
    await wait_for(lambda: middleware.stats.streams_opened == 1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await middleware.aclose(2)
    _, _, closed = streams(recorder)
    assert closed.data.reason == "cancelled"


async def test_client_gone_before_a_response_is_499(recorder: FakeRecorder) -> None:
    async def app(scope: Scope, receive: Receive, send: Send) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    async def receive_then_leave() -> Message:
        return {"type": "http.disconnect"}

    middleware = MeteringMiddleware(
        app, recorder=recorder, source="gw-test", account=from_header("x-account-id")
    )

    async def send(message: Message) -> None:
        raise AssertionError("nothing is sent")

    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": "/slow",
        "headers": [(b"x-account-id", b"acct-1")],
    }
    await middleware(scope, receive_then_leave, send)
    await middleware.aclose(2)
    assert [e.data.status for e in recorder.events] == [499]


# -- recording must never hurt the response ---------------------------------------


async def test_a_failing_recorder_is_logged_and_counted(
    recorder: FakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    recorder.fail = RuntimeError("Gateway is closed")
    async with metered(recorder, log_every_s=3600) as (client, middleware):
        for _ in range(5):
            assert (await client.get("/v1/items/1", headers=ACCOUNT)).status_code == 200
        await middleware.drain(2)
    assert middleware.stats.events_failed == 5
    assert middleware.stats.events_recorded == 0
    # Logged once, not five times: a broken Kafka must not flood the gateway's log.
    assert caplog.text.count("NOT recorded") == 1


async def test_a_stuck_recorder_neither_slows_responses_nor_grows_memory(
    recorder: FakeRecorder,
) -> None:
    recorder.gate = asyncio.Event()  # record() never returns
    async with metered(recorder, max_pending=10) as (client, middleware):
        # A response that waited for the recorder would never come (it never returns):
        # the timeout only turns that hang into a failure.
        async with asyncio.timeout(30):
            for _ in range(30):
                assert (await client.get("/v1/items/1", headers=ACCOUNT)).status_code == 200
        # At most ten wait in the queue (one more may be in the recorder's hands); the
        # rest are dropped and counted.
        stats = middleware.stats
        assert stats.events_queued + stats.events_dropped == 30
        assert middleware.pending <= 10
        assert stats.events_dropped >= 19
        assert await middleware.drain(0.05) > 0
        recorder.gate.set()
        assert await middleware.drain(2) == 0
    assert len(recorder.events) == stats.events_recorded == stats.events_queued


async def test_lifespan_shutdown_drains_before_the_app_closes_its_gateway(
    recorder: FakeRecorder,
) -> None:
    seen_at_shutdown: list[int] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        seen_at_shutdown.append(len(recorder.events))

    app = FastAPI(lifespan=lifespan)

    @app.get("/x")
    async def x() -> dict[str, bool]:
        return {"ok": True}

    recorder.gate = asyncio.Event()
    middleware = MeteringMiddleware(
        app, recorder=recorder, source="gw-test", account=from_header("x-account-id")
    )
    for _ in range(3):
        await run_asgi(middleware, "/x")
    assert recorder.events == []
    asyncio.get_running_loop().call_later(0.05, recorder.gate.set)

    messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    replies: list[Message] = []

    async def receive() -> Message:
        return next(messages)

    async def send(message: Message) -> None:
        replies.append(message)

    await middleware({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert [m["type"] for m in replies] == [
        "lifespan.startup.complete",
        "lifespan.shutdown.complete",
    ]
    assert seen_at_shutdown == [3]


def test_source_is_checked_at_construction() -> None:
    with pytest.raises(ValueError, match="source must be"):
        MeteringMiddleware(make_app(), recorder=FakeRecorder(), source="", account=from_header("a"))


async def wait_for(condition: Any, within_s: float = 2.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def _capture_metering_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="producers.asgi")
