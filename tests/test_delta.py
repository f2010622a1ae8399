"""Delta patches (otakit.image.delta): made from two signed MCUboot images, applied streaming
from a device's primary slot into its secondary slot, verified and booted; wrong bases,
corrupt and truncated patches refused by name before anything is written; power cuts at
sampled points while applying, resumed by applying again from byte 0 of the patch."""

from __future__ import annotations

import hashlib
import random
import struct
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from typer.testing import CliRunner

from otakit.device.bootloader import Action, Bootloader, BootloaderConfig
from otakit.device.flash import Flash, PowerCut
from otakit.device.flashmap import preset
from otakit.device.journal import Download, Journal
from otakit.device.storage import SlotStorage
from otakit.errors import DELTA_REASONS, DeltaError, ImageFormatError, InputFileError, UsageError
from otakit.host.delta import app as delta_app
from otakit.image import delta
from otakit.image.delta import (
    COMPRESSIONS,
    DIGEST_OFFSET,
    HEADER,
    apply_delta,
    check_base,
    check_delta,
    create_delta,
    image_digest,
    read_delta_header,
)
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.layout import read_layout
from otakit.image.sign import SignOptions, sign_image
from otakit.image.source import BytesSource
from otakit.image.verify import verify_image

KEY = SigningKey.generate("ecdsa-p256")
LAYOUT = "sim-small"  # 20 KiB slots, swap-scratch, 4 KiB sectors
PAYLOAD_SIZE = 12_000


def firmware(change: int = 0) -> bytes:
    """A payload that looks like code: repeated instruction-like words, with ``change`` bytes
    of one function replaced (a small code change) and the rest shifted by an insertion."""
    rng = random.Random(7)
    words = [rng.randrange(1 << 16) for _ in range(64)]
    payload = bytearray(b"".join(struct.pack("<H", rng.choice(words)) for _ in range(6000)))
    if change:
        payload[4000 : 4000 + change] = random.Random(change).randbytes(change)
        payload[8000:8000] = b"\x00\xbf" * 8  # a few NOPs: everything after moves
        del payload[-16:]
    return bytes(payload[:PAYLOAD_SIZE])


def signed(version: str, payload: bytes, **options: object) -> bytes:
    return sign_image(
        payload,
        KEY,
        SignOptions(ImageVersion.parse(version), pad_header=True, **options),  # type: ignore[arg-type]
    )


V110 = ImageVersion.parse("1.1.0")
BASE = signed("1.0.0", firmware())
NEW = signed("1.1.0", firmware(change=64))


@dataclass
class Target:
    """A DeltaTarget in memory that records every write."""

    data: bytearray = field(default_factory=bytearray)
    writes: list[tuple[int, int]] = field(default_factory=list)

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, len(data)))
        end = offset + len(data)
        if len(self.data) < end:
            self.data += b"\xff" * (end - len(self.data))
        self.data[offset:end] = data


def reseal(patch: bytes | bytearray) -> bytes:
    """``patch`` with its digest computed again (a patch changed by someone who knew how)."""
    patch = bytes(patch)
    digest = hashlib.sha256(patch[:DIGEST_OFFSET] + patch[HEADER.size :]).digest()
    return patch[:DIGEST_OFFSET] + digest + patch[HEADER.size :]


def refused(patch: bytes, base: bytes = BASE) -> tuple[DeltaError, Target]:
    target = Target()
    with pytest.raises(DeltaError) as caught:
        apply_delta(base, patch, target)
    assert caught.value.reason in DELTA_REASONS
    return caught.value, target


# --- round trips ---------------------------------------------------------------------------------


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_a_signed_image_round_trips_with_every_compression(compression: str) -> None:
    patch = create_delta(BASE, NEW, compression=compression)
    header = check_delta(patch)
    assert (header.compression, header.new_size, header.base_size) == (
        compression,
        len(NEW),
        len(BASE),
    )
    assert header.new_sha256 == hashlib.sha256(NEW).digest()
    target = Target()
    assert apply_delta(BASE, patch, target) == header
    assert bytes(target.data) == NEW
    verify_image(bytes(target.data), [KEY.public_key])
    if compression != "none":
        assert len(patch) * 5 < len(NEW), (compression, len(patch), len(NEW))


