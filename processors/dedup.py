"""Counting a re-sent event once: bounded memory of recently seen (source, id) keys.

Gateways retry, and a retry re-sends an event with the same (`source`, `id`).
Keeping every key forever is unbounded, so keys live in two generations: the
current one takes new keys, and when it has been open for `window_s` seconds or
holds `max_keys` keys it becomes the previous one, and the old previous one is
dropped. A key is therefore remembered for at least `window_s` seconds (unless
more than `max_keys` keys arrive in that time) and at most two windows, and
memory holds at most 2 x `max_keys` keys.

One `Deduplicator` serves one Kafka partition: all events of an account land in
one partition (CONTRACT §1), and a gateway re-sends an event with its subject,
so its duplicates land there too.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic


class Deduplicator:
    def __init__(
        self, window_s: float, max_keys: int, clock: Callable[[], float] = monotonic
    ) -> None:
        if window_s <= 0 or max_keys <= 0:
            raise ValueError("window_s and max_keys must be positive")
        self.window_s = window_s
        self.max_keys = max_keys
        self._clock = clock
        self._current: set[tuple[str, str]] = set()
        self._previous: set[tuple[str, str]] = set()
        self._opened = clock()

    def first_time(self, source: str, event_id: str) -> bool:
        """Remember the key; True when it was not seen within the window."""
        # A tuple, not a joined string: any separator could occur inside source or id.
        key = (source, event_id)
        if key in self._current or key in self._previous:
            return False
        if len(self._current) >= self.max_keys or self._clock() - self._opened >= self.window_s:
            self._previous = self._current
            self._current = set()
            self._opened = self._clock()
        self._current.add(key)
        return True

    def __len__(self) -> int:
        return len(self._current) + len(self._previous)
