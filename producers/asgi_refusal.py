"""The 429 the metering middleware answers when enforcement refuses a call.

The body is Tally's one error envelope (docs/api.md#errors), so a client reads a
gateway's refusal as it reads the API's: `{"error": {"code", "message", "docs"}}`.
"""

from __future__ import annotations

from typing import Final

import orjson
from starlette.types import Send

from producers.enforcement import Refusal

ENFORCEMENT_DOCS: Final = "docs/gateway-integration.md#enforcing-plans"
"""The default `docs` of a refusal; MeteringMiddleware(docs_url=...) points it at yours."""


async def send_refusal(send: Send, refusal: Refusal, docs: str) -> None:
    body = orjson.dumps({"error": {"code": refusal.code, "message": refusal.message, "docs": docs}})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in refusal.headers.items()),
    ]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