def test_the_body_is_a_plain_detools_patch_and_lzma_names_a_small_dictionary() -> None:
    """detools' own apply (and so its C library on an MCU) takes the body as it is; otakit's
    lzma stream names a dictionary sized to the data, not the preset's 8 MiB."""
    import io

    import detools  # type: ignore[import-untyped]

    patch = create_delta(BASE, NEW, compression="lzma")
    body = patch[HEADER.size :]
    out = io.BytesIO()
    assert detools.apply_patch(io.BytesIO(BASE), io.BytesIO(body), out) == len(NEW)
    assert out.getvalue() == NEW
    size_bytes = next(i for i, byte in enumerate(body[1:]) if not byte & 0x80) + 1
    stream = body[1 + size_bytes :]  # .lzma: properties, dictionary size, uncompressed size
    dict_size = struct.unpack_from("<I", stream, 1)[0]
    assert 4096 <= dict_size <= 64 * 1024 < 8 << 20


def test_writes_are_whole_blocks_in_order_and_progress_ends_at_the_size() -> None:
    patch = create_delta(BASE, NEW)
    target, seen = Target(), []
    apply_delta(BASE, patch, target, progress=lambda done, total: seen.append((done, total)))
    offsets = [offset for offset, _ in target.writes]
    assert offsets == list(range(0, len(NEW), delta.BLOCK))
    assert all(size == delta.BLOCK for _, size in target.writes[:-1])
    assert seen[-1] == (len(NEW), len(NEW))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


class Reads(BytesSource):
    """A ByteSource that remembers the longest read it was asked for."""

    longest = 0

    def read_at(self, offset: int, length: int) -> bytes:
        self.longest = max(self.longest, length)
        return super().read_at(offset, length)


def test_memory_stays_bounded_reads_and_writes_are_small() -> None:
    patch = create_delta(BASE + bytes(200_000), NEW + bytes(200_000), whole_files=True)
    base, source = Reads(BASE + bytes(200_000)), Reads(patch)
    target = Target()
    apply_delta(base, source, target)
    assert base.longest <= 64 * 1024  # the hash pass's chunks; detools itself asks 4 KiB
    assert source.longest <= 64 * 1024
    assert max(size for _, size in target.writes) == delta.BLOCK


def test_padded_images_are_diffed_as_the_images_a_slot_holds(tmp_path: Path) -> None:
    fm = preset(LAYOUT)
    slot = fm.primary(0).size
    base = signed("1.0.0", firmware(), pad=True, slot_size=slot)
    new = signed("1.1.0", firmware(change=64), pad=True, slot_size=slot)
    assert len(base) == len(new) == slot
    (tmp_path / "base.bin").write_bytes(base)
    (tmp_path / "new.bin").write_bytes(new)
    patch = create_delta(tmp_path / "base.bin", tmp_path / "new.bin")
    header = read_delta_header(patch)
    proper = new[: read_layout(BytesSource(new)).end]
    assert image_digest(new) == delta.ImageDigest(header.new_size, header.new_sha256)
    assert image_digest(base).size == header.base_size < len(base)
    target = Target()
    apply_delta(base, patch, target)  # a padded base: only its image is read
    assert bytes(target.data) == proper


@pytest.mark.parametrize("seed", range(6))
def test_any_bytes_round_trip_as_whole_files(seed: int) -> None:
    rng = random.Random(seed)
    base = rng.randbytes(rng.choice([0, 1, 100, 5000, 20_000]))
    new = bytearray(base)
    for _ in range(rng.randrange(4)):
        at = rng.randrange(len(new) + 1)
        new[at:at] = rng.randbytes(rng.randrange(1, 300))
    if seed == 5:
        new = bytearray()
    patch = create_delta(
        base, bytes(new), compression=rng.choice(list(COMPRESSIONS)), whole_files=True
    )
    target = Target()
    apply_delta(base, patch, target)
    assert bytes(target.data) == new


def test_inputs_that_are_not_images_are_named() -> None:
    with pytest.raises(ImageFormatError, match=r"^base image: "):
        create_delta(b"not an image" * 10, NEW)
    with pytest.raises(ImageFormatError, match=r"^new image: "):
        create_delta(BASE, b"\x00" * 100)
    with pytest.raises(UsageError, match="compression 'gzip'"):
        create_delta(BASE, NEW, compression="gzip")


# --- refused before anything is written ----------------------------------------------------------


