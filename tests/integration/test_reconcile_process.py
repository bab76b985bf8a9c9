"""`tally reconcile` as an operator's script sees it: the process's exit status.

0 no drift, 1 drift, 2 could not check (deploy/reconcile_cli.py). The command runs
as its own process against a real broker and an embedded store of its own path
(chdb admits one process per path, so this test process never opens it).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from deploy.kafka_local import ensure_topics
from deploy.processes import free_port

pytestmark = pytest.mark.integration

CLI = [sys.executable]


async def _run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [*CLI, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_reconcile_exits_0_1_and_2(
    kafka_bootstrap: str, unique_name: str, tmp_path: Path
) -> None:
    env = {
        **os.environ,
        "TALLY_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "TALLY_EVENTS_TOPIC": f"{unique_name}.events",
        "TALLY_CLICKHOUSE_URL": f"chdb://{tmp_path / 'store'}",
        "TALLY_CLICKHOUSE_DATABASE": unique_name,
        # Nothing listens there: the rollups are read from the store itself.
        "TALLY_API_URL": f"http://127.0.0.1:{free_port()}",
    }
    env.pop("TALLY_ADMIN_KEY", None)
    migrated = await _run(env, "-m", "deploy.cli", "migrate")
    assert migrated.returncode == 0, migrated.stderr
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    span = ["--from", (now - timedelta(hours=1)).isoformat(), "--to", now.isoformat(), "--quiet"]

    missing = await _run(env, "-m", "deploy.cli", "reconcile", *span)
    assert missing.returncode == 2, missing.stderr
    assert "has no topic" in missing.stderr

    await ensure_topics(kafka_bootstrap, {env["TALLY_EVENTS_TOPIC"]: 2})
    clean = await _run(env, "-m", "deploy.cli", "reconcile", *span)
    assert clean.returncode == 0, clean.stderr
    assert clean.stdout.startswith("no drift")

    # A rollup no event in the log accounts for.
    minute = int((now - timedelta(minutes=30)).timestamp())
    insert = (
        "from datetime import UTC, datetime\n"
        "from schemas.rollup_table import COLUMNS\n"
        "from schemas.store import Store\n"
        f"store = Store({env['TALLY_CLICKHOUSE_URL']!r}, {unique_name!r})\n"
        f"at = datetime.fromtimestamp({minute}, UTC)\n"
        "store.insert('rollup_minute', [['acct-drift', at, 'tally.request.v1', '', '', '', 0,"
        " '', 1, 1000000, 0.0, 0, 0, at, 0]], COLUMNS)\n"
    )
    inserted = await _run(env, "-c", insert)
    assert inserted.returncode == 0, inserted.stderr
    drift = await _run(env, "-m", "deploy.cli", "reconcile", *span, "--json")
    assert drift.returncode == 1, drift.stderr
    assert '"acct-drift"' in drift.stdout
