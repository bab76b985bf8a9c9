"""The Standard Webhooks scheme, signing secrets at rest, and the SSRF guard.

Signing (https://www.standardwebhooks.com, "Signature scheme"): the secret is
`whsec_` + base64 of 32 random bytes; the signed content is
`{webhook-id}.{webhook-timestamp}.{body}`; `webhook-signature` is `v1,` + base64
of its HMAC-SHA256 under the secret's decoded bytes.

At rest, secrets are stored encrypted with AES-256-GCM (the endpoint id as
associated data, so a ciphertext cannot be moved to another endpoint) under a key
derived by HKDF-SHA256 from TALLY_WEBHOOK_SECRET_KEY, or from a random key file
<data_dir>/webhook.key (0600) when that is unset. Anyone holding the key material
and the store can sign as Tally; the store alone cannot.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ipaddress
import os
import secrets
import socket
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from query_api.alerts.settings import AlertSettings

SECRET_PREFIX = "whsec_"
_CIPHER_PREFIX = "v1:"


class UnsafeUrlError(ValueError):
    """A webhook URL Tally refuses to call; the message says why and what to do."""


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def secret_bytes(secret: str) -> bytes:
    return base64.b64decode(secret.removeprefix(SECRET_PREFIX))


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """The `webhook-signature` header value for one attempt."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_bytes(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secret: str, msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": sign(secret, msg_id, timestamp, body),
    }


class SecretBox:
    """Encrypts signing secrets for the store and decrypts them to sign."""

    def __init__(self, key_material: bytes) -> None:
        hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"tally webhook secrets")
        self._aead = AESGCM(hkdf.derive(key_material))

    @classmethod
    def from_settings(cls, settings: AlertSettings) -> SecretBox:
        if settings.webhook_secret_key is not None:
            return cls(settings.webhook_secret_key.get_secret_value().encode())
        return cls(_key_file(settings.data_dir / "webhook.key"))

    def seal(self, endpoint_id: str, secret: str) -> str:
        nonce = secrets.token_bytes(12)
        sealed = self._aead.encrypt(nonce, secret.encode(), endpoint_id.encode())
        return _CIPHER_PREFIX + base64.b64encode(nonce + sealed).decode()

    def open(self, endpoint_id: str, stored: str) -> str:
        raw = base64.b64decode(stored.removeprefix(_CIPHER_PREFIX))
        return self._aead.decrypt(raw[:12], raw[12:], endpoint_id.encode()).decode()


def _key_file(path: Path) -> bytes:
    """The key in `path`, made on first use. Written to a temporary file and linked into
    place, so a process racing to make it too reads a whole key, never a partial one."""
    if path.exists():
        return path.read_bytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=".webhook-key-")
    try:
        with os.fdopen(fd, "wb") as out:  # mkstemp: mode 0600
            out.write(secrets.token_bytes(32))
        with contextlib.suppress(FileExistsError):  # another process was first: use its key
            os.link(temporary, path)
    finally:
        os.unlink(temporary)
    return path.read_bytes()


def check_scheme(url: str) -> tuple[str, int]:
    """(host, port) of an http(s) URL; UnsafeUrlError for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UnsafeUrlError("the URL must be http:// or https:// with a host")
    if parts.username or parts.password:
        raise UnsafeUrlError("the URL must not carry credentials; sign-in is the signature's job")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise UnsafeUrlError("the URL's port is not a number in 1..65535") from None
    return parts.hostname, port


def _private(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not ip.is_global or ip.is_multicast


async def check_target(url: str, allow_private: bool) -> None:
    """Refuse a URL that is not http(s) or whose host resolves to any non-public
    address (loopback, private, link-local, reserved...), unless `allow_private`.

    Every address the name resolves to is checked, since the client may connect to
    any of them. Called when an endpoint is created and again before each attempt
    (a name may be re-pointed after creation).
    """
    host, port = check_scheme(url)
    if allow_private:
        return
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise UnsafeUrlError(f"cannot resolve {host}: {exc}") from None
    bad = sorted({str(info[4][0]) for info in found if _private(str(info[4][0]))})
    if bad:
        raise UnsafeUrlError(
            f"{host} resolves to non-public addresses {', '.join(bad)}; Tally refuses them "
            "(SSRF). Set TALLY_WEBHOOK_ALLOW_PRIVATE=true to allow private targets."
        )