def test_a_patch_for_another_base_is_refused_before_writing() -> None:
    patch = create_delta(BASE, NEW)
    other = signed("1.0.0", firmware(change=3))
    error, target = refused(patch, base=other)
    assert error.reason == "WRONG_BASE"
    assert not target.writes
    error, target = refused(patch, base=BASE[:-1])
    assert error.reason == "WRONG_BASE"
    assert not target.writes
    # the same image signed again: same payload and hash TLV, another ECDSA signature
    again = signed("1.0.0", firmware())
    assert again != BASE
    error, target = refused(patch, base=again)
    assert error.reason == "WRONG_BASE"
    assert not target.writes


def test_a_slot_larger_than_the_base_image_is_a_good_base() -> None:
    patch = create_delta(BASE, NEW)
    check_base(read_delta_header(patch), BASE + b"\xff" * 5000)
    target = Target()
    apply_delta(BASE + b"\xff" * 5000, patch, target)
    assert bytes(target.data) == NEW


def test_corrupt_patches_are_refused_before_writing() -> None:
    patch = create_delta(BASE, NEW)
    for at in (HEADER.size + 3, len(patch) - 1, 20, 60, DIGEST_OFFSET + 1):
        bad = bytearray(patch)
        bad[at] ^= 0x10
        error, target = refused(bytes(bad))
        assert error.reason == "CORRUPT", at
        assert not target.writes
    error, _ = refused(patch + b"\x00")
    assert error.reason == "CORRUPT"
    assert "after its end" in error.message
    error, _ = refused(b"\x96\xf3\xb8\x3d" + patch[4:])
    assert error.reason == "NOT_A_DELTA"


@pytest.mark.parametrize("keep", [0, 3, 50, HEADER.size, HEADER.size + 1, -1])
def test_truncated_patches_are_refused_before_writing(keep: int) -> None:
    patch = create_delta(BASE, NEW)
    error, target = refused(patch[:keep])
    assert error.reason == ("NOT_A_DELTA" if 0 <= keep < 4 else "TRUNCATED")
    assert not target.writes


def test_patches_this_otakit_does_not_apply_are_unsupported() -> None:
    patch = bytearray(create_delta(BASE, NEW))
    newer = bytearray(patch)
    newer[4] = 2  # format version
    assert refused(reseal(newer))[0].reason == "UNSUPPORTED"
    for number in (2, 5):  # detools' crle; zstd, whose decoder keeps all it decoded
        other = bytearray(patch)
        other[HEADER.size] = (other[HEADER.size] & 0xF0) | number
        assert refused(reseal(other))[0].reason == "UNSUPPORTED"
    in_place = bytearray(patch)
    in_place[HEADER.size] |= 0x10  # detools' in-place patch type
    assert refused(reseal(in_place))[0].reason == "UNSUPPORTED"


def test_a_patch_with_a_detools_data_format_is_refused_before_decoding() -> None:
    """Its data-format part would be decompressed whole (the size comes from the patch) and
    the base read whole: refused from its first decoded bytes, nothing written."""
    plain = bytearray(create_delta(BASE, NEW, compression="none"))
    size_bytes = next(i for i, byte in enumerate(plain[HEADER.size + 1 :]) if not byte & 0x80)
    first = HEADER.size + 1 + size_bytes + 1  # the first decoded byte: the data-format size
    assert plain[first] == 0
    plain[first] = 0x3F  # 63 bytes of data format
    error, target = refused(reseal(plain))
    assert error.reason == "UNSUPPORTED"
    assert "data format" in error.message
    assert not target.writes
    squeezed = delta._lzma(bytes(plain[HEADER.size :]))  # the same, lzma-compressed
    packed = bytearray(plain[: HEADER.size] + squeezed)
    struct.pack_into("<I", packed, 16, len(squeezed))
    assert refused(reseal(packed))[0].reason == "UNSUPPORTED"


