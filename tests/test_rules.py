"""The pure rules, without a server: rollout decisions (phases.py, rollouts.py), version order
(protocol/version.py against the MCUboot header's own order) and trailer layouts (trailer.py, with
the numbers its docstrings and the MCUboot host harness's README give).

The rollout functions take ORM objects; here they are transient ones, never added to a session,
so nothing touches a database. What needs one (tallies, seeding, the engine's rounds) is tested
against real servers in test_rollout.py and test_rollout_scale.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otakit.errors import ConflictError, UsageError, VersionFormatError
from otakit.image.header import ImageVersion
from otakit.image.source import BytesSource
from otakit.image.trailer import (
    BOOT_MAGIC,
    BOOT_MAGIC_ALIGNED_TAIL,
    COPY_DONE_OFF,
    IMAGE_OK_OFF,
    MAGIC_OFF,
    SWAP_INFO_OFF,
    SWAP_SIZE_OFF,
    TRAILER_FIXED_SIZE,
    VALID_MAX_ALIGNS,
    VALID_WRITE_ALIGNS,
    SwapType,
    TrailerLayout,
    TrailerState,
    align_up,
    boot_magic,
    read_slot_trailer,
    scratch_trailer_size,
    status_entry_states,
    swap_status_area_size,
    swap_status_rows,
    trailer_info_size,
    trailer_size,
)
from otakit.protocol.version import FirmwareVersion
from otakit.server.models import Artifact, Deployment, Device, Rollout
from otakit.server.service import phases as phasing
from otakit.server.service import rollouts
from otakit.server.service.phases import BUCKETS, PhaseCount, bucket, phase_of
from otakit.server.service.rollouts import (
    ABORTED,
    COMPLETED,
    PAUSED,
    RUNNING,
    SCHEDULED,
    Loaded,
    Phase,
    Standing,
    admits,
    admits_anonymous,
    decide,
    joins,
    may_download,
    operator_step,
)

NOW = datetime(2030, 1, 7, 12, 0, tzinfo=UTC)  # a Monday, noon UTC
DEPLOYMENT = 7

# --- rollouts: a phase's thresholds ----------------------------------------------------------


def test_an_error_count_is_exceeded_only_above_it() -> None:
    phase = Phase(percent=10, max_errors=2)
    assert not phase.exceeded(2, 100)
    assert phase.exceeded(3, 100)
    assert Phase(percent=10, max_errors=0).exceeded(1, 100)  # zero tolerance


def test_an_error_percentage_is_of_the_phases_devices() -> None:
    phase = Phase(percent=10, max_errors_percent=5)
    assert not phase.exceeded(5, 100)  # exactly 5 %: allowed
    assert phase.exceeded(6, 100)
    assert phase.exceeded(1, 10)  # 10 % of a small phase
    assert not phase.exceeded(0, 0)  # no devices, no failures


def test_either_threshold_trips_and_none_never_does() -> None:
    both = Phase(percent=10, max_errors=10, max_errors_percent=1)
    assert both.exceeded(2, 100)  # the percentage, below the count
    assert Phase(percent=10, max_errors=1, max_errors_percent=50).exceeded(2, 100)  # the count
    assert not Phase(percent=10).exceeded(1000, 1000)


def test_success_is_reached_at_the_percentage_and_never_with_no_device() -> None:
    phase = Phase(percent=50, success=90)
    assert phase.succeeded(9, 10)
    assert not phase.succeeded(8, 10)
    assert not phase.succeeded(0, 0)  # a phase nobody falls into is held
    assert not Phase(percent=50, success=0).succeeded(0, 0)
    assert Phase(percent=50, success=0).succeeded(0, 1)


# --- rollouts: which phase admits a device ---------------------------------------------------


def test_a_device_falls_into_the_first_percentage_that_covers_its_bucket() -> None:
    phases = [Phase(percent=10), Phase(percent=50), Phase(percent=100)]
    seen = set()
    for n in range(300):
        serial = f"dev-{n}"
        place = bucket(DEPLOYMENT, serial)
        assert 0 <= place < BUCKETS
        expected = 1 if place < 1000 else 2 if place < 5000 else 3
        assert phase_of(phases, DEPLOYMENT, serial, {}) == expected
        seen.add(expected)
    assert seen == {1, 2, 3}


def test_beyond_the_last_percentage_no_phase_admits_a_device() -> None:
    phases = [Phase(percent=20)]
    outside = [s for s in (f"dev-{n}" for n in range(100)) if bucket(DEPLOYMENT, s) >= 2000]
    inside = [s for s in (f"dev-{n}" for n in range(100)) if bucket(DEPLOYMENT, s) < 2000]
    assert outside
    assert inside
    assert {phase_of(phases, DEPLOYMENT, s, {}) for s in outside} == {None}
    assert {phase_of(phases, DEPLOYMENT, s, {}) for s in inside} == {1}


def test_a_group_phase_admits_its_group_wherever_it_stands() -> None:
    phases = [Phase(percent=100), Phase(group="canary")]
    assert phase_of(phases, DEPLOYMENT, "dev-1", {"deviceGroup": "canary"}) == 1  # first wins
    phases = [Phase(group="canary"), Phase(percent=100)]
    assert phase_of(phases, DEPLOYMENT, "dev-1", {"deviceGroup": "canary"}) == 1
    assert phase_of(phases, DEPLOYMENT, "dev-1", {"deviceGroup": "field"}) == 2
    assert phase_of([Phase(group="canary")], DEPLOYMENT, "dev-1", {}) is None


def test_a_devices_bucket_depends_on_the_deployment() -> None:
    places = {bucket(d, "dev-1") for d in range(1, 40)}
    assert len(places) > 30  # a device is not first in every deployment


# --- rollouts: the engine's decisions --------------------------------------------------------


def _rollout(
    phases: list[Phase], *, state: str = RUNNING, phase: int = 1, **fields: Any
) -> Rollout:
    values: dict[str, Any] = {
        "id": 1,
        "deployment_id": DEPLOYMENT,
        "state": state,
        "phase": phase,
        "phases": [p.to_json() for p in phases],
        "start_at": None,
        "window": None,
        "frozen": False,
        "acknowledged": {},
        "phase_started_at": NOW - timedelta(hours=1),
    }
    values.update(fields)
    return Rollout(**values)


def _loaded(rollout: Rollout, **deployment: Any) -> Loaded:
    values: dict[str, Any] = {
        "id": DEPLOYMENT,
        "cancelled_at": None,
        "expires_at": NOW + timedelta(days=30),
    }
    values.update(deployment)
    return Loaded(rollout, Deployment(**values), Artifact(id="0" * 64, version="1.1.0"))


def _counts(*phases: tuple[int, int, int]) -> list[PhaseCount]:
    """(targeted, succeeded, failed) per phase."""
    return [
        PhaseCount(n, targeted=t, succeeded=s, failed=f) for n, (t, s, f) in enumerate(phases, 1)
    ]


TWO = [Phase(percent=10, max_errors=1), Phase(percent=100, max_errors=1)]


def test_a_phase_that_reached_its_success_advances_and_the_last_completes() -> None:
    step = decide(_loaded(_rollout(TWO)), _counts((10, 9, 0), (0, 0, 0)), NOW)
    assert step is not None
    assert (step.state, step.phase, step.kind) == (RUNNING, 2, "advanced")
    assert step.detail == "9 of 10 devices applied"
    step = decide(_loaded(_rollout(TWO, phase=2)), _counts((10, 10, 0), (90, 81, 0)), NOW)
    assert step is not None
    assert (step.state, step.phase, step.kind) == (COMPLETED, 2, "completed")


def test_a_phase_short_of_success_or_empty_or_manual_waits() -> None:
    assert decide(_loaded(_rollout(TWO)), _counts((10, 8, 0), (0, 0, 0)), NOW) is None
    assert decide(_loaded(_rollout(TWO)), _counts((0, 0, 0), (0, 0, 0)), NOW) is None
    manual = [Phase(percent=10, manual=True), Phase(percent=100)]
    assert decide(_loaded(_rollout(manual)), _counts((10, 10, 0), (0, 0, 0)), NOW) is None


def test_failures_past_the_threshold_pause_or_abort() -> None:
    step = decide(_loaded(_rollout(TWO)), _counts((10, 0, 2), (0, 0, 0)), NOW)
    assert step is not None
    assert (step.state, step.kind, step.cancel) == (PAUSED, "paused", False)
    assert step.reason == "phase 1: 2 of 10 devices failed"
    aborting = [Phase(percent=10, max_errors=1, on_error="abort"), Phase(percent=100)]
    step = decide(_loaded(_rollout(aborting)), _counts((10, 9, 2), (0, 0, 0)), NOW)
    assert step is not None
    assert (step.state, step.kind, step.cancel) == (ABORTED, "aborted", True)


def test_an_earlier_phase_still_counts_after_the_rollout_moved_on() -> None:
    step = decide(_loaded(_rollout(TWO, phase=2)), _counts((10, 8, 2), (50, 0, 0)), NOW)
    assert step is not None
    assert step.state == PAUSED
    assert step.reason == "phase 1: 2 of 10 devices failed"


def test_a_later_phase_does_not_count_before_it_opens() -> None:
    step = decide(_loaded(_rollout(TWO)), _counts((10, 9, 0), (50, 0, 5)), NOW)
    assert step is not None
    assert step.kind == "advanced"


def test_acknowledged_failures_no_longer_count() -> None:
    rollout = _rollout(TWO, acknowledged={"1": 2})
    assert decide(_loaded(rollout), _counts((10, 8, 2), (0, 0, 0)), NOW) is None
    step = decide(_loaded(rollout), _counts((10, 7, 4), (0, 0, 0)), NOW)  # two more since
    assert step is not None
    assert step.reason == "phase 1: 2 of 10 devices failed"


def test_a_paused_rollout_stays_paused_but_can_still_abort() -> None:
    assert (
        decide(_loaded(_rollout(TWO, state=PAUSED)), _counts((10, 10, 5), (0, 0, 0)), NOW) is None
    )
    aborting = [Phase(percent=10, max_errors=1, on_error="abort"), Phase(percent=100)]
    step = decide(_loaded(_rollout(aborting, state=PAUSED)), _counts((10, 0, 2), (0, 0, 0)), NOW)
    assert step is not None
    assert step.state == ABORTED


def test_a_scheduled_rollout_starts_at_its_time() -> None:
    later = _rollout(TWO, state=SCHEDULED, start_at=NOW + timedelta(minutes=1))
    assert decide(_loaded(later), _counts((0, 0, 0), (0, 0, 0)), NOW) is None
    due = _rollout(TWO, state=SCHEDULED, start_at=NOW)
    step = decide(_loaded(due), _counts((0, 0, 0), (0, 0, 0)), NOW)
    assert step is not None
    assert (step.state, step.phase, step.kind) == (RUNNING, 1, "started")


@pytest.mark.parametrize(
    ("deployment", "why"),
    [
        ({"cancelled_at": NOW - timedelta(seconds=1)}, "deployment cancelled"),
        ({"expires_at": NOW}, "deployment expired"),
    ],
)
def test_a_rollout_whose_deployment_is_gone_aborts(deployment: dict[str, Any], why: str) -> None:
    step = decide(_loaded(_rollout(TWO), **deployment), _counts((10, 10, 0), (0, 0, 0)), NOW)
    assert step is not None
    assert (step.state, step.kind, step.reason) == (ABORTED, "aborted", why)


@pytest.mark.parametrize("state", [COMPLETED, ABORTED])
def test_a_finished_rollout_makes_no_step(state: str) -> None:
    gone = {"cancelled_at": NOW}
    assert (
        decide(_loaded(_rollout(TWO, state=state), **gone), _counts((1, 0, 9), (0, 0, 0)), NOW)
        is None
    )


# --- rollouts: what an operator may do ------------------------------------------------------


def _act(state: str, action: str, **kwargs: Any) -> rollouts.Step | None:
    counts = _counts((10, 3, 2), (0, 0, 0))
    return operator_step(_loaded(_rollout(TWO, state=state)), action, counts, NOW, **kwargs)


def test_pause_resume_and_abort() -> None:
    paused = _act(RUNNING, "pause", reason="night shift")
    assert paused is not None
    assert (paused.state, paused.reason) == (PAUSED, "night shift")
    resumed = _act(PAUSED, "resume")
    assert resumed is not None
    assert (resumed.state, resumed.acknowledged) == (RUNNING, {"1": 2})  # failures accepted
    aborted = _act(PAUSED, "abort")
    assert aborted is not None
    assert (aborted.state, aborted.cancel, aborted.reason) == (
        ABORTED,
        True,
        "aborted by an operator",
    )


def test_asking_for_the_state_it_is_in_is_no_step() -> None:
    assert _act(PAUSED, "pause") is None
    assert _act(RUNNING, "resume") is None
    assert _act(SCHEDULED, "resume") is None
    assert _act(ABORTED, "abort") is None


def test_a_rollout_paused_before_it_started_is_scheduled_again() -> None:
    rollout = _rollout(TWO, state=PAUSED, phase_started_at=None)
    step = operator_step(_loaded(rollout), "resume", _counts((0, 0, 0), (0, 0, 0)), NOW)
    assert step is not None
    assert step.state == SCHEDULED


@pytest.mark.parametrize(
    ("state", "action"),
    [
        (ABORTED, "pause"),
        (COMPLETED, "pause"),
        (ABORTED, "resume"),
        (COMPLETED, "resume"),
        (COMPLETED, "abort"),
        (PAUSED, "approve"),
        (SCHEDULED, "approve"),
    ],
)
def test_impossible_actions_are_conflicts(state: str, action: str) -> None:
    with pytest.raises(ConflictError, match=f"rollout 1 is {state}"):
        _act(state, action)


def test_approval_advances_only_the_phase_it_names() -> None:
    step = _act(RUNNING, "approve", phase=1)
    assert step is not None
    assert (step.state, step.phase, step.detail) == (
        RUNNING,
        2,
        "approved: 3 of 10 devices applied",
    )
    with pytest.raises(ConflictError, match="already approved"):
        _act(RUNNING, "approve", phase=2)


def test_an_unknown_action_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="unknown rollout action 'explode'"):
        _act(RUNNING, "explode")


# --- rollouts: who is offered the update -----------------------------------------------------


def _in_phase(phases: list[Phase], number: int) -> Device:
    """A device (no tags) that ``phases`` put in phase ``number``."""
    for n in range(1000):
        if phase_of(phases, DEPLOYMENT, f"dev-{n}", {}) == number:
            return Device(serial=f"dev-{n}", product="widget", tags={})
    raise AssertionError(f"no device falls into phase {number}")


def _standing(status: str | None = None, error: str | None = None) -> Standing:
    return Standing(statuses={DEPLOYMENT: (status, error)} if status else {})


def test_a_running_rollout_offers_the_open_phases_only() -> None:
    first, second = _in_phase(TWO, 1), _in_phase(TWO, 2)
    running = _rollout(TWO)
    assert admits(running, first, _standing(), NOW)
    assert not admits(running, second, _standing(), NOW)
    assert admits(_rollout(TWO, phase=2), first, _standing(), NOW)  # earlier phases stay open
    assert admits(_rollout(TWO, state=COMPLETED), second, _standing(), NOW)


@pytest.mark.parametrize("state", [SCHEDULED, PAUSED, ABORTED])
def test_a_rollout_that_is_not_running_offers_nothing_new(state: str) -> None:
    assert not admits(_rollout(TWO, state=state), _in_phase(TWO, 1), _standing(), NOW)


def test_a_download_under_way_keeps_its_offer_unless_aborted() -> None:
    device = _in_phase(TWO, 2)  # its phase is not even open
    paused = _rollout(TWO, state=PAUSED)
    assert admits(paused, device, _standing("downloading"), NOW)
    assert admits(paused, device, _standing("interrupted"), NOW)
    assert may_download(paused, device, _standing("downloading"))
    assert not admits(paused, device, _standing("interrupted", "aborted"), NOW)
    aborted = _rollout(TWO, state=ABORTED)
    assert not admits(aborted, device, _standing("downloading"), NOW)
    assert not may_download(aborted, device, _standing("downloading"))


def test_a_device_that_reverted_is_not_offered_the_version_again() -> None:
    device = _in_phase(TWO, 1)
    done = _rollout(TWO, state=COMPLETED)
    assert not admits(done, device, _standing("reverted"), NOW)
    assert not may_download(done, device, _standing("reverted"))


def test_start_time_and_window_hold_offers_back() -> None:
    device = _in_phase(TWO, 1)
    assert not admits(_rollout(TWO, start_at=NOW + timedelta(seconds=1)), device, None, NOW)
    assert admits(_rollout(TWO, start_at=NOW), device, None, NOW)
    night = _rollout(TWO, window="mon-fri 02:00-05:00")
    assert not admits(night, device, None, NOW)
    assert admits(night, device, None, NOW.replace(hour=3))
    assert may_download(night, device, None)  # windows stop offers, not downloads


def test_a_frozen_rollout_offers_only_its_snapshot() -> None:
    device = _in_phase(TWO, 1)
    frozen = _rollout(TWO, frozen=True)
    assert not admits(frozen, device, None, NOW)
    assert not admits(frozen, device, Standing(), NOW)
    assert admits(frozen, device, Standing(members=frozenset({1})), NOW)
    assert admits(frozen, device, Standing(members=frozenset({1}), phases={1: 1}), NOW)
    assert not admits(frozen, device, Standing(members=frozenset({1}), phases={1: 2}), NOW)


def test_anonymous_devices_wait_for_completion_and_the_window() -> None:
    assert not admits_anonymous(_rollout(TWO, phase=2), NOW)
    assert admits_anonymous(_rollout(TWO, state=COMPLETED), NOW)
    assert not admits_anonymous(_rollout(TWO, state=COMPLETED, window="02:00-05:00"), NOW)


def test_who_joins_a_rollout_later() -> None:
    assert joins(_rollout(TWO))
    assert joins(_rollout(TWO, state=PAUSED))
    assert not joins(_rollout(TWO, state=ABORTED))
    assert joins(_rollout(TWO, state=SCHEDULED, frozen=True, phase_started_at=None))
    assert not joins(_rollout(TWO, frozen=True))  # its snapshot was taken at the start


def test_the_rows_a_rollout_starts_with() -> None:
    """seeds(): the devices the deployment targets at the start (product, board, an older
    version), plus those already standing in the deployment, each in the phase that admits it;
    an applied device soaks from its applied time."""
    rollout = _rollout([Phase(percent=100)], soak=600, updated_at=NOW)
    loaded = _loaded(rollout, condition="tags.productType='widget'", downgrade=False)
    artifact = Artifact(id="0" * 64, version="1.1.0", board="BOARD_A")

    def device(serial: str, *, product: str = "widget", version: str = "1.0.0") -> Device:
        return Device(serial=serial, product=product, board="BOARD_A", version=version, tags={})

    devices = [
        device("old"),
        device("same", version="1.1.0"),
        device("newer", version="2.0.0"),
        device("other", product="gadget"),
        Device(serial="board", product="widget", board="BOARD_B", version="1.0.0", tags={}),
        device("done", version="1.1.0"),  # already applied: it stands in the deployment
    ]
    applied = NOW - timedelta(seconds=60)
    found = phasing.seeds(
        rollout, loaded.deployment, artifact, devices, {"done": ("applied", applied)}
    )
    assert [(s.serial, s.phase, s.status) for s in found] == [
        ("old", 1, None),
        ("done", 1, "applied"),
    ]
    assert found[0].soak_until is None
    assert found[1].soak_until == applied + timedelta(seconds=600)
    frozen = phasing.seeds(rollout, loaded.deployment, artifact, devices, {}, frozenset({"x"}))
    assert frozen == []  # a frozen rollout takes only its snapshot's members


# --- version order: what the server compares and what MCUboot compares -----------------------

header_parts = st.tuples(
    st.integers(0, 255), st.integers(0, 255), st.integers(0, 0xFFFF), st.integers(0, 0xFFFFFFFF)
)


@settings(max_examples=300)
@given(header_parts, header_parts, st.lists(st.booleans(), min_size=4, max_size=4))
def test_the_server_orders_versions_as_mcuboot_does(
    a: tuple[int, int, int, int], other: tuple[int, int, int, int], same: list[bool]
) -> None:
    """FirmwareVersion (offers, downgrade checks on the server and agent) and ImageVersion
    (MCUboot's downgrade prevention, build numbers compared) agree on every header version;
    ``b`` shares the parts ``same`` picks with ``a``, so equal prefixes are common."""
    b = tuple(x if keep else y for x, y, keep in zip(a, other, same, strict=True))
    ia, ib = ImageVersion(*a), ImageVersion(*b)
    fa, fb = FirmwareVersion.from_image(ia), FirmwareVersion.from_image(ib)
    assert (fa < fb) == (ia < ib) == (a < b)
    assert (fa == fb) == (ia == ib) == (a == b)
    assert fa.to_image() == ia


def test_the_build_number_decides_only_between_equal_releases() -> None:
    v = ImageVersion.parse
    assert v("1.2.3") < v("1.2.3+1") < v("1.2.3+2")
    assert not v("1.2.3+2") < v("1.2.3+1")
    assert v("1.2.3+4294967295") < v("1.2.4")
    assert v("1.2.65535+4294967295") < v("1.3.0")
    assert v("1.255.65535+4294967295") < v("2.0.0")
    shuffled = [v("1.2.4"), v("1.2.3+7"), v("1.2.3"), v("1.2.3+1")]
    assert sorted(shuffled) == [v("1.2.3"), v("1.2.3+1"), v("1.2.3+7"), v("1.2.4")]


@pytest.mark.parametrize(
    ("parts", "fits"),
    [
        ((255, 255, 0xFFFF, 0xFFFFFFFF), True),
        ((256, 0, 0, 0), False),  # major is a u8
        ((0, 256, 0, 0), False),  # minor is a u8
        ((0, 0, 0x10000, 0), False),  # revision is a u16
        ((0, 0, 0, 0x100000000), False),  # build is a u32
    ],
)
def test_what_an_image_header_can_hold(parts: tuple[int, int, int, int], fits: bool) -> None:
    version = FirmwareVersion(*parts)
    if fits:
        assert version.to_image() == ImageVersion(*parts)
    else:
        with pytest.raises(VersionFormatError, match="does not fit"):
            version.to_image()


# --- trailer layouts -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("max_align", "offsets"),
    [
        # (magic area, image_ok, copy_done, swap_info, swap_size), counted back from the end
        (8, (16, 24, 32, 40, 48)),  # the docstring's: image_ok at end - 24, ...
        (16, (16, 32, 48, 64, 80)),
        (32, (32, 64, 96, 128, 160)),
    ],
)
def test_field_offsets_per_max_align(max_align: int, offsets: tuple[int, ...]) -> None:
    layout = TrailerLayout(max_align)
    assert (
        layout.magic_area,
        layout.image_ok_off,
        layout.copy_done_off,
        layout.swap_info_off,
        layout.swap_size_off,
    ) == offsets
    assert layout.magic_off == 16  # the magic is always the last 16 bytes
    assert layout.fixed_size == layout.swap_size_off
    m = align_up(16, max_align)
    for k, off in enumerate((layout.image_ok_off, layout.copy_done_off, layout.swap_info_off), 1):
        assert off == m + k * max_align  # end - M - k * max_align


def test_the_default_layout_constants_are_max_align_8() -> None:
    assert (MAGIC_OFF, IMAGE_OK_OFF, COPY_DONE_OFF, SWAP_INFO_OFF, SWAP_SIZE_OFF) == (
        16,
        24,
        32,
        40,
        48,
    )
    assert TRAILER_FIXED_SIZE == 48


@pytest.mark.parametrize("max_align", [0, 1, 4, 64])
def test_max_align_outside_mcuboots_range_is_refused(max_align: int) -> None:
    with pytest.raises(ValueError, match=f"max_align {max_align} is not one of 8, 16, 32"):
        TrailerLayout(max_align)


def test_the_magic_names_its_max_align() -> None:
    assert boot_magic(8) == BOOT_MAGIC
    assert boot_magic(16) == b"\x10\x00" + BOOT_MAGIC_ALIGNED_TAIL
    assert boot_magic(32) == b"\x20\x00" + BOOT_MAGIC_ALIGNED_TAIL
    for max_align in VALID_MAX_ALIGNS:
        magic = boot_magic(max_align)
        assert len(magic) == 16
        assert TrailerLayout.from_magic(magic) == TrailerLayout(max_align)
    assert TrailerLayout.from_magic(b"\x08\x00" + BOOT_MAGIC_ALIGNED_TAIL) is None  # 8 is plain
    assert TrailerLayout.from_magic(b"\x40\x00" + BOOT_MAGIC_ALIGNED_TAIL) is None
    assert TrailerLayout.from_magic(b"\xff" * 16) is None
    assert TrailerLayout.from_magic(BOOT_MAGIC[:15]) is None


@pytest.mark.parametrize("erased", [0xFF, 0x00])
def test_a_flag_is_one_then_erased_bytes_to_max_align(erased: int) -> None:
    assert TrailerLayout(8).flag(erased_value=erased) == b"\x01" + bytes([erased]) * 7
    assert TrailerLayout(32).flag(erased_value=erased) == b"\x01" + bytes([erased]) * 31


def _tail(
    max_align: int, erased: int, *, image_ok: bool, swap_info: int | None, extra: int = 0
) -> bytearray:
    """The fixed trailer fields (plus ``extra`` erased bytes before them), written as MCUboot
    writes a test or permanent request."""
    layout = TrailerLayout(max_align)
    tail = bytearray([erased]) * (layout.fixed_size + extra)
    end = len(tail)
    tail[end - layout.magic_off :] = layout.magic
    if image_ok:
        tail[end - layout.image_ok_off] = 0x01
    if swap_info is not None:
        tail[end - layout.swap_info_off] = swap_info
    return tail


@pytest.mark.parametrize("max_align", VALID_MAX_ALIGNS)
@pytest.mark.parametrize("erased", [0xFF, 0x00])
def test_trailer_fields_read_back_where_they_were_written(max_align: int, erased: int) -> None:
    tail = _tail(max_align, erased, image_ok=True, swap_info=(1 << 4) | SwapType.PERM)
    state = TrailerState.read(bytes(tail), max_align, erased)
    assert (state.magic, state.image_ok, state.copy_done) == (True, True, False)
    assert state.swap_info == 0x13
    assert state.swap_type is SwapType.PERM  # the low nibble; the image index is above it
    assert state.request == "permanent"
    test = TrailerState.read(
        bytes(_tail(max_align, erased, image_ok=False, swap_info=None)), max_align, erased
    )
    assert (test.request, test.swap_info, test.swap_type) == ("test", None, None)


def test_a_trailer_read_with_another_max_align_has_no_magic() -> None:
    tail = bytes(_tail(16, 0xFF, image_ok=True, swap_info=None))
    assert TrailerState.read(tail, 16).magic
    assert not TrailerState.read(tail, 8).magic
    assert TrailerState.read(tail[-47:], 8) == TrailerState(False, False, False, None)  # too short


def test_an_unknown_swap_type_nibble_is_none() -> None:
    tail = _tail(8, 0xFF, image_ok=False, swap_info=0x0F)
    assert TrailerState.read(bytes(tail)).swap_type is None


def test_a_slot_trailer_is_read_with_the_max_align_its_magic_names() -> None:
    image_end = 100
    slot = bytes(image_end) + bytes(_tail(32, 0xFF, image_ok=True, swap_info=None, extra=50))
    state = read_slot_trailer(BytesSource(slot), image_end=image_end)
    assert state is not None
    assert (state.max_align, state.request) == (32, "permanent")
    unknown = bytes(image_end) + b"\xff" * 64
    state = read_slot_trailer(BytesSource(unknown), image_end=image_end)
    assert state is not None
    assert (state.max_align, state.magic) == (8, False)
    # no room after the image for the fixed fields: not a padded image
    assert read_slot_trailer(BytesSource(slot), image_end=len(slot) - 160) is not None
    assert read_slot_trailer(BytesSource(slot), image_end=len(slot) - 159) is None
    assert read_slot_trailer(BytesSource(bytes(image_end + 15)), image_end=image_end) is None


def test_status_writes_per_sector() -> None:
    assert [status_entry_states(s) for s in ("overwrite", "swap-scratch", "swap-move")] == [3] * 3
    assert status_entry_states("swap-offset") == 2
    with pytest.raises(ValueError, match="unknown strategy 'swap'"):
        status_entry_states("swap")


@pytest.mark.parametrize("write_align", VALID_WRITE_ALIGNS)
@pytest.mark.parametrize("max_sectors", [1, 128, 1840])
def test_trailer_sizes_follow_boot_trailer_sz(write_align: int, max_sectors: int) -> None:
    """M * 3 * W + info (swap-offset: M * 2 * W + info and one field more), info = 4 fields of
    max_align plus the magic's area; the harness README's M*3*W + 48 and M*2*W + 56 at W = 8."""
    max_align = max(8, write_align)
    magic = align_up(16, max_align)
    info = 4 * max_align + magic
    assert trailer_info_size(max_align) == info
    assert trailer_info_size(max_align, "swap-offset") == info + max_align
    for strategy in ("overwrite", "swap-scratch", "swap-move"):
        expected = max_sectors * 3 * write_align + info
        assert trailer_size(write_align, max_sectors, strategy=strategy) == expected
    assert (
        trailer_size(write_align, max_sectors, strategy="swap-offset")
        == max_sectors * 2 * write_align + info + max_align
    )
    assert trailer_size(write_align, max_sectors, overwrite_only=True) == 2 * max_align + magic
    assert trailer_size(write_align, max_sectors, strategy="swap-status") == 0
    if write_align <= 8:
        assert trailer_size(write_align, max_sectors) == max_sectors * 3 * write_align + 48
        assert scratch_trailer_size(write_align) == 3 * write_align + 48


def test_an_explicit_max_align_widens_every_field() -> None:
    assert trailer_size(8, 128, max_align=32) == 128 * 3 * 8 + 4 * 32 + 32
    assert trailer_size(8, 128, overwrite_only=True, max_align=16) == 2 * 16 + 16
    with pytest.raises(ValueError, match="max_align 4"):
        trailer_size(8, 128, max_align=4)


@pytest.mark.parametrize("row", [0x200, 0x1000])
@pytest.mark.parametrize("max_sectors", [1, 64, 500, 501, 1840])
def test_swap_status_partition_follows_swap_status_h(row: int, max_sectors: int) -> None:
    """rows = ceil(M / (R - 12)) + ceil(64 / (R - 12)); 3 areas x 2 copies x rows x R."""
    rows = -(-max_sectors // (row - 12)) + -(-64 // (row - 12))
    assert swap_status_rows(max_sectors, row) == rows
    assert swap_status_area_size(max_sectors, row_size=row) == 3 * 2 * rows * row
    assert swap_status_area_size(max_sectors, images=2, row_size=row) == 5 * 2 * rows * row
    if row == 0x200 and max_sectors <= 500:
        assert swap_status_area_size(max_sectors) == 6144  # the README's 12 rows
