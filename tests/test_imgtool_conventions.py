"""imgtool's conventions that otakit follows (issue 14, points 10 to 12), with the real imgtool as
the peer and the real ``otakit`` command:

- Intel HEX: a ``.hex`` name means Intel HEX, in and out; the output starts at the input's lowest
  address (less the header with --pad-header) or at --hex-addr; gaps in the input read as 0xFF.
- Trailers: the magic and flags sit at multiples of ``max_align`` (8, 16 or 32) from the end of
  the slot, and the magic says which (MCUboot ``bootutil_misc.h``, imgtool ``pad_to``).
- ``imgtool sign -E KEY --clear``: flagged encrypted, key TLV present, payload in clear.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from imgtool import image as imgtool_image
from intelhex import IntelHex

from otakit.errors import BadMagicError, EncryptedImageError, HexFileError, SigningError
from otakit.image.header import ImageVersion
from otakit.image.hexfile import parse_hex
from otakit.image.info import inspect_image
from otakit.image.keys import PublicKey, SigningKey
from otakit.image.sign import SignOptions, hex_address, sign_image
from otakit.image.trailer import trailer_size
from otakit.image.verify import verify_image

from .conftest import Run

Tool = Callable[..., Run]

# The PSoC 6 layout of protocols.md §5: the application is linked after the 0x200-byte header.
PRIMARY = 0x10028000
SLOT = 0xE6000
HEADER = 0x200
PAYLOAD = os.urandom(5000)
GAP = range(1500, 1700)  # bytes the .hex input leaves out: they read as 0xFF


def _write_hex(path: Path, address: int, data: bytes, gap: range | None = None) -> None:
    hexfile = IntelHex()
    if gap is None:
        hexfile.frombytes(data, offset=address)
    else:
        hexfile.frombytes(data[: gap.start], offset=address)
        hexfile.frombytes(data[gap.stop :], offset=address + gap.stop)
    hexfile.tofile(str(path), "hex")


def _expected_payload() -> bytes:
    return PAYLOAD[: GAP.start] + b"\xff" * len(GAP) + PAYLOAD[GAP.stop :]


def _info(otakit: Tool, image: Path) -> dict[str, object]:
    result = otakit("info", "--json", image)
    assert result.returncode == 0, result.stderr
    details: dict[str, object] = json.loads(result.stdout)
    return details


def _one_line_error(result: Run, code: str, status: int) -> None:
    assert result.returncode == status, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"otakit: error [{code}]: "), result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def app_hex(tmp_path: Path) -> Path:
    path = tmp_path / "app.hex"
    _write_hex(path, PRIMARY + HEADER, PAYLOAD, GAP)
    return path


# --- 10. Intel HEX -----------------------------------------------------------------------------

SIGN = ["-v", "1.2.3+4", "-H", hex(HEADER), "--pad-header", "-S", hex(SLOT)]


@pytest.mark.parametrize("padded", [False, True], ids=["plain", "confirmed"])
def test_imgtool_hex_images_verify_and_show_with_otakit(
    tmp_path: Path, key_dir: Path, app_hex: Path, imgtool: Tool, otakit: Tool, padded: bool
) -> None:
    key = key_dir / "ecdsa-p256.pem"
    out = tmp_path / "signed.hex"
    extra = ["--confirm", "--align", "8"] if padded else []
    result = imgtool("sign", "-k", key, *SIGN, *extra, app_hex, out)
    assert result.returncode == 0, result.stderr

    verified = otakit("verify", "-k", key, out)
    assert verified.returncode == 0, verified.stderr
    assert "valid, version 1.2.3+4" in verified.stdout

    details = _info(otakit, out)
    header = details["header"]
    assert isinstance(header, dict)
    assert header["hdr_size"] == HEADER
    assert header["img_size"] == len(PAYLOAD)
    assert details["hash_ok"] is True
    trailer = details["trailer"]
    if padded:
        # imgtool writes only the magic and image_ok at the end of the slot: the .hex spans it
        assert isinstance(trailer, dict)
        assert trailer["magic"] is True
        assert trailer["request"] == "permanent"
    else:
        assert trailer is None
    # the payload is the .hex input's bytes, its gap erased (what imgtool signed)
    image = verify_image(out, [PublicKey.load(key)])
    start = image.layout.payload_offset
    hexfile = IntelHex(str(out))
    assert hexfile.minaddr() == PRIMARY
    assert hexfile.tobinstr()[start : start + len(PAYLOAD)] == _expected_payload()


CASES = {
    # name: (otakit/imgtool arguments, where the payload comes from)
    "hex-in-hex-out": ([], "hex"),
    "hex-addr-overrides-input": (["-x", "0x10100000"], "hex"),
    "confirmed-align-16": (["--confirm", "--align", "16"], "hex"),
    "padded-max-align-32": (["--pad", "--align", "4", "--max-align", "32"], "hex"),
    "bin-in-hex-out": (["--hex-addr", hex(PRIMARY)], "bin"),
    "hex-at-address-0": ([], "hex-at-0"),  # imgtool keeps 0: the header goes at 0
}


@pytest.mark.parametrize("case", list(CASES))
def test_otakit_writes_the_hex_imgtool_writes(
    tmp_path: Path, key_dir: Path, app_hex: Path, imgtool: Tool, otakit: Tool, case: str
) -> None:
    # Ed25519 signatures are deterministic, so both tools must write the very same file.
    key = key_dir / "ed25519.pem"
    extra, source = CASES[case]
    payload = app_hex
    if source == "bin":
        payload = tmp_path / "app.bin"
        payload.write_bytes(PAYLOAD)
    elif source == "hex-at-0":
        payload = tmp_path / "app0.hex"
        _write_hex(payload, 0, PAYLOAD)
    ours, theirs = tmp_path / "otakit.hex", tmp_path / "imgtool.hex"
    made = otakit("sign", "-k", key, *SIGN, *extra, payload, ours)
    assert made.returncode == 0, made.stderr
    reference = imgtool("sign", "-k", key, *SIGN, *extra, payload, theirs)
    assert reference.returncode == 0, reference.stderr

    assert ours.read_text() == theirs.read_text()
    checked = imgtool("verify", "-k", key, ours)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "Image was correctly validated" in checked.stdout


def test_hex_output_address_rule() -> None:
    padded = SignOptions(ImageVersion(1), header_size=HEADER, pad_header=True)
    plain = SignOptions(ImageVersion(1), header_size=HEADER)
    assert hex_address(PRIMARY + HEADER, padded) == PRIMARY
    assert hex_address(PRIMARY, plain) == PRIMARY
    assert hex_address(0, padded) == 0  # as imgtool: an input at 0 is not moved
    assert hex_address(PRIMARY + HEADER, padded, 0x2000) == 0x2000  # --hex-addr wins
    assert hex_address(None, padded) is None  # binary input, no --hex-addr
    with pytest.raises(SigningError):
        hex_address(HEADER // 2, padded)  # the header would start below 0


def test_hex_text_under_another_name_says_so(app_hex: Path) -> None:
    with pytest.raises(BadMagicError, match="looks like Intel HEX"):
        inspect_image(app_hex.read_bytes())


def test_a_hex_output_needs_an_address(tmp_path: Path, key_dir: Path, otakit: Tool) -> None:
    payload = tmp_path / "app.bin"
    payload.write_bytes(PAYLOAD)
    result = otakit("sign", "-k", key_dir / "ed25519.pem", *SIGN, payload, tmp_path / "o.hex")
    _one_line_error(result, "BAD_HEX", 2)
    assert "--hex-addr" in result.stderr
    assert not (tmp_path / "o.hex").exists()


@pytest.mark.parametrize(
    "text",
    [
        b":10000000zz\n",  # not hex digits
        b":0400000001020304F1\n:00000001FF\n",  # bad checksum
        b":0400000001020304F2\n:0400020001020304F0\n",  # two records overlap
        b"not a hex file at all\n",
        b":00000001FF\n",  # no data
        b"\x96\xf3\xb8\x3d binary\n",  # not text
    ],
    ids=["bad-digits", "bad-checksum", "overlap", "no-records", "no-data", "binary"],
)
def test_malformed_hex_is_a_hex_file_error(text: bytes) -> None:
    with pytest.raises(HexFileError) as caught:
        parse_hex(text, name="app.hex")
    assert caught.value.code == "BAD_HEX"
    assert caught.value.message.startswith("app.hex ")


def test_a_malformed_hex_file_is_a_named_one_line_error(
    tmp_path: Path, key_dir: Path, otakit: Tool
) -> None:
    bad = tmp_path / "bad.hex"
    bad.write_bytes(b":0400000001020304F1\n:00000001FF\n")  # bad checksum
    key = key_dir / "ed25519.pem"
    _one_line_error(otakit("sign", "-k", key, *SIGN, bad, tmp_path / "o.img"), "BAD_HEX", 2)
    _one_line_error(otakit("verify", "-k", key, bad), "BAD_HEX", 2)
    _one_line_error(otakit("info", bad), "BAD_HEX", 2)
    assert not (tmp_path / "o.img").exists()


# --- 11. Trailer alignment ----------------------------------------------------------------------

MAGIC_8 = "77c295f360d2ef7f3552500f2cb67980"
ALIGNS = [
    (align, max_align)
    for align in (1, 2, 4, 8, 16, 32)
    for max_align in (None, 8, 16, 32)
    if max_align is None or max_align >= align
]


def _effective(align: int, max_align: int | None) -> int:
    return max(8, align) if max_align is None else max_align


def _mcuboot_offsets(size: int, max_align: int) -> dict[str, int]:
    """``bootutil_misc.h``: where a bootloader built with BOOT_MAX_ALIGN reads each field."""
    magic = size - 16
    image_ok = (magic - max_align) // max_align * max_align  # ALIGN_DOWN
    copy_done = image_ok - max_align
    return {"image_ok": image_ok, "copy_done": copy_done, "swap_info": copy_done - max_align}


def _align_args(align: int, max_align: int | None) -> list[str]:
    return ["--align", str(align)] + ([] if max_align is None else ["--max-align", str(max_align)])


def _imgtool_slot(
    imgtool: Tool, key: Path, tmp_path: Path, align: int, max_align: int | None, size: int
) -> Path:
    """An image imgtool padded to a ``size``-byte slot (confirmed), then given the trailer a swap
    in progress leaves, written where MCUboot writes it: copy_done set, swap_info PERM."""
    payload = tmp_path / "app.bin"
    payload.write_bytes(PAYLOAD)
    image = tmp_path / "app.img"
    result = imgtool(
        "sign", "-k", key, "-v", "1.0.0", "-H", "32", "--pad-header", "-S", hex(size),
        "--confirm", *_align_args(align, max_align), payload, image,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = bytearray(image.read_bytes())
    at = _mcuboot_offsets(size, _effective(align, max_align))
    data[at["copy_done"]] = 0x01
    data[at["swap_info"]] = 0x03
    image.write_bytes(data)
    return image


@pytest.mark.parametrize(("align", "max_align"), ALIGNS)
def test_imgtool_trailers_read_as_mcuboot_and_imgtool_read_them(
    tmp_path: Path, key_dir: Path, imgtool: Tool, align: int, max_align: int | None
) -> None:
    image = _imgtool_slot(imgtool, key_dir / "ecdsa-p256.pem", tmp_path, align, max_align, 0x20000)
    trailer = inspect_image(image).trailer
    assert trailer is not None
    assert trailer.magic
    assert trailer.max_align == _effective(align, max_align)
    assert trailer.image_ok
    assert trailer.copy_done
    assert trailer.swap_info == 0x03
    assert trailer.request == "permanent"
    # imgtool's own reader agrees on every field
    dumped = imgtool("dumpinfo", "-f", "json", image)
    assert dumped.returncode == 0, dumped.stderr
    theirs = json.loads(dumped.stdout)["trailer"]
    assert (theirs["image_ok"], theirs["copy_done"], theirs["swap_info"]) == (1, 1, 3)
    assert (theirs["magic"] == MAGIC_8) == (trailer.max_align == 8)


# Through the command: each max_align, by default (from --align) and given.
CLI_ALIGNS = [(16, None), (32, None), (4, 16), (8, 32), (2, 8)]


@pytest.mark.parametrize(("align", "max_align"), CLI_ALIGNS)
def test_otakit_info_reads_imgtool_trailers(
    tmp_path: Path,
    key_dir: Path,
    imgtool: Tool,
    otakit: Tool,
    align: int,
    max_align: int | None,
) -> None:
    image = _imgtool_slot(imgtool, key_dir / "ecdsa-p256.pem", tmp_path, align, max_align, 0x20000)
    trailer = _info(otakit, image)["trailer"]
    assert trailer == {
        "magic": True,
        "max_align": _effective(align, max_align),
        "image_ok": True,
        "copy_done": True,
        "swap_info": 0x03,
        "request": "permanent",
    }


@pytest.mark.parametrize(("align", "max_align"), ALIGNS)
def test_otakit_padded_images_are_imgtools(
    tmp_path: Path, key_dir: Path, imgtool: Tool, align: int, max_align: int | None
) -> None:
    # Ed25519 signatures are deterministic: both tools must write the very same slot.
    key = key_dir / "ed25519.pem"
    payload = tmp_path / "app.bin"
    payload.write_bytes(PAYLOAD)
    theirs = tmp_path / "imgtool.img"
    result = imgtool(
        "sign", "-k", key, "-v", "1.0.0", "-H", "32", "--pad-header", "-S", "0x20000",
        "--confirm", *_align_args(align, max_align), payload, theirs,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    options = SignOptions(
        ImageVersion(1, 0, 0),
        pad_header=True,
        slot_size=0x20000,
        confirm=True,
        align=align,
        max_align=max_align,
    )
    ours = sign_image(PAYLOAD, SigningKey.load(key), options)
    assert ours == theirs.read_bytes()
    assert options.trailer_layout.max_align == _effective(align, max_align)


@pytest.mark.parametrize(
    "args",
    [["--pad", "--align", "16"], ["--confirm", "--align", "4", "--max-align", "32"]],
    ids=["pad-align-16", "confirm-max-align-32"],
)
def test_otakit_sign_pad_trailers_read_by_imgtool_and_otakit(
    tmp_path: Path, key_dir: Path, imgtool: Tool, otakit: Tool, args: list[str]
) -> None:
    key = key_dir / "ecdsa-p256.pem"
    payload = tmp_path / "app.bin"
    payload.write_bytes(PAYLOAD)
    image = tmp_path / "app.img"
    made = otakit(
        "sign", "-k", key, "-v", "1.0.0", "-H", "32", "--pad-header", "-S", "0x20000", *args,
        payload, image,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    checked = imgtool("verify", "-k", key, image)
    assert checked.returncode == 0, checked.stdout
    confirmed = "--confirm" in args
    dumped = json.loads(imgtool("dumpinfo", "-f", "json", image).stdout)["trailer"]
    assert dumped["magic"] != MAGIC_8
    assert dumped["image_ok"] == (1 if confirmed else 0xFF)
    trailer = _info(otakit, image)["trailer"]
    assert isinstance(trailer, dict)
    assert trailer["magic"] is True
    assert trailer["max_align"] == (16 if "16" in args else 32)
    assert trailer["request"] == ("permanent" if confirmed else "test")


@pytest.mark.parametrize(("align", "max_align"), ALIGNS)
@pytest.mark.parametrize("overwrite_only", [False, True])
def test_trailer_size_is_imgtools(align: int, max_align: int | None, overwrite_only: bool) -> None:
    img = imgtool_image.Image(align=align, max_align=max_align, overwrite_only=overwrite_only)
    expected = img._trailer_size(align, 128, overwrite_only, None, False, 0)
    assert trailer_size(align, 128, overwrite_only=overwrite_only, max_align=max_align) == expected
    if max_align is None:  # imgtool's default, also what a flash map's write_align gives
        assert trailer_size(align, 128, overwrite_only=overwrite_only) == expected


def test_max_align_smaller_than_align_is_refused(
    tmp_path: Path, key_dir: Path, otakit: Tool
) -> None:
    payload = tmp_path / "app.bin"
    payload.write_bytes(PAYLOAD)
    result = otakit(
        "sign", "-k", key_dir / "ed25519.pem", "-v", "1.0.0", "-H", "32", "--pad-header",
        "-S", "0x20000", "--pad", "--align", "32", "--max-align", "16", payload, tmp_path / "o",
    )  # fmt: skip
    _one_line_error(result, "SIGN", 2)


# --- 12. imgtool sign -E KEY --clear -------------------------------------------------------------


@pytest.fixture(scope="module")
def enc_keys(tmp_path_factory: pytest.TempPathFactory, imgtool: Tool, key_dir: Path) -> Path:
    """Encryption public keys of each kind imgtool wraps the AES key for."""
    d = tmp_path_factory.mktemp("enc")
    for kind, private in (
        ("ecdsa-p256", key_dir / "ecdsa-p256.pem"),
        ("rsa-2048", key_dir / "rsa-2048.pem"),
        ("x25519", d / "x25519.pem"),
    ):
        if kind == "x25519":
            assert imgtool("keygen", "-t", "x25519", "-k", private).returncode == 0
        result = imgtool("getpub", "-k", private, "-e", "pem")
        assert result.returncode == 0, result.stderr
        (d / f"{kind}.pub.pem").write_text(result.stdout)
    return d


ENCRYPTION = {
    # signing key, encryption key, key TLV, padded to the slot
    "ecdsa-p256": ("ecdsa-p256", "ecdsa-p256", "ENC_EC256", True),
    "rsa-2048": ("rsa-2048", "rsa-2048", "ENC_RSA2048", False),
    "ed25519-x25519": ("ed25519", "x25519", "ENC_X25519", False),
}


def _sign_encrypted(
    imgtool: Tool, key: Path, enc: Path, out: Path, payload: Path, *extra: str
) -> None:
    result = imgtool(
        "sign", "-k", key, "-E", enc, "-v", "2.0.0", "-H", "0x200", "--pad-header",
        "-S", "0x40000", *extra, payload, out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("kind", list(ENCRYPTION))
def test_clear_images_with_encryption_tlvs_verify(
    tmp_path: Path,
    key_dir: Path,
    enc_keys: Path,
    imgtool: Tool,
    otakit: Tool,
    kind: str,
) -> None:
    signer, enc, tlv, padded = ENCRYPTION[kind]
    key = key_dir / f"{signer}.pem"
    payload = tmp_path / "app.bin"
    payload.write_bytes(PAYLOAD)
    image = tmp_path / "clear.img"
    extra = ("--confirm",) if padded else ()
    _sign_encrypted(imgtool, key, enc_keys / f"{enc}.pub.pem", image, payload, "--clear", *extra)
    assert imgtool("verify", "-k", key, image).returncode == 0

    result = otakit("verify", "-k", key, image)
    assert result.returncode == 0, result.stderr
    assert "valid, version 2.0.0" in result.stdout
    assert f"marked encrypted ({tlv}) with the payload in clear" in result.stdout

    details = _info(otakit, image)
    header = details["header"]
    assert isinstance(header, dict)
    assert "ENCRYPTED_AES128" in header["flag_names"]  # imgtool keeps the flag with --clear
    assert details["hash_ok"] is True
    assert details["encryption"] == {
        "flags": ["ENCRYPTED_AES128"],
        "key_tlv": tlv,
        "payload": "clear",
    }
    if padded:
        trailer = details["trailer"]
        assert isinstance(trailer, dict)
        assert trailer["request"] == "permanent"
    assert "payload in clear" in dict(inspect_image(image).rows())["encryption"]

    # devices and the server do not take it: MCUboot would decrypt the secondary slot
    with pytest.raises(EncryptedImageError):
        verify_image(image, [PublicKey.load(key)])


def test_an_encrypted_payload_is_refused_by_name(
    tmp_path: Path, key_dir: Path, enc_keys: Path, imgtool: Tool, otakit: Tool
) -> None:
    key = key_dir / "ecdsa-p256.pem"
    payload = tmp_path / "app.bin"
    payload.write_bytes(PAYLOAD)
    image = tmp_path / "encrypted.img"
    _sign_encrypted(imgtool, key, enc_keys / "ecdsa-p256.pub.pem", image, payload)
    assert imgtool("verify", "-k", key, image).returncode != 0  # "Image has an invalid hash"

    _one_line_error(otakit("verify", "-k", key, image), "ENCRYPTED", 1)
    details = _info(otakit, image)
    assert details["hash_ok"] is False
    encryption = details["encryption"]
    assert isinstance(encryption, dict)
    assert encryption["payload"] == "encrypted"
