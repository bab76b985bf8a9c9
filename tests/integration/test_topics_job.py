"""`python -m deploy.topics` (the compose/Kubernetes topics one-shot) on a real broker."""

from __future__ import annotations

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from deploy.kafka_local import TopicSetupError, ensure_topics
from deploy.settings import StackSettings
from deploy.topics import create

pytestmark = pytest.mark.integration


async def _partitions(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        return len(consumer.partitions_for_topic(topic) or ())
    finally:
        await consumer.stop()


def _settings(bootstrap: str, name: str, partitions: int) -> StackSettings:
    return StackSettings(
        kafka_bootstrap=bootstrap,
        events_topic=f"{name}.events",
        rollups_topic=f"{name}.rollups",
        dlq_topic=f"{name}.dlq",
        events_partitions=partitions,
    )


async def test_creates_all_four_and_is_idempotent(
    kafka_bootstrap: str, unique_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = _settings(kafka_bootstrap, unique_name, 6)
    alerts = f"{unique_name}.alerts"
    monkeypatch.setenv("TALLY_ALERTS_TOPIC", alerts)
    await create(settings, timeout_s=60)
    await create(settings, timeout_s=60)  # a re-run Job changes nothing
    assert await _partitions(kafka_bootstrap, settings.events_topic) == 6
    assert await _partitions(kafka_bootstrap, settings.rollups_topic) == 6
    assert await _partitions(kafka_bootstrap, settings.dlq_topic) == 1
    assert await _partitions(kafka_bootstrap, alerts) == 1
    assert await _cleanup_policy(kafka_bootstrap, alerts) == "compact"


async def _cleanup_policy(bootstrap: str, topic: str) -> str:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        (response,) = await admin.describe_configs(
            [ConfigResource(ConfigResourceType.TOPIC, topic)]
        )
        entries = response.to_object()["resources"][0]["config_entries"]
        # aiokafka names the field config_names in v0 of the response, config_name later.
        named = {e.get("config_name", e.get("config_names")): e["config_value"] for e in entries}
        return str(named["cleanup.policy"])
    finally:
        await admin.close()


async def test_rollups_follow_an_existing_larger_events_topic(
    kafka_bootstrap: str, unique_name: str
) -> None:
    settings = _settings(kafka_bootstrap, unique_name, 4)
    await ensure_topics(kafka_bootstrap, {settings.events_topic: 8})
    await create(settings, timeout_s=60)
    assert await _partitions(kafka_bootstrap, settings.rollups_topic) == 8


async def test_an_events_topic_with_too_few_partitions_is_an_error(
    kafka_bootstrap: str, unique_name: str
) -> None:
    settings = _settings(kafka_bootstrap, unique_name, 4)
    await ensure_topics(kafka_bootstrap, {settings.events_topic: 2})
    with pytest.raises(TopicSetupError):
        await create(settings, timeout_s=30)
