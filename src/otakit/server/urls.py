"""Expiring signed download URLs: ``PATH?expires=UNIX&sig=HMAC``.

The signature is HMAC-SHA256 over ``PATH`` and the expiry, keyed with the server's signing key
(kept in the database so every process and host signs alike), base64url without padding. A URL
whose expiry has passed, or whose signature does not match, is refused with 403.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import time
from urllib.parse import quote


def new_signing_key() -> str:
    return secrets.token_hex(32)


def _signature(key: str, path: str, expires: int) -> str:
    mac = hmac.new(bytes.fromhex(key), f"{path}\n{expires}".encode(), hashlib.sha256)
    return base64.urlsafe_b64encode(mac.digest()).rstrip(b"=").decode()


def sign_path(key: str, path: str, expires_in: int, *, now: float | None = None) -> str:
    """``path`` with ``expires`` and ``sig`` query parameters."""
    expires = int((time.time() if now is None else now) + expires_in)
    return f"{path}?expires={expires}&sig={quote(_signature(key, path, expires))}"


def check_signature(
    key: str, path: str, expires: str | None, sig: str | None, *, now: float | None = None
) -> str | None:
    """None when the URL is valid, else why not (for the 403 message)."""
    if not expires or not sig or not expires.isdigit():
        return "the download URL is not signed"
    if int(expires) < (time.time() if now is None else now):
        return "the download URL has expired"
    if not hmac.compare_digest(_signature(key, path, int(expires)), sig):
        return "the download URL signature is not valid"
    return None
