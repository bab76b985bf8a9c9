"""One error body for every failure (docs/api.md#errors):
`{"error": {"code": "...", "message": "...", "docs": "..."}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from query_api.limits import api_limit_headers
from query_api.ratelimit import Decision
from schemas.exceptions import TallyError

log = logging.getLogger("tally.api")

DOCS = "/docs#section/Errors"

ERROR_CODES = {
    "invalid_body": "400: the body is not JSON, not an event or an array of them, or empty.",
    "unauthorized": "401: the API key is missing, unknown or revoked.",
    "forbidden": "403: the key is valid but may not do this (an account key on an admin "
    "route or sending events, an ingest key reading).",
    "not_found": "404: no such resource, or not one this key may see.",
    "conflict": "409: the resource exists already.",
    "payload_too_large": "413: the request body is over TALLY_API_MAX_BODY_BYTES (events: "
    "TALLY_INGEST_MAX_BODY_BYTES or TALLY_INGEST_MAX_EVENTS); send less.",
    "validation_error": "422: a parameter or body field is invalid; the message names it.",
    "rate_limited": "429: too many calls; retry after the time in Retry-After.",
    "internal_error": "500: a fault on our side; the X-Request-Id header identifies it.",
    "unavailable": "503: a dependency (store, Kafka, processors) is not ready.",
}
UNAUTHORIZED_MESSAGE = "Invalid or missing API key"


class ErrorDetail(BaseModel):
    code: str
    message: str
    docs: str


class ErrorBody(BaseModel):
    error: ErrorDetail


class ApiError(TallyError):
    """A refusal the API answers with the error envelope: `status`, `code`, `message`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", UNAUTHORIZED_MESSAGE, {"WWW-Authenticate": "Bearer"})


def rate_limited(decision: Decision, now_epoch: float) -> ApiError:
    """429 for a caller over the API's own limit; its headers (X-RateLimit-* and the
    fields of docs/api.md#rate-limit-headers) describe that limit, the one that refused
    the request."""
    return ApiError(
        429,
        "rate_limited",
        f"too many requests: at most {decision.limit} at once, then refilling over time; "
        f"retry in {decision.retry_after_s}s",
        {"Retry-After": str(decision.retry_after_s), **api_limit_headers(decision, now_epoch)},
    )


def _int_header(description: str) -> dict[str, object]:
    return {"description": description, "schema": {"type": "integer"}}


def _sf_header(description: str) -> dict[str, object]:
    return {"description": description, "schema": {"type": "string"}}


RATE_LIMITED_RESPONSE: dict[int | str, dict[str, object]] = {
    429: {
        "model": ErrorBody,
        "description": "Too many requests from this API key (or, without a valid key, from "
        "this client address): the API's own limit, per API process "
        "(TALLY_API_RATE_PER_S, TALLY_API_RATE_BURST). Not the plan's per_minute limit.",
        "headers": {
            "Retry-After": _int_header("Seconds to wait before the next request (at least 1)."),
            "X-RateLimit-Limit": _int_header("Requests allowed in one burst."),
            "X-RateLimit-Remaining": _int_header("Requests left in the burst now (0)."),
            "X-RateLimit-Reset": _int_header(
                "Epoch seconds at which the whole burst is available again."
            ),
            "RateLimit-Policy": _sf_header(
                "The limit that refused the request (draft-ietf-httpapi-ratelimit-headers, "
                'an RFC 9651 List): `"api";q=<burst>;w=<seconds an empty bucket takes to '
                "refill>`."
            ),
            "RateLimit": _sf_header(
                '`"api";r=<X-RateLimit-Remaining>;t=<seconds until X-RateLimit-Reset, rounded up>`.'
            ),
        },
    }
}
"""For `responses=` of every route that authenticates (they are the limited ones)."""


PAYLOAD_TOO_LARGE_RESPONSE: dict[int | str, dict[str, object]] = {
    413: {
        "model": ErrorBody,
        "description": "The request body is larger than TALLY_API_MAX_BODY_BYTES (default "
        "1 MiB), by its Content-Length or as it streams in; it is not read further.",
    }
}
"""For `responses=` of every route that takes a body."""


def payload_too_large(limit: int, setting: str = "TALLY_API_MAX_BODY_BYTES") -> ApiError:
    """413, closing the connection: the rest of the body is never read, and draining
    it to keep the connection alive would receive what the limit refuses."""
    return ApiError(
        413,
        "payload_too_large",
        f"the request body is over {limit} bytes ({setting}); send a smaller one",
        {"Connection": "close"},
    )


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "docs": DOCS}}
    return JSONResponse(body, status_code=status, headers=headers)


_STATUS_CODES = {
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "not_found",
    409: "conflict",
    413: "payload_too_large",
    422: "validation_error",
    429: "rate_limited",
}


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p not in ("query", "body"))
            parts.append(f"{where or 'request'}: {error.get('msg')}")
        return error_response(422, "validation_error", "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's answer to a body it cannot decode (not UTF-8, say): the caller's
            # fault like any other unreadable body, which FastAPI already answers with
            # 422. One status and code for both; it is never an internal error.
            detail = exc.detail if isinstance(exc.detail, str) else "invalid request"
            return error_response(422, "validation_error", f"body: {detail}")
        code = _STATUS_CODES.get(exc.status_code, "internal_error")
        message = exc.detail if isinstance(exc.detail, str) else code
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}; see /docs"
        return error_response(exc.status_code, code, message, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(
            500,
            "internal_error",
            "an internal error occurred; quote the X-Request-Id when reporting it",
        )
