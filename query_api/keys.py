"""API keys: random, shown once, stored only as a hash (pure).

A key looks like `tly_<prefix>_<secret>`: the 12-hex-digit prefix names the key
(for listing and revocation, safe to log), the secret carries 192 random bits.
Keys are high-entropy, so a single SHA-256 is enough to make the stored hash
useless to a thief; a slow password hash would only cost latency per request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

_KEY = re.compile(r"tly_([0-9a-f]{12})_([A-Za-z0-9_-]{32})")


def new_key() -> tuple[str, str]:
    """A fresh key and its prefix."""
    prefix = secrets.token_hex(6)
    return f"tly_{prefix}_{secrets.token_urlsafe(24)}", prefix


def prefix_of(key: str) -> str | None:
    match = _KEY.fullmatch(key)
    return match.group(1) if match else None


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def same_key(key: str, stored_hash: str) -> bool:
    """Constant-time comparison, so timing reveals nothing about the stored hash."""
    return hmac.compare_digest(hash_key(key), stored_hash)