def test_a_resealed_patch_with_bad_contents_is_still_refused() -> None:
    """Past the digest (someone recomputed it): detools' own checks, then the result's hash."""
    lzma = bytearray(create_delta(BASE, NEW, compression="lzma"))
    lzma[HEADER.size + 40] ^= 0xFF
    error, _ = refused(reseal(lzma))
    assert error.reason in ("CORRUPT", "RESULT")
    plain = bytearray(create_delta(BASE, NEW, compression="none"))
    plain[-100] ^= 0x01  # a byte of extra data: decodes fine, into another image
    error, _ = refused(reseal(plain))
    assert error.reason == "RESULT"
    size = bytearray(create_delta(BASE, NEW))
    struct.pack_into("<I", size, 12, len(NEW) + 1)  # new size disagrees with detools' own
    assert refused(reseal(size))[0].reason == "CORRUPT"


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_damaged_patches_raise_only_delta_errors(compression: str) -> None:
    """Random bytes changed (and sometimes cut), the digest computed again so that detools sees
    them: whatever happens, a DeltaError or the right image, never another exception."""
    patch = create_delta(BASE, NEW, compression=compression)
    rng = random.Random(compression)
    for _ in range(100):
        bad = bytearray(patch)
        for _ in range(rng.randrange(1, 4)):
            bad[rng.randrange(HEADER.size, len(bad))] = rng.randrange(256)
        if rng.random() < 0.2:
            del bad[rng.randrange(HEADER.size + 1, len(bad)) :]
            struct.pack_into("<I", bad, 16, len(bad) - HEADER.size)
        target, reasons = Target(), []
        try:
            apply_delta(BASE, reseal(bad), target)
        except DeltaError as exc:
            reasons.append(exc.reason)
        assert set(reasons) <= set(DELTA_REASONS)
        assert reasons or bytes(target.data) == NEW


# --- on the device's flash -----------------------------------------------------------------------


@dataclass
class Device:
    """The sim-small flash map with BASE running, and a journal on disk."""

    boot: Bootloader
    flash: Flash
    journal: Path

    @classmethod
    def make(cls, tmp_path: Path) -> Device:
        fm = preset(LAYOUT)
        flash = Flash(fm.flash_size, fm.sector_size, write_align=fm.write_align)
        boot = Bootloader(flash, fm, BootloaderConfig(keys=(KEY.public_key,)))
        boot.primary().write(0, BASE + b"\xff" * (-len(BASE) % fm.write_align))
        tmp_path.mkdir(parents=True, exist_ok=True)
        return cls(boot, flash, tmp_path / "journal.json")

    def storage(self) -> SlotStorage:
        return SlotStorage(
            self.boot, Journal(self.journal), (KEY.public_key,), current_version="1.0.0"
        )

    def apply(self, patch: bytes, *, pend: bool = True) -> None:
        """One attempt as an agent makes it: open (resume point), apply, commit per block,
        verify, then (``pend``) the bootloader request."""
        header = read_delta_header(patch)
        storage = self.storage()
        download = Download(source="delta:" + header.digest.hex(), size=header.new_size)
        written = storage.open(download)
        apply_delta(
            self.boot.primary(),
            patch,
            storage,
            written=written,
            block=1024,  # more writes, more places for a power cut
            progress=lambda done, _total: storage.commit(done),
        )
        storage.commit(header.new_size)
        assert storage.verify() == "1.1.0"
        if pend:
            storage.set_pending(permanent=False)


def test_applied_from_the_primary_slot_into_the_secondary_the_new_image_boots(
    tmp_path: Path,
) -> None:
    device = Device.make(tmp_path)
    device.apply(create_delta(BASE, NEW))
    update = device.boot.update_area(0)
    verified = verify_image(update, [KEY.public_key], max_size=len(NEW) + 64)
    assert verified.version == V110
    result = device.boot.boot().images[0]
    assert (result.action, result.version) == (Action.UPGRADE_TEST, V110)
    assert image_digest(device.boot.primary()) == image_digest(NEW)


def _operations(tmp_path: Path, patch: bytes) -> int:
    device = Device.make(tmp_path / "count")
    start = device.flash.operations
    device.apply(patch, pend=False)
    return device.flash.operations - start


@pytest.mark.parametrize("tear", [False, True])
def test_power_cuts_while_applying_resume_to_the_same_image(tmp_path: Path, tear: bool) -> None:
    patch = create_delta(BASE, NEW, compression="heatshrink")
    total = _operations(tmp_path, patch)
    assert total > 15
    for cut in range(total):  # every flash operation of the apply: erases and blocks
        device = Device.make(tmp_path / f"cut{cut}")
        device.flash.cut_after(cut, tear=tear, seed=cut)
        with pytest.raises(PowerCut):
            device.apply(patch)
        device.flash.power_on()
        device.apply(patch)  # from byte 0 of the patch; the journal skips durable blocks
        assert image_digest(device.boot.update_area(0)) == image_digest(NEW), cut
        result = device.boot.boot().images[0]
        assert (result.action, result.version) == (Action.UPGRADE_TEST, V110), (cut, result)


