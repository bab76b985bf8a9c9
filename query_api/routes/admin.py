"""Administration (docs/api.md#administration): plans, accounts, keys, totals. Admin keys only.

Each route is a thin async wrapper around a blocking operation below; the
operations are also what `tally accounts|keys` runs when it opens the store
directly (deploy/admin_cli.py), so the CLI and the API answer alike. Nothing is
cached: a plan change or a revocation holds from the very next request.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Depends, Query, status

from processors.reconcile import stored_totals
from processors.rollup import MARKER_ACCOUNT, MARKER_TYPE
from processors.windows import format_time
from query_api.accounts import (
    Account,
    AccountExistsError,
    AccountStore,
    KeyInfo,
    UnknownAccountError,
)
from query_api.admin_models import (
    AccountCreatedOut,
    AccountCreatedResponse,
    AccountCreateIn,
    AccountOut,
    AccountResponse,
    AccountsOut,
    AccountTotalsOut,
    KeyCreatedOut,
    KeyCreatedResponse,
    KeyCreateIn,
    KeyOut,
    KeyRevokedOut,
    KeyRevokedResponse,
    KeysOut,
    PageMeta,
    PlanChangedOut,
    PlanChangedResponse,
    PlanChangeIn,
    PlanOut,
    PlansOut,
    TotalsMeta,
    TotalsOut,
)
from query_api.deps import NO_STORE_HEADER, AdminDep, ServicesDep, no_store
from query_api.errors import (
    PAYLOAD_TOO_LARGE_RESPONSE,
    RATE_LIMITED_RESPONSE,
    ApiError,
    ErrorBody,
)
from query_api.plans import Plan
from query_api.routes.analytics import FromQuery, ToQuery, check_range, minute_range
from schemas.events import SUBJECT_PATTERN
from schemas.store import Store

router = APIRouter(prefix="/api/v1/admin", tags=["admin"])

_AUTH: dict[int | str, dict[str, object]] = {
    401: {"model": ErrorBody, "description": "Invalid or missing API key"},
    403: {"model": ErrorBody, "description": "An account key: these routes need an admin key"},
    **RATE_LIMITED_RESPONSE,
}
_422: dict[int | str, dict[str, object]] = {
    422: {"model": ErrorBody, "description": "A parameter or body field is invalid"}
}
_404: dict[int | str, dict[str, object]] = {
    404: {"model": ErrorBody, "description": "No such account or key"}
}
_409: dict[int | str, dict[str, object]] = {
    409: {"model": ErrorBody, "description": "An account with this id exists already"}
}
_BODY = PAYLOAD_TOO_LARGE_RESPONSE
_KEY_SHOWN: dict[int | str, dict[str, object]] = {
    201: {"description": "Created; the key is in the body", "headers": NO_STORE_HEADER}
}

PAGE_MAX = 1000
ENV_ADMIN_PREFIX = "env:TALLY_ADMIN_KEY"
_SUBJECT = re.compile(SUBJECT_PATTERN)


# -- the operations (blocking; shared with the CLI) -------------------------------


def _account_out(account: Account) -> AccountOut:
    return AccountOut(id=account.id, plan=account.plan, created_at=format_time(account.created_at))


def _key_out(info: KeyInfo) -> KeyOut:
    return KeyOut(
        key_prefix=info.prefix,
        account=info.account,
        admin=info.admin,
        ingest=info.ingest,
        created_at=format_time(info.created_at),
        revoked_at=format_time(info.revoked_at) if info.revoked_at else None,
    )


def _no_account(account_id: str) -> ApiError:
    return ApiError(404, "not_found", f"no account {account_id!r}")


def check_plan(plan: str, plans: Mapping[str, Plan], field: str = "plan") -> str:
    if plan not in plans:
        known = ", ".join(sorted(plans))
        raise ApiError(
            422, "validation_error", f"{field}: unknown plan {plan!r}; known plans: {known}"
        )
    return plan


def list_plans(plans: Mapping[str, Plan]) -> list[PlanOut]:
    return [PlanOut.model_validate(plans[name].model_dump()) for name in sorted(plans)]


def create_account(
    accounts: AccountStore, plans: Mapping[str, Plan], default_plan: str, body: AccountCreateIn
) -> AccountCreatedOut:
    if body.plan is None:
        if default_plan not in plans:
            known = ", ".join(sorted(plans))
            raise ApiError(
                422,
                "validation_error",
                f"plan: none given and the default plan {default_plan!r} (TALLY_DEFAULT_PLAN) "
                f"is not a known plan; name one of: {known}",
            )
        plan = default_plan
    else:
        plan = check_plan(body.plan, plans)
    try:
        account = accounts.create(body.id, plan)
    except AccountExistsError:
        raise ApiError(409, "conflict", f"account {body.id!r} exists already") from None
    key, _ = accounts.create_key(account.id, admin=False)
    return AccountCreatedOut(id=account.id, plan=account.plan, api_key=key)


def list_accounts(accounts: AccountStore, limit: int, after: str) -> AccountsOut:
    page = accounts.page(limit=limit, after=after)
    next_after = page[-1].id if len(page) == limit else None
    return AccountsOut(data=[_account_out(a) for a in page], meta=PageMeta(next_after=next_after))


def get_account(accounts: AccountStore, account_id: str) -> AccountOut:
    account = accounts.get(account_id)
    if account is None:
        raise _no_account(account_id)
    return _account_out(account)


def set_plan(
    accounts: AccountStore, plans: Mapping[str, Plan], account_id: str, body: PlanChangeIn
) -> PlanChangedOut:
    # An unknown account is 404 whatever the body says: the resource comes first.
    if accounts.get(account_id) is None:
        raise _no_account(account_id)
    plan = check_plan(body.plan, plans)
    try:
        account = accounts.set_plan(account_id, plan)
    except UnknownAccountError:
        raise _no_account(account_id) from None
    return PlanChangedOut(id=account.id, plan=account.plan)


def create_key(accounts: AccountStore, body: KeyCreateIn) -> KeyCreatedOut:
    try:
        key, info = accounts.create_key(body.account, admin=bool(body.admin))
    except UnknownAccountError:
        raise _no_account(body.account or "") from None
    return KeyCreatedOut(
        key_prefix=info.prefix,
        api_key=key,
        account=info.account,
        admin=info.admin,
        ingest=info.ingest,
    )


def list_keys(accounts: AccountStore, account_id: str | None) -> list[KeyOut]:
    if account_id is not None and accounts.get(account_id) is None:
        raise _no_account(account_id)
    return [_key_out(info) for info in accounts.keys(account_id)]


def revoke_key(accounts: AccountStore, key_prefix: str) -> KeyRevokedOut:
    if key_prefix == ENV_ADMIN_PREFIX:
        raise ApiError(
            404,
            "not_found",
            "TALLY_ADMIN_KEY is not a stored key; unset or change it where the API runs",
        )
    if not accounts.revoke_key(key_prefix):
        raise ApiError(404, "not_found", f"no active key with prefix {key_prefix!r}")
    return KeyRevokedOut(key_prefix=key_prefix, revoked=True)


def account_totals(
    store: Store, topic: str, start: datetime, end: datetime, account: str | None
) -> TotalsOut:
    """Per-account totals over the minutes starting in [start, end), and the offsets
    of `topic` they reflect.

    One SELECT reads both the totals and the offset markers: ClickHouse answers a
    query from one snapshot of the table's parts, and deltas are written in one
    INSERT with the markers of the events offsets they cover, so the offsets are
    exactly those the totals cover even while rollups are being written (what
    `tally reconcile` needs to compare like with like).
    """
    since, until = minute_range(start, end)
    rows = store.query(
        "SELECT account, type, if(account = {m:String}, status, 0) AS part, "
        "sum(events), sum(units_micro), max(offset_end) FROM rollup_minute "
        "WHERE (account != {m:String} AND minute >= {since:DateTime} "
        "AND minute < {until:DateTime} AND ({a:String} = '' OR account = {a:String})) "
        "OR (account = {m:String} AND type = {mt:String} AND route = {topic:String}) "
        "GROUP BY account, type, part",
        {
            "m": MARKER_ACCOUNT,
            "mt": MARKER_TYPE,
            "topic": topic,
            "since": since,
            "until": until,
            "a": account or "",
        },
    )
    offsets: dict[str, int] | None = None
    usage: list[tuple[str, str, int, int]] = []
    for acct, kind, part, events, units_micro, offset_end in rows:
        if acct == MARKER_ACCOUNT:
            offsets = offsets or {}
            offsets[str(int(part))] = int(offset_end)
        else:
            usage.append((str(acct), str(kind), int(events), int(units_micro)))
    totals = stored_totals(usage)
    data = [
        AccountTotalsOut(
            account=name,
            requests=t.requests,
            units=t.units_micro / 1_000_000,
            units_micro=t.units_micro,
            events=dict(sorted(t.events.items())),
        )
        for name, t in sorted(totals.items())
    ]
    meta = TotalsMeta(
        from_=format_time(start),
        to=format_time(end),
        minutes_from=format_time(since),
        minutes_to=format_time(max(since, until)),
        account=account,
        accounts=len(data),
        topic=topic,
        counted_offsets=dict(sorted(offsets.items(), key=lambda kv: int(kv[0])))
        if offsets is not None
        else None,
    )
    return TotalsOut(data=data, meta=meta)


# -- the routes --------------------------------------------------------------------


@router.get(
    "/plans",
    response_model=PlansOut,
    responses=_AUTH,
    summary="The plans accounts can be on, sorted by name",
)
async def get_plans(caller: AdminDep, svc: ServicesDep) -> PlansOut:
    return PlansOut(data=list_plans(svc.plans))


@router.post(
    "/accounts",
    response_model=AccountCreatedResponse,
    status_code=status.HTTP_201_CREATED,
    responses={**_KEY_SHOWN, **_AUTH, **_409, **_BODY, **_422},
    dependencies=[Depends(no_store)],
    summary="Create an account and its first API key (the key is shown once)",
)
async def post_account(
    body: AccountCreateIn, caller: AdminDep, svc: ServicesDep
) -> AccountCreatedResponse:
    """`plan` defaults to TALLY_DEFAULT_PLAN; an unknown plan is 422 and names the known
    ones. 409 when the id exists already."""
    created = await asyncio.to_thread(
        create_account, svc.accounts, svc.plans, svc.settings.default_plan, body
    )
    return AccountCreatedResponse(data=created)


@router.get(
    "/accounts",
    response_model=AccountsOut,
    responses={**_AUTH, **_422},
    summary="Accounts in id order, a page at a time",
)
async def get_accounts(
    caller: AdminDep,
    svc: ServicesDep,
    limit: Annotated[int, Query(ge=1, le=PAGE_MAX, description="Page size.")] = 100,
    after: Annotated[
        str, Query(max_length=128, description="Return accounts with ids after this one.")
    ] = "",
) -> AccountsOut:
    """Pages are in id order; pass `meta.next_after` as `after` for the next one."""
    return await asyncio.to_thread(list_accounts, svc.accounts, limit, after)


@router.get(
    "/accounts/{account_id}",
    response_model=AccountResponse,
    responses={**_AUTH, **_404, **_422},
    summary="One account",
)
async def get_one_account(account_id: str, caller: AdminDep, svc: ServicesDep) -> AccountResponse:
    return AccountResponse(data=await asyncio.to_thread(get_account, svc.accounts, account_id))


@router.put(
    "/accounts/{account_id}",
    response_model=PlanChangedResponse,
    responses={**_AUTH, **_404, **_BODY, **_422},
    summary="Change an account's plan (effective from the next request)",
)
async def put_account(
    account_id: str, body: PlanChangeIn, caller: AdminDep, svc: ServicesDep
) -> PlanChangedResponse:
    """404 for an unknown account; 422 for an unknown plan. Usage already counted stays;
    percentages are computed against the new plan's limits from the next request on."""
    changed = await asyncio.to_thread(set_plan, svc.accounts, svc.plans, account_id, body)
    return PlanChangedResponse(data=changed)


