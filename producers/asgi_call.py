"""One HTTP call as the metering middleware (producers/asgi.py) sees it.

`Call` is what the resolvers are asked about; `CallMeter` watches one call's ASGI
messages and emits its events (request, stream opened, stream closed) exactly once.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from starlette.types import Message, Receive, Scope, Send

from producers import events

if TYPE_CHECKING:
    from producers.asgi import MeteringMiddleware
    from producers.enforcement import LocalUse

_METHOD_MAX: Final = 16
"""The contract's longest `method`: a longer one is left out of the event."""


@dataclass(frozen=True, slots=True)
class Call:
    """What the middleware knows about a call when it asks the resolvers."""

    scope: Scope
    status: int | None
    """The response status; None when no response started (the app raised)."""
    response_headers: tuple[tuple[bytes, bytes], ...] = ()

    def request_header(self, name: str) -> str | None:
        return _header(self.scope.get("headers", ()), name)

    def response_header(self, name: str) -> str | None:
        return _header(self.response_headers, name)

    @property
    def state(self) -> Mapping[str, Any]:
        """What the app set on `request.state` (Starlette keeps it in the scope)."""
        state = self.scope.get("state")
        return state if isinstance(state, Mapping) else {}


class CallMeter:
    """The metering of one HTTP call: watches its messages, emits its events once."""

    def __init__(self, meter: MeteringMiddleware, scope: Scope) -> None:
        self.meter = meter
        self.scope = scope
        self.root_path: str = scope.get("root_path", "")
        self.at_epoch = time.time()
        self.at = datetime.fromtimestamp(self.at_epoch, UTC)
        self.local: LocalUse | None = None
        """This call's count in the enforcer, when it was admitted by one."""
        self.t0 = time.monotonic()
        self.status: int | None = None
        self.headers: tuple[tuple[bytes, bytes], ...] = ()
        self.bytes_in = 0
        self.bytes_out = 0
        self.body_messages = 0
        self.complete = False
        self.disconnected = False
        self.send_failed = False
        self.request_done = False
        self.resolved = False
        self.subject: str | None = None
        self.stream_id: str | None = None
        self.stream_t0 = 0.0
        self.stream_done = False

    def receive(self, receive: Receive) -> Receive:
        async def wrapped() -> Message:
            message = await receive()
            try:
                kind = message["type"]
                if kind == "http.request":
                    self.bytes_in += len(message.get("body", b""))
                elif kind == "http.disconnect" and not self.complete:
                    self.disconnected = True
            except Exception:
                self.meter.report("receive", "metering could not read a request message", exc=True)
            return message

        return wrapped

    def send(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            kind = message["type"]
            final = False
            if kind == "http.response.start":
                self._guard(self._started, message)
            elif kind == "http.response.body":
                final = not message.get("more_body", False)
                self._guard(self._body, message)
            elif kind == "http.response.pathsend":
                final = True
            try:
                await send(message)
            except BaseException:
                self.send_failed = True
                raise
            if final:
                self.complete = True
                self._guard(self._completed, None)

        return wrapped

    def finish(self, outcome: str | None) -> None:
        """After the app returned (outcome None) or raised; emits what is still due."""
        try:
            if self.status is None and outcome is None and self.disconnected:
                self.status = 499  # the client left before any response (nginx's code)
            if not self.request_done:
                self._request(latency_s=time.monotonic() - self.t0)
            if self.stream_id is not None and not self.stream_done:
                if self.send_failed or self.disconnected:
                    reason = "client_disconnect"
                else:
                    reason = outcome or ("completed" if self.complete else "error")
                self._close_stream(reason)
        except Exception:
            self.meter.report("finish", "metering failed at the end of a call", exc=True)

    # -- the events ---------------------------------------------------------

    def _guard(self, step: Callable[[Message | None], None], message: Message | None) -> None:
        try:
            step(message)
        except Exception:
            self.meter.report("send", "metering failed on a response message", exc=True)

    def _started(self, message: Message | None) -> None:
        assert message is not None
        self.status = int(message["status"])
        self.headers = tuple(message.get("headers") or ())
        if self.meter.streams(self._call()):
            self._open_stream()

    def _body(self, message: Message | None) -> None:
        assert message is not None
        self.body_messages += 1
        self.bytes_out += len(message.get("body", b""))
        if (
            self.body_messages == 1
            and message.get("more_body", False)
            and self.stream_id is None
            and self.meter.chunked_streams
        ):
            self._open_stream()

    def _completed(self, _: Message | None) -> None:
        if not self.request_done:
            self._request(latency_s=time.monotonic() - self.t0)
        if self.stream_id is not None and not self.stream_done:
            self._close_stream("completed")

    def _call(self) -> Call:
        return Call(self.scope, self.status, self.headers)

    def account(self) -> str | None:
        # Asked once per call: the request and its stream belong to the same account.
        if not self.resolved:
            self.resolved = True
            self.subject = self.meter.account_of(self._call())
        return self.subject

    def _request(self, *, latency_s: float, streaming: bool = False) -> None:
        self.request_done = True
        meter = self.meter
        subject = self.account()
        if subject is None:
            meter.stats.calls_without_account += 1
            return
        call = self._call()
        status = 500 if self.status is None else self.status
        method = self.scope.get("method")
        units = meter.units_of(call)
        if self.local is not None and meter.enforcement is not None:
            meter.enforcement.core.charge(subject, self.local, units)
        try:
            event = events.request(
                subject,
                meter.source,
                units=units,
                route=meter.route_of(self.scope, self.root_path),
                method=method if isinstance(method, str) and len(method) <= _METHOD_MAX else None,
                status=status if 100 <= status <= 599 else None,
                model=meter.model_of(call),
                latency_ms=max(0.0, latency_s * 1000),
                bytes_in=self.bytes_in,
                bytes_out=None if streaming else self.bytes_out,
                time=self.at,
            )
        except Exception as exc:
            # Typically an account id the contract does not allow as a subject.
            meter.report(
                "build", "request of account %r NOT metered: %s", subject, _first_line(exc)
            )
            return
        meter.stats.calls_metered += 1
        meter.enqueue(event)

    def _open_stream(self) -> None:
        if not self.request_done:
            self._request(latency_s=time.monotonic() - self.t0, streaming=True)
        subject = self.account()
        if subject is None:
            return
        meter = self.meter
        stream_id = uuid.uuid4().hex
        try:
            event = events.stream_opened(
                subject,
                meter.source,
                stream_id,
                route=meter.route_of(self.scope, self.root_path),
                model=meter.model_of(self._call()),
                time=self.at,
            )
        except Exception as exc:
            meter.report("build", "stream of %r NOT metered: %s", subject, _first_line(exc))
            return
        self.stream_id = stream_id
        self.stream_t0 = time.monotonic()
        if meter.enforcement is not None:
            meter.enforcement.core.stream_opened(subject, self.at_epoch)
        meter.stats.streams_opened += 1
        meter.enqueue(event)

    def _close_stream(self, reason: str) -> None:
        self.stream_done = True
        if self.stream_id is None or self.subject is None:
            return
        meter = self.meter
        elapsed = time.monotonic() - self.stream_t0
        units = meter.stream_units_of(self._call())
        closed_at = time.time()
        if meter.enforcement is not None:
            meter.enforcement.core.stream_closed(self.subject, closed_at, units)
        try:
            event = events.stream_closed(
                self.subject,
                meter.source,
                self.stream_id,
                units=units,
                duration_ms=max(0.0, elapsed * 1000),
                reason=reason,
                time=datetime.fromtimestamp(closed_at, UTC),
            )
        except Exception as exc:
            meter.report("build", "stream close NOT metered: %s", _first_line(exc))
            return
        meter.stats.streams_closed += 1
        meter.enqueue(event)


def _header(headers: Iterable[tuple[bytes, bytes]], name: str) -> str | None:
    wanted = name.lower().encode("latin-1")
    for key, value in headers:
        if key.lower() == wanted:
            return value.decode("latin-1")
    return None


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__
