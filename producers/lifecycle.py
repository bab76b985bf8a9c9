"""A gateway's lifecycle, as a state machine: the states, and the only moves between them.

    NEW --start--> STARTING --connected--> RUNNING --close--> DRAINING ---> CLOSED
     |                 |
     |                 +--start failed--> NEW   (start may be tried again)
     +--close (never started)--> CLOSED

Only RUNNING records; DRAINING makes what was recorded safe, then CLOSED for good.
"""

from __future__ import annotations

import asyncio
from enum import Enum
from typing import Final


class State(Enum):
    NEW = "new"
    STARTING = "starting"
    RUNNING = "running"
    DRAINING = "closing"
    CLOSED = "closed"


TRANSITIONS: Final[dict[State, frozenset[State]]] = {
    State.NEW: frozenset({State.STARTING, State.CLOSED}),
    State.STARTING: frozenset({State.RUNNING, State.NEW}),
    State.RUNNING: frozenset({State.DRAINING}),
    State.DRAINING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}


class Lifecycle:
    """The current state; `move` refuses any move not in TRANSITIONS (a bug, not a user
    error: the gateway checks what it may do before moving)."""

    __slots__ = ("closed", "state")

    def __init__(self) -> None:
        self.state = State.NEW
        self.closed = asyncio.Event()
        """Set on reaching CLOSED: a second close() waits for it."""

    def move(self, to: State) -> None:
        if to not in TRANSITIONS[self.state]:
            raise RuntimeError(f"a gateway cannot go from {self.state.value} to {to.value}")
        self.state = to
        if to is State.CLOSED:
            self.closed.set()