@router.post(
    "/keys",
    response_model=KeyCreatedResponse,
    status_code=status.HTTP_201_CREATED,
    responses={**_KEY_SHOWN, **_AUTH, **_404, **_BODY, **_422},
    dependencies=[Depends(no_store)],
    summary="Create an API key for an account, an admin key or an ingest key (shown once)",
)
async def post_key(body: KeyCreateIn, caller: AdminDep, svc: ServicesDep) -> KeyCreatedResponse:
    """Body: exactly one of `{"account": "<id>"}`, `{"admin": true}` or `{"ingest": true}`
    (else 422). An ingest key may send events (POST /api/v1/events) for any subject and
    read nothing. 404 when the account does not exist. Only the key's hash is stored."""
    return KeyCreatedResponse(data=await asyncio.to_thread(create_key, svc.accounts, body))


@router.get(
    "/keys",
    response_model=KeysOut,
    responses={**_AUTH, **_404, **_422},
    summary="API keys (prefixes and metadata; never a key or its hash)",
)
async def get_keys(
    caller: AdminDep,
    svc: ServicesDep,
    account: Annotated[
        str | None, Query(max_length=128, description="Only this account's keys.")
    ] = None,
) -> KeysOut:
    """Revoked keys are listed too, with `revoked_at`. 404 when `account` does not exist."""
    return KeysOut(data=await asyncio.to_thread(list_keys, svc.accounts, account))


