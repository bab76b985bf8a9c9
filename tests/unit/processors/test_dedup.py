from __future__ import annotations

import pytest

from processors.dedup import Deduplicator


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_key_counts_once_within_the_window() -> None:
    clock = Clock()
    dedup = Deduplicator(window_s=60, max_keys=100, clock=clock)
    assert dedup.first_time("gw", "1")
    assert not dedup.first_time("gw", "1")
    assert dedup.first_time("gw-2", "1")  # the pair identifies the event
    clock.now = 59
    assert not dedup.first_time("gw", "1")


def test_keys_survive_one_rotation_and_expire_after_two() -> None:
    clock = Clock()
    dedup = Deduplicator(window_s=60, max_keys=100, clock=clock)
    dedup.first_time("gw", "old")
    clock.now = 61
    assert dedup.first_time("gw", "new")  # rotates: "old" is now in the previous generation
    assert not dedup.first_time("gw", "old")
    clock.now = 122
    assert dedup.first_time("gw", "newer")  # rotates again: "old" is gone
    assert dedup.first_time("gw", "old")


def test_memory_is_bounded_by_two_generations() -> None:
    dedup = Deduplicator(window_s=3600, max_keys=10, clock=Clock())
    for i in range(1000):
        assert dedup.first_time("gw", str(i))
    assert len(dedup) <= 20
    assert not dedup.first_time("gw", "999")


def test_separator_inside_ids_cannot_collide() -> None:
    dedup = Deduplicator(window_s=60, max_keys=10, clock=Clock())
    assert dedup.first_time("a\x1fb", "c")
    assert dedup.first_time("a", "b\x1fc")


def test_rejects_nonsense_bounds() -> None:
    with pytest.raises(ValueError, match="positive"):
        Deduplicator(window_s=0, max_keys=1)


def test_keys_of_several_sources_rotate_together() -> None:
    dedup = Deduplicator(window_s=3600, max_keys=3, clock=Clock())
    assert dedup.first_time("gw-a", "1")
    assert dedup.first_time("gw-b", "1")
    assert dedup.first_time("gw-a", "2")
    assert len(dedup) == 3
    assert dedup.first_time("gw-c", "9")  # full: rotates, the three above are now previous
    assert not dedup.first_time("gw-b", "1")
    assert not dedup.first_time("gw-a", "2")
    assert dedup.first_time("gw-c", "1")
    assert dedup.first_time("gw-c", "2")
    assert dedup.first_time("gw-d", "1")  # rotates again: gw-a and gw-b are forgotten
    assert dedup.first_time("gw-b", "1")
    assert len(dedup) <= 6


@pytest.mark.parametrize("seed", range(20))
def test_admit_many_is_first_time_for_each_key(seed: int) -> None:
    import random

    rng = random.Random(seed)
    clock = Clock()
    batched = Deduplicator(window_s=60, max_keys=50, clock=clock)
    single = Deduplicator(window_s=60, max_keys=50, clock=clock)
    admitted = with_duplicates = 0
    for _ in range(300):
        n = rng.randint(1, 12)
        sources = [rng.choice(["gw-1", "gw-2", "gw-3"]) for _ in range(n)]
        ids = [str(rng.randrange(400)) for _ in range(n)]
        if rng.random() < 0.3:  # a re-sent event next to its original, as gateways retry
            at = rng.randrange(n)
            sources.insert(at, sources[at])
            ids.insert(at, ids[at])
        if rng.random() < 0.2:  # one source for the whole message (its own fast path)
            sources = [sources[0]] * len(ids)
        clock.now += rng.uniform(0, 5)
        expected = [single.first_time(s, i) for s, i in zip(sources, ids, strict=True)]
        found = batched.admit_many(sources, ids)
        if found is None:
            got = [batched.first_time(s, i) for s, i in zip(sources, ids, strict=True)]
        else:
            admitted += 1
            with_duplicates += bool(found)
            got = [index not in found for index in range(len(ids))]
            assert found == sorted(found)
        assert got == expected
        assert len(batched) == len(single)
        assert batched._current == single._current
        assert batched._previous == single._previous
    assert admitted > 30
    assert with_duplicates > 10
