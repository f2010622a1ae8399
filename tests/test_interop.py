"""The acceptance test of the images issue: otakit and imgtool accept each other's images."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from otakit.errors import KeyMismatchError
from otakit.image.header import ImageVersion
from otakit.image.info import inspect_image
from otakit.image.keys import PublicKey, SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.image.verify import verify_image

from .conftest import Run

SIZES = [1, 4096, 100_003]
SLOT = 0x40000
VARIANTS = {
    "plain": [],
    "pad-confirm": ["--pad", "--confirm", "-S", hex(SLOT), "--align", "8"],
    "security-counter": ["-s", "42", "-d", "(1, 1.0.0)"],
}


def _payload(size: int) -> bytes:
    return os.urandom(size)


@pytest.mark.parametrize("kind", ["ecdsa-p256", "ed25519"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_imgtool_signed_images_verify_with_otakit(
    tmp_path: Path, key_dir: Path, imgtool: Callable[..., Run], kind: str, size: int, variant: str
) -> None:
    payload = tmp_path / "app.bin"
    payload.write_bytes(_payload(size))
    out = tmp_path / "app.img"
    args = ["sign", "-k", key_dir / f"{kind}.pem", "-v", "1.2.3+4", "-H", "0x200", "--pad-header"]
    if variant != "pad-confirm":
        args += ["-S", hex(SLOT)]
    result = imgtool(*args, *VARIANTS[variant], payload, out)
    assert result.returncode == 0, result.stderr

    key = PublicKey.load(key_dir / f"{kind}.pem")
    verified = verify_image(out, [key])
    assert verified.signed_by == key
    assert verified.version == ImageVersion(1, 2, 3, 4)
    assert verified.layout.header.img_size == size
    assert verified.layout.header.hdr_size == 0x200
    info = inspect_image(out)
    if variant == "pad-confirm":
        assert out.stat().st_size == SLOT
        assert info.trailer is not None
        assert info.trailer.request == "permanent"
    else:
        assert info.trailer is None
    if variant == "security-counter":
        assert verified.security_counter == 42
        assert [(d.image_id, str(d.min_version)) for d in verified.layout.dependencies] == [
            (1, "1.0.0+0")
        ]


@pytest.mark.parametrize("kind", ["ecdsa-p256", "ed25519"])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_otakit_signed_images_verify_with_imgtool(
    tmp_path: Path,
    signing_keys: dict[str, SigningKey],
    imgtool: Callable[..., Run],
    kind: str,
    size: int,
    variant: str,
) -> None:
    key = signing_keys[kind]
    key_file = tmp_path / "key.pem"
    key_file.write_bytes(key.to_pem())
    options = {
        "plain": SignOptions(ImageVersion(3, 1, 4, 15), pad_header=True),
        "pad-confirm": SignOptions(
            ImageVersion(3, 1, 4, 15), pad_header=True, slot_size=SLOT, align=8, confirm=True
        ),
        "security-counter": SignOptions(
            ImageVersion(3, 1, 4, 15), pad_header=True, security_counter="auto"
        ),
    }[variant]
    image = tmp_path / "app.img"
    image.write_bytes(sign_image(_payload(size), key, options))

    result = imgtool("verify", "-k", key_file, image)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Image was correctly validated" in result.stdout
    assert "Image version: 3.1.4+15" in result.stdout
    # and imgtool rejects it under another key, so the check above means something
    other = tmp_path / "other.pem"
    other.write_bytes(SigningKey.generate(kind).to_pem())
    assert imgtool("verify", "-k", other, image).returncode != 0


@pytest.mark.parametrize("kind", ["rsa-2048", "rsa-3072", "ecdsa-p384", "ecdsa-p256", "ed25519"])
def test_otakit_verifies_every_imgtool_key_type(
    tmp_path: Path, key_dir: Path, imgtool: Callable[..., Run], kind: str, other_key: PublicKey
) -> None:
    payload = tmp_path / "app.bin"
    payload.write_bytes(_payload(12345))
    out = tmp_path / "app.img"
    result = imgtool(
        "sign", "-k", key_dir / f"{kind}.pem", "-v", "0.9.0", "-H", "32", "--pad-header",
        "-S", hex(SLOT), "-s", "auto", payload, out,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    key = PublicKey.load(key_dir / f"{kind}.pem")
    verified = verify_image(out, [other_key, key])
    assert verified.signed_by == key
    assert verified.hash_name == ("sha384" if kind == "ecdsa-p384" else "sha256")
    with pytest.raises(KeyMismatchError):
        verify_image(out, [other_key])


def test_pure_ed25519_and_full_public_key_images(
    tmp_path: Path, key_dir: Path, imgtool: Callable[..., Run]
) -> None:
    payload = tmp_path / "app.bin"
    payload.write_bytes(_payload(5000))
    pure = tmp_path / "pure.img"
    full = tmp_path / "full.img"
    common = ["-v", "1.0.0", "-H", "32", "--pad-header", "-S", hex(SLOT)]
    assert (
        imgtool("sign", "-k", key_dir / "ed25519.pem", "--pure", *common, payload, pure).returncode
        == 0
    )
    assert (
        imgtool(
            "sign", "-k", key_dir / "ecdsa-p256.pem", "--public-key-format", "full",
            "--pad-sig", *common, payload, full,
        ).returncode
        == 0
    )  # fmt: skip
    ed = PublicKey.load(key_dir / "ed25519.pem")
    ec = PublicKey.load(key_dir / "ecdsa-p256.pem")
    assert verify_image(pure, [ed]).signed_by == ed
    assert verify_image(full, [ed, ec]).signed_by == ec


def test_public_key_exports_match_imgtool(
    key_dir: Path, imgtool: Callable[..., Run], tmp_path: Path
) -> None:
    for kind in ("ecdsa-p256", "ed25519", "rsa-2048", "ecdsa-p384"):
        key = PublicKey.load(key_dir / f"{kind}.pem")
        c = imgtool("getpub", "-k", key_dir / f"{kind}.pem", "-l", "c")
        assert c.returncode == 0
        # identical except for the "generated by" comment on the first line
        assert c.stdout.splitlines()[1:] == key.c_array().splitlines()[1:]
        pem = imgtool("getpub", "-k", key_dir / f"{kind}.pem", "-e", "pem")
        assert pem.stdout.encode() == key.pem()
