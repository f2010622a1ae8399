"""Image validation, as MCUboot's ``bootutil_img_validate`` does it, in bounded memory.

The image hash is computed over header, payload and protected TLVs by streaming the source in
chunks; only the TLV areas are held in memory. Then:

1. the hash TLV (SHA-256/384/512) must match the computed digest;
2. each signature TLV is paired with the KEYHASH (or PUBKEY) TLV before it; a signature whose key
   is not trusted is skipped, as MCUboot does;
3. at least one signature by a trusted key must verify.

Each failure raises its own :class:`~otakit.errors.VerificationError` subclass.

Encrypted images (IMAGE_F_ENCRYPTED_*): imgtool hashes and signs the payload before it encrypts
it, and MCUboot decrypts the secondary slot while hashing it. otakit does not decrypt, so it can
only check an image whose payload was left in clear (``imgtool sign -E KEY --clear``, which keeps
the flag and the key TLV): ``imgtool verify`` accepts those and so does :func:`verify_image` when
asked (``accept_clear=True``). An encrypted payload does not match its (plaintext) hash and is
refused with :class:`~otakit.errors.EncryptedImageError`.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from dataclasses import dataclass

from otakit.errors import (
    EncryptedImageError,
    HashMismatchError,
    ImageTooLargeError,
    KeyMismatchError,
    SignatureError,
    TlvError,
    UnsignedImageError,
    VerificationError,
)
from otakit.image.header import ImageVersion
from otakit.image.keys import PublicKey
from otakit.image.layout import ImageLayout, read_layout
from otakit.image.source import ByteSource, SourceLike, iter_range, open_source
from otakit.image.tlv import HASH_TLVS, SIGNATURE_TLVS, TlvType

_HASH_NAMES = {TlvType.SHA256: "sha256", TlvType.SHA384: "sha384", TlvType.SHA512: "sha512"}
# A pure Ed25519 signature covers the whole hashed region, which must then be held in memory.
PURE_SIGNATURE_LIMIT = 16 * 1024 * 1024


@dataclass(frozen=True)
class VerifiedImage:
    """An image that passed verification, with what was checked."""

    layout: ImageLayout
    hash_name: str
    digest: bytes
    signed_by: PublicKey | None  # None when no keys were given (integrity check only)

    @property
    def version(self) -> ImageVersion:
        return self.layout.header.version

    @property
    def security_counter(self) -> int | None:
        return self.layout.security_counter


def verify_image(
    source: SourceLike,
    keys: Sequence[PublicKey] | None = None,
    *,
    max_size: int | None = None,
    accept_clear: bool = False,
) -> VerifiedImage:
    """Verify an image from bytes, a path (``.hex``: Intel HEX), a binary file or any
    :class:`ByteSource`.

    With ``keys=None`` only the image's integrity (its hash) is checked; with a sequence of keys
    a valid signature by one of them is required.

    An image marked encrypted is refused (:class:`~otakit.errors.EncryptedImageError`) unless
    ``accept_clear``: then one whose payload is in clear (``imgtool sign -E KEY --clear``) is
    checked like any other, as ``imgtool verify`` does. Devices and the server leave it False:
    a bootloader without encryption support refuses such an image, and one with it decrypts
    the secondary slot, which turns a clear payload into garbage.

    Raises an :class:`~otakit.errors.ImageFormatError` subclass for malformed input (bad magic,
    truncation, TLV overflow, too large for ``max_size``) and a
    :class:`~otakit.errors.VerificationError` subclass for a failed check.
    """
    with open_source(source) as src:
        layout = read_layout(src, max_size=max_size)
        header = layout.header
        if header.encrypted and not accept_clear:
            raise EncryptedImageError(
                f"image is marked encrypted ({', '.join(header.flag_names)}): otakit does not "
                "decrypt images, and a bootloader that does would also decrypt a payload left in "
                "clear (imgtool --clear), which is only for the primary slot",
                value=header.flag_names,
            )
        hash_name, digest, region = check_hash(src, layout)
        if keys is None:
            return VerifiedImage(layout, hash_name, digest, None)
        signer = _check_signatures(layout, keys, hash_name, digest, region)
        return VerifiedImage(layout, hash_name, digest, signer)


def check_hash(src: ByteSource, layout: ImageLayout) -> tuple[str, bytes, bytes | None]:
    """Stream the hashed region and compare it with the hash TLV.

    Returns the hash name, the digest and, for a pure-signature image, the hashed region itself
    (which a pure signature covers). Raises :class:`HashMismatchError` on mismatch, or
    :class:`EncryptedImageError` when the image is marked encrypted (its hash covers the
    plaintext, so only a payload left in clear matches).
    """
    header = layout.header
    hash_tlvs = [t for t in layout.tlvs if t.kind in HASH_TLVS]
    if not hash_tlvs:
        raise VerificationError("image has no SHA-256/384/512 hash TLV")
    if len(hash_tlvs) > 1:
        raise TlvError("image has more than one hash TLV", value=[t.name for t in hash_tlvs])
    hash_tlv = hash_tlvs[0]
    hash_name = _HASH_NAMES[TlvType(hash_tlv.kind)]
    pure = layout.find(TlvType.SIG_PURE) is not None
    if pure and layout.hashed_size > PURE_SIGNATURE_LIMIT:
        raise ImageTooLargeError(
            f"pure-signature images are limited to {PURE_SIGNATURE_LIMIT} bytes",
            value=layout.hashed_size,
        )
    hasher = hashlib.new(hash_name)
    region = bytearray() if pure else None
    for chunk in iter_range(src, 0, layout.hashed_size):
        hasher.update(chunk)
        if region is not None:
            region += chunk
    digest = hasher.digest()
    if not hmac.compare_digest(digest, hash_tlv.value):
        if header.encrypted:
            raise EncryptedImageError(
                f"the payload is encrypted ({', '.join(header.flag_names)}) and otakit cannot "
                f"decrypt it (or it is corrupted): it does not match the image's plaintext "
                f"{hash_name.upper()}; only an image signed with imgtool --clear can be checked",
                value=digest.hex(),
            )
        raise HashMismatchError(
            f"image {hash_name.upper()} does not match its contents: the image is "
            "corrupted or was modified after signing",
            value=digest.hex(),
        )
    return hash_name, digest, None if region is None else bytes(region)


def _check_signatures(
    layout: ImageLayout,
    keys: Sequence[PublicKey],
    hash_name: str,
    digest: bytes,
    region: bytes | None,
) -> PublicKey:
    signatures = [t for t in layout.tlvs if t.kind in SIGNATURE_TLVS]
    if not signatures:
        raise UnsignedImageError("image is not signed (no signature TLV)")
    current: PublicKey | None = None
    seen_key_ids: list[str] = []
    failed: list[str] = []
    for tlv in layout.tlvs:
        if tlv.kind == TlvType.KEYHASH:
            seen_key_ids.append(tlv.value.hex())
            current = next(
                (k for k in keys if hmac.compare_digest(k.key_hash(hash_name), tlv.value)), None
            )
        elif tlv.kind == TlvType.PUBKEY:
            seen_key_ids.append(hashlib.sha256(tlv.value).hexdigest())
            current = next((k for k in keys if k.public_bytes() == tlv.value), None)
        elif tlv.kind in SIGNATURE_TLVS and current is not None:
            if tlv.kind != current.sig_tlv:
                failed.append(f"{tlv.name} signature cannot come from a {current.type} key")
            elif region is not None:
                if current.verify_message(tlv.value, region):
                    return current
                failed.append(f"pure {tlv.name} signature does not verify")
            elif current.verify_digest(tlv.value, digest, hash_name):
                return current
            else:
                failed.append(
                    f"{tlv.name} signature does not verify with key {current.fingerprint}"
                )
    if failed:
        raise SignatureError(f"bad signature: {failed[0]}", value=failed)
    trusted = ", ".join(k.fingerprint for k in keys) or "none"
    shown = ", ".join(k[:16] for k in seen_key_ids) or "no key hash"
    raise KeyMismatchError(
        f"image is signed by a key that is not trusted (image key {shown}; trusted {trusted})",
        value=seen_key_ids,
    )