def test_a_restart_from_scratch_writes_the_same_bytes(tmp_path: Path) -> None:
    patch = create_delta(BASE, NEW)
    first, second = Target(), Target()

    def cut(done: int, _total: int) -> None:
        if done >= 2 * delta.BLOCK:
            raise PowerCut("cut after two blocks")

    with pytest.raises(PowerCut):  # the target's error comes out as it was raised
        apply_delta(BASE, patch, first, progress=cut)
    assert len(first.data) == 2 * delta.BLOCK
    apply_delta(BASE, patch, first)  # again from zero over the same target
    apply_delta(BASE, patch, second, written=2 * delta.BLOCK)  # skipping what was durable
    assert bytes(first.data) == NEW
    assert second.writes[0][0] == 2 * delta.BLOCK
    assert bytes(second.data[2 * delta.BLOCK :]) == NEW[2 * delta.BLOCK :]


# --- otakit delta ... ----------------------------------------------------------------------------


def _files(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "base.bin").write_bytes(BASE)
    (tmp_path / "new.bin").write_bytes(NEW)
    return tmp_path / "base.bin", tmp_path / "new.bin"


def test_the_commands_create_show_and_apply(tmp_path: Path) -> None:
    base, new = _files(tmp_path)
    runner = CliRunner()
    made = runner.invoke(
        delta_app,
        ["create", str(base), str(new), "-o", str(tmp_path / "p"), "--compression", "heatshrink"],
    )
    assert made.exit_code == 0, made.output
    assert "heatshrink" in made.output
    assert hashlib.sha256(BASE).hexdigest() in made.output
    shown = runner.invoke(delta_app, ["show", str(tmp_path / "p")])
    assert shown.exit_code == 0, shown.output
    assert f"new:  {len(NEW)} bytes" in shown.output
    applied = runner.invoke(
        delta_app, ["apply", str(base), str(tmp_path / "p"), "-o", str(tmp_path / "out.bin")]
    )
    assert applied.exit_code == 0, applied.output
    assert (tmp_path / "out.bin").read_bytes() == NEW


def test_the_commands_refuse_by_name(tmp_path: Path) -> None:
    base, new = _files(tmp_path)
    runner = CliRunner()
    assert (
        runner.invoke(
            delta_app, ["create", str(base), str(new), "-o", str(tmp_path / "p")]
        ).exit_code
        == 0
    )
    wrong = runner.invoke(
        delta_app, ["apply", str(new), str(tmp_path / "p"), "-o", str(tmp_path / "out.bin")]
    )
    assert isinstance(wrong.exception, DeltaError)
    assert wrong.exception.reason == "WRONG_BASE"
    assert not (tmp_path / "out.bin").exists()
    raw = runner.invoke(
        delta_app, ["create", str(tmp_path / "nope"), str(new), "-o", str(tmp_path / "q")]
    )
    assert isinstance(raw.exception, InputFileError)
    bad = runner.invoke(
        delta_app,
        ["create", str(base), str(new), "-o", str(tmp_path / "q"), "--compression", "gzip"],
    )
    assert isinstance(bad.exception, UsageError)
    assert "compression 'gzip' must be one of lzma" in bad.exception.message


def test_the_registered_command_prints_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from otakit import cli

    if "delta" not in {group.name for group in cli.app.registered_groups}:
        pytest.skip("otakit delta is not registered in otakit.cli yet")
    base, new = _files(tmp_path)
    assert cli.main(["delta", "create", str(base), str(new), "-o", str(tmp_path / "p")]) == 0
    (tmp_path / "p").write_bytes((tmp_path / "p").read_bytes()[:-10])
    status = cli.main(["delta", "apply", str(base), str(tmp_path / "p"), "-o", str(tmp_path / "o")])
    assert status == 1
    lines = capsys.readouterr().err.splitlines()
    assert lines == [lines[-1]]
    assert lines[0].startswith("otakit: error [DELTA]: the delta is truncated")
