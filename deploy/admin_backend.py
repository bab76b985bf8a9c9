"""The admin commands' backends' contract, and the backend that goes through the admin API.

`Backend` is what `tally accounts|keys` (deploy/admin_cli.py) needs; `HttpBackend`
answers it through `/api/v1/admin` of a running stack, `deploy/admin_store.py` through
the store itself. Both return the admin API's `data` shapes, so the commands print
the same whichever answered.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import quote

import httpx

from deploy.exceptions import EXIT_REFUSED, EXIT_UNAVAILABLE, AdminCliError

DEFAULT_API_URL = "http://127.0.0.1:8000"

Json = dict[str, Any]


@dataclass(frozen=True, slots=True)
class ApiTarget:
    """The admin API a command would go through, and whether it can."""

    url: str
    admin_key: str | None
    up: bool
    """It answered `/healthz`."""

    @property
    def why_not(self) -> str:
        """Why the command opens the store instead (for its stderr line)."""
        if self.up:
            return "the API answers but no admin key was given"
        return f"no API answers at {self.url}"


def api_target(
    api_url: str | None,
    admin_key: str | None,
    environ: Mapping[str, str],
    probe: Callable[[str], bool],
) -> ApiTarget:
    """The flags (--api-url, --admin-key), else TALLY_API_URL / TALLY_ADMIN_KEY, probed."""
    url = (api_url or environ.get("TALLY_API_URL") or DEFAULT_API_URL).rstrip("/")
    return ApiTarget(url, admin_key or environ.get("TALLY_ADMIN_KEY") or None, probe(url))


class Backend(Protocol):
    """What the commands need; both backends return the admin API's `data` shapes."""

    @property
    def description(self) -> str: ...

    def create_account(self, account_id: str, plan: str | None) -> Json: ...

    def list_accounts(self) -> list[Json]: ...

    def get_account(self, account_id: str) -> Json: ...

    def set_plan(self, account_id: str, plan: str) -> Json: ...

    def create_key(self, account_id: str | None, ingest: bool = False) -> Json: ...

    def list_keys(self, account_id: str | None) -> list[Json]: ...

    def revoke_key(self, key_prefix: str) -> Json: ...

    def close(self) -> None: ...


def _segment(value: str) -> str:
    # Dots too: a client would otherwise fold an id like ".." out of the path.
    return quote(value, safe="").replace(".", "%2E")


def answer_json(response: httpx.Response) -> Any:
    """The answer's JSON document, or None when it is not JSON."""
    try:
        return response.json()
    except ValueError:
        return None


def error_message(response: httpx.Response, doc: Any) -> str:
    """What an error answer says: the error envelope's message, else its status."""
    message = f"the API answered {response.status_code}"
    if isinstance(doc, dict) and isinstance(doc.get("error"), dict):
        message = str(doc["error"].get("message", message))
    return message


class HttpBackend:
    def __init__(
        self, api_url: str, admin_key: str, transport: httpx.BaseTransport | None = None
    ) -> None:
        self.api_url = api_url.rstrip("/")
        self._client = httpx.Client(
            base_url=self.api_url,
            headers={"X-API-Key": admin_key, "User-Agent": "tally-cli"},
            timeout=30.0,
            transport=transport,
        )

    @property
    def description(self) -> str:
        return f"the admin API at {self.api_url}"

    def _call(
        self,
        method: str,
        path: str,
        body: Json | None = None,
        params: Mapping[str, str | int] | None = None,
    ) -> Json:
        try:
            response = self._client.request(
                method, "/api/v1/admin" + path, json=body, params=params
            )
        except httpx.HTTPError as exc:
            raise AdminCliError(
                f"the admin API at {self.api_url} did not answer ({exc}); check that the "
                "stack runs, or unset TALLY_ADMIN_KEY to work on the store directly",
                EXIT_UNAVAILABLE,
            ) from None
        if response.status_code == 401:
            raise AdminCliError(
                f"the API at {self.api_url} refused the admin key (401); set TALLY_ADMIN_KEY "
                "(or --admin-key) to the TALLY_ADMIN_KEY the API runs with, or to a key from "
                "`tally keys create --admin`",
                EXIT_UNAVAILABLE,
                401,
            )
        if response.status_code == 403:
            raise AdminCliError(
                "the key given is an account key, not an admin key; set TALLY_ADMIN_KEY "
                "(or --admin-key) to an admin key",
                EXIT_UNAVAILABLE,
                403,
            )
        doc = answer_json(response)
        if response.is_error:
            raise AdminCliError(error_message(response, doc), EXIT_REFUSED, response.status_code)
        if not isinstance(doc, dict) or "data" not in doc:
            raise AdminCliError(
                f"{self.api_url} answered {method} {path} with something that is not a Tally "
                "admin response; check TALLY_API_URL",
                EXIT_UNAVAILABLE,
            )
        return doc

    def create_account(self, account_id: str, plan: str | None) -> Json:
        body: Json = {"id": account_id}
        if plan is not None:
            body["plan"] = plan
        data: Json = self._call("POST", "/accounts", body)["data"]
        return data

    def list_accounts(self) -> list[Json]:
        found: list[Json] = []
        after = ""
        while True:
            doc = self._call("GET", "/accounts", params={"limit": 1000, "after": after})
            found.extend(doc["data"])
            after = (doc.get("meta") or {}).get("next_after") or ""
            if not after:
                return found

    def get_account(self, account_id: str) -> Json:
        data: Json = self._call("GET", f"/accounts/{_segment(account_id)}")["data"]
        return data

    def set_plan(self, account_id: str, plan: str) -> Json:
        data: Json = self._call("PUT", f"/accounts/{_segment(account_id)}", {"plan": plan})["data"]
        return data

    def create_key(self, account_id: str | None, ingest: bool = False) -> Json:
        body: Json = {"admin": True} if account_id is None else {"account": account_id}
        if ingest:
            body = {"ingest": True}
        data: Json = self._call("POST", "/keys", body)["data"]
        return data

    def list_keys(self, account_id: str | None) -> list[Json]:
        params = {"account": account_id} if account_id is not None else None
        data: list[Json] = self._call("GET", "/keys", params=params)["data"]
        return data

    def revoke_key(self, key_prefix: str) -> Json:
        data: Json = self._call("DELETE", f"/keys/{_segment(key_prefix)}")["data"]
        return data

    def close(self) -> None:
        self._client.close()


def api_answers(api_url: str, timeout_s: float = 2.0) -> bool:
    """True when a Tally API answers `/healthz` at `api_url`."""
    try:
        response = httpx.get(api_url.rstrip("/") + "/healthz", timeout=timeout_s)
        return response.status_code == 200 and response.json().get("status") == "ok"
    except (httpx.HTTPError, ValueError, AttributeError):
        return False
