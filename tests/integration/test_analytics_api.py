"""The analytics API against real rollups in ClickHouse, checked against the events.

Rollup rows are written with the worker's own builder and sink (in two flushes, so
the same keys sit in several parts and the API has to aggregate). The expected
series are computed here, in Python, from the generated events, independently of
the SQL under test.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest

from processors.rollup import RollupBuilder
from producers import events as build
from query_api.accounts import AccountStore
from query_api.app import create_app
from query_api.deps import Services
from query_api.settings import ApiSettings
from schemas.events import REQUEST, STREAM_CLOSED, RequestEvent, StreamClosedEvent
from schemas.rollup_table import offset_markers
from schemas.store import Store
from tests.rollups import ms, write_wire

pytestmark = pytest.mark.integration

AnyEvent = build.AnyEvent

ADMIN_KEY = "adm1n-" + "k" * 30
BASE = datetime(2026, 1, 5, 21, 0, tzinfo=UTC)  # the traffic crosses two midnights
SPAN = timedelta(hours=30)
ACCOUNTS = ("acme", "globex", "initech")
GHOST = "ghost"  # usage arrives for it, but it has no account row
TIES = ("tie-b", "tie-a")  # identical usage: ordered by account id
# A range with partial buckets at both edges (hour and day), and a mid-minute start.
FROM = BASE + timedelta(minutes=17, seconds=30)
TO = BASE + timedelta(hours=27, minutes=10, seconds=20)
USAGE = "/api/v1/analytics/usage"
TOP = "/api/v1/analytics/top-accounts"
DIMENSIONS = ("type", "route", "model", "status")


def z(t: datetime) -> str:
    return t.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="milliseconds") + "Z"


def micro(units: float) -> int:
    return int(Decimal(repr(units)) * 1_000_000)


def _traffic(rng: random.Random) -> list[AnyEvent]:
    events: list[AnyEvent] = []
    seconds = int(SPAN.total_seconds())
    for _ in range(900):
        account = rng.choice((*ACCOUNTS, *ACCOUNTS, GHOST))
        t = BASE + timedelta(seconds=rng.randrange(seconds), microseconds=rng.randrange(10**6))
        if rng.random() < 0.85:
            events.append(
                build.request(
                    account,
                    "gw-1",
                    units=rng.choice((0, 0.5, 1, 2.25, 7.125, rng.randrange(5000) / 1000)),
                    route=rng.choice((None, "/v1/chat", "/v1/embed")),
                    status=rng.choice((None, 200, 429, 500)),
                    model=rng.choice((None, "m-small", "m-large")),
                    time=t,
                )
            )
        else:
            stream = uuid.uuid4().hex
            events.append(
                build.stream_opened(
                    account, "gw-1", stream, route="/v1/chat", model="m-large", time=t
                )
            )
            events.append(
                build.stream_closed(
                    account,
                    "gw-1",
                    stream,
                    units=rng.choice((0, 1.5, 12.000001)),
                    time=t + timedelta(seconds=rng.randrange(900)),
                )
            )
    for account in TIES:
        for i in range(3):
            t = BASE + timedelta(hours=2 + i)
            events.append(build.request(account, "gw-2", units=4, route="/v1/chat", time=t))
    return events


# --- the expected answers, from the events -----------------------------------------------


def _bucket(minute: datetime, window: str) -> tuple[datetime, datetime]:
    if window == "minute":
        return minute, minute + timedelta(minutes=1)
    if window == "hour":
        start = minute.replace(minute=0)
        return start, start + timedelta(hours=1)
    start = minute.replace(hour=0, minute=0)
    return start, start + timedelta(days=1)


def _dimensions(event: AnyEvent) -> dict[str, Any]:
    """Raw dimension values as stored ('' and 0 for absent); stream events carry none."""
    if isinstance(event, RequestEvent):
        d = event.data
        return {
            "type": event.type,
            "route": d.route or "",
            "model": d.model or "",
            "status": d.status or 0,
        }
    return {"type": event.type, "route": "", "model": "", "status": 0}


def _cost(event: AnyEvent) -> tuple[int, int]:
    """(requests, units in millionths) one event adds."""
    if isinstance(event, RequestEvent):
        return 1, micro(event.data.units)
    if isinstance(event, StreamClosedEvent):
        return 0, micro(event.data.units)
    return 0, 0


def _in_range(event: AnyEvent, start: datetime, end: datetime) -> bool:
    minute = event.time.replace(second=0, microsecond=0)
    return start <= minute < end


def expected_series(
    events: list[AnyEvent],
    account: str | None,
    start: datetime,
    end: datetime,
    window: str,
    dims: list[str],
) -> list[dict[str, Any]]:
    sums: dict[tuple[datetime, tuple[Any, ...]], list[int]] = {}
    for event in events:
        if account is not None and event.subject != account:
            continue
        if not _in_range(event, start, end):
            continue
        requests, units = _cost(event)
        if not requests and not units:
            continue
        values = _dimensions(event)
        bucket, _ = _bucket(event.time.replace(second=0, microsecond=0), window)
        slot = sums.setdefault((bucket, tuple(values[d] for d in dims)), [0, 0])
        slot[0] += requests
        slot[1] += units
    out = []
    for (bucket, group), (requests, units) in sorted(sums.items()):
        if not requests and not units:
            continue
        out.append(
            {
                "window_start": z(bucket),
                "window_end": z(_bucket(bucket, window)[1]),
                "group": {
                    d: (v or None) if d != "type" else v for d, v in zip(dims, group, strict=True)
                },
                "requests": requests,
                "units": units / 1_000_000,
            }
        )
    return out


def expected_top(
    events: list[AnyEvent], start: datetime, end: datetime, metric: str
) -> list[dict[str, Any]]:
    sums: dict[str, list[int]] = {}
    for event in events:
        if _in_range(event, start, end):
            requests, units = _cost(event)
            slot = sums.setdefault(event.subject, [0, 0])
            slot[0] += requests
            slot[1] += units
    ranked = sorted(
        ((a, r, u) for a, (r, u) in sums.items() if r or u),
        key=lambda x: (-(x[2] if metric == "units" else x[1]), x[0]),
    )
    return [{"account": a, "requests": r, "units": u / 1_000_000} for a, r, u in ranked]


# --- the running API ---------------------------------------------------------------------


@dataclass
class Api:
    client: httpx.AsyncClient
    events: list[AnyEvent]
    keys: dict[str, dict[str, str]]  # account -> headers; "admin", "admin-stored" too
    settings: ApiSettings
    services: Services

    def configure(self, monkeypatch: pytest.MonkeyPatch, **changes: Any) -> None:
        """Settings changed on the running app, for one test."""
        changed = self.services.settings.model_copy(update=changes)
        monkeypatch.setattr(self.services, "settings", changed)


@pytest.fixture
async def api(store_url: str) -> AsyncIterator[Api]:
    settings = ApiSettings(
        admin_key=ADMIN_KEY,
        clickhouse_url=store_url,
        clickhouse_database=f"t{uuid.uuid4().hex}",
    )
    store = Store(settings.store_url, settings.store_database)
    store.migrate()
    events = _traffic(random.Random(20260105))
    half = len(events) // 2
    for part in (events[:half], events[half:]):  # the same keys in two parts
        builder = RollupBuilder()
        for event in part:
            builder.add(event)
        write_wire(store, builder.wire_rows())
    # Offset markers (reserved account '') ride along, as the sink writes them.
    fresh = {0: ms(BASE + SPAN), 1: ms(BASE)}
    write_wire(store, offset_markers(settings.events_topic, {0: 500, 1: 400}, fresh))

    accounts = AccountStore(store)
    keys: dict[str, dict[str, str]] = {"admin": {"X-API-Key": ADMIN_KEY}}
    for account in (*ACCOUNTS, *TIES):
        accounts.create(account, "pro")
        key, _ = accounts.create_key(account, admin=False)
        keys[account] = {"Authorization": f"Bearer {key}"}
    stored_admin, _ = accounts.create_key(None, admin=True)
    keys["admin-stored"] = {"X-API-Key": stored_admin}

    app = create_app(settings, store)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tally") as client:
        yield Api(client, events, keys, settings, app.state.services)


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message", "docs"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    assert body["error"]["docs"]
    return body


GROUPINGS: list[list[str]] = [[], ["type"], ["route", "status"], ["model", "route", "type"]]
GROUPINGS.append(list(DIMENSIONS))


@pytest.mark.parametrize("window", ["minute", "hour", "day"])
async def test_series_equal_the_events(api: Api, window: str) -> None:
    start = FROM.replace(second=0) + timedelta(minutes=1)  # the first minute in range
    end = TO.replace(second=0) + timedelta(minutes=1)  # TO is mid-minute: that one counts
    for dims in GROUPINGS:
        params = {"from": z(FROM), "to": z(TO), "window": window, "group_by": ",".join(dims)}
        # An account key, its own account implied.
        got = await api.client.get(USAGE, params=params, headers=api.keys["acme"])
        assert got.status_code == 200, got.text
        body = got.json()
        expected = expected_series(api.events, "acme", start, end, window, dims)
        assert expected, "the test data should fill this range"
        assert body["data"] == expected, (window, dims)
        assert len({r["window_start"] for r in body["data"]}) > 1
        span = {"minute": 60, "hour": 3600, "day": 86400}[window]
        n = math.ceil((TO.timestamp() - FROM.timestamp() // span * span) / span)
        assert body["meta"] == {
            "from": z(FROM),
            "to": z(TO),
            "window": window,
            "group_by": dims,
            "account": "acme",
            "buckets": n,
            "updated_at": z(BASE),  # the slowest partition's marker
        }
        # An admin key naming the account sees the same; omitting it, every account.
        admin = await api.client.get(
            USAGE, params={**params, "account": "acme"}, headers=api.keys["admin"]
        )
        assert admin.json()["data"] == expected
        everyone = await api.client.get(USAGE, params=params, headers=api.keys["admin-stored"])
        assert everyone.status_code == 200, everyone.text
        assert everyone.json()["data"] == expected_series(
            api.events, None, start, end, window, dims
        )
        assert everyone.json()["meta"]["account"] is None


async def test_group_values_and_nulls(api: Api) -> None:
    got = await api.client.get(
        USAGE,
        params={"from": z(BASE), "to": z(BASE + SPAN), "window": "day", "group_by": "type"},
        headers=api.keys["admin"],
    )
    types = {row["group"]["type"] for row in got.json()["data"]}
    assert types == {REQUEST, STREAM_CLOSED}  # opened streams carry no requests nor units
    for row in got.json()["data"]:
        if row["group"]["type"] == STREAM_CLOSED:
            assert row["requests"] == 0
    got = await api.client.get(
        USAGE,
        params={"from": z(BASE), "to": z(BASE + SPAN), "window": "day", "group_by": "status"},
        headers=api.keys["admin"],
    )
    statuses = {row["group"]["status"] for row in got.json()["data"]}
    assert statuses == {None, 200, 429, 500}
    # Repeated parameters, other spellings and duplicates mean the same grouping.
    a = await api.client.get(
        USAGE,
        params=[("from", z(FROM)), ("to", z(TO)), ("group_by", "route"), ("group_by", "Model")],
        headers=api.keys["globex"],
    )
    b = await api.client.get(
        USAGE,
        params={"from": z(FROM), "to": z(TO), "group_by": " route , model,route,"},
        headers=api.keys["globex"],
    )
    assert a.status_code == b.status_code == 200, a.text
    assert a.json() == b.json()
    assert a.json()["meta"]["group_by"] == ["route", "model"]


async def test_zones_and_edges(api: Api) -> None:
    plain = await api.client.get(
        USAGE, params={"from": z(FROM), "to": z(TO)}, headers=api.keys["initech"]
    )
    # The same instants written with an offset, encoded (%2B) and as a raw '+'.
    offset_from = FROM.astimezone(UTC).replace(tzinfo=None).isoformat() + "+00:00"
    local_to = (TO + timedelta(hours=2)).replace(tzinfo=None).isoformat() + "+02:00"
    encoded = await api.client.get(
        USAGE, params={"from": offset_from, "to": local_to}, headers=api.keys["initech"]
    )
    raw = await api.client.get(
        f"{USAGE}?from={offset_from}&to={local_to}", headers=api.keys["initech"]
    )
    assert plain.status_code == encoded.status_code == raw.status_code == 200, raw.text
    assert plain.json() == encoded.json() == raw.json()
    assert plain.json()["meta"]["window"] == "hour"  # the default

    # A range inside one minute holds no minute start: empty, not an error.
    inside = await api.client.get(
        USAGE,
        params={"from": z(BASE + timedelta(seconds=5)), "to": z(BASE + timedelta(seconds=50))},
        headers=api.keys["initech"],
    )
    assert inside.status_code == 200
    assert inside.json()["data"] == []
    assert inside.json()["meta"]["buckets"] == 1
    # Nothing before the traffic: empty series.
    before = await api.client.get(
        USAGE,
        params={"from": z(BASE - timedelta(days=3)), "to": z(BASE), "window": "day"},
        headers=api.keys["initech"],
    )
    assert before.json()["data"] == []
    assert before.json()["meta"]["buckets"] == 4  # Jan 2 (partial) .. Jan 5 (partial)


async def test_invalid_parameters(api: Api) -> None:
    key = api.keys["acme"]
    ok = {"from": z(FROM), "to": z(TO)}
    cases: list[tuple[dict[str, str], str]] = [
        ({"from": z(TO), "to": z(FROM)}, "must be before"),
        ({"from": z(FROM), "to": z(FROM)}, "must be before"),
        ({**ok, "window": "week"}, "window"),
        ({**ok, "group_by": "route,color"}, "color"),
        ({**ok, "group_by": "account"}, "allowed: type, route, model, status"),
        ({"from": "2026-01-05T21:00:00", "to": z(TO)}, "from"),
        ({"from": z(FROM), "to": "2026-01-06T21:00:00.000"}, "to"),
        ({"from": "2026-01-05", "to": z(TO)}, "from"),
        ({"from": "yesterday", "to": z(TO)}, "from"),
        ({"to": z(TO)}, "from"),
        ({**ok, "account": "has space"}, "account"),
        ({**ok, "account": "a" * 129}, "account"),
    ]
    for params, words in cases:
        body = assert_error(
            await api.client.get(USAGE, params=params, headers=key), 422, "validation_error"
        )
        assert words in body["error"]["message"], (params, body)

    # Too many buckets: the message names the maximum and suggests a coarser window.
    limit = api.settings.analytics_max_buckets
    wide = {"from": z(BASE), "to": z(BASE + timedelta(minutes=limit + 1)), "window": "minute"}
    body = assert_error(
        await api.client.get(USAGE, params=wide, headers=key), 422, "validation_error"
    )
    assert str(limit) in body["error"]["message"]
    assert "coarser window" in body["error"]["message"]
    assert "hour" in body["error"]["message"]
    at_limit = {**wide, "to": z(BASE + timedelta(minutes=limit))}
    assert (await api.client.get(USAGE, params=at_limit, headers=key)).status_code == 200
    days = {"from": z(BASE), "to": z(BASE + timedelta(days=limit + 1)), "window": "day"}
    body = assert_error(
        await api.client.get(USAGE, params=days, headers=key), 422, "validation_error"
    )
    assert "shorter range" in body["error"]["message"]

    top = api.keys["admin"]
    for params, words in [
        ({**ok, "limit": "0"}, "limit"),
        ({**ok, "limit": "1001"}, "limit"),
        ({**ok, "metric": "latency"}, "metric"),
        ({"from": z(TO), "to": z(FROM)}, "must be before"),
        ({"from": "2026-01-05T21:00:00", "to": z(TO)}, "from"),
    ]:
        body = assert_error(
            await api.client.get(TOP, params=params, headers=top), 422, "validation_error"
        )
        assert words in body["error"]["message"], (params, body)


async def test_row_cap_refuses_rather_than_truncates(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = {"from": z(FROM), "to": z(TO), "window": "hour"}
    rows = (await api.client.get(USAGE, params=params, headers=api.keys["acme"])).json()["data"]
    api.configure(monkeypatch, analytics_max_rows=len(rows))
    exact = await api.client.get(USAGE, params=params, headers=api.keys["acme"])
    assert exact.json()["data"] == rows
    api.configure(monkeypatch, analytics_max_rows=len(rows) - 1)
    body = assert_error(
        await api.client.get(USAGE, params=params, headers=api.keys["acme"]),
        422,
        "validation_error",
    )
    message = body["error"]["message"]
    assert f"more than {len(rows) - 1} rows" in message
    assert "use a coarser window, a shorter range or fewer group_by dimensions" in message


async def test_account_keys_see_only_their_own(api: Api) -> None:
    params = {"from": z(FROM), "to": z(TO)}
    key = api.keys["acme"]
    own = await api.client.get(USAGE, params=params, headers=key)
    named = await api.client.get(USAGE, params={**params, "account": "acme"}, headers=key)
    empty = await api.client.get(USAGE, params={**params, "account": ""}, headers=key)
    assert own.status_code == named.status_code == empty.status_code == 200
    assert own.json() == named.json() == empty.json()

    other = await api.client.get(USAGE, params={**params, "account": "globex"}, headers=key)
    ghost = await api.client.get(USAGE, params={**params, "account": GHOST}, headers=key)
    nobody = await api.client.get(USAGE, params={**params, "account": "no-such"}, headers=key)
    for response in (other, ghost, nobody):
        assert_error(response, 404, "not_found")
    assert other.json() == ghost.json() == nobody.json()
    assert "globex" not in other.text

    # An admin key may read an account that has usage but no account row.
    got = await api.client.get(
        USAGE, params={**params, "account": GHOST, "group_by": "route"}, headers=api.keys["admin"]
    )
    assert got.status_code == 200
    start = FROM.replace(second=0) + timedelta(minutes=1)
    end = TO.replace(second=0) + timedelta(minutes=1)
    assert got.json()["data"] == expected_series(api.events, GHOST, start, end, "hour", ["route"])
    assert got.json()["data"]

    for route in (USAGE, TOP):
        body = assert_error(await api.client.get(route, params=params), 401, "unauthorized")
        assert body["error"]["message"] == "Invalid or missing API key"
        assert_error(
            await api.client.get(route, params=params, headers={"X-API-Key": "tly_nope"}),
            401,
            "unauthorized",
        )


async def test_top_accounts(api: Api) -> None:
    params = {"from": z(FROM), "to": z(TO)}
    body = assert_error(
        await api.client.get(TOP, params=params, headers=api.keys["acme"]), 403, "forbidden"
    )
    assert "admin" in body["error"]["message"]

    start = FROM.replace(second=0) + timedelta(minutes=1)
    end = TO.replace(second=0) + timedelta(minutes=1)
    for metric in ("units", "requests"):
        everyone = expected_top(api.events, start, end, metric)
        assert {row["account"] for row in everyone} == {*ACCOUNTS, GHOST, *TIES}
        got = await api.client.get(
            TOP, params={**params, "metric": metric, "limit": "1000"}, headers=api.keys["admin"]
        )
        assert got.status_code == 200, got.text
        assert got.json()["data"] == everyone
        assert got.json()["meta"] == {"from": z(FROM), "to": z(TO), "metric": metric, "limit": 1000}
        names = [row["account"] for row in got.json()["data"]]
        assert names.index("tie-a") == names.index("tie-b") - 1  # ties by account id
        assert "" not in names  # the offset markers are not an account

        top2 = await api.client.get(
            TOP, params={**params, "metric": metric, "limit": "2"}, headers=api.keys["admin"]
        )
        assert top2.json()["data"] == everyone[:2]

    default = await api.client.get(TOP, params=params, headers=api.keys["admin-stored"])
    assert default.status_code == 200
    assert default.json()["meta"]["metric"] == "units"
    assert default.json()["meta"]["limit"] == 10
    assert default.json()["data"] == expected_top(api.events, start, end, "units")[:10]


async def test_openapi_documents_the_routes(api: Api) -> None:
    spec = (await api.client.get("/openapi.json")).json()
    usage = spec["paths"][USAGE]["get"]
    assert {"401", "403", "404", "422"} <= set(usage["responses"])
    assert "null" in usage["description"]
    top = spec["paths"][TOP]["get"]
    assert {"401", "403", "422"} <= set(top["responses"])
    names = {p["name"] for p in usage["parameters"]}
    assert names == {"from", "to", "window", "group_by", "account"}


async def test_a_query_over_the_time_bound_is_refused_with_how_to_narrow_it(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    params = {"from": z(FROM), "to": z(TO), "window": "minute", "group_by": ",".join(DIMENSIONS)}
    assert (await api.client.get(USAGE, params=params, headers=api.keys["admin"])).is_success
    api.configure(monkeypatch, analytics_max_seconds=0.001)
    body = assert_error(
        await api.client.get(USAGE, params=params, headers=api.keys["admin"]),
        422,
        "validation_error",
    )
    message = body["error"]["message"]
    assert "ran longer than 0.001s (TALLY_ANALYTICS_MAX_SECONDS)" in message
    assert "use a coarser window, a shorter range or fewer group_by dimensions" in message


async def test_big_answers_are_charged_to_the_caller_s_rate_limit(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Burst 100 at 50/s (the defaults); charged one token per row, an answer of more
    # than 200 rows leaves the key a whole bucket in debt: two seconds of refill.
    api.configure(monkeypatch, analytics_rows_per_token=1)
    params = {"from": z(FROM), "to": z(TO), "window": "minute", "group_by": "route"}
    key = api.keys["admin-stored"]
    big = await api.client.get(USAGE, params=params, headers=key)
    assert big.status_code == 200, big.text
    assert len(big.json()["data"]) > 200
    assert_error(await api.client.get(USAGE, params=params, headers=key), 429, "rate_limited")
    # The debt is the key's own: another key is served.
    assert (await api.client.get(USAGE, params=params, headers=api.keys["admin"])).is_success


async def test_an_account_id_with_a_trailing_newline_is_refused(api: Api) -> None:
    params = {"from": z(FROM), "to": z(TO), "account": "acme\n"}
    body = assert_error(
        await api.client.get(USAGE, params=params, headers=api.keys["admin"]),
        422,
        "validation_error",
    )
    assert "account" in body["error"]["message"]


async def test_refused_answers_are_charged_too(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    # The store read, and this process parsed, max_rows + 1 rows before refusing.
    api.configure(monkeypatch, analytics_rows_per_token=1, analytics_max_rows=150)
    params = {"from": z(FROM), "to": z(TO), "window": "minute", "group_by": "route"}
    key = api.keys["admin-stored"]
    assert_error(await api.client.get(USAGE, params=params, headers=key), 422, "validation_error")
    assert_error(await api.client.get(USAGE, params=params, headers=key), 429, "rate_limited")
