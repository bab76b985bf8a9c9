"""The Standard Webhooks scheme (query_api/alerts/signing.py): the reference library's
own test vector, an independent verifier, secrets at rest and the SSRF guard."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest
from cryptography.exceptions import InvalidTag

from query_api.alerts.settings import AlertSettings
from query_api.alerts.signing import (
    SecretBox,
    UnsafeUrlError,
    check_target,
    headers,
    new_secret,
    sign,
)


def verify(secret: str, sent: dict[str, str], body: bytes) -> bool:
    """Written from the specification, not from Tally's code: any `v1,` entry of the
    space-separated header must match HMAC-SHA256 over id.timestamp.body."""
    key = base64.b64decode(secret.split("_", 1)[1])
    content = b".".join([sent["webhook-id"].encode(), sent["webhook-timestamp"].encode(), body])
    expected = hmac.new(key, content, hashlib.sha256).digest()
    for entry in sent["webhook-signature"].split(" "):
        version, _, value = entry.partition(",")
        if version == "v1" and hmac.compare_digest(base64.b64decode(value), expected):
            return True
    return False


def test_the_reference_implementations_vector() -> None:
    # From the standard-webhooks reference library's tests (libraries/python).
    signature = sign(
        "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        "msg_p5jXN8AQM9LWM0D4loKWxJek",
        1614265330,
        b'{"test": 2432232314}',
    )
    assert signature == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_headers_verify_independently_and_fail_when_anything_changes() -> None:
    secret = new_secret()
    assert secret.startswith("whsec_")
    assert len(base64.b64decode(secret[6:])) == 32
    body = b'{"type": "usage.threshold.crossed"}'
    sent = headers(secret, "msg_1", 1_700_000_000, body)
    assert verify(secret, sent, body)
    assert not verify(secret, sent, body + b" ")
    assert not verify(secret, {**sent, "webhook-id": "msg_2"}, body)
    assert not verify(secret, {**sent, "webhook-timestamp": "1700000001"}, body)
    assert not verify(new_secret(), sent, body)


def test_secrets_are_sealed_per_endpoint(tmp_path: Path) -> None:
    box = SecretBox.from_settings(AlertSettings(data_dir=tmp_path))
    assert (tmp_path / "webhook.key").stat().st_mode & 0o777 == 0o600
    secret = new_secret()
    sealed = box.seal("whep_1", secret)
    assert secret not in sealed
    assert secret[6:] not in sealed
    assert box.open("whep_1", sealed) == secret
    # The same key file again: a restart can still sign.
    assert (
        SecretBox.from_settings(AlertSettings(data_dir=tmp_path)).open("whep_1", sealed) == secret
    )
    with pytest.raises(InvalidTag):
        box.open("whep_2", sealed)  # moved to another endpoint
    with pytest.raises(InvalidTag):
        SecretBox(b"another key").open("whep_1", sealed)


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com/x",
        "file:///etc/passwd",
        "http://user:pw@example.com/",
        "http://127.0.0.1:8000/hook",
        "http://localhost/hook",
        "http://10.1.2.3/",
        "http://192.168.0.1/",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]/",
        "http://[::ffff:127.0.0.1]/",
        "http://0.0.0.0/",
    ],
)
async def test_unsafe_targets_are_refused(url: str) -> None:
    with pytest.raises(UnsafeUrlError):
        await check_target(url, allow_private=False)


async def test_private_targets_only_when_allowed() -> None:
    await check_target("http://127.0.0.1:9/hook", allow_private=True)
    await check_target("https://8.8.8.8/hook", allow_private=False)
    with pytest.raises(UnsafeUrlError):
        await check_target("gopher://127.0.0.1/", allow_private=True)


def test_the_key_setting_refuses_weak_material_and_treats_empty_as_unset(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="24"):
        AlertSettings(webhook_secret_key="short")  # type: ignore[arg-type]
    assert AlertSettings(webhook_secret_key="").webhook_secret_key is None  # type: ignore[arg-type]
    given = AlertSettings(data_dir=tmp_path, webhook_secret_key="k" * 32)  # type: ignore[arg-type]
    box = SecretBox.from_settings(given)
    assert not (tmp_path / "webhook.key").exists(), "a configured key needs no key file"
    sealed = box.seal("whep_1", "whsec_AAAA")
    assert SecretBox.from_settings(given).open("whep_1", sealed) == "whsec_AAAA"
