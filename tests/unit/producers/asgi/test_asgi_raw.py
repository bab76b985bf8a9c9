"""MeteringMiddleware driven as raw ASGI: disconnects and failures mid-stream, and that
metering failures never reach the response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from fastapi import FastAPI
from starlette.types import Message, Receive, Scope, Send

from producers.asgi import MeteringMiddleware, from_header
from tests.unit.producers.asgi.fakes import (
    ACCOUNT,
    BoomError,
    FakeRecorder,
    endless_stream,
    make_app,
    metered,
    run_asgi,
    streams,
    wait_for,
)

# -- raw ASGI: disconnects, failures mid-stream ------------------------------------


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
