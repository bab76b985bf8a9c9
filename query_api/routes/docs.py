"""GET /docs: Swagger UI over /openapi.json, under a Content-Security-Policy.

No Python package in the lock ships Swagger UI's files, so they come from the CDN,
pinned: one exact version, each file with its Subresource Integrity hash (sha384 of
the file in the npm package swagger-ui-dist, which the CDN serves byte for byte).
A browser refuses a file whose bytes differ, and the policy allows those two URLs
and the page's one inline script (by its hash) and nothing else: no other script,
no frames, no form targets, requests only to this origin. The page itself carries
no key; "Authorize" keeps the one its user types in the browser.

To move to another Swagger UI version: change SWAGGER_UI_VERSION and both hashes
(`openssl dgst -sha384 -binary FILE | base64` over the files of
`npm pack swagger-ui-dist@VERSION`).
"""

from __future__ import annotations

import base64
import hashlib

from fastapi import APIRouter, Response

router = APIRouter(include_in_schema=False)

SWAGGER_UI_VERSION = "5.31.0"
_CDN = f"https://cdn.jsdelivr.net/npm/swagger-ui-dist@{SWAGGER_UI_VERSION}"
SCRIPT_URL = f"{_CDN}/swagger-ui-bundle.js"
SCRIPT_SRI = "sha384-cxafBeQ+zYROeFafGFxtFbnp1ICqeS9mG7+f0WWSHzhnrUvwg9Za5CCw6wgrHA7K"
STYLE_URL = f"{_CDN}/swagger-ui.css"
STYLE_SRI = "sha384-KX9Rx9vM1AmUNAn07bPAiZhFD4C8jdNgG6f5MRNvR+EfAxs2PmMFtUUazui7ryZQ"

# Relative URLs, so the page works under a proxy's path prefix too.
INIT_SCRIPT = """window.ui = SwaggerUIBundle({
  url: "openapi.json",
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset]
});"""

PAGE = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Tally usage API</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="{STYLE_URL}" integrity="{STYLE_SRI}" crossorigin="anonymous">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{SCRIPT_URL}" integrity="{SCRIPT_SRI}" crossorigin="anonymous"></script>
<script>{INIT_SCRIPT}</script>
</body>
</html>
"""


def _script_hash(script: str) -> str:
    digest = hashlib.sha256(script.encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        f"script-src {SCRIPT_URL} {_script_hash(INIT_SCRIPT)}",
        # Swagger UI sets some styles inline; a style cannot run code.
        f"style-src {STYLE_URL} 'unsafe-inline'",
        "img-src 'self' data:",
        # "Try it out" calls this API, and the page loads /openapi.json.
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
    )
)

SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@router.get("/docs")
async def docs() -> Response:
    return Response(PAGE, media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)
