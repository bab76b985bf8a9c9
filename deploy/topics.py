"""`python -m deploy.topics`: create Tally's topics on a Kafka cluster Tally does not run.

`tally up` creates them on its local broker; against a shared cluster (Docker
Compose, Kubernetes) this one-shot does it before the workers start, because a
worker refuses to start without the events topic (the partition count is a
deployment decision, not the first worker's). Existing topics are kept; one with
fewer partitions than asked is an error (accounts would map to other partitions).
"""

from __future__ import annotations

import asyncio

from deploy.kafka_local import ensure_topics
from deploy.settings import StackSettings
from deploy.stack import ensure_rollups_topic
from query_api.alerts.evaluator import COMPACTED
from query_api.alerts.settings import AlertSettings
from schemas.settings import load


async def create(settings: StackSettings, timeout_s: float = 120.0) -> None:
    # A broker that has just started may take a while to accept requests.
    await ensure_topics(
        settings.bootstrap, {settings.events_topic: settings.events_partitions}, timeout=timeout_s
    )
    # The rollups topic follows the events topic's actual partition count, which
    # may be larger than TALLY_EVENTS_PARTITIONS if someone created it earlier.
    await ensure_rollups_topic(settings)
    # Alerts are keyed by their id and compacted: the latest event per alert stays.
    alerts = load(AlertSettings).alerts_topic
    await ensure_topics(
        settings.bootstrap, {alerts: 1}, timeout=timeout_s, configs={alerts: COMPACTED}
    )


def main() -> int:
    settings = load(StackSettings)
    asyncio.run(create(settings))
    print(
        f"topics {settings.events_topic}, {settings.rollups_topic}, {settings.dlq_topic}, "
        f"{load(AlertSettings).alerts_topic} "
        f"are ready on {settings.bootstrap}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
