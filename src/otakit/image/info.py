"""Inspect an MCUboot image: header, sizes, TLVs, hash and trailer, as data or for display."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from otakit.errors import EncryptedImageError, ImageFormatError, VerificationError
from otakit.image.layout import ImageLayout, read_layout
from otakit.image.package import MAGIC_OFFSET, Component, PackageManifest, is_package, read_manifest
from otakit.image.source import SliceSource, SourceLike, open_source
from otakit.image.tlv import HASH_TLVS, SEC_CNT_STRUCT, TlvType
from otakit.image.trailer import TrailerState, read_slot_trailer
from otakit.image.verify import check_hash

# TLV values longer than this are shown truncated in the human view.
_SHOWN_VALUE_BYTES = 32


@dataclass(frozen=True)
class ImageInfo:
    layout: ImageLayout
    hash_ok: bool | None  # None: the image has no hash TLV
    hash_problem: str | None
    trailer: TrailerState | None  # None when the image is not padded to a slot
    payload_encrypted: bool | None = None  # None: not marked encrypted; False: imgtool --clear

    @property
    def encryption(self) -> dict[str, Any] | None:
        """For an image marked encrypted: its flags, the key TLV and whether the payload is in
        clear (``imgtool sign -E KEY --clear``: the hash matches the bytes as they are)."""
        h = self.layout.header
        key_tlv = self.layout.encryption_tlv
        if not h.encrypted and key_tlv is None:
            return None
        if not h.encrypted:
            payload = "not encrypted"  # a key TLV without the flag: MCUboot ignores it
        elif self.payload_encrypted is None:
            payload = "unknown"  # no hash to tell
        else:
            payload = "encrypted" if self.payload_encrypted else "clear"
        return {
            "flags": [f for f in h.flag_names if f.startswith("ENCRYPTED")],
            "key_tlv": None if key_tlv is None else key_tlv.name,
            "payload": payload,
        }

    def to_dict(self) -> dict[str, Any]:
        h = self.layout.header
        return {
            "header": {
                "magic": "0x96f3b83d",
                "load_addr": h.load_addr,
                "hdr_size": h.hdr_size,
                "protect_tlv_size": h.protect_tlv_size,
                "img_size": h.img_size,
                "flags": h.flags,
                "flag_names": h.flag_names,
                "version": str(h.version),
            },
            "sizes": {
                "image": self.layout.end,
                "hashed": self.layout.hashed_size,
                "file": self.layout.source_size,
            },
            "security_counter": self.layout.security_counter,
            "dependencies": [
                {"image_id": d.image_id, "min_version": str(d.min_version)}
                for d in self.layout.dependencies
            ],
            "tlvs": [
                {
                    "type": t.kind,
                    "name": t.name,
                    "protected": t.protected,
                    "offset": t.offset,
                    "length": len(t.value),
                    "value": t.value.hex(),
                }
                for t in self.layout.all_tlvs()
            ],
            "hash_ok": self.hash_ok,
            "hash_problem": self.hash_problem,
            "encryption": self.encryption,
            "trailer": None
            if self.trailer is None
            else {
                "magic": self.trailer.magic,
                "max_align": self.trailer.max_align,
                "image_ok": self.trailer.image_ok,
                "copy_done": self.trailer.copy_done,
                "swap_info": self.trailer.swap_info,
                "request": self.trailer.request,
            },
        }

    def rows(self) -> list[tuple[str, str]]:
        """(field, value) pairs for a human table."""
        h = self.layout.header
        rows = [
            ("version", str(h.version)),
            ("header size", f"{h.hdr_size} (0x{h.hdr_size:x})"),
            ("payload size", f"{h.img_size} (0x{h.img_size:x})"),
            ("protected TLVs", f"{h.protect_tlv_size} bytes"),
            ("image size", f"{self.layout.end} bytes (file {self.layout.source_size})"),
            ("load address", f"0x{h.load_addr:08x}"),
            ("flags", ", ".join(h.flag_names) or "none"),
        ]
        if self.hash_ok is not None:
            rows.append(("hash", "ok" if self.hash_ok else f"MISMATCH: {self.hash_problem}"))
        encryption = self.encryption
        if encryption is not None:
            key = encryption["key_tlv"] or "no key TLV"
            flags = ", ".join(encryption["flags"]) or "no ENCRYPTED flag"
            shown = {
                "clear": "payload in clear (imgtool --clear), for the primary slot",
                "encrypted": "payload encrypted (otakit cannot decrypt it)",
            }.get(encryption["payload"], f"payload {encryption['payload']}")
            rows.append(("encryption", f"{flags}, {key}: {shown}"))
        for t in self.layout.all_tlvs():
            if t.kind == TlvType.SEC_CNT and len(t.value) == SEC_CNT_STRUCT.size:
                shown = str(SEC_CNT_STRUCT.unpack(t.value)[0])
            else:
                shown = t.value[:_SHOWN_VALUE_BYTES].hex()
                if len(t.value) > _SHOWN_VALUE_BYTES:
                    shown += f"... ({len(t.value)} bytes)"
            area = "protected " if t.protected else ""
            rows.append((f"{area}TLV {t.name}", shown))
        if self.trailer is not None:
            rows.append(
                (
                    "trailer",
                    f"magic {'set' if self.trailer.magic else 'unset'}"
                    f"{f' (max-align {self.trailer.max_align})' if self.trailer.magic else ''}, "
                    f"image_ok {'set' if self.trailer.image_ok else 'unset'}, "
                    f"request {self.trailer.request}",
                )
            )
        return rows


def inspect_image(source: SourceLike) -> ImageInfo:
    """Parse an image and check its hash (no signature check: see ``verify_image``).

    The trailer of a padded image is read with the ``max_align`` its magic names (8, 16 or 32).
    Raises an :class:`~otakit.errors.ImageFormatError` subclass when the image is malformed; a
    hash that does not match is reported in the result, not raised.
    """
    with open_source(source) as src:
        layout = read_layout(src)
        hash_ok: bool | None = None
        problem: str | None = None
        payload_encrypted: bool | None = None
        if any(t.kind in HASH_TLVS for t in layout.tlvs):
            try:
                check_hash(src, layout)
                hash_ok = True
                payload_encrypted = False if layout.header.encrypted else None
            except EncryptedImageError as exc:
                hash_ok, problem, payload_encrypted = False, exc.message, True
            except VerificationError as exc:
                hash_ok, problem = False, exc.message
        trailer = read_slot_trailer(src, image_end=layout.end)
        return ImageInfo(layout, hash_ok, problem, trailer, payload_encrypted)


@dataclass(frozen=True)
class ComponentInfo:
    component: Component
    image: ImageInfo | None
    problem: str | None  # why the member is not a readable image


@dataclass(frozen=True)
class PackageInfo:
    manifest: PackageManifest
    components: tuple[ComponentInfo, ...]

    def to_dict(self) -> dict[str, Any]:
        return {
            "package": {
                "version": self.manifest.version,
                "components": [
                    {
                        "name": c.component.name,
                        "file_type": c.component.file_type,
                        "image_index": c.component.image_index,
                        "size": c.component.size,
                        "offset": c.component.offset,
                        "image": None if c.image is None else c.image.to_dict(),
                        "problem": c.problem,
                    }
                    for c in self.components
                ],
            }
        }


def inspect(source: SourceLike) -> ImageInfo | PackageInfo:
    """Inspect an image, or a package and each image in it (detected by its ustar magic)."""
    with open_source(source) as src:
        if not is_package(src.read_at(0, MAGIC_OFFSET + 8)):
            return inspect_image(src)
        manifest = read_manifest(src)
        components = []
        for component in manifest.components:
            assert component.offset is not None  # read_manifest locates every member
            member = SliceSource(src, component.offset, component.size)
            try:
                components.append(ComponentInfo(component, inspect_image(member), None))
            except ImageFormatError as exc:
                components.append(ComponentInfo(component, None, exc.message))
        return PackageInfo(manifest, tuple(components))
