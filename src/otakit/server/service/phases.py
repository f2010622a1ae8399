"""Phases: which devices each phase of a rollout admits, each device's place in a rollout, and
how many devices of each phase stand where.

A device's phase is the first one that admits it (:func:`phase_of`): a **group** phase admits
the devices of its ``deviceGroup``; a **percentage** phase (cumulative) admits the devices whose
stable bucket, a hash of (deployment id, serial) in 0..9999, is below 100 x its percentage.

Each targeted device has one ``rollout_devices`` row per rollout, made when it is first targeted:
at the rollout's start for the devices registered then (one paged pass, :func:`seed`), when it
is first seen at a check-in afterwards (dynamic rollouts only: :func:`place`), or when it first
reports about the deployment. The row keeps the phase it fell into and its status.

``rollout_phase_counts`` holds, per (rollout, phase), how many devices are ``targeted``, how many
``succeeded`` (applied, and soaked for the rollout's ``soak``) and how many stand in each status.
Every change of a row changes the counts in the same statement batch and transaction
(:func:`note`, called from reports.set_standing), so a rollout's counts cost one query of at
most phases x statuses rows, whatever the number of devices.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import UsageError
from otakit.protocol.states import FAILED, empty_counts, label_of
from otakit.server.database import insert
from otakit.server.models import (
    Artifact,
    Deployment,
    DeploymentDevice,
    Device,
    Rollout,
    RolloutCount,
    RolloutDevice,
)
from otakit.server.targeting import (
    GROUP_TAG,
    board_fits,
    device_tags,
    matches,
    parse_condition,
    wanted,
)

ON_ERROR = ("pause", "abort")
MAX_PHASES = 20
BUCKETS = 10_000
DEFAULT_SUCCESS = 90.0

TARGETED = "targeted"  # count keys besides the statuses
SUCCEEDED = "succeeded"
APPLIED = "applied"
SEED_PAGE = 2000  # devices read per page when a rollout starts


# --- phase specs -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """One phase: which devices it admits and when it is done."""

    percent: float | None = None  # cumulative share of the targeted devices, 0 < p <= 100
    group: str | None = None  # or: the devices of this group (deviceGroup tag)
    success: float = DEFAULT_SUCCESS  # percent of the phase's devices applied and healthy
    manual: bool = False  # advance only on approval
    max_errors: int | None = None  # failures allowed (count); more pauses or aborts
    max_errors_percent: float | None = None  # failures allowed (percent of the phase)
    on_error: str = "pause"  # or "abort"

    def to_json(self) -> dict[str, Any]:
        return {
            "percent": self.percent,
            "group": self.group,
            "success": self.success,
            "manual": self.manual,
            "max_errors": self.max_errors,
            "max_errors_percent": self.max_errors_percent,
            "on_error": self.on_error,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Phase:
        return cls(
            percent=data.get("percent"),
            group=data.get("group"),
            success=float(data.get("success", DEFAULT_SUCCESS)),
            manual=bool(data.get("manual", False)),
            max_errors=data.get("max_errors"),
            max_errors_percent=data.get("max_errors_percent"),
            on_error=str(data.get("on_error", "pause")),
        )

    @property
    def label(self) -> str:
        return f"{self.percent:g}%" if self.percent is not None else f"group {self.group}"

    def exceeded(self, failed: int, targeted: int) -> bool:
        """Whether ``failed`` devices of ``targeted`` are more than this phase allows."""
        if self.max_errors is not None and failed > self.max_errors:
            return True
        return (
            self.max_errors_percent is not None
            and targeted > 0
            and failed * 100 > self.max_errors_percent * targeted
        )

    def succeeded(self, succeeded: int, targeted: int) -> bool:
        """Whether the phase is done. A phase that targets no device is never done by itself
        (a mistyped group would otherwise pass at once and open the next phases): it waits
        until a device falls into it, or an operator approves it."""
        return targeted > 0 and succeeded * 100 >= self.success * targeted


def check_phases(phases: Sequence[Phase]) -> None:
    """Raise UsageError unless ``phases`` make a rollout."""
    if not phases:
        raise UsageError("a rollout needs at least one phase")
    if len(phases) > MAX_PHASES:
        raise UsageError(f"a rollout has at most {MAX_PHASES} phases", value=len(phases))
    last = 0.0
    groups: set[str] = set()
    for number, phase in enumerate(phases, 1):
        where = f"phase {number}"
        if (phase.percent is None) == (phase.group is None):
            raise UsageError(f"{where}: give either a percentage or a group")
        if phase.percent is not None:
            if not 0 < phase.percent <= 100:
                raise UsageError(f"{where}: {phase.percent}% is not in (0, 100]", value=phase)
            if phase.percent <= last:
                raise UsageError(
                    f"{where}: percentages are cumulative and must grow "
                    f"({phase.percent:g}% after {last:g}%)",
                    value=phase.percent,
                )
            last = phase.percent
        if phase.group is not None:
            if not phase.group or phase.group in groups:
                raise UsageError(f"{where}: group {phase.group!r} is empty or repeated")
            groups.add(phase.group)
        if not 0 <= phase.success <= 100:
            raise UsageError(f"{where}: success {phase.success}% is not in [0, 100]")
        if phase.max_errors is not None and phase.max_errors < 0:
            raise UsageError(f"{where}: max_errors cannot be negative")
        if phase.max_errors_percent is not None and not 0 <= phase.max_errors_percent <= 100:
            raise UsageError(f"{where}: max_errors_percent is not in [0, 100]")
        if phase.on_error not in ON_ERROR:
            raise UsageError(f"{where}: on_error must be 'pause' or 'abort'", value=phase.on_error)


def phases_of(rollout: Rollout) -> list[Phase]:
    return [Phase.from_json(p) for p in rollout.phases]


def bucket(deployment_id: int, serial: str) -> int:
    """The device's stable place (0..9999) in one deployment's percentage phases."""
    digest = hashlib.sha256(f"{deployment_id}:{serial}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % BUCKETS


def phase_of(
    phases: Sequence[Phase], deployment_id: int, serial: str, tags: Mapping[str, str]
) -> int | None:
    """The first phase (from 1) that admits the device, or None (beyond the last percentage)."""
    place = bucket(deployment_id, serial)
    for number, phase in enumerate(phases, 1):
        if phase.group is not None and tags.get(GROUP_TAG) == phase.group:
            return number
        if phase.percent is not None and place < round(phase.percent * BUCKETS / 100):
            return number
    return None


def started(rollout: Rollout) -> bool:
    """Whether the rollout has started (its devices have rows from then on)."""
    return rollout.phase_started_at is not None


# --- counts ------------------------------------------------------------------------------------


@dataclass
class PhaseCount:
    number: int
    targeted: int = 0
    succeeded: int = 0
    failed: int = 0
    counts: dict[str, int] = field(default_factory=lambda: empty_counts())


def _weight(status: str | None, soak_until: datetime | None) -> Counter[str]:
    """What one row adds to its phase's counts."""
    weight: Counter[str] = Counter({TARGETED: 1})
    if status is not None:
        weight[status] += 1
        if status == APPLIED and soak_until is None:
            weight[SUCCEEDED] += 1
    return weight


