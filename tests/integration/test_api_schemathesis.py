"""Property-based checks of the whole API against its own OpenAPI document (schemathesis).

The real app runs in-process on a real store (a database of its own in the session's
one chdb path), seeded with an account that has usage, the account's key and a stored
admin key. Every operation is generated three times: with the account key (usage and
analytics answer; admin routes must answer their documented 403), with the admin key
(admin and analytics answer; the usage routes must answer 403), and with no key (every
authenticated route must answer its documented 401).

On every response: no 5xx, and the response conforms to the OpenAPI document (status
code, media type, body schema, documented headers), error envelopes included. The
API's own rate limit is set out of reach; tests/integration/test_api_ratelimit.py
covers it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, BaseSchema, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from deploy.kafka_local import ensure_topics
from processors.rollup import RollupBuilder
from producers import events as build
from query_api.accounts import AccountStore
from query_api.app import create_app
from query_api.settings import ApiSettings
from schemas.rollup_table import offset_markers
from schemas.store import Store
from tests.rollups import ms, write_wire

pytestmark = pytest.mark.integration

ACCOUNT = "acme"
ENV_ADMIN_KEY = "schemathesis-admin-key-0123456789"
MAX_EXAMPLES = 30
# No 5xx and a body matching the schema, plus what makes "conforms" whole: every
# status answered is documented, with the documented media type and headers.
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
]
READYZ_CHECKS = [check for check in CHECKS if check is not not_a_server_error]


@dataclass(frozen=True)
class Seeded:
    app: FastAPI
    headers: dict[str, dict[str, str]]


@pytest.fixture(scope="module")
def seeded(store_url: str, kafka_bootstrap: str) -> Iterator[Seeded]:
    settings_ = ApiSettings(
        admin_key=ENV_ADMIN_KEY,
        clickhouse_url=store_url,
        clickhouse_database=f"t{uuid.uuid4().hex}",
        # Thousands of generated requests from one key in seconds: the API's own
        # limit would answer 429 (documented, so conforming) and hide everything else.
        api_rate_per_s=1e9,
        api_rate_burst=1_000_000_000,
        # No worker runs here: /readyz answers its documented 503 no_worker throughout
        # (a group of its own on the session's broker, so no one else's worker counts).
        kafka_bootstrap=kafka_bootstrap,
        consumer_group=f"g{uuid.uuid4().hex}",
        # POST /api/v1/events publishes here: a topic of its own on the session's broker.
        events_topic=f"t{uuid.uuid4().hex}.events",
    )
    asyncio.run(ensure_topics(kafka_bootstrap, {settings_.events_topic: 2}))
    store = Store(settings_.store_url, settings_.store_database)
    store.migrate()
    now = datetime.now(UTC)
    builder = RollupBuilder()
    for i in range(40):
        t = now - timedelta(minutes=3 * i, seconds=7)
        builder.add(build.request(ACCOUNT, "gw-1", units=1.5, route="/v1/chat", status=200, time=t))
    builder.add(build.stream_opened(ACCOUNT, "gw-1", "s-1", route="/v1/chat", time=now))
    write_wire(store, builder.wire_rows())
    write_wire(store, offset_markers(settings_.events_topic, {0: 40}, {0: ms(now)}))

    accounts = AccountStore(store)
    accounts.create(ACCOUNT, "pro")
    account_key, _ = accounts.create_key(ACCOUNT, admin=False)
    admin_key, _ = accounts.create_key(None, admin=True)
    app = create_app(settings_, store)
    try:
        yield Seeded(
            app,
            {
                "account": {"X-API-Key": account_key},
                # A stored admin key, not TALLY_ADMIN_KEY: the path most callers take.
                "admin": {"Authorization": f"Bearer {admin_key}"},
                "none": {},  # every authenticated route must answer its documented 401
            },
        )
    finally:
        store.close()


# Hypothesis settings per operation: bounded so the file runs in well under a minute;
# the store answers in milliseconds, but a deadline would still flake on a busy host.
BOUNDED = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)


Operation = APIOperation[Any, Any, Any, Any]


def exercise(schema: BaseSchema, operation: Operation, headers: dict[str, str]) -> set[int]:
    """Valid, invalid and documented-example inputs of one operation; the statuses seen."""
    statuses: set[int] = set()
    cases = st.one_of(
        # The documented examples too: they are what users copy from /docs.
        *schema.get_strategies_from_examples(operation),
        operation.as_strategy(GenerationMode.POSITIVE),
        operation.as_strategy(GenerationMode.NEGATIVE),
    )

    # /readyz's 503 is its documented answer for a stack that is not counting (this
    # one has no worker); everywhere else a 5xx is a fault.
    checks = READYZ_CHECKS if operation.label == "GET /readyz" else CHECKS

    @BOUNDED
    @given(case=cases)
    def conforms(case: schemathesis.Case[Operation]) -> None:
        response = case.call_and_validate(headers=headers, checks=checks)
        statuses.add(response.status_code)

    conforms()
    return statuses


def run_every_operation(
    seeded: Seeded, role: str, subtests: pytest.Subtests
) -> dict[str, set[int]]:
    """Each operation as a subtest of its own; returns the statuses seen per operation.

    (schemathesis' own pytest loader for fixture-built schemas, `from_fixture`, does
    not run on pytest 9, so the operations are driven here with their strategies.)
    """
    schema = schemathesis.openapi.from_asgi("/openapi.json", seeded.app)
    operations: list[Operation] = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):  # an operation schemathesis cannot read: a doc bug
            pytest.fail(f"unusable operation in the OpenAPI document: {result.err()}")
        operations.append(result.ok())
    assert len(operations) >= 10, [op.label for op in operations]
    seen: dict[str, set[int]] = {}
    for operation in operations:
        seen[operation.label] = set()
        with subtests.test(msg=operation.label):
            seen[operation.label] = exercise(schema, operation, seeded.headers[role])
    return seen


def answered(seen: dict[str, set[int]], label: str) -> bool:
    """Whether the operation gave at least one 2xx (so the run reached past auth)."""
    return any(200 <= status < 300 for status in seen[label])


# Operations with a 2xx on the happy path; an answer of only 401/403 would mean the
# run never got past authentication (a revoked key, say) and proved little.
ACCOUNT_OK = ("GET /api/account/usage", "GET /api/v1/account/usage", "GET /api/v1/analytics/usage")
ADMIN_OK = (
    "GET /api/v1/admin/plans",
    "GET /api/v1/admin/accounts",
    "POST /api/v1/admin/accounts",
    "POST /api/v1/admin/keys",
    "GET /api/v1/admin/keys",
    "GET /api/v1/analytics/usage",
    "GET /api/v1/analytics/top-accounts",
    "POST /api/v1/events",
)


def test_every_operation_with_an_account_key(seeded: Seeded, subtests: pytest.Subtests) -> None:
    seen = run_every_operation(seeded, "account", subtests)
    assert all(answered(seen, label) for label in ACCOUNT_OK), seen
    assert not any(answered(seen, label) for label in ADMIN_OK if "admin" in label), seen


def test_every_operation_with_an_admin_key(seeded: Seeded, subtests: pytest.Subtests) -> None:
    seen = run_every_operation(seeded, "admin", subtests)
    assert all(answered(seen, label) for label in ADMIN_OK), seen
    assert seen["GET /api/v1/account/usage"] <= {403}, seen  # an admin key has no usage


def test_every_operation_without_a_key(seeded: Seeded, subtests: pytest.Subtests) -> None:
    seen = run_every_operation(seeded, "none", subtests)
    for label, statuses in seen.items():
        if label == "GET /healthz":
            assert statuses == {200}, (label, statuses)
        elif label == "GET /readyz":
            assert statuses == {503}, (label, statuses)
        else:
            assert statuses <= {401, 422}, (label, statuses)


# -- what schemathesis found, pinned down ------------------------------------------------


async def test_an_undecodable_body_is_a_422_not_an_internal_error(seeded: Seeded) -> None:
    # Was 400 with code internal_error (FastAPI's "error parsing the body"), undocumented.
    transport = httpx.ASGITransport(app=seeded.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
        response = await client.post(
            "/api/v1/admin/accounts",
            content=b'{"id": "\xff"}',
            headers={**seeded.headers["admin"], "Content-Type": "application/json"},
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"
    assert response.json()["error"]["message"].startswith("body: ")


@pytest.mark.parametrize(
    ("path", "start", "end"),
    [
        ("/api/v1/analytics/top-accounts", "0999-01-01T00:00:00Z", "2000-01-01T00:00:00Z"),
        ("/api/v1/analytics/top-accounts", "1969-12-31T23:59:59Z", "2000-01-01T00:00:00Z"),
        ("/api/v1/analytics/top-accounts", "2000-01-01T00:00:00Z", "9999-12-31T23:59:59-01:00"),
        ("/api/v1/analytics/usage", "0001-01-01T00:30:00+01:00", "2000-01-01T00:00:00Z"),
    ],
)
async def test_times_the_store_cannot_hold_are_a_422_not_a_500(
    seeded: Seeded, path: str, start: str, end: str
) -> None:
    # Were 500s: ClickHouse's DateTime could not take the parameter, or converting
    # to UTC overflowed.
    transport = httpx.ASGITransport(app=seeded.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
        response = await client.get(
            path,
            params={"from": start, "to": end, "window": "day"},
            headers=seeded.headers["admin"],
        )
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "validation_error"
    assert "1970-01-01T00:00:00.000Z and 2100-01-01T00:00:00.000Z" in response.text


async def test_the_widest_range_allowed_is_answered(seeded: Seeded) -> None:
    transport = httpx.ASGITransport(app=seeded.app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
        response = await client.get(
            "/api/v1/analytics/top-accounts",
            params={"from": "1970-01-01T00:00:00Z", "to": "2100-01-01T00:00:00Z"},
            headers=seeded.headers["admin"],
        )
    assert response.status_code == 200, response.text
    assert [row["account"] for row in response.json()["data"]] == [ACCOUNT]
