"""Image parsing and verification: every malformed or tampered image gets its named error."""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tracemalloc
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from otakit.errors import (
    BadMagicError,
    HashMismatchError,
    ImageFormatError,
    ImageTooLargeError,
    KeyMismatchError,
    SignatureError,
    SigningError,
    TlvError,
    TruncatedImageError,
    UnsignedImageError,
    VerificationError,
    VersionFormatError,
)
from otakit.image.header import HEADER_SIZE, ImageHeader, ImageVersion
from otakit.image.info import inspect_image
from otakit.image.keys import PublicKey, SigningKey
from otakit.image.layout import read_layout
from otakit.image.sign import SignOptions, sign_image
from otakit.image.source import BytesSource
from otakit.image.tlv import TlvType, pack_tlv_area
from otakit.image.trailer import BOOT_MAGIC, TrailerState
from otakit.image.verify import verify_image

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

V1 = ImageVersion(1, 0, 0)


def build(
    payload: bytes = b"\x5a" * 100,
    *,
    protected: list[tuple[int, bytes]] | None = None,
    tlvs: list[tuple[int, bytes]] | None = None,
    hdr_size: int = HEADER_SIZE,
    version: ImageVersion = V1,
) -> bytes:
    """Hand-build an image with a correct SHA-256 unless ``tlvs`` is given."""
    prot = pack_tlv_area(protected, protected=True) if protected else b""
    header = ImageHeader(0, hdr_size, len(prot), len(payload), 0, version).pack()
    body = header + bytes(max(hdr_size - HEADER_SIZE, 0)) + payload + prot
    if tlvs is None:
        tlvs = [(TlvType.SHA256, hashlib.sha256(body).digest())]
    return body + pack_tlv_area(tlvs, protected=False)


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate("ecdsa-p256")


@pytest.fixture(scope="module")
def signed(key: SigningKey) -> bytes:
    return sign_image(os.urandom(3000), key, SignOptions(V1, pad_header=True, security_counter=5))


# --- versions and headers ---------------------------------------------------------------------


def test_version_parse_order_and_limits() -> None:
    assert ImageVersion.parse("1.2.3+4") == ImageVersion(1, 2, 3, 4)
    assert ImageVersion.parse("2") == ImageVersion(2, 0, 0, 0)
    assert ImageVersion.parse("1.2.3+1") > ImageVersion.parse("1.2.3")
    assert ImageVersion.parse("1.10.0") > ImageVersion.parse("1.9.99")
    assert str(ImageVersion(1, 2, 3, 4)) == "1.2.3+4"
    assert ImageVersion(1, 2, 3, 4).short == "1.2.3"
    for bad in ("", "1.", "a.b.c", "1.2.3.4", "01.2", "256.0.0", "1.0.65536", "-1"):
        with pytest.raises(VersionFormatError):
            ImageVersion.parse(bad)


def test_header_round_trip() -> None:
    h = ImageHeader(0x1000, 0x200, 8, 1234, 0x10, ImageVersion(1, 2, 3, 4))
    assert ImageHeader.unpack(h.pack()) == h
    assert h.flag_names == ["NON_BOOTABLE"]


# --- malformed images -------------------------------------------------------------------------


def test_well_formed_hand_built_image_verifies_for_integrity() -> None:
    image = build(protected=[(TlvType.SEC_CNT, struct.pack("<I", 9))])
    result = verify_image(image)
    assert result.signed_by is None
    assert result.security_counter == 9


@pytest.mark.parametrize(
    ("image", "error"),
    [
        (b"", TruncatedImageError),
        (b"\x3d\xb8\xf3", TruncatedImageError),
        (b"\x00" * 64, BadMagicError),
        (build()[:40], TruncatedImageError),  # payload cut short
        (build()[:-1], TruncatedImageError),  # TLV area cut short
        (build()[: 32 + 100 + 2], TruncatedImageError),  # inside the TLV info header
        (build(hdr_size=16), ImageFormatError),  # header smaller than itself
        (build()[:132] + b"\x07\x70" + build()[134:], BadMagicError),  # bad TLV info magic
    ],
)
def test_malformed_images_raise_named_errors(image: bytes, error: type[Exception]) -> None:
    with pytest.raises(error):
        verify_image(image)
    with pytest.raises(error):
        inspect_image(image)


def test_tlv_entry_overflowing_its_area() -> None:
    good = build()
    tlv_off = HEADER_SIZE + 100
    # entry length says 40 bytes but the area holds 32
    bad = bytearray(good)
    struct.pack_into("<H", bad, tlv_off + 4 + 2, 40)
    with pytest.raises(TlvError, match="overflows"):
        verify_image(bytes(bad))


