"""Administration (docs/api.md#administration): plans, accounts, keys, totals. Admin keys only.

Each route is a thin async wrapper around a blocking operation of
query_api/admin_ops.py, which the CLI runs too when it opens the store directly.
"""

from __future__ import annotations

import asyncio
import re
from datetime import UTC
from typing import Annotated

from fastapi import APIRouter, Depends, Query, status

from query_api.admin_models import (
    AccountCreatedResponse,
    AccountCreateIn,
    AccountResponse,
    AccountsOut,
    KeyCreatedResponse,
    KeyCreateIn,
    KeyRevokedResponse,
    KeysOut,
    PlanChangedResponse,
    PlanChangeIn,
    PlansOut,
    TotalsOut,
)
from query_api.admin_ops import (
    PAGE_MAX,
    account_totals,
    create_account,
    create_key,
    get_account,
    list_accounts,
    list_keys,
    list_plans,
    revoke_key,
    set_plan,
)
from query_api.deps import NO_STORE_HEADER, AdminDep, ServicesDep, no_store
from query_api.errors import (
    PAYLOAD_TOO_LARGE_RESPONSE,
    RATE_LIMITED_RESPONSE,
    ApiError,
    ErrorBody,
)
from query_api.routes.analytics import FromQuery, ToQuery, check_range
from schemas.events import SUBJECT_PATTERN

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

_SUBJECT = re.compile(SUBJECT_PATTERN)


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
