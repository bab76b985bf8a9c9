"""Types of the native fold (native/src/lib.rs); see processors/pipeline.py."""

from collections.abc import Callable

class Fold:
    def __init__(self) -> None: ...
    def __len__(self) -> int: ...
    def clear(self) -> None: ...
    def add_message(
        self,
        value: bytes,
        lo_us: int,
        hi_us: int,
        max_event_bytes: int,
        dedup: Dedup,
    ) -> tuple[int, int, int, int] | None: ...
    def add_values(
        self,
        kind: str,
        subject: str,
        minute: int,
        route: str,
        method: str,
        model: str,
        status: int,
        stream_id: str,
        units: float,
        latency: float,
        bytes_in: int,
        bytes_out: int,
        time_us: int,
    ) -> None: ...
    def bodies(self, budget: int) -> list[tuple[bytes, int]]: ...

class Dedup:
    window_s: float
    max_keys: int
    def __init__(self, window_s: float, max_keys: int, clock: Callable[[], float]) -> None: ...
    def first_time(self, source: str, event_id: str) -> bool: ...
    def admit_many(self, sources: list[str], ids: list[str]) -> list[int]: ...
    def __len__(self) -> int: ...
