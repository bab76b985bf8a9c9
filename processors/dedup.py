"""Counting a re-sent event once: bounded memory of recently seen (source, id) keys.

Gateways retry, and a retry re-sends an event with the same (`source`, `id`).
Keeping every key forever is unbounded, so keys live in two generations: the
current one takes new keys, and when it has been open for `window_s` seconds or
holds `max_keys` keys it becomes the previous one, and the old previous one is
dropped. A key is therefore remembered for at least `window_s` seconds (unless
more than `max_keys` keys arrive in that time) and at most two windows, and
memory holds at most 2 x `max_keys` keys.

One `Deduplicator` serves one Kafka partition: all events of an account land in
one partition (docs/api.md#partitioning), and a gateway re-sends an event with its subject,
so its duplicates land there too.
"""

from __future__ import annotations

from collections import Counter
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
        # Ids grouped by source, not (source, id) tuples: a partition sees few
        # sources, so each key costs its id string and a set slot (~120 bytes for
        # a UUID) instead of also a tuple and its own copy of the source (~230).
        # Exact, unlike a hash of the pair: a collision would drop a real event.
        self._current: dict[str, set[str]] = {}
        self._previous: dict[str, set[str]] = {}
        self._current_keys = 0
        self._previous_keys = 0
        self._opened = clock()

    def first_time(self, source: str, event_id: str) -> bool:
        """Remember the key; True when it was not seen within the window."""
        current = self._current.get(source)
        if current is not None and event_id in current:
            return False
        previous = self._previous.get(source)
        if previous is not None and event_id in previous:
            return False
        if self._current_keys >= self.max_keys or self._clock() - self._opened >= self.window_s:
            self._previous, self._previous_keys = self._current, self._current_keys
            self._current, self._current_keys = {}, 0
            self._opened = self._clock()
            current = None
        if current is None:
            current = self._current[source] = set()
        current.add(event_id)
        self._current_keys += 1
        return True

    def admit_many(self, sources: list[str], ids: list[str]) -> list[int] | None:
        """Remember a message's keys at once: the indices of its duplicates (usually
        none), exactly where `first_time` for each in turn would return False. None,
        with nothing remembered, when a generation would turn or the partition sees
        many sources: then ask `first_time` per key.

        Set operations in C instead of a call per key, even when a re-sent event is in
        the message (with 200 events per message and 0.5 % re-sent, most messages hold
        one); only keys that may be duplicates are looked at one by one. The window's
        clock is read once per message, so a generation may turn one message late."""
        n = len(ids)
        current, previous = self._current, self._previous
        if (
            self._current_keys + n > self.max_keys
            or len(current) + len(previous) > 16  # many sources: per key is cheaper
            or self._clock() - self._opened >= self.window_s
        ):
            return None
        fresh = set(ids)
        # Conservative: an id repeated in the message, or seen under any source, is a
        # suspect; every other key is new, whatever its source.
        suspects = (
            {i for i, count in Counter(ids).items() if count > 1} if len(fresh) != n else set()
        )
        for seen in (*current.values(), *previous.values()):
            if not seen.isdisjoint(fresh):
                suspects |= seen & fresh
        duplicates: list[int] = []
        first = sources[0]
        if not suspects and sources.count(first) == n:
            group = current.get(first)
            if group is None:
                current[first] = fresh
            else:
                group |= fresh
            self._current_keys += n
            return duplicates
        groups: dict[str, set[str]] = {}
        created = []
        for source in set(sources):
            group = current.get(source)
            if group is None:
                group = current[source] = set()
                created.append(source)
            groups[source] = group
        added = 0
        for index, (source, event_id) in enumerate(zip(sources, ids, strict=True)):
            if event_id in suspects:
                old = previous.get(source)
                if event_id in groups[source] or (old is not None and event_id in old):
                    duplicates.append(index)
                    continue
            groups[source].add(event_id)
            added += 1
        for source in created:  # a source whose every key was a duplicate: as first_time
            if not current[source]:
                del current[source]
        self._current_keys += added
        return duplicates

    def __len__(self) -> int:
        return self._current_keys + self._previous_keys