async def _add(db: AsyncSession, rollout_id: int, deltas: Mapping[tuple[int, str], int]) -> None:
    """Add ``deltas`` ((phase, key) -> n) to the rollout's counts: one upsert, rows in key
    order (concurrent transactions lock them in the same order)."""
    values = [
        {"rollout_id": rollout_id, "phase": phase, "key": key, "count": n}
        for (phase, key), n in sorted(deltas.items())
        if n
    ]
    if not values:
        return
    statement = insert(db, RolloutCount).values(values)
    await db.execute(
        statement.on_conflict_do_update(
            index_elements=["rollout_id", "phase", "key"],
            set_={"count": RolloutCount.count + statement.excluded.count},
        )
    )


def _deltas(phase: int, before: Counter[str], after: Counter[str]) -> dict[tuple[int, str], int]:
    keys = set(before) | set(after)
    return {(phase, key): after[key] - before[key] for key in keys}


async def tally(db: AsyncSession, rollout: Rollout, now: datetime) -> list[PhaseCount]:
    """Per phase: how many devices it targets and where they stand (the counters, plus the
    applied devices whose soak ended since the engine last looked)."""
    stats = [PhaseCount(n) for n in range(1, len(rollout.phases) + 1)]
    found = await db.execute(
        select(RolloutCount.phase, RolloutCount.key, RolloutCount.count).where(
            RolloutCount.rollout_id == rollout.id
        )
    )
    for phase, key, count in found:
        if not 1 <= phase <= len(stats) or not count:
            continue
        stat = stats[phase - 1]
        if key == TARGETED:
            stat.targeted += count
        elif key == SUCCEEDED:
            stat.succeeded += count
        else:
            stat.counts[label_of(key)] += count
            if key in FAILED:
                stat.failed += count
    if rollout.soak:
        soaked = await db.execute(
            select(RolloutDevice.phase, func.count())
            .where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.soak_until <= now)
            .group_by(RolloutDevice.phase)
        )
        for phase, count in soaked:
            if 1 <= phase <= len(stats):
                stats[phase - 1].succeeded += count
    return stats