def test_tlv_area_total_overlapping_the_next_area() -> None:
    # protected area's own total disagrees with the header: the areas would overlap
    image = bytearray(build(protected=[(TlvType.SEC_CNT, b"\x01\x00\x00\x00")]))
    struct.pack_into("<H", image, HEADER_SIZE + 100 + 2, 16)  # protected total 12 -> 16
    with pytest.raises(TlvError):
        verify_image(bytes(image))


def test_tlv_area_with_trailing_partial_entry() -> None:
    image = build(tlvs=[(TlvType.SHA256, b"\x00" * 32)])
    bad = bytearray(image + b"\x00\x00")
    struct.pack_into("<H", bad, HEADER_SIZE + 100 + 2, 4 + 36 + 2)
    with pytest.raises(TlvError):
        verify_image(bytes(bad))


def test_duplicate_and_misplaced_tlvs() -> None:
    body_hash = (TlvType.SHA256, b"\x00" * 32)
    with pytest.raises(TlvError, match="more than once"):
        verify_image(build(tlvs=[body_hash, body_hash]))
    with pytest.raises(TlvError, match="protected area"):
        verify_image(build(tlvs=[body_hash, (TlvType.SEC_CNT, b"\x01\x00\x00\x00")]))


def test_image_without_hash_is_rejected() -> None:
    with pytest.raises(VerificationError, match="no SHA"):
        verify_image(build(tlvs=[(TlvType.KEYHASH, b"\x00" * 32)]))


def test_bad_security_counter_length() -> None:
    image = build(protected=[(TlvType.SEC_CNT, b"\x01\x02")])
    with pytest.raises(TlvError):
        verify_image(image).layout.security_counter  # noqa: B018


def test_size_limit(signed: bytes) -> None:
    end = read_layout(BytesSource(signed)).end
    assert verify_image(signed, max_size=end).layout.end == end
    with pytest.raises(ImageTooLargeError):
        verify_image(signed, max_size=end - 1)
    with pytest.raises(ImageTooLargeError):
        verify_image(signed, max_size=100)


# --- tampering and keys -----------------------------------------------------------------------


def test_signed_image_verifies(signed: bytes, key: SigningKey, other_key: PublicKey) -> None:
    result = verify_image(signed, [other_key, key.public_key])
    assert result.signed_by == key.public_key
    assert result.digest == hashlib.sha256(signed[: result.layout.hashed_size]).digest()


@pytest.mark.parametrize("where", ["header", "payload", "protected-tlv"])
def test_tampering_is_a_hash_mismatch(signed: bytes, key: SigningKey, where: str) -> None:
    layout = read_layout(BytesSource(signed))
    offset = {
        "header": 20,  # the version
        "payload": layout.payload_offset + 1000,
        "protected-tlv": layout.tlv_offset + 8,  # the security counter value
    }[where]
    bad = bytearray(signed)
    bad[offset] ^= 0x01
    with pytest.raises(HashMismatchError):
        verify_image(bytes(bad), [key.public_key])


def test_tampered_signature(signed: bytes, key: SigningKey) -> None:
    layout = read_layout(BytesSource(signed))
    sig = layout.find(TlvType.ECDSA_SIG)
    assert sig is not None
    bad = bytearray(signed)
    bad[sig.offset + len(sig.value) - 3] ^= 0x40
    with pytest.raises(SignatureError):
        verify_image(bytes(bad), [key.public_key])


def test_wrong_key_and_unsigned(signed: bytes, other_key: PublicKey) -> None:
    with pytest.raises(KeyMismatchError, match="not trusted"):
        verify_image(signed, [other_key])
    with pytest.raises(KeyMismatchError):
        verify_image(signed, [])
    unsigned = sign_image(b"\x00" * 32 + b"abc", None, SignOptions(V1))
    assert verify_image(unsigned).signed_by is None
    with pytest.raises(UnsignedImageError):
        verify_image(unsigned, [other_key])


def test_keyhash_swapped_for_trusted_key_does_not_help(
    signed: bytes, key: SigningKey, other_key: PublicKey
) -> None:
    """An attacker re-labels an image with a trusted key's hash: the signature must fail."""
    attacker = SigningKey.generate("ecdsa-p256")
    forged = bytearray(sign_image(os.urandom(100), attacker, SignOptions(V1, pad_header=True)))
    layout = read_layout(BytesSource(bytes(forged)))
    keyhash = layout.find(TlvType.KEYHASH)
    assert keyhash is not None
    forged[keyhash.offset : keyhash.offset + 32] = key.public_key.key_hash()
    with pytest.raises(SignatureError):
        verify_image(bytes(forged), [key.public_key])


