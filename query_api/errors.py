"""One error body for every failure (CONTRACT §3):
`{"error": {"code": "...", "message": "...", "docs": "..."}}`."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("tally.api")

DOCS = "/docs#section/Errors"

ERROR_CODES = {
    "unauthorized": "401: the API key is missing, unknown or revoked.",
    "forbidden": "403: the key is valid but may not do this (an account key on an admin route).",
    "not_found": "404: no such resource, or not one this key may see.",
    "conflict": "409: the resource exists already.",
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


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", UNAUTHORIZED_MESSAGE, {"WWW-Authenticate": "Bearer"})


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