async def promote(db: AsyncSession, rollout: Rollout, now: datetime) -> int:
    """Count the applied devices whose soak has ended as succeeded (in the caller's
    transaction); each row is promoted once, whichever process gets there first."""
    if not rollout.soak:
        return 0
    rows = await db.execute(
        update(RolloutDevice)
        .where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.soak_until <= now)
        .values(soak_until=None)
        .returning(RolloutDevice.phase)
        .execution_options(synchronize_session=False)
    )
    deltas: Counter[tuple[int, str]] = Counter((phase, SUCCEEDED) for (phase,) in rows)
    await _add(db, rollout.id, deltas)
    return sum(deltas.values())


# --- rows --------------------------------------------------------------------------------------


def _soak_until(
    rollout: Rollout, status: str | None, applied_at: datetime | None
) -> datetime | None:
    if status != APPLIED or not rollout.soak:
        return None
    return (applied_at or rollout.updated_at) + timedelta(seconds=rollout.soak)


async def place(
    db: AsyncSession,
    rollout: Rollout,
    serial: str,
    phase: int,
    now: datetime,
    *,
    status: str | None = None,
    applied_at: datetime | None = None,
) -> bool:
    """Give the device its row in ``phase`` unless it has one, and count it. True when added."""
    soak_until = _soak_until(rollout, status, applied_at)
    added = await db.execute(
        insert(db, RolloutDevice)
        .values(
            rollout_id=rollout.id,
            device_serial=serial,
            phase=phase,
            status=status,
            soak_until=soak_until,
            updated_at=now,
        )
        .on_conflict_do_nothing()
        .returning(RolloutDevice.phase)
    )
    if added.first() is None:
        return False
    await _add(db, rollout.id, _deltas(phase, Counter(), _weight(status, soak_until)))
    return True


async def note(
    db: AsyncSession,
    rollout: Rollout,
    serial: str,
    tags: Mapping[str, str] | None,
    status: str,
    applied_at: datetime | None,
    now: datetime,
) -> None:
    """The device's status in the rollout's deployment is now ``status``: move it in its
    phase's counts. A device without a row gets one (it reported about the deployment, so it
    counts) in the phase that admits it (``tags``: the device's; None: no row is made)."""
    for _ in range(2):
        row = (
            await db.execute(
                select(RolloutDevice.phase, RolloutDevice.status, RolloutDevice.soak_until)
                .where(
                    RolloutDevice.rollout_id == rollout.id, RolloutDevice.device_serial == serial
                )
                .with_for_update()
            )
        ).first()
        if row is not None:
            break
        if tags is None:
            return
        phase = phase_of(phases_of(rollout), rollout.deployment_id, serial, tags)
        if phase is None:
            return
        if await place(db, rollout, serial, phase, now, status=status, applied_at=applied_at):
            return
    else:
        return
    phase, before, soaking = row
    if before == status:
        return  # applied again: it keeps its soak
    if status == APPLIED:
        soak_until = _soak_until(rollout, status, applied_at)
        if soak_until is not None and soak_until <= now:
            soak_until = None
    else:
        soak_until = None
    await db.execute(
        update(RolloutDevice)
        .where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.device_serial == serial)
        .values(status=status, soak_until=soak_until, updated_at=now)
        .execution_options(synchronize_session=False)
    )
    await _add(
        db, rollout.id, _deltas(phase, _weight(before, soaking), _weight(status, soak_until))
    )


