"""otakit's bootloader against MCUboot's own code, for every swap mode (issue 15).

The judge is MCUboot's ``boot_go()`` built by the host harness (``tests/mcuboot_host.py``).
For each strategy, on a small layout of its own and on every single-image preset that uses it:

- one boot from the same flash, by otakit and by MCUboot: same flash bytes afterwards, same
  number of flash operations, same image runs (fresh device, TEST and PERM requests set by
  otakit, a revert and a confirmed image on the flash MCUboot left, tampered and wrongly signed
  candidates, Ed25519 keys, images at and just past the size limit);
- boot sequences mixing both (every assignment of otakit/MCUboot to three boots, with and
  without otakit confirming in between): the same images run as with MCUboot alone;
- power cuts across both: otakit cut after every flash operation of an upgrade and of a revert
  (clean and torn-half), then MCUboot boots; MCUboot cut the same way, then otakit boots. At
  each cut point: the flash otakit leaves equals the flash MCUboot leaves at the same point,
  the next boot does what MCUboot does after its own cut (same image, same flash), a valid
  image runs, no image is lost, and without a confirm the test image is gone after one more
  boot. Small layouts try every cut point, large ones a stride; the counts are reported.

Multi-image presets are left out: the harness builds MCUboot for one image.
"""

from __future__ import annotations

import functools
import os
import random
import tempfile
import threading
import traceback
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import product
from pathlib import Path

import pytest

from otakit.device.bootloader import Bootloader, BootloaderConfig, BootResult
from otakit.device.flash import PowerCut
from otakit.device.flashmap import PRESETS, FlashMap
from otakit.errors import OtakitError
from otakit.image.header import ImageVersion
from otakit.image.keys import PublicKey, SigningKey
from otakit.image.sign import SignOptions, sign_image
from otakit.image.source import BytesSource
from otakit.image.verify import verify_image

from .mcuboot_host import (
    McubootHost,
    flash_bytes,
    flash_from_bytes,
    map_args,
    mask_unset_bytes,
    small_layout_dict,
)

STRATEGIES = ("overwrite", "swap-scratch", "swap-move", "swap-offset", "swap-status")
SWAPPING = frozenset(STRATEGIES) - {"overwrite"}
KEYS = {"ecdsa-p256": SigningKey.generate("ecdsa-p256"), "ed25519": SigningKey.generate("ed25519")}
OTHER_KEY = SigningKey.generate("ecdsa-p256")
V1, V2 = "1.0.0+1", "1.1.0+2"
SAMPLES = 16  # cut points per tear mode on a large layout (a stride over the operations)
WORKERS = 4  # harness runs are subprocesses: a few in flight keep both cores busy

# --- layouts -------------------------------------------------------------------------------------


def _strategy_of(fm: FlashMap) -> str:
    default = "swap-scratch" if fm.scratch is not None else "overwrite"
    return str(getattr(fm, "strategy", default))


def _layout_ids() -> list[str]:
    """``strategy/small``, ``strategy/small-00`` (NOR erased to 0x00) and ``strategy/PRESET``."""
    ids = []
    for strategy in STRATEGIES:
        ids.append(f"{strategy}/small")
        if strategy != "swap-status":
            ids.append(f"{strategy}/small-00")
        for name, fm in PRESETS.items():
            if len(fm.images) == 1 and _strategy_of(fm) == strategy:
                ids.append(f"{strategy}/{name}")
    return ids


LAYOUT_IDS = _layout_ids()
CUT_LAYOUT_IDS = [lid for lid in LAYOUT_IDS if not lid.endswith("/small-00")]


@dataclass(frozen=True)
class Layout:
    id: str
    strategy: str
    fm: FlashMap
    large: bool  # cut points sampled with a stride

    @property
    def swapping(self) -> bool:
        return self.strategy in SWAPPING

    @property
    def erased(self) -> int:
        return int(getattr(self.fm, "erased_value", 0xFF))


@functools.cache
def layout(lid: str) -> Layout:
    strategy, name = lid.split("/")
    if name == "small":
        fm = FlashMap.from_dict(small_layout_dict(strategy))
    elif name == "small-00":
        fm = FlashMap.from_dict(small_layout_dict(strategy, erased=0x00))
    else:
        fm = PRESETS[name]
    assert _strategy_of(fm) == strategy
    sectors = fm.primary(0).size // fm.sector_size
    return Layout(lid, strategy, fm, large=sectors > 64)


