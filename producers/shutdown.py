"""Shutting down: what close() reports and raises, and closing a gateway on SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from producers.exceptions import GatewaySendError
from producers.ledger import Failure

if TYPE_CHECKING:
    from producers.gateway import Gateway

log = logging.getLogger("producers.gateway")


@dataclass(frozen=True, slots=True)
class Where:
    """Names for the messages: which topic, at which broker, spooled where."""

    topic: str
    bootstrap: str
    spool_dir: object
    spool_on: bool


def report_close(where: Where, left_in_spool: int, spool_bytes: int, counts: str) -> None:
    if left_in_spool:
        log.warning(
            "gateway for %s closed with %d event(s) (%d bytes) in the spool %s; the next "
            "Gateway started on that directory replays them",
            where.topic,
            left_in_spool,
            spool_bytes,
            where.spool_dir,
        )
    else:
        log.info("gateway for %s closed: %s", where.topic, counts)


def raise_failures(
    where: Where, failures: list[Failure], unsafe: list[bytes] | None = None, budget: float = 0.0
) -> None:
    """Raise GatewaySendError for `failures` (refused for good) and `unsafe` events
    (neither acknowledged nor spooled within `budget` seconds); nothing when neither."""
    if not failures and not unsafe:
        return
    events = tuple(e for failure in failures for e in failure.batch.events)
    causes = tuple(failure.error for failure in failures)
    parts: list[str] = []
    if failures:
        first = causes[0]
        parts.append(
            f"Kafka did not acknowledge {len(failures)} message(s) holding "
            f"{len(events)} event(s) for topic {where.topic!r} at {where.bootstrap} (first "
            f"error: {type(first).__name__}: {first}); those events were NOT delivered."
        )
    if unsafe:
        spooled = "spooled" if where.spool_on else "spooled (the spool is off)"
        parts.append(
            f"{len(unsafe)} event(s) were neither acknowledged by Kafka at "
            f"{where.bootstrap} nor {spooled} within {budget:.1f}s; they may NOT have been "
            "delivered."
        )
    parts.append(
        "Check the broker and the topic, then record them again (error.failed_events; "
        "a re-sent event is counted once)."
    )
    raise GatewaySendError(" ".join(parts), events + tuple(unsafe or ()), causes) from (
        causes[0] if causes else None
    )


# -- shutting down on signals ---------------------------------------------------


@dataclass(eq=False)
class ShutdownHandle:
    """What `install_signal_handlers` returns: await `wait()` to know the gateway closed."""

    gateway: Gateway
    loop: asyncio.AbstractEventLoop
    signals: tuple[signal.Signals, ...]
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    """Set once a signal arrived and the gateway is closed (successfully or not)."""
    received: signal.Signals | None = None
    spooled: int = 0
    """Events left in the spool by the close."""
    error: Exception | None = None
    """What the close raised (a GatewaySendError: events that may be lost)."""
    task: asyncio.Task[None] | None = None

    async def wait(self) -> int:
        """Until a signal closed the gateway; returns the events left spooled, or raises
        what the close raised."""
        await self.closed.wait()
        if self.error is not None:
            raise self.error
        return self.spooled

    def remove(self) -> None:
        """Give the signals back to their default handling."""
        for sig in self.signals:
            self.loop.remove_signal_handler(sig)


def install_signal_handlers(
    gateway: Gateway,
    loop: asyncio.AbstractEventLoop | None = None,
    *,
    signals: Iterable[signal.Signals] = (signal.SIGTERM, signal.SIGINT),
    timeout: float | None = None,
    before_close: Callable[[], Awaitable[None]] | None = None,
) -> ShutdownHandle:
    """On SIGTERM/SIGINT, flush and close `gateway`: no recorded event is left in memory.

    The first signal awaits `before_close` (stop taking requests there, so nothing calls
    `record` on a closing gateway), then `gateway.close(timeout)`: every recorded event
    ends up acknowledged by Kafka or in the spool, which the next start replays. Keep
    `timeout` (default `close_timeout_s`, 30 s) below the time the supervisor waits
    between SIGTERM and SIGKILL (Kubernetes: terminationGracePeriodSeconds, 30 s by
    default). Further signals while closing are logged and ignored. Unix only; call it
    from the thread running the loop.

        async def main() -> None:
            async with Gateway() as gateway:
                server = await start_my_http_server(gateway)   # calls gateway.record()
                shutdown = install_signal_handlers(gateway, before_close=server.stop)
                left = await shutdown.wait()    # returns once SIGTERM closed the gateway
                print(f"closed; {left} event(s) wait in the spool for the next start")
    """
    running = loop if loop is not None else asyncio.get_running_loop()
    handle = ShutdownHandle(gateway, running, tuple(signals))

    async def shut_down() -> None:
        try:
            if before_close is not None:
                try:
                    await before_close()
                except Exception:
                    log.exception("before_close failed; closing the gateway anyway")
            handle.spooled = await gateway.close(timeout)
        except Exception as exc:
            handle.error = exc
            log.error("closing the gateway on %s: %s", handle.received, exc)
        finally:
            handle.closed.set()

    def on_signal(sig: signal.Signals) -> None:
        if handle.task is not None:
            log.warning("%s: already closing the gateway; waiting for that to finish", sig.name)
            return
        handle.received = sig
        log.warning("%s: flushing the gateway to Kafka or its spool, then closing", sig.name)
        handle.task = running.create_task(shut_down(), name="tally-gateway-shutdown")

    for sig in handle.signals:
        running.add_signal_handler(sig, on_signal, sig)
    return handle