# --- sources and memory -----------------------------------------------------------------------


def test_verify_from_path_file_and_stream_agree(
    tmp_path: Path, signed: bytes, key: SigningKey
) -> None:
    path = tmp_path / "app.img"
    path.write_bytes(signed)
    keys = [key.public_key]
    from_bytes = verify_image(signed, keys)
    from_path = verify_image(path, keys)
    with path.open("rb") as f:
        from_file = verify_image(f, keys)
    from_buffer = verify_image(io.BytesIO(signed), keys)
    from_pipe = verify_image(io.BufferedReader(_Pipe(signed)), keys)
    assert (
        from_bytes.digest
        == from_path.digest
        == from_file.digest
        == from_buffer.digest
        == from_pipe.digest
    )


class _Pipe(io.RawIOBase):
    """A stream that can only be read forward, like a pipe or a download."""

    def __init__(self, data: bytes) -> None:
        self._data = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def readinto(self, buffer: WriteableBuffer) -> int:
        view = memoryview(buffer).cast("B")
        chunk = self._data.read(min(len(view), 1000))
        view[: len(chunk)] = chunk
        return len(chunk)


def test_verification_runs_in_bounded_memory(tmp_path: Path, key: SigningKey) -> None:
    size = 24 * 1024 * 1024
    path = tmp_path / "big.img"
    path.write_bytes(sign_image(os.urandom(size), key, SignOptions(V1, pad_header=True)))
    tracemalloc.start()
    try:
        verify_image(path, [key.public_key])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1024 * 1024, f"verification of a {size}-byte image peaked at {peak} bytes"


# --- signing options --------------------------------------------------------------------------


def test_sign_checks_header_room_and_slot(key: SigningKey) -> None:
    with pytest.raises(SigningError, match="pad-header"):
        sign_image(b"\x01" * 100, key, SignOptions(V1))
    with pytest.raises(SigningError, match="slot"):
        sign_image(b"\x00" * 100, key, SignOptions(V1, pad_header=True, slot_size=256, pad=True))
    with pytest.raises(SigningError, match="slot size"):
        SignOptions(V1, confirm=True)
    with pytest.raises(SigningError):
        SignOptions(V1, align=3)
    with pytest.raises(SigningError):
        SignOptions(V1, header_size=16)
    with pytest.raises(SigningError):
        SignOptions(V1, security_counter=2**32)


def test_header_from_zeroed_payload_and_custom_header_size(key: SigningKey) -> None:
    payload = bytes(0x400) + b"firmware"
    image = sign_image(payload, key, SignOptions(V1, header_size=0x400))
    layout = verify_image(image, [key.public_key]).layout
    assert layout.header.hdr_size == 0x400
    assert layout.header.img_size == len(b"firmware")
    assert image[0x400 : 0x400 + 8] == b"firmware"


def test_padded_images_carry_a_trailer(key: SigningKey) -> None:
    slot = 0x8000
    test = sign_image(b"x" * 100, key, SignOptions(V1, pad_header=True, slot_size=slot, pad=True))
    perm = sign_image(
        b"x" * 100, key, SignOptions(V1, pad_header=True, slot_size=slot, confirm=True)
    )
    assert len(test) == len(perm) == slot
    assert test.endswith(BOOT_MAGIC)
    assert TrailerState.read(test[-48:]).request == "test"
    assert TrailerState.read(perm[-48:]).request == "permanent"
    assert TrailerState.read(b"\xff" * 48).request == "none"
    info = inspect_image(perm)
    assert info.trailer is not None
    assert info.trailer.image_ok
    assert info.to_dict()["trailer"]["request"] == "permanent"


def test_inspect_reports_hash_mismatch_without_raising(signed: bytes) -> None:
    bad = bytearray(signed)
    bad[100] ^= 0xFF
    info = inspect_image(bytes(bad))
    assert info.hash_ok is False
    assert info.to_dict()["hash_ok"] is False
    assert inspect_image(signed).hash_ok is True
    names = [t["name"] for t in inspect_image(signed).to_dict()["tlvs"]]
    assert names == ["SEC_CNT", "SHA256", "KEYHASH", "ECDSA_SIG"]