# --- images --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Images:
    key: SigningKey
    v1: bytes
    v2: bytes
    tampered: bytes  # v2 with one payload byte changed
    wrong_key: bytes  # v2's payload signed by a key the bootloader does not trust

    @property
    def public(self) -> PublicKey:
        return self.key.public_key


def _sign_options(lay: Layout, version: str) -> SignOptions:
    align = lay.fm.write_align if lay.fm.write_align <= 32 else 8
    return SignOptions(
        ImageVersion.parse(version),
        pad_header=True,
        align=align,
        max_sectors=lay.fm.max_sectors,
        overwrite_only=lay.strategy == "overwrite",
    )


def _sign(lay: Layout, version: str, size: int, key: SigningKey, *, seed: str = "") -> bytes:
    payload = random.Random(f"{version}/{size}/{seed}").randbytes(size)
    return sign_image(payload, key, _sign_options(lay, version))


def sized_image(lay: Layout, version: str, total: int, key: SigningKey) -> bytes:
    """An image (header, payload and TLVs) of exactly ``total`` bytes."""
    overhead = len(_sign(lay, version, 64, key)) - 64
    for attempt in range(40):  # an ECDSA signature's DER length varies by a byte or two
        image = _sign(lay, version, total - overhead, key, seed=str(attempt))
        if len(image) == total:
            return image
        overhead += len(image) - total
    raise AssertionError(f"could not sign an image of exactly {total} bytes")


