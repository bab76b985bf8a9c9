"""The Java gateway recipe (docs/recipes/java/TallyRecorder.java) against a real broker.

What a gateway in another language publishes must be what Tally's processors accept:
every event valid by the pydantic models and by schemas/event.schema.json, keyed by its
subject, in the partition our producer library computes for that subject.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from collections import Counter
from typing import Any

import jsonschema_rs
import orjson
import pytest

from producers.partitioning import partition_for
from schemas.events import (
    CONTENT_TYPE_SINGLE,
    EVENT_ADAPTER,
    MESSAGE_ADAPTER,
    REQUEST,
    STREAM_CLOSED,
    STREAM_OPENED,
)
from schemas.jsonschema import SCHEMA_PATH
from tests.conftest import KAFKA_LIBS, REPO_ROOT, MakeTopics, consume_all

pytestmark = pytest.mark.integration

RECIPE = REPO_ROOT / "docs" / "recipes" / "java" / "TallyRecorder.java"
PARTITIONS = 6
PER_ACCOUNT = 12
# Enough accounts that several partitions are used: a partitioner mismatch shows.
ACCOUNTS = [f"acct-{i:03d}" for i in range(24)] + ["org:42.team_a-b"]
SOURCE = "gw-java-1"

JAVA = shutil.which("java")


def run_recipe(bootstrap: str, topic: str) -> list[dict[str, Any]]:
    result = subprocess.run(
        [
            str(JAVA),
            "-cp",
            f"{KAFKA_LIBS}/*",
            str(RECIPE),
            bootstrap,
            topic,
            SOURCE,
            str(PER_ACCOUNT),
            *ACCOUNTS,
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, f"the Java recipe failed:\n{result.stderr[-4000:]}"
    return [orjson.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


@pytest.mark.skipif(JAVA is None, reason="no `java` on PATH (a JDK 17 is needed for the recipe)")
async def test_java_recipe_publishes_what_tally_accepts(
    kafka_bootstrap: str, unique_name: str, make_topics: MakeTopics
) -> None:
    assert list(KAFKA_LIBS.glob("kafka-clients-*.jar")), (
        f"no Kafka client in {KAFKA_LIBS}: run `make setup`"
    )
    await make_topics(kafka_bootstrap, {unique_name: PARTITIONS})

    acked = await asyncio.to_thread(run_recipe, kafka_bootstrap, unique_name)
    assert len(acked) == len(ACCOUNTS) * (PER_ACCOUNT + 2)

    schema = jsonschema_rs.validator_for(orjson.loads(SCHEMA_PATH.read_bytes()))
    records = await consume_all(kafka_bootstrap, unique_name, PARTITIONS)
    assert len(records) == len(acked), "one message per event, each delivered once"

    where: dict[str, int] = {}
    by_id: dict[str, Any] = {}
    for record in records:
        doc = orjson.loads(record.value)
        assert isinstance(doc, dict), "the recipe sends single events, not batches"
        schema.validate(doc)  # raises with the offending path
        MESSAGE_ADAPTER.validate_json(record.value)
        event = EVENT_ADAPTER.validate_json(record.value)
        assert record.key == event.subject.encode()
        assert dict(record.headers)["content-type"].decode() == CONTENT_TYPE_SINGLE
        assert record.partition == partition_for(event.subject, PARTITIONS), event.subject
        where[event.id] = record.partition
        by_id[event.id] = event

    # What the program says Kafka acknowledged is what is on the topic, where it said.
    assert {line["event"]["id"]: line["partition"] for line in acked} == where
    assert len({e.subject for e in by_id.values()}) == len(ACCOUNTS)
    assert len(set(where.values())) > 1, "the accounts should spread over partitions"
    assert {e.source for e in by_id.values()} == {SOURCE}

    types = Counter((e.subject, e.type) for e in by_id.values())
    for account in ACCOUNTS:
        assert types[(account, REQUEST)] == PER_ACCOUNT
        assert types[(account, STREAM_OPENED)] == types[(account, STREAM_CLOSED)] == 1
    opened = {e.data.stream_id: e.subject for e in by_id.values() if e.type == STREAM_OPENED}
    closed = {e.data.stream_id: e.subject for e in by_id.values() if e.type == STREAM_CLOSED}
    assert opened == closed


def test_the_schema_check_is_not_vacuous() -> None:
    schema = jsonschema_rs.validator_for(orjson.loads(SCHEMA_PATH.read_bytes()))
    good = {
        "specversion": "1.0",
        "id": "a1",
        "source": SOURCE,
        "type": REQUEST,
        "subject": "acct-1",
        "time": "2026-03-29T01:02:03.456Z",
        "data": {"units": 1},
    }
    assert schema.is_valid(good)
    assert not schema.is_valid({**good, "data": {"units": -1}})
    assert not schema.is_valid({**good, "subject": "has space"})