@router.delete(
    "/keys/{key_prefix}",
    response_model=KeyRevokedResponse,
    responses={**_AUTH, **_404, **_422},
    summary="Revoke a key: it is refused (401) from the next request on",
)
async def delete_key(key_prefix: str, caller: AdminDep, svc: ServicesDep) -> KeyRevokedResponse:
    """Answers **200** with `{"data": {"key_prefix", "revoked": true}}`. 404 when no
    active key has this prefix (unknown, or revoked already). TALLY_ADMIN_KEY is not a
    stored key and cannot be revoked here."""
    return KeyRevokedResponse(data=await asyncio.to_thread(revoke_key, svc.accounts, key_prefix))


TOTALS_DESCRIPTION = """
Per-account totals over a range, for reconciliation (`tally reconcile` compares them
with a recount of the Kafka log). Admin key only.

- **Range**: `[from, to)` at minute granularity, as in `/api/v1/analytics/usage`: a
  minute counts when its *start* lies in the range (`from=10:00:30Z` begins with the
  10:01 minute). `meta.minutes_from` / `meta.minutes_to` name the minutes summed.
  `from` must be before `to` (else 422).
- **`data`**: one entry per account with any rollup in those minutes, by account id.
  `requests` counts `tally.request.v1` events, `units` (and the exact `units_micro`)
  adds the units of requests and of closed streams, `events` counts every type. The
  reserved offset-marker rows are never included.
- **`account`**: only that account (an id with no usage gives an empty `data`).
- **`meta.counted_offsets`**: per partition of the events topic, the next offset the
  worker has not counted yet, read in the same query as the totals: the totals are
  exactly the events of the messages below these offsets.
"""


@router.get(
    "/totals",
    response_model=TotalsOut,
    responses={**_AUTH, **_422},
    summary="Per-account totals over a range of minutes (for reconciliation)",
    description=TOTALS_DESCRIPTION,
)
async def get_totals(
    caller: AdminDep,
    svc: ServicesDep,
    from_: FromQuery,
    to: ToQuery,
    account: Annotated[
        str | None,
        Query(max_length=128, description="Only this account; omit for every account."),
    ] = None,
) -> TotalsOut:
    start, end = from_.astimezone(UTC), to.astimezone(UTC)
    check_range(start, end)
    target = account or None
    if target is not None and not _SUBJECT.fullmatch(target):
        raise ApiError(422, "validation_error", "account: not a valid account id")
    return await asyncio.to_thread(
        account_totals, svc.store, svc.settings.events_topic, start, end, target
    )