@functools.cache
def images(lid: str, key_type: str = "ecdsa-p256") -> Images:
    lay = layout(lid)
    key = KEYS[key_type]
    limit = lay.fm.max_image_size(0)
    unit = lay.fm.sector_size
    # a few sectors each, v2 larger than v1 and ending in a partly used sector
    v1_size = min(limit // 2, int(unit * (2.3 if lay.large or unit < 0x1000 else 1.6)))
    v2_size = min(limit * 3 // 4, int(unit * (3.6 if lay.large or unit < 0x1000 else 2.7)))
    if lay.large:  # enough sectors to matter, few enough to cut through in seconds
        v1_size, v2_size = min(limit // 2, 20 * 1024), min(limit * 3 // 4, 36 * 1024)
    v2 = _sign(lay, V2, v2_size, key)
    tampered = bytearray(v2)
    tampered[len(v2) // 2] ^= 0x01  # inside the payload: the hash no longer matches
    wrong = _sign(
        lay, V2, v2_size, OTHER_KEY if key_type == "ecdsa-p256" else SigningKey.generate(key_type)
    )
    return Images(key, _sign(lay, V1, v1_size, key), v2, bytes(tampered), wrong)


def _padded(data: bytes, lay: Layout) -> bytes:
    return data + bytes([lay.erased]) * (-len(data) % lay.fm.write_align)


# --- one boot by either side ---------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    version: str | None  # what runs ("1.1.0+2"); None when nothing runs or the power was cut
    ops: int  # flash operations done
    cut: bool
    flash: bytes
    detail: str = ""


def otakit_bootloader(lay: Layout, flash_data: bytes, keys: tuple[PublicKey, ...]) -> Bootloader:
    return Bootloader(flash_from_bytes(flash_data, lay.fm), lay.fm, BootloaderConfig(keys=keys))


def otakit_boot(
    lay: Layout,
    data: bytes,
    keys: tuple[PublicKey, ...],
    *,
    cut: int | None = None,
    torn: bool = False,
) -> Outcome:
    boot = otakit_bootloader(lay, data, keys)
    flash = boot.flash
    if cut is not None:
        flash.cut_after(cut, tear=torn, tear_half=torn)
    try:
        result: BootResult = boot.boot()
    except PowerCut:
        flash.power_on()
        return Outcome(None, flash.operations, True, flash_bytes(flash))
    image = result.images[0]
    version = None if image.version is None else str(image.version)
    detail = f"action {image.action.value}, reason {image.reason!r}"
    return Outcome(version, flash.operations, False, flash_bytes(flash), detail)


class Cross:
    """Runs MCUboot (the harness) and otakit over flash contents held as bytes."""

    def __init__(self, host: McubootHost, workdir: Path) -> None:
        self.host = host
        self.workdir = workdir

    def mcuboot(
        self,
        lay: Layout,
        data: bytes,
        imgs: Images,
        *,
        cut: int | None = None,
        torn: bool = False,
    ) -> Outcome:
        fd, name = tempfile.mkstemp(dir=self.workdir, suffix=".bin")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            result = self.host.run_map(
                lay.fm,
                name,
                key_pems=[imgs.public.pem()],
                cut_after=cut,
                torn=torn,
                ed25519=imgs.key.type.value == "ed25519",
            )
            after = Path(name).read_bytes()
        finally:
            os.unlink(name)
        if result.booted:
            assert result.slot == "primary", result.raw  # none of these modes runs elsewhere
        return Outcome(result.version if result.booted else None, result.ops, result.cut, after)

    def otakit(
        self, lay: Layout, data: bytes, imgs: Images, *, cut: int | None = None, torn: bool = False
    ) -> Outcome:
        return otakit_boot(lay, data, (imgs.public,), cut=cut, torn=torn)

    def boot(self, who: str, lay: Layout, data: bytes, imgs: Images) -> Outcome:
        return (self.mcuboot if who == "mcuboot" else self.otakit)(lay, data, imgs)


@pytest.fixture(scope="module")
def cross(mcuboot_host: McubootHost, tmp_path_factory: pytest.TempPathFactory) -> Cross:
    return Cross(mcuboot_host, tmp_path_factory.mktemp("cross"))


# --- flash states --------------------------------------------------------------------------------


def fresh(lay: Layout, imgs: Images) -> bytes:
    """A device as it leaves the factory: v1 in the primary slot, everything else erased."""
    boot = otakit_bootloader(lay, b"", (imgs.public,))
    boot.primary(0).write(0, _padded(imgs.v1, lay))
    return flash_bytes(boot.flash)


def install(
    lay: Layout,
    data: bytes,
    imgs: Images,
    image: bytes,
    *,
    permanent: bool = False,
    may_refuse: bool = False,
) -> bytes:
    """What an otakit agent does: erase the secondary slot, write the image where the strategy
    wants it, request the upgrade (``may_refuse``: a request otakit refuses is not made)."""
    boot = otakit_bootloader(lay, data, (imgs.public,))
    slot = boot.secondary(0)
    slot.erase_all()
    slot.write(lay.fm.image_offset(0), _padded(image, lay))
    try:
        boot.set_pending(0, permanent=permanent)
    except OtakitError:
        if not may_refuse:
            raise
    return flash_bytes(boot.flash)


def confirm(lay: Layout, data: bytes, imgs: Images) -> bytes:
    """The running application confirms itself through otakit."""
    boot = otakit_bootloader(lay, data, (imgs.public,))
    boot.confirm(0)
    return flash_bytes(boot.flash)


def _masked(lay: Layout, data: bytes) -> bytes:
    return mask_unset_bytes(lay.fm, data)


def describe_difference(lay: Layout, ours: bytes, theirs: bytes) -> str | None:
    """None when equal (but for :func:`unset_bytes`); else where the first difference is and
    how many bytes differ."""
    if ours == theirs:
        return None
    if len(ours) != len(theirs):
        return f"flash sizes differ: {len(ours)} vs {len(theirs)}"
    ours, theirs = _masked(lay, ours), _masked(lay, theirs)
    if ours == theirs:
        return None
    step = 4096
    diffs = [
        i
        for chunk in range(0, len(ours), step)
        if ours[chunk : chunk + step] != theirs[chunk : chunk + step]
        for i in range(chunk, min(chunk + step, len(ours)))
        if ours[i] != theirs[i]
    ]
    first = diffs[0]
    where = "outside every area"
    for area in lay.fm.areas:
        if area.offset <= first < area.end:
            where = f"{area.label} +0x{first - area.offset:x}"
    sector = first // lay.fm.sector_size
    return (
        f"{len(diffs)} bytes differ, first at 0x{first:x} ({where}, sector {sector}): "
        f"otakit {ours[first : first + 8].hex()} vs MCUboot {theirs[first : first + 8].hex()}"
    )


def versions_present(lay: Layout, data: bytes, imgs: Images) -> set[str]:
    """Versions of the valid images found in the slots (where each strategy keeps them)."""
    found = set()
    places = [(lay.fm.primary(0), 0), (lay.fm.secondary(0), 0)]
    if lay.fm.image_offset(0):
        places.append((lay.fm.secondary(0), lay.fm.image_offset(0)))
    for area, offset in places:
        try:
            verified = verify_image(
                BytesSource(data[area.offset + offset : area.end]), [imgs.public]
            )
        except OtakitError:
            continue
        found.add(str(verified.version))
    return found


# --- one boot, same flash: same result ---------------------------------------------------------

SCENARIOS = (
    "none",
    "test",
    "permanent",
    "revert",
    "confirmed",
    "tampered",
    "wrong-key",
    "ed25519",
    "max-size",
    "too-large",
)


def start_state(cross: Cross, lay: Layout, scenario: str) -> tuple[bytes, Images, str]:
    """The flash before the boot under test, the images, and what MCUboot should run."""
    imgs = images(lay.id, "ed25519" if scenario == "ed25519" else "ecdsa-p256")
    base = fresh(lay, imgs)
    if scenario == "none":
        return base, imgs, V1
    if scenario in ("test", "ed25519"):
        return install(lay, base, imgs, imgs.v2), imgs, V2
    if scenario == "permanent":
        return install(lay, base, imgs, imgs.v2, permanent=True), imgs, V2
    if scenario in ("revert", "confirmed"):
        upgraded = cross.mcuboot(lay, install(lay, base, imgs, imgs.v2), imgs)
        assert upgraded.version == V2, upgraded
        if scenario == "confirmed":
            return confirm(lay, upgraded.flash, imgs), imgs, V2
        return upgraded.flash, imgs, V1 if lay.swapping else V2
    if scenario == "tampered":
        return install(lay, base, imgs, imgs.tampered), imgs, V1
    if scenario == "wrong-key":
        return install(lay, base, imgs, imgs.wrong_key), imgs, V1
    limit = lay.fm.max_image_size(0)
    if scenario == "max-size":
        return install(lay, base, imgs, sized_image(lay, V2, limit, imgs.key)), imgs, V2
    assert scenario == "too-large"
    # written over the end of the space for an image; otakit may refuse to request it
    over = sized_image(lay, V2, limit + lay.fm.write_align, imgs.key)
    return install(lay, base, imgs, over, may_refuse=True), imgs, V1


@pytest.mark.parametrize("scenario", SCENARIOS)
@pytest.mark.parametrize("lid", LAYOUT_IDS)
def test_one_boot_same_flash_as_mcuboot(cross: Cross, lid: str, scenario: str) -> None:
    lay = layout(lid)
    start, imgs, expected = start_state(cross, lay, scenario)
    theirs = cross.mcuboot(lay, start, imgs)
    assert theirs.version == expected, f"MCUboot ran {theirs.version}, the scenario expects it"
    ours = cross.otakit(lay, start, imgs)
    assert ours.version == theirs.version, ours.detail
    assert describe_difference(lay, ours.flash, theirs.flash) is None
    assert ours.ops == theirs.ops


# --- boot sequences mixing both ------------------------------------------------------------------


@pytest.mark.parametrize("lid", LAYOUT_IDS)
def test_boot_sequences_mixing_otakit_and_mcuboot(cross: Cross, lid: str) -> None:
    """Install v2 for a test, then three boots, each by either side, with and without otakit
    confirming after the first: the same images run and the flash ends the same as with MCUboot
    alone. otakit's status reads the flash MCUboot left as MCUboot would act on it."""
    lay = layout(lid)
    imgs = images(lid)
    start = install(lay, fresh(lay, imgs), imgs, imgs.v2)

    pending = otakit_bootloader(lay, start, (imgs.public,)).status()[0]
    # overwrite-only MCUboot copies a test request for good: otakit may say either
    assert pending.pending in ({"test"} if lay.swapping else {"test", "permanent"})

    def run(whos: Iterable[str], confirm_after_first: bool) -> tuple[list[str | None], bytes]:
        data, ran = start, []
        for i, who in enumerate(whos):
            out = cross.boot(who, lay, data, imgs)
            ran.append(out.version)
            data = out.flash
            if i == 0 and confirm_after_first:
                data = confirm(lay, data, imgs)
        return ran, data

    for confirmed in (False, True):
        reference, reference_flash = run(["mcuboot"] * 3, confirmed)
        kept = confirmed or not lay.swapping
        assert reference == [V2, V2, V2] if kept else [V2, V1, V1]
        for whos in product(("otakit", "mcuboot"), repeat=3):
            ran, flash = run(whos, confirmed)
            label = f"boots by {'/'.join(whos)}, confirmed={confirmed}"
            assert ran == reference, label
            assert describe_difference(lay, flash, reference_flash) is None, label

    after_upgrade = cross.mcuboot(lay, start, imgs).flash
    status = otakit_bootloader(lay, after_upgrade, (imgs.public,)).status()[0]
    assert (status.state, status.pending) == (
        ("testing", "revert") if lay.swapping else ("confirmed", "none")
    )
    status = otakit_bootloader(lay, confirm(lay, after_upgrade, imgs), (imgs.public,)).status()[0]
    assert (status.state, status.pending) == ("confirmed", "none")


# --- power cuts across both ----------------------------------------------------------------------


@dataclass(frozen=True)
class Reference:
    """MCUboot alone: cut after n operations, then a boot, then one more boot."""

    cut: Outcome
    recovered: Outcome
    again: Outcome


class CutCase:
    """One sequence (an upgrade or a revert) on one layout, and MCUboot's behaviour at each cut."""

    def __init__(self, cross: Cross, lid: str, sequence: str) -> None:
        self.cross = cross
        self.lay = layout(lid)
        self.imgs = images(lid)
        start = install(self.lay, fresh(self.lay, self.imgs), self.imgs, self.imgs.v2)
        if sequence == "revert":
            upgraded = cross.mcuboot(self.lay, start, self.imgs)
            assert upgraded.version == V2
            start = upgraded.flash
        self.start = start
        self.sequence = sequence
        whole = cross.mcuboot(self.lay, start, self.imgs)
        assert whole.version == (V1 if sequence == "revert" else V2)
        self.ops = whole.ops
        self._refs: dict[tuple[int, bool], Reference] = {}
        self._lock = threading.Lock()

    def points(self) -> list[tuple[int, bool]]:
        """(n, torn): cut after n operations; all of them on a small layout."""
        if not self.lay.large:
            cuts = list(range(self.ops))
        else:
            stride = max(1, self.ops // SAMPLES)
            cuts = sorted({*range(0, self.ops, stride), *range(max(0, self.ops - 3), self.ops)})
        return [(n, torn) for n in cuts for torn in (False, True)]

    def reference(self, n: int, torn: bool) -> Reference:
        with self._lock:
            ref = self._refs.get((n, torn))
        if ref is None:
            cut = self.cross.mcuboot(self.lay, self.start, self.imgs, cut=n, torn=torn)
            assert cut.cut, f"MCUboot finished before its operation {n + 1}"
            recovered = self.cross.mcuboot(self.lay, cut.flash, self.imgs)
            again = self.cross.mcuboot(self.lay, recovered.flash, self.imgs)
            ref = Reference(cut, recovered, again)
            with self._lock:
                self._refs[(n, torn)] = ref
        return ref

    def check_after_cut(self, out: Outcome, ref: Reference, who: str) -> list[str]:
        """The boot after a cut: as MCUboot after its own cut, a valid image, none lost."""
        problems = []
        if out.version != ref.recovered.version:
            problems.append(
                f"{who} ran {out.version} where MCUboot after its own cut runs "
                f"{ref.recovered.version} {out.detail}"
            )
        diff = describe_difference(self.lay, out.flash, ref.recovered.flash)
        if diff is not None:
            problems.append(f"flash after {who}'s boot differs from MCUboot's: {diff}")
        if out.version not in (V1, V2):
            problems.append(f"no valid image runs after {who}'s boot {out.detail}")
        present = versions_present(self.lay, out.flash, self.imgs)
        needed = {V1, V2} if self.lay.swapping else {V2}
        if not needed <= present:
            problems.append(f"image(s) {sorted(needed - present)} lost (found {sorted(present)})")
        return problems

    def run(self, check: Callable[[int, bool], list[str]]) -> tuple[int, list[str]]:
        points = self.points()

        def one(point: tuple[int, bool]) -> list[str]:
            n, torn = point
            try:
                problems = check(n, torn)
            except Exception:
                problems = [traceback.format_exc(limit=4).strip().splitlines()[-1]]
            label = f"cut after {n}/{self.ops} ops{' (torn)' if torn else ''}"
            return [f"{label}: {p}" for p in problems]

        with ThreadPoolExecutor(WORKERS) as pool:
            failures = [p for problems in pool.map(one, points) for p in problems]
        return len(points), failures


_CASES: dict[tuple[str, str], CutCase] = {}


def cut_case(cross: Cross, lid: str, sequence: str) -> CutCase:
    key = (lid, sequence)
    if key not in _CASES:
        _CASES[key] = CutCase(cross, lid, sequence)
    return _CASES[key]


CUT_CASES = [
    (lid, sequence)
    for lid in CUT_LAYOUT_IDS
    for sequence in ("upgrade", "revert")
    if sequence == "upgrade" or not lid.startswith("overwrite/")
]


def _summary(failures: list[str]) -> str:
    shown = "\n".join(failures[:12])
    more = f"\n... and {len(failures) - 12} more" if len(failures) > 12 else ""
    return f"{len(failures)} problems:\n{shown}{more}"


@pytest.mark.parametrize(("lid", "sequence"), CUT_CASES)
def test_otakit_cut_then_mcuboot_boots(
    cross: Cross, lid: str, sequence: str, report: Callable[[str], None]
) -> None:
    case = cut_case(cross, lid, sequence)
    lay, imgs = case.lay, case.imgs

    def check(n: int, torn: bool) -> list[str]:
        ref = case.reference(n, torn)
        ours = cross.otakit(lay, case.start, imgs, cut=n, torn=torn)
        if not ours.cut:
            return [f"otakit finished after {ours.ops} operations; MCUboot does {case.ops}"]
        problems = []
        diff = describe_difference(lay, ours.flash, ref.cut.flash)
        if diff is not None:
            problems.append(f"the flash otakit's cut leaves differs from MCUboot's: {diff}")
        theirs = cross.mcuboot(lay, ours.flash, imgs)
        problems += case.check_after_cut(theirs, ref, "MCUboot")
        if lay.swapping:
            again = cross.mcuboot(lay, theirs.flash, imgs)
            if again.version != V1:
                problems.append(f"test image still runs after one more boot: {again.version}")
        return problems

    tried, failures = case.run(check)
    report(
        f"cross {lid} {sequence}: otakit cut at {tried // 2} of {case.ops} ops x (clean, torn), "
        f"MCUboot booted each: {len(failures)} problems"
    )
    assert not failures, _summary(failures)


@pytest.mark.parametrize(("lid", "sequence"), CUT_CASES)
def test_mcuboot_cut_then_otakit_boots(
    cross: Cross, lid: str, sequence: str, report: Callable[[str], None]
) -> None:
    case = cut_case(cross, lid, sequence)
    lay, imgs = case.lay, case.imgs

    def check(n: int, torn: bool) -> list[str]:
        ref = case.reference(n, torn)
        ours = cross.otakit(lay, ref.cut.flash, imgs)
        problems = case.check_after_cut(ours, ref, "otakit")
        if ours.ops != ref.recovered.ops:
            problems.append(f"otakit did {ours.ops} operations, MCUboot {ref.recovered.ops}")
        if lay.swapping:
            again = cross.otakit(lay, ours.flash, imgs)
            if again.version != V1:
                problems.append(f"test image still runs after one more boot: {again.version}")
        return problems

    tried, failures = case.run(check)
    report(
        f"cross {lid} {sequence}: MCUboot cut at {tried // 2} of {case.ops} ops x (clean, torn), "
        f"otakit booted each: {len(failures)} problems"
    )
    assert not failures, _summary(failures)


def test_layouts_cover_every_strategy() -> None:
    """Every strategy is tested on at least its small layout; presets join by their strategy."""
    tested = {lid.split("/")[0] for lid in CUT_LAYOUT_IDS}
    assert tested == set(STRATEGIES)
    for lid in LAYOUT_IDS:
        assert map_args(layout(lid).fm)["mode"] == lid.split("/")[0]
