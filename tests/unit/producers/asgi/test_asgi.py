"""MeteringMiddleware with a fake recorder: what each kind of call records."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from producers.asgi import Call, MeteringMiddleware, MeteringStats, from_header, from_state
from schemas.events import (
    REQUEST,
    STREAM_CLOSED,
    STREAM_OPENED,
    RequestEvent,
)
from tests.unit.producers.asgi.fakes import (
    ACCOUNT,
    BoomError,
    FakeRecorder,
    make_app,
    metered,
    run_asgi,
    streams,
    wait_for,
)


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
