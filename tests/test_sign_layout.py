"""``otakit sign --layout`` / ``otakit verify --layout``: the image-size limit of the MCUboot build a
flash map describes, with MCUboot itself (the mcuboot-host harness) as the judge of what fits.

A hash-only image (``--unsigned``) has a fixed overhead (32-byte header, 4-byte TLV info, 36-byte
SHA-256 TLV), so the payload size picks the image size exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from otakit.device.flashmap import preset
from otakit.image.layout import read_layout
from otakit.image.source import BytesSource

from .conftest import Run
from .mcuboot_host import McubootHost

Otakit = Callable[..., Run]
OVERHEAD = 32 + 4 + 36  # header, TLV info, SHA-256 TLV

# one preset per MCUboot mode that keeps a trailer in the slots, and one that does not
LAYOUTS = ["sim-small", "nrf52840-swap-move", "sim-small-status"]


def _one_line_error(result: Run, *codes: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert any(lines[0].startswith(f"otakit: error [{code}]: ") for code in codes), result.stderr


def _sign(otakit: Otakit, tmp: Path, layout: str, size: int, *extra: str) -> tuple[Run, Path]:
    payload = tmp / f"payload-{size}.bin"
    payload.write_bytes(bytes((i * 13 + 5) & 0xFF for i in range(size - OVERHEAD)))
    out = tmp / f"image-{size}{'-pad' if extra else ''}.bin"
    result = otakit(
        "sign", "--unsigned", "--pad-header", "-v", "2.0.0", "--layout", layout, *extra,
        payload, out,
    )  # fmt: skip
    return result, out


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sign_and_verify_hold_images_to_the_layouts_limit(
    layout: str, otakit: Otakit, tmp_path: Path
) -> None:
    limit = preset(layout).max_image_size()
    fits, image = _sign(otakit, tmp_path, layout, limit)
    assert fits.returncode == 0, fits.stderr
    assert read_layout(BytesSource(image.read_bytes())).end == limit
    ok = otakit("verify", "--hash-only", "--layout", layout, image)
    assert ok.returncode == 0, ok.stderr

    too_large, out = _sign(otakit, tmp_path, layout, limit + 8)
    assert too_large.returncode != 0
    # imgtool's own slot check (SIGN) catches it first where it is as strict as MCUboot
    _one_line_error(too_large, "IMAGE_TOO_LARGE", "SIGN")
    assert f"accepts at most {limit}" in too_large.stderr or "exceeds slot size" in too_large.stderr
    assert not out.exists()  # nothing written for a refused image

    # an image built without the map (imgtool's defaults) is held to the map by verify
    payload = tmp_path / "big.bin"
    payload.write_bytes(bytes(limit + 8 - OVERHEAD))
    plain = tmp_path / "plain.bin"
    signed = otakit("sign", "--unsigned", "--pad-header", "-v", "2.0.0", payload, plain)
    assert signed.returncode == 0, signed.stderr
    refused = otakit("verify", "--hash-only", "--layout", layout, plain)
    assert refused.returncode != 0
    _one_line_error(refused, "IMAGE_TOO_LARGE")


@pytest.mark.parametrize("layout", ["sim-small", "nrf52840-swap-move"])
def test_a_padded_image_signed_for_a_layout_is_an_upgrade_request_mcuboot_takes(
    layout: str, otakit: Otakit, mcuboot_host: McubootHost, tmp_path: Path
) -> None:
    """``--pad`` with ``--layout`` puts the trailer where that MCUboot build reads it: the file
    written into the secondary slot as a programmer would is upgraded to at the next boot."""
    m = preset(layout)
    key = tmp_path / "key.pem"
    assert otakit("keygen", "-t", "ecdsa-p256", "-o", key).returncode == 0
    pub = otakit("getpub", "-k", key)
    (tmp_path / "pub.pem").write_text(pub.stdout)
    images = {}
    for version, extra in (("1.0.0", ()), ("2.0.0", ("--pad",))):
        payload = tmp_path / f"app-{version}.bin"
        payload.write_bytes(bytes((i * 7 + len(version)) & 0xFF for i in range(5000)))
        out = tmp_path / f"app-{version}.img"
        result = otakit(
            "sign", "-k", key, "--pad-header", "-v", version, "--layout", layout, *extra,
            payload, out,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        images[version] = out.read_bytes()
    padded = images["2.0.0"]
    assert len(padded) == m.secondary().size - m.image_offset()
    flash = bytearray([m.erased_value]) * m.flash_size
    flash[m.primary().offset : m.primary().offset + len(images["1.0.0"])] = images["1.0.0"]
    start = m.secondary().offset + m.image_offset()
    flash[start : start + len(padded)] = padded
    path = tmp_path / "flash.bin"
    path.write_bytes(flash)
    boot = mcuboot_host.run_map(m, path, key_pems=[tmp_path / "pub.pem"])
    assert boot.booted, boot.raw
    assert boot.version == "2.0.0+0"


def test_a_padded_image_for_a_flash_that_erases_to_zero(otakit: Otakit, tmp_path: Path) -> None:
    """``--layout`` of a 0x00-erased flash pads with 0x00 (imgtool -R 0); ``-R 0xff`` overrides."""
    payload = tmp_path / "app.bin"
    payload.write_bytes(b"\x5a" * 3000)
    for args, fill in (((), 0x00), (("-R", "0xff"), 0xFF)):
        out = tmp_path / f"app-{fill}.img"
        result = otakit(
            "sign", "--unsigned", "--pad-header", "-v", "1.0.0", "--layout", "sim-small-status",
            "--pad", *args, payload, out,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        data = out.read_bytes()
        end = read_layout(BytesSource(data)).end
        assert data[end : end + 256] == bytes([fill]) * 256
    bad = otakit("sign", "--unsigned", "-v", "1.0.0", "-R", "0x7f", payload, tmp_path / "x.img")
    assert bad.returncode != 0
    _one_line_error(bad, "SIGN")
