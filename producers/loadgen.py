"""`tally loadgen`: simulated gateways sending realistic traffic through `Gateway`.

`Traffic` (pure, no I/O) decides what happens: which account calls which route,
which requests open streams and when those close. `run_loadgen` paces it to a
rate and records it through one `Gateway` per simulated gateway.

The seed fixes the shape of the traffic (accounts, routes, units, streams, the
order of events). Event and stream ids also carry a per-run nonce, so two runs
with the same seed are two sets of events, not one set re-sent (which the
pipeline would rightly count once).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import random
import sys
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from producers import events
from producers.gateway import Gateway
from schemas.events import REQUEST, STREAM_CLOSED, STREAM_OPENED, AnyEvent

Clock = Callable[[], datetime]

# (route, method, weight, can stream)
_ROUTES: Final = (
    ("/v1/messages", "POST", 62, True),
    ("/v1/embeddings", "POST", 18, False),
    ("/v1/messages/count_tokens", "POST", 10, False),
    ("/v1/models", "GET", 6, False),
    ("/v1/files", "POST", 4, False),
)
_MODELS: Final = (("small-1", 50), ("medium-2", 35), ("large-3", 15))
_STATUSES: Final = ((200, 930), (400, 20), (401, 8), (404, 5), (429, 27), (500, 7), (503, 3))
_CLOSE_REASONS: Final = (("completed", 90), ("client_disconnect", 7), ("error", 3))

ZIPF_EXPONENT: Final = 1.1
"""Popularity of the account ranked k is proportional to 1 / k**ZIPF_EXPONENT."""


def _cumulative(weights: Sequence[float]) -> list[float]:
    return list(itertools.accumulate(weights))


class Traffic(Iterator[AnyEvent]):
    """An endless (or, with `total`, exactly `total` events long) stream of traffic.

    `stream_fraction` of successful /v1/messages requests open a stream: the request
    event is followed by `stream.opened`, and `stream.closed` (with the stream's
    cost) comes a while later, from the same gateway. `abandon_fraction` of streams
    never close, as when a gateway crashes; they are listed in `abandoned`. With
    `total` the traffic ends with every other stream closed; without it, `finish()`
    closes them.
    """

    def __init__(
        self,
        seed: int,
        accounts: int,
        *,
        gateways: int = 1,
        account_ids: Sequence[str] | None = None,
        total: int | None = None,
        stream_fraction: float = 0.25,
        abandon_fraction: float = 0.02,
        mean_stream_events: float = 40.0,
        clock: Clock | None = None,
        run_id: str | None = None,
    ) -> None:
        ids = list(account_ids) if account_ids is not None else _account_ids(accounts)
        if not ids:
            raise ValueError("traffic needs at least one account")
        if gateways < 1:
            raise ValueError(f"gateways must be at least 1, got {gateways}")
        if total is not None and total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        self._rng = random.Random(seed)
        self._accounts = ids
        self._account_weights = _cumulative(
            [1 / (k**ZIPF_EXPONENT) for k in range(1, len(ids) + 1)]
        )
        self._sources = [f"gw-{i}" for i in range(gateways)]
        self._total = total
        self._stream_fraction = stream_fraction
        self._abandon_fraction = abandon_fraction
        self._mean_stream_events = mean_stream_events
        self._clock: Clock = clock or (lambda: datetime.now(UTC))
        self._run = run_id if run_id is not None else f"s{seed}"
        self._emitted = 0
        self._ids = itertools.count()
        self._streams = itertools.count()
        self._queued: deque[AnyEvent] = deque()
        # Streams to close: (due at emitted-count, tiebreak, subject, source, stream_id, opened)
        self._closing: list[tuple[int, int, str, str, str, datetime]] = []
        self.abandoned: set[str] = set()
        """Ids of the streams that are never closed, on purpose."""

        self._route_cum = _cumulative([r[2] for r in _ROUTES])
        self._model_cum = _cumulative([m[1] for m in _MODELS])
        self._status_cum = _cumulative([s[1] for s in _STATUSES])
        self._reason_cum = _cumulative([r[1] for r in _CLOSE_REASONS])

    @property
    def emitted(self) -> int:
        return self._emitted

    @property
    def open_streams(self) -> int:
        """Streams opened that will still be closed (the abandoned ones excluded)."""
        return len(self._closing)

    def __iter__(self) -> Traffic:
        return self

    def __next__(self) -> AnyEvent:
        if self._total is not None and self._emitted >= self._total:
            raise StopIteration
        if not self._queued:
            self._generate()
        self._emitted += 1
        return self._queued.popleft()

    def finish(self) -> list[AnyEvent]:
        """Close every stream still open (except the abandoned): the end of a run."""
        closes = []
        while self._closing:
            closes.append(self._close(heapq.heappop(self._closing)))
        self._emitted += len(closes)
        return closes

    # -- generation ------------------------------------------------------------

    def _generate(self) -> None:
        reserve = len(self._closing)
        remaining = None if self._total is None else self._total - self._emitted
        if self._closing and (
            self._closing[0][0] <= self._emitted or (remaining is not None and remaining <= reserve)
        ):
            self._queued.append(self._close(heapq.heappop(self._closing)))
            return
        # A stream costs two events now and one later: open one only if the budget
        # still leaves room to close every stream already promised a close.
        may_stream = remaining is None or remaining >= reserve + 3
        self._request(may_stream)

    def _request(self, may_stream: bool) -> None:
        rng = self._rng
        subject = rng.choices(self._accounts, cum_weights=self._account_weights)[0]
        source = rng.choice(self._sources)
        route, method, _, streamable = rng.choices(_ROUTES, cum_weights=self._route_cum)[0]
        status = rng.choices(_STATUSES, cum_weights=self._status_cum)[0][0]
        model = (
            None
            if route == "/v1/models"
            else rng.choices(_MODELS, cum_weights=self._model_cum)[0][0]
        )
        ok = status < 400
        streams = may_stream and ok and streamable and rng.random() < self._stream_fraction
        if not ok:
            units = 0.0
        elif route == "/v1/messages":
            # Half whole units, half fractional (at most 3 decimals), as gateways do.
            units = (
                float(rng.randint(1, 5)) if rng.random() < 0.5 else round(rng.uniform(0.1, 4.0), 3)
            )
        elif route == "/v1/embeddings":
            units = round(rng.uniform(0.01, 0.5), 3)
        else:
            units = 1.0 if route == "/v1/files" else 0.0
        now = self._clock()
        self._queued.append(
            events.request(
                subject,
                source,
                units=units,
                route=route,
                method=method,
                status=status,
                model=model,
                latency_ms=round(rng.lognormvariate(math.log(250), 0.8), 1),
                bytes_in=int(rng.lognormvariate(math.log(2_000), 1.0)),
                bytes_out=0 if not ok else int(rng.lognormvariate(math.log(4_000), 1.2)),
                time=now,
                id=self._next_id(),
            )
        )
        if not streams:
            return
        stream_id = f"st-{self._run}-{next(self._streams):x}"
        self._queued.append(
            events.stream_opened(
                subject, source, stream_id, route=route, model=model, time=now, id=self._next_id()
            )
        )
        if rng.random() < self._abandon_fraction:
            self.abandoned.add(stream_id)
            return
        after = 1 + int(rng.expovariate(1 / self._mean_stream_events))
        due = self._emitted + len(self._queued) + after
        heapq.heappush(self._closing, (due, next(self._ids), subject, source, stream_id, now))

    def _close(self, pending: tuple[int, int, str, str, str, datetime]) -> AnyEvent:
        _, _, subject, source, stream_id, opened = pending
        rng = self._rng
        now = self._clock()
        reason = rng.choices(_CLOSE_REASONS, cum_weights=self._reason_cum)[0][0]
        return events.stream_closed(
            subject,
            source,
            stream_id,
            units=round(rng.uniform(0.5, 20.0), 3) if reason != "error" else 0.0,
            duration_ms=max(0.0, round((now - opened).total_seconds() * 1000, 3)),
            reason=reason,
            time=now,
            id=self._next_id(),
        )

    def _next_id(self) -> str:
        return f"{self._run}-{next(self._ids):x}"


def traffic(
    seed: int,
    accounts: int,
    *,
    gateways: int = 1,
    account_ids: Sequence[str] | None = None,
    total: int | None = None,
    clock: Clock | None = None,
    run_id: str | None = None,
) -> Traffic:
    """Deterministic simulated traffic; `Traffic` has the tuning knobs."""
    return Traffic(
        seed,
        accounts,
        gateways=gateways,
        account_ids=account_ids,
        total=total,
        clock=clock,
        run_id=run_id,
    )


def _account_ids(accounts: int) -> list[str]:
    if accounts < 1:
        raise ValueError(f"accounts must be at least 1, got {accounts}")
    return [f"acct-{k:06d}" for k in range(accounts)]


# -- running against Kafka ------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LoadgenResult:
    requests: int
    streams_opened: int
    streams_closed: int
    streams_left_open: int
    """Streams deliberately never closed (they expire by the idle timeout)."""
    elapsed_s: float
    """From the first event to the last acknowledgement."""

    @property
    def events(self) -> int:
        return self.requests + self.streams_opened + self.streams_closed

    @property
    def rate(self) -> float:
        """Events per second achieved."""
        return self.events / self.elapsed_s if self.elapsed_s > 0 else 0.0


class _Progress:
    """One line on stderr, rewritten in place."""

    def __init__(self) -> None:
        self._width = 0

    def show(self, sent: int, elapsed: float) -> None:
        rate = sent / elapsed if elapsed > 0 else 0.0
        line = f"loadgen: {sent:,} events sent, {rate:,.0f} events/s, {elapsed:,.1f}s elapsed"
        sys.stderr.write("\r" + line.ljust(self._width))
        sys.stderr.flush()
        self._width = len(line)

    def done(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


async def run_loadgen(
    bootstrap: str,
    topic: str,
    *,
    gateways: int,
    accounts: int,
    rate: float | None,
    duration_s: float | None,
    events: int | None,
    seed: int,
    progress: bool,
    account_ids: list[str] | None = None,
) -> LoadgenResult:
    """Send simulated traffic until `duration_s` passed or `events` were sent.

    `rate` is events/s across all gateways (None: as fast as possible). With
    neither `duration_s` nor `events` it runs until cancelled; cancelling flushes
    what was recorded and re-raises. `account_ids` replaces the generated
    `acct-000000`... ids (e.g. accounts that exist in the store).
    """
    if rate is not None and rate <= 0:
        raise ValueError(f"rate must be > 0 events/s, got {rate}")
    if duration_s is not None and duration_s < 0:
        raise ValueError(f"duration must be >= 0 s, got {duration_s}")
    flow = Traffic(
        seed,
        accounts,
        gateways=gateways,
        account_ids=account_ids,
        total=events,
        run_id=uuid.uuid4().hex[:12],
    )
    counts = {REQUEST: 0, STREAM_OPENED: 0, STREAM_CLOSED: 0}
    loop = asyncio.get_running_loop()
    display = _Progress() if progress else None
    start = loop.time()
    try:
        async with AsyncExitStack() as stack:
            # Leaving the stack flushes and closes every gateway, and raises if Kafka
            # did not acknowledge something.
            by_source: dict[str, Gateway] = {}
            for i in range(gateways):
                gateway = Gateway(bootstrap, topic, client_id=f"tally-loadgen-gw-{i}")
                by_source[f"gw-{i}"] = await stack.enter_async_context(gateway)
            start = shown = loop.time()
            chunk = 500 if rate is None else max(1, min(1_000, int(rate / 100)))
            for event in flow:
                await by_source[event.source].record(event)
                counts[event.type] += 1
                sent = flow.emitted
                if sent % chunk:
                    continue
                now = loop.time()
                if duration_s is not None and now - start >= duration_s:
                    break
                if rate is not None:
                    # Ahead of schedule: wait for the clock to catch up with the count.
                    ahead = sent / rate - (now - start)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
                else:
                    await asyncio.sleep(0)
                if display is not None and now - shown >= 0.25:
                    display.show(sent, now - start)
                    shown = now
            for event in flow.finish():
                await by_source[event.source].record(event)
                counts[event.type] += 1
    finally:
        if display is not None:
            display.show(sum(counts.values()), loop.time() - start)
            display.done()
    elapsed = loop.time() - start
    return LoadgenResult(
        requests=counts[REQUEST],
        streams_opened=counts[STREAM_OPENED],
        streams_closed=counts[STREAM_CLOSED],
        streams_left_open=len(flow.abandoned),
        elapsed_s=elapsed,
    )
