"""CPU cost of `Gateway.record` per event, without Kafka (the producer is a stub).

    .venv/bin/python -m benchmarks.micro_producer [--events 200000] [--accounts 20000]

Same events as benchmarks/producer.py (the bench dataset's generator, 10 events per
account as there: 1M events, 100k accounts), the gateway's
defaults (200-event batches, 20 ms linger), spool off; a stub producer acknowledges
each message at once, so what is timed is encoding, partitioning, batching and the
gateway's bookkeeping. Process CPU time, best of three (comparable on a loaded machine).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from benchmarks.producer import _events
from producers.gateway import Gateway, Headers
from schemas.events import AnyEvent

PARTITIONS = 12


class _StubProducer:
    """Acknowledges every message at once."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def partitions_for(self, topic: str) -> set[int]:
        return set(range(PARTITIONS))

    async def send(
        self,
        topic: str,
        value: bytes | None = None,
        key: bytes | None = None,
        partition: int | None = None,
        timestamp_ms: int | None = None,
        headers: Headers | None = None,
    ) -> asyncio.Future[Any]:
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        future.set_result(None)
        return future


async def _record(events: list[AnyEvent]) -> float:
    gateway = Gateway("stub:9092", "bench", producer_factory=_StubProducer, spool=False)
    await gateway.start()
    try:
        started = time.process_time()
        for event in events:
            await gateway.record(event)
        await gateway.flush()
        elapsed = time.process_time() - started
    finally:
        await gateway.close()
    if gateway.stats.events_acked != len(events):
        raise RuntimeError(f"acknowledged {gateway.stats.events_acked} of {len(events)}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--accounts", type=int, default=20_000)
    args = parser.parse_args()
    events = _events(args.events, args.accounts, seed=11)
    best = min(asyncio.run(_record(events)) for _ in range(3))
    print(f"{'gateway_record_us_per_event':<34} {best / len(events) * 1e6:8.3f}")


if __name__ == "__main__":
    main()
