"""Trusted keys: the public keys uploads are checked against.

Only a public key is ever accepted: a PEM holding a private key is refused
(:class:`~otakit.errors.PrivateKeyError`) before it is parsed, and nothing of it is stored or
logged (``otakit key trust`` sends only the public part of a key file). Trusting and removing a
key are recorded in the audit log (``key.trust``, ``key.delete``).
"""

from __future__ import annotations

import re

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import KeyFormatError, NotFoundError, PrivateKeyError, TooLargeError
from otakit.image.keys import PublicKey
from otakit.server.models import TrustedKey
from otakit.server.service import audit

MAX_PEM = 64 * 1024
# any PEM block of a private key: PKCS#8 (also encrypted), PKCS#1 RSA, SEC1 EC, OpenSSH
_PRIVATE = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")


def public_key(pem: bytes) -> PublicKey:
    """The public key ``pem`` holds. Raises PrivateKeyError (the PEM holds a private key),
    KeyFormatError (no public key PEM otakit reads) and TooLargeError (over 64 KiB)."""
    if len(pem) > MAX_PEM:
        raise TooLargeError("a PEM key is at most 64 KiB")
    if _PRIVATE.search(pem):
        raise PrivateKeyError(
            "this is a private key: send only its public part (otakit key trust does; or "
            "`openssl pkey -in KEY.pem -pubout`); the private key never leaves the signer's "
            "machine, and nothing was stored"
        )
    try:
        loaded = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise KeyFormatError(
            "not a PEM public key (expected '-----BEGIN PUBLIC KEY-----')"
        ) from None
    return PublicKey(loaded)  # type: ignore[arg-type]


async def trust(db: AsyncSession, pem: bytes, *, actor: str = audit.LOCAL) -> TrustedKey:
    """Trust the public key in ``pem`` (trusting it again changes nothing); commits. Raises
    what :func:`public_key` raises."""
    key = public_key(pem)
    row = await db.get(TrustedKey, key.fingerprint)
    if row is None:
        row = TrustedKey(
            fingerprint=key.fingerprint, key_type=key.type.value, pem=key.pem().decode()
        )
        db.add(row)
        audit.record(
            db,
            actor=actor,
            action="key.trust",
            target=f"key {key.fingerprint}",
            details={"key_type": key.type.value},
        )
        await db.commit()
    return row


async def remove(db: AsyncSession, fingerprint: str, *, actor: str = audit.LOCAL) -> None:
    """Stop trusting a key; commits. Raises NotFoundError for a key that is not trusted."""
    row = await db.get(TrustedKey, fingerprint)
    if row is None:
        raise NotFoundError(f"key {fingerprint!r} not found", value=fingerprint)
    await db.delete(row)
    audit.record(
        db,
        actor=actor,
        action="key.delete",
        target=f"key {fingerprint}",
        details={"key_type": row.key_type},
    )
    await db.commit()


async def listing(db: AsyncSession) -> list[TrustedKey]:
    """Every trusted key, oldest first."""
    return list(await db.scalars(select(TrustedKey).order_by(TrustedKey.created_at)))
