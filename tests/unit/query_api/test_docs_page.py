"""The /docs page (query_api/routes/docs.py): pinned assets under a strict CSP."""

from __future__ import annotations

import base64
import hashlib
import re

from query_api.routes import docs


def test_every_external_asset_is_pinned_by_version_and_integrity() -> None:
    urls = re.findall(r'(?:src|href)="(https?://[^"]+)"', docs.PAGE)
    assert sorted(urls) == sorted([docs.SCRIPT_URL, docs.STYLE_URL])
    for url in urls:
        assert f"@{docs.SWAGGER_UI_VERSION}/" in url
    for tag in re.findall(r"<(?:script|link)[^>]*https://[^>]*>", docs.PAGE):
        assert re.search(r'integrity="sha384-[A-Za-z0-9+/]{64}"', tag), tag
        assert 'crossorigin="anonymous"' in tag


def test_the_policy_allows_only_the_pinned_files_and_the_page_s_own_script() -> None:
    policy = dict(
        (*part.split(" ", 1), "")[:2] for part in docs.CONTENT_SECURITY_POLICY.split("; ")
    )
    assert policy["default-src"] == "'none'"
    inline = re.findall(r"<script>(.*?)</script>", docs.PAGE, re.S)
    assert inline == [docs.INIT_SCRIPT]
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    assert policy["script-src"].split() == [docs.SCRIPT_URL, f"'sha256-{digest}'"]
    assert policy["style-src"].split()[0] == docs.STYLE_URL
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    assert "unsafe-eval" not in docs.CONTENT_SECURITY_POLICY
