"""Artifacts: what an upload is, checked before it is recorded.

An upload is streamed to a temporary file while its SHA-256, SHA-1 and MD5 are computed
(artifacts.Hasher, in the management API's upload route), then classified:

- a TAR package (``ustar`` at byte 257): its manifest and every component image are checked;
- an MCUboot image (header magic): hash and signature against the trusted keys;
- anything else is a *raw* file (the gateway model of protocols.md §7), accepted only when the
  product allows raw files, with the version given by the uploader.

Signed images are refused unless a trusted key verifies them, and so are bytes after an image's
TLV area (an ``imgtool --pad`` trailer); unsigned images only go through as raw files of a
product that allows them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from otakit.errors import OtakitError, TrailingDataError, UnsignedImageError, UsageError
from otakit.image.header import IMAGE_MAGIC
from otakit.image.keys import PublicKey
from otakit.image.package import is_package, read_manifest
from otakit.image.source import SliceSource, open_source
from otakit.image.verify import VerifiedImage, verify_image
from otakit.protocol.version import FirmwareVersion


@dataclass(frozen=True)
class Inspected:
    kind: str  # image, package, raw
    version: str
    signature: str  # valid, raw
    signed_by: str | None
    details: dict[str, Any] = field(default_factory=dict)


def inspect_upload(
    path: Path,
    keys: Sequence[PublicKey],
    *,
    raw_allowed: bool,
    version: str | None,
) -> Inspected:
    """Classify and check an uploaded file; raise an OtakitError to refuse it."""
    with open_source(path) as src:
        head = src.read_at(0, 512)
        if is_package(head):
            return _package(src, keys)
        if len(head) >= 4 and int.from_bytes(head[:4], "little") == IMAGE_MAGIC:
            try:
                return _image(path, keys)
            except UnsignedImageError:
                if not raw_allowed:
                    raise
    if not raw_allowed:
        raise UsageError(
            "this is not a signed MCUboot image or package, and the product does not allow raw "
            "files (set allow_raw on the product for gateway firmware)"
        )
    if not version:
        raise UsageError("a raw file needs its version (?version=...)")
    FirmwareVersion.parse(version)  # validates; the gateway's own form ("3") is kept
    return Inspected("raw", version.strip(), "raw", None)


def _require_keys(keys: Sequence[PublicKey]) -> None:
    if not keys:
        raise UsageError(
            "no trusted keys are configured, so signed images cannot be checked; "
            "add one with POST /api/v1/keys"
        )


def _signed_part_only(verified: VerifiedImage, size: int, what: str) -> None:
    """Refuse bytes after the TLV area: nothing signs them, and a trailer in them (``imgtool
    sign --pad --confirm``) would make a device's test upgrade permanent."""
    extra = size - verified.layout.end
    if extra > 0:
        raise TrailingDataError(
            f"{what} has {extra} bytes after its signed part (header, payload and TLVs end at "
            f"byte {verified.layout.end}); sign it without --pad/--confirm for an OTA update: "
            "the device sets its own test or permanent request",
            value=extra,
        )


def _image(path: Path, keys: Sequence[PublicKey]) -> Inspected:
    _require_keys(keys)
    verified = verify_image(path, keys)
    assert verified.signed_by is not None
    _signed_part_only(verified, path.stat().st_size, "the image")
    version = FirmwareVersion.from_image(verified.version)
    return Inspected(
        "image",
        str(version),
        "valid",
        verified.signed_by.fingerprint,
        {
            "image_version": str(verified.version),
            "security_counter": verified.security_counter,
            "image_size": verified.layout.end,
        },
    )


def _package(src: Any, keys: Sequence[PublicKey]) -> Inspected:
    _require_keys(keys)
    manifest = read_manifest(src)
    components = []
    signer = None
    for component in manifest.components:
        assert component.offset is not None
        member = SliceSource(src, component.offset, component.size)
        try:
            verified = verify_image(member, keys)
        except OtakitError as exc:
            raise type(exc)(f"{component.name}: {exc.message}", value=exc.value) from None
        _signed_part_only(verified, component.size, component.name)
        signer = verified.signed_by.fingerprint if verified.signed_by else None
        components.append(
            {
                "name": component.name,
                "type": component.file_type,
                "image": component.image_index,
                "size": component.size,
                "version": str(verified.version),
            }
        )
    return Inspected(
        "package",
        str(FirmwareVersion.parse(manifest.version)),
        "valid",
        signer,
        {"components": components},
    )