async def forget(db: AsyncSession, serial: str, rollout_id: int | None = None) -> None:
    """Remove the device's rows (of one rollout, or all) and its counts: a deleted device, or
    one the deployment no longer targets before it ever reported."""
    query = delete(RolloutDevice).where(RolloutDevice.device_serial == serial)
    if rollout_id is not None:
        query = query.where(RolloutDevice.rollout_id == rollout_id)
    gone = await db.execute(
        query.returning(
            RolloutDevice.rollout_id,
            RolloutDevice.phase,
            RolloutDevice.status,
            RolloutDevice.soak_until,
        ).execution_options(synchronize_session=False)
    )
    by_rollout: dict[int, Counter[tuple[int, str]]] = {}
    for rollout, phase, status, soak_until in gone:
        counter = by_rollout.setdefault(rollout, Counter())
        for key, n in _weight(status, soak_until).items():
            counter[(phase, key)] -= n
    for rollout in sorted(by_rollout):
        await _add(db, rollout, by_rollout[rollout])


# --- the start: one pass over the registry -----------------------------------------------------


@dataclass(frozen=True)
class Seed:
    serial: str
    phase: int
    status: str | None
    soak_until: datetime | None


def seeds(
    rollout: Rollout,
    deployment: Deployment,
    artifact: Artifact,
    devices: Iterable[Device],
    statuses: Mapping[str, tuple[str, datetime | None]],
    members: frozenset[str] | None = None,
) -> list[Seed]:
    """The rows of ``devices`` in the rollout: those the deployment targets now (for a frozen
    rollout given ``members``: those of the snapshot) or that already stand in the deployment
    (``statuses``: serial -> (status, applied_at)), in the phase that admits them."""
    phases = phases_of(rollout)
    required = parse_condition(deployment.condition)
    wants: dict[str | None, bool] = {}  # by version: a fleet runs few
    found: list[Seed] = []
    for device in devices:
        standing = statuses.get(device.serial)
        if standing is None:
            if members is not None and device.serial not in members:
                continue
            if not matches(required, device_tags(device)) or not board_fits(artifact, device):
                continue
            version = device.version
            if version not in wants:
                wants[version] = wanted(deployment, artifact, version)
            if not wants[version]:
                continue
        phase = phase_of(phases, deployment.id, device.serial, device_tags(device))
        if phase is None:
            continue
        status, applied_at = standing if standing is not None else (None, None)
        found.append(Seed(device.serial, phase, status, _soak_until(rollout, status, applied_at)))
    return found


async def seed(
    db: AsyncSession, rollout: Rollout, deployment: Deployment, artifact: Artifact, now: datetime
) -> int:
    """Rows for the devices registered now (one paged pass over the registry, at the start;
    rows already made are kept); returns how many were added."""
    statuses = {
        serial: (status, applied_at)
        for serial, status, applied_at in await db.execute(
            select(
                DeploymentDevice.device_serial,
                DeploymentDevice.status,
                DeploymentDevice.applied_at,
            ).where(DeploymentDevice.deployment_id == deployment.id)
        )
    }
    added, after = 0, ""
    while True:
        page = list(
            await db.execute(
                select(Device.serial, Device.product, Device.tags, Device.board, Device.version)
                .where(Device.serial > after)
                .order_by(Device.serial)
                .limit(SEED_PAGE)
            )
        )
        if not page:
            return added
        after = page[-1].serial
        # the rows carry what targeting reads of a device (serial, product, tags, board, version)
        found = seeds(rollout, deployment, artifact, cast("list[Device]", page), statuses)
        if found:
            rows = await db.execute(  # executemany: one statement per batch of rows
                insert(db, RolloutDevice)
                .on_conflict_do_nothing()
                .returning(RolloutDevice.phase, RolloutDevice.status, RolloutDevice.soak_until),
                [
                    {
                        "rollout_id": rollout.id,
                        "device_serial": s.serial,
                        "phase": s.phase,
                        "status": s.status,
                        "soak_until": s.soak_until,
                        "updated_at": now,
                    }
                    for s in found
                ],
            )
            deltas: Counter[tuple[int, str]] = Counter()
            for phase, status, soak_until in rows:
                added += 1
                for key, n in _weight(status, soak_until).items():
                    deltas[(phase, key)] += n
            await _add(db, rollout.id, deltas)
