"""The admin routes (docs/api.md#administration) on the real app and a real store.

Every test gets a database of its own in the session's one chdb path.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from query_api.app import create_app
from query_api.settings import ApiSettings
from schemas.store import Store

pytestmark = pytest.mark.integration

ADMIN_KEY = "admin-key-for-tests-0123456789abcdef"
ADMIN = {"X-API-Key": ADMIN_KEY}
TIME = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
PLAN_FIELDS = {
    "name",
    "session_hours",
    "session_limit",
    "session_anchor",
    "weekly_limit",
    "weekly_anchor",
    "per_minute",
    "max_streams",
    "alert_thresholds",
}
KEY_FIELDS = {"key_prefix", "account", "admin", "ingest", "created_at", "revoked_at"}


@dataclass
class Api:
    client: httpx.AsyncClient
    store: Store

    async def create_account(self, account_id: str, plan: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"id": account_id}
        if plan is not None:
            body["plan"] = plan
        response = await self.client.post("/api/v1/admin/accounts", json=body, headers=ADMIN)
        assert response.status_code == 201, response.text
        data: dict[str, Any] = response.json()["data"]
        return data


@pytest.fixture
async def api(store_url: str, unique_name: str) -> AsyncIterator[Api]:
    settings = ApiSettings(
        admin_key=SecretStr(ADMIN_KEY),
        clickhouse_url=store_url,
        clickhouse_database=unique_name,
        default_plan="free",
        plans=None,
    )
    store = Store(settings.store_url, settings.store_database)
    store.migrate()
    app = create_app(settings, store)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
        yield Api(client, store)
    store.close()


def _assert_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "docs"}
    assert body["error"]["code"] == code
    assert body["error"]["docs"]
    message: str = body["error"]["message"]
    return message


# -- plans ------------------------------------------------------------------------------


async def test_plans_are_listed_sorted_with_every_field(api: Api) -> None:
    response = await api.client.get("/api/v1/admin/plans", headers=ADMIN)
    assert response.status_code == 200
    data = response.json()["data"]
    assert [p["name"] for p in data] == ["free", "max", "pro"]
    assert all(set(p) == PLAN_FIELDS for p in data)
    pro = next(p for p in data if p["name"] == "pro")
    assert pro["per_minute"] == 300
    assert pro["max_streams"] == 10
    assert pro["session_anchor"] == "first_request"
    assert pro["weekly_anchor"] == "fixed"


# -- accounts ---------------------------------------------------------------------------


async def test_create_account_returns_a_key_that_works(api: Api) -> None:
    data = await api.create_account("acme-corp", "pro")
    assert set(data) == {"id", "plan", "api_key"}
    assert data["id"] == "acme-corp"
    assert data["plan"] == "pro"

    usage = await api.client.get(
        "/api/account/usage", headers={"Authorization": f"Bearer {data['api_key']}"}
    )
    assert usage.status_code == 200, usage.text
    assert usage.json()["plan"] == "pro"


async def test_create_account_without_a_plan_gets_the_default(api: Api) -> None:
    data = await api.create_account("no-plan-given")
    assert data["plan"] == "free"


async def test_create_account_twice_is_409(api: Api) -> None:
    await api.create_account("dup")
    response = await api.client.post(
        "/api/v1/admin/accounts", json={"id": "dup", "plan": "max"}, headers=ADMIN
    )
    assert "dup" in _assert_error(response, 409, "conflict")
    shown = await api.client.get("/api/v1/admin/accounts/dup", headers=ADMIN)
    assert shown.json()["data"]["plan"] == "free"  # the first one stands


@pytest.mark.parametrize(
    "body",
    [
        {"id": "has space"},
        {"id": ""},
        {"id": "x" * 129},
        {"id": "slash/in/id"},
        {"id": "newline\n"},
        {"plan": "pro"},
        {"id": "ok", "plan": "pro", "extra": 1},
        {"id": 42},
    ],
    ids=[
        "space",
        "empty",
        "too-long",
        "slash",
        "newline",
        "no-id",
        "unknown-field",
        "not-a-string",
    ],
)
async def test_create_account_rejects_bad_bodies(api: Api, body: dict[str, Any]) -> None:
    response = await api.client.post("/api/v1/admin/accounts", json=body, headers=ADMIN)
    _assert_error(response, 422, "validation_error")


async def test_create_account_accepts_every_subject_character(api: Api) -> None:
    account_id = "Org_1.team:eu-" + "x" * 114
    assert len(account_id) == 128
    data = await api.create_account(account_id)
    assert data["id"] == account_id
    shown = await api.client.get(f"/api/v1/admin/accounts/{account_id}", headers=ADMIN)
    assert shown.status_code == 200


async def test_create_account_with_an_unknown_plan_names_the_known_ones(api: Api) -> None:
    response = await api.client.post(
        "/api/v1/admin/accounts", json={"id": "acme", "plan": "gold"}, headers=ADMIN
    )
    message = _assert_error(response, 422, "validation_error")
    assert "gold" in message
    for name in ("free", "max", "pro"):
        assert name in message
    missing = await api.client.get("/api/v1/admin/accounts/acme", headers=ADMIN)
    assert missing.status_code == 404


async def test_accounts_are_listed_in_pages(api: Api) -> None:
    for account_id in ("c-3", "a-1", "b-2"):
        await api.create_account(account_id, "pro")
    first = await api.client.get("/api/v1/admin/accounts?limit=2", headers=ADMIN)
    assert first.status_code == 200
    body = first.json()
    assert [a["id"] for a in body["data"]] == ["a-1", "b-2"]
    assert body["meta"]["next_after"] == "b-2"
    for account in body["data"]:
        assert set(account) == {"id", "plan", "created_at"}
        assert account["plan"] == "pro"
        assert TIME.match(account["created_at"])

    rest = await api.client.get(
        "/api/v1/admin/accounts", params={"limit": 2, "after": "b-2"}, headers=ADMIN
    )
    assert [a["id"] for a in rest.json()["data"]] == ["c-3"]
    assert rest.json()["meta"]["next_after"] is None

    everything = await api.client.get("/api/v1/admin/accounts", headers=ADMIN)
    assert [a["id"] for a in everything.json()["data"]] == ["a-1", "b-2", "c-3"]

    bad = await api.client.get("/api/v1/admin/accounts?limit=0", headers=ADMIN)
    _assert_error(bad, 422, "validation_error")


async def test_get_one_account_and_404(api: Api) -> None:
    await api.create_account("acme", "max")
    response = await api.client.get("/api/v1/admin/accounts/acme", headers=ADMIN)
    assert response.status_code == 200
    data = response.json()["data"]
    assert data["id"] == "acme"
    assert data["plan"] == "max"
    assert TIME.match(data["created_at"])

    missing = await api.client.get("/api/v1/admin/accounts/nobody", headers=ADMIN)
    assert "nobody" in _assert_error(missing, 404, "not_found")


async def test_plan_change_shows_on_the_next_usage_request(api: Api) -> None:
    created = await api.create_account("acme", "pro")
    bearer = {"Authorization": f"Bearer {created['api_key']}"}
    before = await api.client.get("/api/account/usage", headers=bearer)
    assert before.json()["plan"] == "pro"
    v1_before = await api.client.get("/api/v1/account/usage", headers=bearer)
    assert v1_before.json()["data"]["streams"]["max"] == 10

    changed = await api.client.put(
        "/api/v1/admin/accounts/acme", json={"plan": "max"}, headers=ADMIN
    )
    assert changed.status_code == 200, changed.text
    assert changed.json() == {"data": {"id": "acme", "plan": "max"}}

    after = await api.client.get("/api/account/usage", headers=bearer)
    assert after.json()["plan"] == "max"
    v1_after = await api.client.get("/api/v1/account/usage", headers=bearer)
    assert v1_after.json()["data"]["streams"]["max"] == 50
    assert v1_after.json()["data"]["requests"]["limit"]["per_minute"] == 1000


async def test_plan_change_refusals(api: Api) -> None:
    await api.create_account("acme", "pro")
    unknown_account = await api.client.put(
        "/api/v1/admin/accounts/nobody", json={"plan": "max"}, headers=ADMIN
    )
    _assert_error(unknown_account, 404, "not_found")

    unknown_plan = await api.client.put(
        "/api/v1/admin/accounts/acme", json={"plan": "gold"}, headers=ADMIN
    )
    message = _assert_error(unknown_plan, 422, "validation_error")
    assert "free, max, pro" in message

    no_plan = await api.client.put("/api/v1/admin/accounts/acme", json={}, headers=ADMIN)
    _assert_error(no_plan, 422, "validation_error")

    shown = await api.client.get("/api/v1/admin/accounts/acme", headers=ADMIN)
    assert shown.json()["data"]["plan"] == "pro"


# -- keys -------------------------------------------------------------------------------


async def test_create_account_key(api: Api) -> None:
    await api.create_account("acme", "pro")
    response = await api.client.post("/api/v1/admin/keys", json={"account": "acme"}, headers=ADMIN)
    assert response.status_code == 201, response.text
    data = response.json()["data"]
    assert set(data) == {"key_prefix", "api_key", "account", "admin", "ingest"}
    assert data["account"] == "acme"
    assert data["admin"] is False
    assert data["key_prefix"] in data["api_key"]

    usage = await api.client.get("/api/v1/account/usage", headers={"X-API-Key": data["api_key"]})
    assert usage.status_code == 200, usage.text


async def test_create_admin_key_that_administers(api: Api) -> None:
    response = await api.client.post("/api/v1/admin/keys", json={"admin": True}, headers=ADMIN)
    assert response.status_code == 201, response.text
    data = response.json()["data"]
    assert data["admin"] is True
    assert data["account"] is None

    plans = await api.client.get(
        "/api/v1/admin/plans", headers={"Authorization": f"Bearer {data['api_key']}"}
    )
    assert plans.status_code == 200
    # An admin key has no usage of its own.
    usage = await api.client.get("/api/v1/account/usage", headers={"X-API-Key": data["api_key"]})
    _assert_error(usage, 403, "forbidden")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"account": "acme", "admin": True},
        {"account": "acme", "ingest": True},
        {"admin": True, "ingest": True},
        {"ingest": False},
        {"admin": False},
        {"account": None},
        {"account": "acme", "extra": True},
    ],
    ids=[
        "neither",
        "both",
        "account-and-ingest",
        "admin-and-ingest",
        "ingest-false",
        "admin-false",
        "account-null",
        "unknown-field",
    ],
)
async def test_create_key_needs_exactly_one_owner(api: Api, body: dict[str, Any]) -> None:
    await api.create_account("acme")
    response = await api.client.post("/api/v1/admin/keys", json=body, headers=ADMIN)
    _assert_error(response, 422, "validation_error")


async def test_create_key_for_an_unknown_account_is_404(api: Api) -> None:
    response = await api.client.post(
        "/api/v1/admin/keys", json={"account": "nobody"}, headers=ADMIN
    )
    assert "nobody" in _assert_error(response, 404, "not_found")


async def test_keys_are_listed_without_secrets(api: Api) -> None:
    acme = await api.create_account("acme")
    await api.create_account("other")
    admin = (
        await api.client.post("/api/v1/admin/keys", json={"admin": True}, headers=ADMIN)
    ).json()["data"]

    everything = await api.client.get("/api/v1/admin/keys", headers=ADMIN)
    assert everything.status_code == 200
    data = everything.json()["data"]
    assert len(data) == 3
    assert all(set(k) == KEY_FIELDS for k in data)
    assert all(TIME.match(k["created_at"]) and k["revoked_at"] is None for k in data)
    text = everything.text
    assert acme["api_key"] not in text
    assert admin["api_key"] not in text
    assert "hash" not in text

    only = await api.client.get("/api/v1/admin/keys", params={"account": "acme"}, headers=ADMIN)
    keys = only.json()["data"]
    assert len(keys) == 1
    assert keys[0]["account"] == "acme"
    assert keys[0]["admin"] is False
    assert keys[0]["key_prefix"] in acme["api_key"]
    admins = [k for k in data if k["admin"]]
    assert [k["key_prefix"] for k in admins] == [admin["key_prefix"]]
    assert admins[0]["account"] is None

    unknown = await api.client.get(
        "/api/v1/admin/keys", params={"account": "nobody"}, headers=ADMIN
    )
    _assert_error(unknown, 404, "not_found")


async def test_revocation_is_immediate(api: Api) -> None:
    created = await api.create_account("acme", "pro")
    key = created["api_key"]
    spare = (
        await api.client.post("/api/v1/admin/keys", json={"account": "acme"}, headers=ADMIN)
    ).json()["data"]
    ok = await api.client.get("/api/v1/account/usage", headers={"X-API-Key": key})
    assert ok.status_code == 200

    listed = await api.client.get("/api/v1/admin/keys?account=acme", headers=ADMIN)
    prefix = next(k["key_prefix"] for k in listed.json()["data"] if k["key_prefix"] in key)
    revoked = await api.client.delete(f"/api/v1/admin/keys/{prefix}", headers=ADMIN)
    assert revoked.status_code == 200, revoked.text
    assert revoked.json() == {"data": {"key_prefix": prefix, "revoked": True}}

    refused = await api.client.get("/api/v1/account/usage", headers={"X-API-Key": key})
    assert _assert_error(refused, 401, "unauthorized") == "Invalid or missing API key"
    refused_bearer = await api.client.get(
        "/api/account/usage", headers={"Authorization": f"Bearer {key}"}
    )
    _assert_error(refused_bearer, 401, "unauthorized")
    # The account's other key still works.
    still = await api.client.get("/api/v1/account/usage", headers={"X-API-Key": spare["api_key"]})
    assert still.status_code == 200

    keys = (await api.client.get("/api/v1/admin/keys?account=acme", headers=ADMIN)).json()["data"]
    by_prefix = {k["key_prefix"]: k for k in keys}
    assert TIME.match(by_prefix[prefix]["revoked_at"])
    assert by_prefix[spare["key_prefix"]]["revoked_at"] is None

    again = await api.client.delete(f"/api/v1/admin/keys/{prefix}", headers=ADMIN)
    _assert_error(again, 404, "not_found")


async def test_revoking_an_admin_key_stops_it_administering(api: Api) -> None:
    admin = (
        await api.client.post("/api/v1/admin/keys", json={"admin": True}, headers=ADMIN)
    ).json()["data"]
    own = {"X-API-Key": admin["api_key"]}
    revoked = await api.client.delete(f"/api/v1/admin/keys/{admin['key_prefix']}", headers=own)
    assert revoked.status_code == 200
    after = await api.client.get("/api/v1/admin/plans", headers=own)
    _assert_error(after, 401, "unauthorized")


async def test_revoke_unknown_prefixes_is_404(api: Api) -> None:
    for prefix in ("000000000000", "nope", "env:TALLY_ADMIN_KEY"):
        response = await api.client.delete(f"/api/v1/admin/keys/{prefix}", headers=ADMIN)
        _assert_error(response, 404, "not_found")
    # TALLY_ADMIN_KEY is untouched by the attempt.
    assert (await api.client.get("/api/v1/admin/plans", headers=ADMIN)).status_code == 200


# -- who may call -----------------------------------------------------------------------

ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/api/v1/admin/plans", None),
    ("POST", "/api/v1/admin/accounts", {"id": "new-one", "plan": "pro"}),
    ("GET", "/api/v1/admin/accounts", None),
    ("GET", "/api/v1/admin/accounts/acme", None),
    ("PUT", "/api/v1/admin/accounts/acme", {"plan": "max"}),
    ("POST", "/api/v1/admin/keys", {"admin": True}),
    ("GET", "/api/v1/admin/keys", None),
    ("DELETE", "/api/v1/admin/keys/{prefix}", None),
]


async def test_account_keys_are_forbidden_on_every_admin_route(api: Api) -> None:
    created = await api.create_account("acme", "pro")
    prefix = created["api_key"].split("_")[1]
    for header in (
        {"X-API-Key": created["api_key"]},
        {"Authorization": f"Bearer {created['api_key']}"},
    ):
        for method, path, body in ROUTES:
            response = await api.client.request(
                method, path.format(prefix=prefix), json=body, headers=header
            )
            assert _assert_error(response, 403, "forbidden"), (method, path)
    # Nothing happened: no account made, no plan changed, no key made or revoked.
    accounts = (await api.client.get("/api/v1/admin/accounts", headers=ADMIN)).json()["data"]
    assert [(a["id"], a["plan"]) for a in accounts] == [("acme", "pro")]
    keys = (await api.client.get("/api/v1/admin/keys", headers=ADMIN)).json()["data"]
    assert [(k["key_prefix"], k["revoked_at"]) for k in keys] == [(prefix, None)]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"X-API-Key": "tly_000000000000_" + "A" * 32},
        {"Authorization": "Bearer not-a-key"},
        {"Authorization": f"Basic {ADMIN_KEY}"},
        {"X-API-Key": ADMIN_KEY[:-1]},
    ],
    ids=["missing", "unknown", "malformed", "wrong-scheme", "almost-admin"],
)
async def test_no_valid_key_is_401_on_every_admin_route(api: Api, headers: dict[str, str]) -> None:
    for method, path, body in ROUTES:
        response = await api.client.request(
            method, path.format(prefix="000000000000"), json=body, headers=headers
        )
        assert response.status_code == 401, (method, path, response.text)
        assert response.json() == {
            "error": {
                "code": "unauthorized",
                "message": "Invalid or missing API key",
                "docs": response.json()["error"]["docs"],
            }
        }
        assert response.json()["error"]["docs"]


# -- storage ----------------------------------------------------------------------------


async def test_plaintext_keys_are_stored_nowhere(api: Api) -> None:
    created = await api.create_account("acme", "pro")
    account_key = (
        await api.client.post("/api/v1/admin/keys", json={"account": "acme"}, headers=ADMIN)
    ).json()["data"]
    admin_key = (
        await api.client.post("/api/v1/admin/keys", json={"admin": True}, headers=ADMIN)
    ).json()["data"]
    await api.client.delete(f"/api/v1/admin/keys/{account_key['key_prefix']}", headers=ADMIN)
    plaintexts = [created["api_key"], account_key["api_key"], admin_key["api_key"]]
    # tly_<12 hex prefix>_<32-char secret>; the secret may itself contain "_".
    secrets = [key[len("tly_") + 12 + 1 :] for key in plaintexts]
    assert all(len(secret) == 32 for secret in secrets)

    columns = api.store.query(
        "SELECT table, name FROM system.columns WHERE database = {db:String} "
        "AND table IN ('accounts', 'api_keys') AND type LIKE '%String%'",
        {"db": api.store.database},
    )
    tables = {table for table, _ in columns}
    assert tables == {"accounts", "api_keys"}
    assert ("api_keys", "key_hash") in columns
    scanned = 0
    for table, column in columns:
        for (value,) in api.store.query(f"SELECT toString(`{column}`) FROM {table}"):
            scanned += 1
            for secret in (*plaintexts, *secrets):
                assert secret not in value, (table, column)
    assert scanned >= 4 * 3  # every row of api_keys, in at least prefix/hash/account


# -- documentation ----------------------------------------------------------------------


async def test_openapi_documents_the_admin_routes_and_their_errors(api: Api) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    paths = spec["paths"]
    expected = {
        ("/api/v1/admin/plans", "get"): {"200", "401", "403"},
        ("/api/v1/admin/accounts", "post"): {"201", "401", "403", "409", "422"},
        ("/api/v1/admin/accounts", "get"): {"200", "401", "403", "422"},
        ("/api/v1/admin/accounts/{account_id}", "get"): {"200", "401", "403", "404"},
        ("/api/v1/admin/accounts/{account_id}", "put"): {"200", "401", "403", "404", "422"},
        ("/api/v1/admin/keys", "post"): {"201", "401", "403", "404", "422"},
        ("/api/v1/admin/keys", "get"): {"200", "401", "403", "404"},
        ("/api/v1/admin/keys/{key_prefix}", "delete"): {"200", "401", "403", "404"},
    }
    for (path, method), statuses in expected.items():
        responses = paths[path][method]["responses"]
        assert statuses <= set(responses), (path, method, set(responses))
        for status in statuses - {"200", "201"}:
            schema = responses[status]["content"]["application/json"]["schema"]
            assert schema["$ref"].endswith("/ErrorBody"), (path, method, status)
    schemas = spec["components"]["schemas"]
    assert schemas["AccountCreateIn"]["examples"]
    assert schemas["AccountCreatedResponse"]["examples"]
    assert "200" in paths["/api/v1/admin/keys/{key_prefix}"]["delete"]["description"]
