"""Expiring signed download URLs: ``PATH?expires=UNIX&sig=HMAC``.

The signature is HMAC-SHA256 over ``PATH`` and the expiry, keyed with the server's signing key
(kept in the database so every process and host signs alike), base64url without padding. A URL
whose expiry has passed, or whose signature does not match, is refused with 403.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import time
from urllib.parse import quote

# an expiry is a Unix time in ASCII digits (at most 12: beyond the year 33000); a signature is
# 43 base64url characters. Anything else is not a signed URL: refused before any arithmetic.
_EXPIRES = re.compile(r"[0-9]{1,12}")
_SIG = re.compile(r"[A-Za-z0-9_-]{43}")


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
    """None when the URL is valid, else why not (for the 403 message). Never raises, whatever
    the (unauthenticated) caller sends."""
    if not expires or not sig or not _EXPIRES.fullmatch(expires) or not _SIG.fullmatch(sig):
        return "the download URL is not signed"
    if int(expires) < (time.time() if now is None else now):
        return "the download URL has expired"
    if not hmac.compare_digest(_signature(key, path, int(expires)), sig):  # both ASCII
        return "the download URL signature is not valid"
    return None
