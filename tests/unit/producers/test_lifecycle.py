"""The gateway's lifecycle: only the moves in the table, and what a gateway does in each state."""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import pytest

from producers import events
from producers.gateway import Gateway
from producers.lifecycle import TRANSITIONS, Lifecycle, State
from producers.settings import ProducerSettings


def test_the_path_through_the_lifecycle_ends_closed() -> None:
    lifecycle = Lifecycle()
    for state in (State.STARTING, State.NEW, State.STARTING, State.RUNNING, State.DRAINING):
        lifecycle.move(state)
        assert lifecycle.state is state
        assert not lifecycle.closed.is_set()
    lifecycle.move(State.CLOSED)
    assert lifecycle.closed.is_set()


@pytest.mark.parametrize(
    ("start", "to"),
    [(a, b) for a, b in itertools.product(State, State) if b not in TRANSITIONS[a]],
)
def test_moves_outside_the_table_are_refused(start: State, to: State) -> None:
    lifecycle = Lifecycle()
    lifecycle.state = start
    with pytest.raises(RuntimeError, match=f"from {start.value} to {to.value}"):
        lifecycle.move(to)
    assert lifecycle.state is start


def test_nothing_leaves_closed_and_recording_needs_running() -> None:
    assert TRANSITIONS[State.CLOSED] == frozenset()
    assert {s for s, moves in TRANSITIONS.items() if State.RUNNING in moves} == {State.STARTING}


class _Producer:
    """Acknowledges at once; its first `fail_starts` starts fail, and a start can be held."""

    def __init__(self, fail_starts: int = 0) -> None:
        self.fail_starts = fail_starts
        self.hold: asyncio.Event | None = None
        self.holding = asyncio.Event()
        self.sent = 0

    async def start(self) -> None:
        if self.hold is not None:
            self.holding.set()
            await self.hold.wait()
        if self.fail_starts:
            self.fail_starts -= 1
            raise ConnectionError("connection refused")

    async def stop(self) -> None:
        return None

    async def partitions_for(self, topic: str) -> set[int]:
        return {0, 1}

    async def send(self, topic: str, value: bytes | None = None, **_: Any) -> asyncio.Future[Any]:
        self.sent += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


def _gateway(producer: _Producer, tmp_path: Path) -> Gateway:
    return Gateway(
        "fake:9092",
        "tally.events",
        settings=ProducerSettings(),
        producer_factory=lambda: producer,
        spool_dir=tmp_path / "spool",
    )


async def test_a_failed_start_can_be_tried_again(tmp_path: Path) -> None:
    producer = _Producer(fail_starts=1)
    gateway = _gateway(producer, tmp_path)
    with pytest.raises(RuntimeError, match="Check that the broker is up"):
        await gateway.start()
    await gateway.start()
    await gateway.record(events.request("acct-1", "gw-1", units=1))
    assert await gateway.close() == 0
    assert producer.sent == 1


async def test_close_while_starting_is_refused_and_start_then_completes(tmp_path: Path) -> None:
    producer = _Producer()
    producer.hold = asyncio.Event()
    gateway = _gateway(producer, tmp_path)
    starting = asyncio.create_task(gateway.start())
    await producer.holding.wait()
    with pytest.raises(RuntimeError, match="starting"):
        await gateway.close()
    with pytest.raises(RuntimeError, match="starting"):
        await gateway.start()
    producer.hold.set()
    await starting
    await gateway.record(events.request("acct-1", "gw-1", units=1))
    assert await gateway.close() == 0
    assert producer.sent == 1
