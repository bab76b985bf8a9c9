"""Meter a Starlette/FastAPI gateway: one `tally.request.v1` event per HTTP call.

A pure ASGI middleware (not BaseHTTPMiddleware, which buffers and breaks streaming):

    gateway = Gateway()                          # started and closed by the app's lifespan

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with gateway:
            yield

    app = FastAPI(lifespan=lifespan)
    app.add_middleware(
        MeteringMiddleware,
        recorder=gateway,
        source="gw-eu-1",
        account=from_header("x-account-id"),     # or from_state("account_id")
    )

What each call records (docs/api.md#event-types):

* `tally.request.v1` with `subject` = the account the `account` resolver returns,
  `route` = the matched route template (`/v1/items/{item_id}`), else `unmatched_route`
  ("unmatched"; never the raw path: it may hold tokens), `method`, `status`, `latency_ms`,
  `bytes_in`, `bytes_out`, `units` (the `units` callable, else the `units_header` header,
  else 1) and `model` (the `model` callable). An exception before the response started
  is recorded as status 500 and re-raised; a client gone before any response as 499.
* For a streaming response (`is_stream(call)` true when the response starts, by default
  `Content-Type: text/event-stream`; or, with `chunked_streams`, a first body message with
  `more_body=True`): the request event as the stream opens (its latency is time to first
  byte), `tally.stream.opened.v1`, and, when the stream ends, `tally.stream.closed.v1`
  with the same `stream_id`, `units` from `stream_units(call)` (default 0),
  `duration_ms` and `reason`: `completed`, `client_disconnect`, `error` or `cancelled`.

With `enforcement=Enforcement.from_settings()` the middleware also holds each account
to its plan (producers/enforcement.py, docs/gateway-integration.md#enforcing-plans): before
the app runs, a call over the per-minute limit, the session or weekly quota, or opening
a stream (`opens_stream`, by default `Accept: text/event-stream`) with `max_streams`
active, is answered 429 with the error envelope, `Retry-After`, `X-RateLimit-*` and the
RateLimit fields, and is not metered. The account must then be known from the request
(`from_header`); `from_state` is refused.

Calls without an account (the resolver returns None or raises) are NOT metered: put
authentication in front of, or inside, the app and let it name the account. Paths in
`unmetered_paths` (exact, or a prefix ending in `*`), websockets and lifespan are not
metered either.

Recording never breaks or slows a response: events go into a bounded in-memory queue
that one task per event loop hands to the recorder (`Gateway.record`, which may wait
under backpressure). Failures are logged (at most once per `log_every_s` per kind) and
counted in `stats`; a full queue drops the event and counts it in `events_dropped`. On
the ASGI lifespan shutdown the queue is drained into the recorder *before* the app's
own shutdown closes the gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol, TypeVar

from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from producers.asgi_call import Call, CallMeter
from producers.asgi_refusal import ENFORCEMENT_DOCS, send_refusal
from producers.enforcement import Refusal
from producers.enforcement_sync import Enforcement
from schemas.events import MAX_UNITS, AnyEvent

__all__ = [
    "DEFAULT_UNITS_HEADER",
    "DEFAULT_UNMETERED_PATHS",
    "STREAM_CONTENT_TYPES",
    "UNMATCHED_ROUTE",
    "Call",
    "MeteringMiddleware",
    "MeteringStats",
    "Recorder",
    "Resolver",
    "accepts_event_stream",
    "event_stream",
    "from_header",
    "from_state",
]

log = logging.getLogger(__name__)

DEFAULT_UNMETERED_PATHS: Final = ("/healthz", "/readyz", "/livez", "/metrics")
DEFAULT_UNITS_HEADER: Final = "x-tally-units"
STREAM_CONTENT_TYPES: Final = ("text/event-stream",)

# Contract limits of the optional request dimensions: a value outside them is left out
# rather than making the whole event invalid.
_LABEL_MAX: Final = 256
UNMATCHED_ROUTE: Final = "unmatched"
"""The `route` of calls no route template matched: one constant label."""

_T = TypeVar("_T")


class Recorder(Protocol):
    """Where events go: `producers.gateway.Gateway` (tests pass fakes)."""

    async def record(self, event: AnyEvent) -> None: ...


Resolver = Callable[[Call], _T | None]


def from_header(name: str) -> Resolver[str]:
    """The account (or model) from a request header, e.g. one an auth proxy sets."""

    def resolve(call: Call) -> str | None:
        return call.request_header(name) or None

    return resolve


class _FromState:
    """Resolves after the app ran: enforcement cannot use it (the app must not run)."""

    def __init__(self, attribute: str) -> None:
        self.attribute = attribute

    def __call__(self, call: Call) -> Any:
        return call.state.get(self.attribute)


def from_state(attribute: str) -> Resolver[Any]:
    """A value the app put on `request.state.<attribute>`, e.g. in an auth dependency.
    Known only once the app ran, so it cannot be used with `enforcement`."""
    return _FromState(attribute)


def accepts_event_stream(call: Call) -> bool:
    """The default `opens_stream`: the request asks for server-sent events
    (`Accept: text/event-stream`); enforcement must know before the app answers."""
    return "text/event-stream" in (call.request_header("accept") or "")


def event_stream(call: Call) -> bool:
    """The default `is_stream`: a `text/event-stream` (server-sent events) response."""
    content_type = (call.response_header("content-type") or "").split(";", 1)[0].strip()
    return content_type.lower() in STREAM_CONTENT_TYPES


@dataclass(slots=True)
class MeteringStats:
    """Counters of one middleware; pass your own instance to read them (e.g. in /metrics)."""

    calls_metered: int = 0
    calls_without_account: int = 0
    """Calls not metered because the resolver returned nothing (or failed)."""
    calls_skipped: int = 0
    """Calls to `unmetered_paths`."""
    streams_opened: int = 0
    streams_closed: int = 0
    events_queued: int = 0
    events_recorded: int = 0
    """Events the recorder accepted."""
    events_failed: int = 0
    """Events the recorder raised on: NOT metered."""
    events_dropped: int = 0
    """Events dropped because the queue was full: NOT metered."""
    errors: int = 0
    """Resolver or event-building failures (the call is metered with defaults, or not at
    all when the event cannot be built)."""
    calls_refused: int = 0
    """Calls answered 429 by enforcement: the app did not run and they are NOT metered."""


class _RateLimitedLog:
    """One log line per kind per interval, telling how many were suppressed since."""

    def __init__(self, every_s: float) -> None:
        self._every_s = every_s
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def __call__(self, kind: str, message: str, *args: object, exc: bool = False) -> None:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < self._every_s:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            return
        self._last[kind] = now
        suppressed = self._suppressed.pop(kind, 0)
        if suppressed:
            message += f" ({suppressed} more like it since the last report)"
        log.error(message, *args, exc_info=exc)


class MeteringMiddleware:
    """ASGI middleware recording Tally events for every metered HTTP call (module doc)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        recorder: Recorder,
        source: str,
        account: Resolver[str],
        units: Resolver[float] | None = None,
        units_header: str | None = DEFAULT_UNITS_HEADER,
        model: Resolver[str] | None = None,
        stream_units: Resolver[float] | None = None,
        is_stream: Callable[[Call], bool] | None = event_stream,
        chunked_streams: bool = True,
        unmetered_paths: Iterable[str] = DEFAULT_UNMETERED_PATHS,
        unmatched_route: str = UNMATCHED_ROUTE,
        max_pending: int = 10_000,
        drain_timeout_s: float = 10.0,
        log_every_s: float = 10.0,
        stats: MeteringStats | None = None,
        enforcement: Enforcement | None = None,
        opens_stream: Callable[[Call], bool] | None = accepts_event_stream,
        docs_url: str = ENFORCEMENT_DOCS,
    ) -> None:
        if not 1 <= len(source) <= _LABEL_MAX:
            raise ValueError(
                f"source must be 1-{_LABEL_MAX} characters naming this gateway instance "
                f"(e.g. 'gw-eu-1'), got {source!r}"
            )
        if max_pending < 1:
            raise ValueError(f"max_pending must be at least 1, got {max_pending}")
        if drain_timeout_s < 0:
            raise ValueError(f"drain_timeout_s must be >= 0, got {drain_timeout_s}")
        if enforcement is not None and isinstance(account, _FromState):
            raise ValueError(
                "enforcement needs the account before the app runs, and from_state(...) "
                "reads what the app sets while it runs: resolve the account from the request "
                "(e.g. from_header('x-account-id') set by your auth proxy), or drop enforcement"
            )
        self.enforcement = enforcement
        if enforcement is not None:
            enforcement.learn_partitions_from(recorder)
        self._opens_stream = opens_stream
        self._docs_url = docs_url
        self.app = app
        self.recorder = recorder
        self.source = source
        self.stats = stats if stats is not None else MeteringStats()
        self._account = account
        self._units = units
        self._units_header = units_header
        self._model = model
        self._stream_units = stream_units
        self._is_stream = is_stream
        self.chunked_streams = chunked_streams
        paths = list(unmetered_paths)
        self._skip_exact = frozenset(p for p in paths if not p.endswith("*"))
        self._skip_prefixes = tuple(p[:-1] for p in paths if p.endswith("*"))
        self._unmatched_route = unmatched_route[:_LABEL_MAX] or UNMATCHED_ROUTE
        self._max_pending = max_pending
        self._drain_timeout_s = drain_timeout_s
        self._report = _RateLimitedLog(log_every_s)
        self._queue: asyncio.Queue[AnyEvent] | None = None
        self._worker: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, self._lifespan_receive(receive), send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if path in self._skip_exact or path.startswith(self._skip_prefixes or ("\0",)):
            self.stats.calls_skipped += 1
            await self.app(scope, receive, send)
            return
        call = CallMeter(self, scope)
        if self.enforcement is not None:
            refusal = self._admit(call, self.enforcement)
            if refusal is not None:
                await send_refusal(send, refusal, self._docs_url)
                return
        try:
            await self.app(scope, call.receive(receive), call.send(send))
        except asyncio.CancelledError:
            call.finish("cancelled")
            raise
        except BaseException:
            call.finish("error")
            raise
        call.finish(None)

    def _admit(self, call: CallMeter, enforcement: Enforcement) -> Refusal | None:
        """Decide before the app runs; an admitted call is counted locally at once, so
        concurrent calls see each other (producers/enforcement.py)."""
        account = call.account()
        if account is None:
            return None
        enforcement.ensure_running()
        core = enforcement.core
        if account not in core.accounts:
            enforcement.wake()
        opens = self._opens_stream is not None and bool(
            self.resolve("opens_stream", self._opens_stream, Call(call.scope, None))
        )
        refusal = core.decide(account, call.at_epoch, opens)
        if refusal is not None:
            self.stats.calls_refused += 1
            return refusal
        call.local = core.admit(account, call.at_epoch)
        return None

    # -- the queue -----------------------------------------------------------

    def enqueue(self, event: AnyEvent) -> None:
        """Hand `event` to the recorder in the background; never raises, never waits."""
        try:
            queue = self._ensure_worker()
            queue.put_nowait(event)
        except asyncio.QueueFull:
            self.stats.events_dropped += 1
            self._report(
                "dropped",
                "metering queue full (%d events): event %s of %s dropped, NOT metered; the "
                "recorder is not keeping up (is Kafka reachable? raise max_pending?)",
                self._max_pending,
                event.type,
                event.subject,
            )
            return
        except Exception:
            self.stats.events_dropped += 1
            self._report("enqueue", "could not queue a metering event", exc=True)
            return
        self.stats.events_queued += 1

    @property
    def pending(self) -> int:
        """Events queued and not yet handed to the recorder."""
        return 0 if self._queue is None else self._queue.qsize()

    async def drain(self, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Wait until every queued event went to the recorder; returns how many are left."""
        queue = self._queue
        if queue is None:
            return 0
        wait = self._drain_timeout_s if timeout is None else timeout
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                await queue.join()
        return queue.qsize()

    async def aclose(self, timeout: float | None = None) -> int:  # noqa: ASYNC109
        """Drain, then stop the background task; returns the events left unrecorded."""
        left = await self.drain(timeout)
        worker, self._worker, self._queue = self._worker, None, None
        if worker is not None:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker
        return left

    def _ensure_worker(self) -> asyncio.Queue[AnyEvent]:
        loop = asyncio.get_running_loop()
        if self._queue is None or self._worker is None or self._worker.get_loop() is not loop:
            # A queue belongs to one loop (tests run one loop per test).
            self._queue = asyncio.Queue(self._max_pending)
            self._worker = None
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work(self._queue), name="tally-metering")
        return self._queue

    async def _work(self, queue: asyncio.Queue[AnyEvent]) -> None:
        while True:
            event = await queue.get()
            try:
                await self.recorder.record(event)
                self.stats.events_recorded += 1
            except Exception as exc:
                self.stats.events_failed += 1
                self._report(
                    "record",
                    "metering event %s of %s NOT recorded: %s: %s",
                    event.type,
                    event.subject,
                    type(exc).__name__,
                    exc,
                )
            finally:
                queue.task_done()

    def _lifespan_receive(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            if message["type"] == "lifespan.shutdown":
                # Before the app's own shutdown closes the gateway: what is queued goes in.
                if self.enforcement is not None:
                    await self.enforcement.aclose()
                left = await self.aclose()
                if left:
                    log.error(
                        "shutting down with %d metering event(s) not handed to the recorder "
                        "within %.1f s: they are NOT metered",
                        left,
                        self._drain_timeout_s,
                    )
            return message

        return wrapped

    # -- resolving -------------------------------------------------------------

    def resolve(self, kind: str, resolver: Resolver[_T] | None, call: Call) -> _T | None:
        if resolver is None:
            return None
        try:
            return resolver(call)
        except Exception:
            self.stats.errors += 1
            self._report(kind, "the %s resolver raised; using its default", kind, exc=True)
            return None

    def account_of(self, call: Call) -> str | None:
        account = self.resolve("account", self._account, call)
        return account if isinstance(account, str) and account else None

    def units_of(self, call: Call) -> float:
        units = self.resolve("units", self._units, call)
        if units is None and self._units_header:
            text = call.response_header(self._units_header)
            if text is not None:
                try:
                    units = float(text)
                except ValueError:
                    units = math.nan
        return self._checked_units("units", units, 1.0)

    def stream_units_of(self, call: Call) -> float:
        return self._checked_units(
            "stream_units", self.resolve("stream_units", self._stream_units, call), 0.0
        )

    def _checked_units(self, kind: str, units: object, default: float) -> float:
        if units is None:
            return default
        if (
            isinstance(units, int | float)
            and not isinstance(units, bool)
            and 0 <= units <= MAX_UNITS
        ):
            return float(units)
        self.stats.errors += 1
        self._report(
            kind, "%s %r is not a number in [0, %g]; charging %s", kind, units, MAX_UNITS, default
        )
        return default

    def model_of(self, call: Call) -> str | None:
        return _label(self.resolve("model", self._model, call))

    def streams(self, call: Call) -> bool:
        if self._is_stream is None:
            return False
        return bool(self.resolve("is_stream", self._is_stream, call))

    def route_of(self, scope: Scope, root_path: str) -> str:
        route = scope.get("route")
        if isinstance(route, Mount):
            # An app mounted without routes of its own: no template to report.
            route = None
        template = getattr(route, "path_format", None) or getattr(route, "path", None)
        if isinstance(template, str) and template:
            # A route inside a Mount is relative to it: prefix what the mounts matched.
            mounted = scope.get("root_path", "")
            if isinstance(mounted, str) and mounted.startswith(root_path):
                template = mounted[len(root_path) :] + template
            return template[:_LABEL_MAX]
        return self._unmatched_route

    def report(self, kind: str, message: str, *args: object, exc: bool = False) -> None:
        self.stats.errors += 1
        self._report(kind, message, *args, exc=exc)


def _label(value: object) -> str | None:
    if isinstance(value, str) and 1 <= len(value) <= _LABEL_MAX:
        return value
    return None
