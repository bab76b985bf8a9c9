"""The admin commands' backend that opens the store itself (no API running, or no key).

It runs the admin API's own operations (query_api/admin_ops.py) in this process, so
the CLI and the API answer alike. The embedded chdb store admits one process: while
`tally up` or `tally api` holds it, opening fails and the message says to go
through the API instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

from deploy.admin_backend import Json
from deploy.exceptions import EXIT_REFUSED, EXIT_UNAVAILABLE, AdminCliError
from schemas.settings import redact

if TYPE_CHECKING:
    from pydantic import ValidationError

    from query_api.plans import Plan
    from schemas.store import Store


class StoreBackend:
    """The API's own operations, run in this process against the store."""

    def __init__(self, store: Store, plans: Mapping[str, Plan], default_plan: str) -> None:
        from query_api.accounts import AccountStore

        self.store = store
        self.accounts = AccountStore(store)
        self.plans = plans
        self.default_plan = default_plan

    @property
    def description(self) -> str:
        return f"the store directly ({redact(self.store.url)}, database {self.store.database})"

    def _do(self, operation: Callable[..., Any], *args: Any) -> Any:
        from query_api.errors import ApiError

        try:
            return operation(*args)
        except ApiError as exc:
            raise AdminCliError(exc.message, EXIT_REFUSED, exc.status) from None

    def create_account(self, account_id: str, plan: str | None) -> Json:
        from pydantic import ValidationError

        from query_api.admin_models import AccountCreateIn
        from query_api.admin_ops import create_account

        try:
            body = AccountCreateIn(id=account_id, plan=plan)
        except ValidationError as exc:
            raise AdminCliError(_validation_message(exc), EXIT_REFUSED, 422) from None
        out = self._do(create_account, self.accounts, self.plans, self.default_plan, body)
        return _dump(out)

    def list_accounts(self) -> list[Json]:
        from query_api.admin_ops import PAGE_MAX, list_accounts

        found: list[Json] = []
        after = ""
        while True:
            page = self._do(list_accounts, self.accounts, PAGE_MAX, after)
            found.extend(_dump(a) for a in page.data)
            if page.meta.next_after is None:
                return found
            after = page.meta.next_after

    def get_account(self, account_id: str) -> Json:
        from query_api.admin_ops import get_account

        return _dump(self._do(get_account, self.accounts, account_id))

    def set_plan(self, account_id: str, plan: str) -> Json:
        from query_api.admin_models import PlanChangeIn
        from query_api.admin_ops import set_plan

        body = PlanChangeIn(plan=plan)
        return _dump(self._do(set_plan, self.accounts, self.plans, account_id, body))

    def create_key(self, account_id: str | None, ingest: bool = False) -> Json:
        from query_api.admin_models import KeyCreateIn
        from query_api.admin_ops import create_key

        body = KeyCreateIn(admin=True) if account_id is None else KeyCreateIn(account=account_id)
        if ingest:
            body = KeyCreateIn(ingest=True)
        return _dump(self._do(create_key, self.accounts, body))

    def list_keys(self, account_id: str | None) -> list[Json]:
        from query_api.admin_ops import list_keys

        return [_dump(k) for k in self._do(list_keys, self.accounts, account_id)]

    def revoke_key(self, key_prefix: str) -> Json:
        from query_api.admin_ops import revoke_key

        return _dump(self._do(revoke_key, self.accounts, key_prefix))

    def close(self) -> None:
        self.store.close()


def _dump(model: Any) -> Json:
    dumped: Json = model.model_dump(mode="json")
    return dumped


def _validation_message(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors(include_url=False):
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where or 'request'}: {error.get('msg')}")
    return "; ".join(parts)


@contextlib.contextmanager
def _native_stderr() -> Iterator[list[str]]:
    """Capture what native code (chdb) writes to fd 2, e.g. its lock failure."""
    captured: list[str] = []
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield captured
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.append(sink.read().decode("utf-8", "replace"))


def _held(text: str) -> bool:
    return "Cannot lock file" in text or "already running" in text


def store_unavailable_message(
    store_url: str, api_url: str, api_up: bool, detail: str, held: bool
) -> str:
    """Why the store could not be opened, and what to do instead (one line)."""
    if api_up:
        why = f"the API at {api_url} answers but no admin key was given"
        todo = (
            "set TALLY_ADMIN_KEY (or pass --admin-key) to the admin key the API runs with "
            "(restart it with TALLY_ADMIN_KEY set if it has none)"
        )
    else:
        why = f"no Tally API answers at {api_url}"
        todo = (
            "start the stack (`tally up`, or `tally api`) with TALLY_ADMIN_KEY set and run this "
            "again with the same TALLY_ADMIN_KEY (and TALLY_API_URL if it is elsewhere)"
        )
    if held:
        return (
            f"the embedded store {store_url} is held by another process (a running `tally up`, "
            f"`tally api` or `tally worker`; chdb admits one) and {why}. To fix: {todo}; or stop "
            "the process holding it."
        )
    return (
        f"cannot open the store {redact(store_url)} ({detail}) and {why}. To fix: check "
        f"TALLY_CLICKHOUSE_URL / TALLY_CLICKHOUSE_DATABASE, or {todo}."
    )


def open_store_backend(api_url: str, api_up: bool) -> StoreBackend:
    from query_api.plans import load_plans
    from query_api.settings import ApiSettings
    from schemas.exceptions import StoreError
    from schemas.settings import load
    from schemas.store import Store

    settings = load(ApiSettings)
    store_url = settings.store_url
    detail = ""
    with _native_stderr() as native:
        try:
            store = Store(store_url, settings.store_database, settings.clickhouse_cluster or "")
            store.migrate()
        except StoreError as exc:
            store = None
            detail = str(exc.__cause__ or exc)
        except Exception as exc:  # a server that refuses a migration, say
            store = None
            detail = f"{type(exc).__name__}: {exc}"
    noise = "".join(native).strip()
    if store is None:
        held = store_url.startswith("chdb:") and (_held(noise) or _held(detail))
        detail = detail.splitlines()[0] if detail else (noise.splitlines() or ["unknown"])[-1]
        raise AdminCliError(
            store_unavailable_message(store_url, api_url, api_up, detail, held), EXIT_UNAVAILABLE
        )
    if noise:
        print(noise, file=sys.stderr)
    return StoreBackend(store, load_plans(settings.plans), settings.default_plan)
