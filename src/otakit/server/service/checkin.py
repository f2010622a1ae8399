"""A device's visits: check-ins and reports, whichever way they come (the JSON device API, the
legacy job document and result routes, the MQTT publisher). The adapters parse, call one of
these and format; the rules are here once:

- ``last_seen`` is written at most once per :data:`LAST_SEEN_RESOLUTION` for a device that only
  polls (a report always writes it).
- A check-in keeps what the device says about itself (board, manufacturer, version) and, when
  that may show the end of an update (a new version, an update under way, a boot counter),
  what it means (reports.note_checkin).
- The offer is offers.offer_for's; a download whose rollout was aborted is called off once.
- An otakit agent that says which image it runs (``image_sha256``, kept on the device) and which
  delta compressions it applies gets, with an offer, the ready delta from that image
  (offers.delta_for, one statement); when none was made yet, one is queued (deltas.queue, made
  in the background) and this check-in gets the full image. A device that said neither, or
  that reported a failed delta for the deployment, gets the full image only.
- A report counts for the deployment it names only when that deployment was offered to the
  device (offers.reportable), else for the one it is about (offers.attribute); it is kept as
  history capped at the server's ``history_per_device``; a result from a device that does not
  identify itself counts for no rollout and is kept apart (``anonymous_history``).

Every function takes ``now`` (the rollout engine's clock) and leaves the commit to the caller,
which then hands the returned deployment ids to the rollout engine (``engine.changed``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import (
    AmbiguousError,
    ForbiddenError,
    NotFoundError,
    NotOfferedError,
    UnauthorizedError,
)
from otakit.protocol import states
from otakit.server import anonymous, identity
from otakit.server.models import ArtifactDelta, DeploymentDevice, Device, Rollout
from otakit.server.service import deltas, offers, reports, revision, rollouts
from otakit.server.targeting import version_of

LAST_SEEN_RESOLUTION = timedelta(seconds=60)

# what a check-in may tell about the device, and the job document key each must fit
JOB_FIELDS = {"board": "Board", "manufacturer": "Manufacturer", "manufacturer_id": "ManufacturerId"}

# the errors of a download under way that was told to stop: the abort notice, and a hawkBit
# device's answer to its cancelAction (service/ddi.py); none of them is told again
CANCELLED = "cancelled"
CANCEL_REJECTED = "cancel rejected"
TOLD_TO_STOP = (rollouts.ABORTED_ERROR, CANCELLED, CANCEL_REJECTED)


async def load(db: AsyncSession, serial: str) -> tuple[Device | None, int]:
    """The device and the offers revision, in one statement."""
    row = (
        await db.execute(select(Device, revision.column()).where(Device.serial == serial))
    ).one_or_none()
    if row is None:
        return None, await revision.current(db)
    return row[0], row[1] or 0


def seen_due(last_seen: datetime | None, now: datetime) -> bool:
    """Whether a visit at ``now`` is to be written (:data:`LAST_SEEN_RESOLUTION`)."""
    return last_seen is None or now - last_seen > LAST_SEEN_RESOLUTION


def seen(device: Device, now: datetime) -> None:
    """Note the device's visit, at most once per :data:`LAST_SEEN_RESOLUTION`."""
    if seen_due(device.last_seen, now):
        device.last_seen = now


@dataclass(frozen=True)
class Abort:
    """Stop the download of this deployment and discard it: its rollout was aborted."""

    deployment_id: int
    reason: str


@dataclass
class CheckedIn:
    offer: offers.Offer | None
    abort: Abort | None = None
    changed: set[int] = field(default_factory=set)  # deployments whose standing changed
    delta: ArtifactDelta | None = None  # the offer's delta, for a device that can apply it


def _new_version(device: Device, version: str | None) -> bool:
    if version is None or version == device.version:
        return False
    parsed = version_of(version)
    return parsed is None or parsed != version_of(device.version)


async def check_in(
    db: AsyncSession,
    device: Device,
    now: datetime,
    *,
    at: int | None = None,
    version: str | None = None,
    board: str | None = None,
    manufacturer: str | None = None,
    manufacturer_id: str | None = None,
    boots: int | None = None,
    image_sha256: str | None = None,
    delta: Sequence[str] | None = None,
    compression: str = "lzma",
    offer: bool = True,
    among: Callable[[offers.Offer], bool] | None = None,
) -> CheckedIn:
    """A registered device asks what to do (``at``: the offers revision read with it;
    ``offer`` False: only note the visit; ``among``: only offers this accepts).
    ``image_sha256`` (the image_digest of what it runs) and ``delta`` (the compressions it
    applies, its preference first): with both, an offer may come with a delta
    (:attr:`CheckedIn.delta`); ``compression``: the one the server makes deltas in."""
    told = {"board": board, "manufacturer": manufacturer, "manufacturer_id": manufacturer_id}
    for name, value in told.items():
        if value is not None:
            identity.check(name, JOB_FIELDS[name], value)
            if getattr(device, name) != value:
                setattr(device, name, value)
    version_changed = _new_version(device, version)
    if version_changed:
        device.version = version
    if image_sha256 is not None and image_sha256 != device.image_sha256:
        device.image_sha256 = image_sha256
    seen(device, now)
    changed: set[int] = set()
    if version_changed or device.status in states.UNDECIDED or boots is not None:
        changed = await reports.note_checkin(db, device, boots=boots, now=now)
    if not offer:
        return CheckedIn(None, None, changed)
    known = await offers.catalogue(db, now, at=at)
    found = await offers.offer_for(db, device, now, among=among, known=known)
    abort = await _abort_notice(db, device, now) if found is None else None
    offered = None
    if found is not None and image_sha256 is not None and delta:
        offered = await offered_delta(
            db, found, device.serial, image_sha256, delta, compression, now
        )
    return CheckedIn(found, abort, changed, offered)


async def offered_delta(
    db: AsyncSession,
    offer: offers.Offer,
    serial: str,
    base_sha256: str,
    accepts: Sequence[str],
    compression: str,
    now: datetime,
) -> ArtifactDelta | None:
    """The offer's ready delta for device ``serial`` running the image ``base_sha256`` and
    applying ``accepts`` (offers.delta_for); when none was made in ``compression`` (the
    server's), one is queued (made in the background, when the base is a known image) and None
    returned. Any adapter that offers deltas (the JSON check-in, the MQTT publisher) calls
    this; the caller commits."""
    choice = await offers.delta_for(db, offer, serial, base_sha256, accepts, preferred=compression)
    if choice.queue is not None:
        await deltas.queue(db, offer.artifact, base_sha256, now, compression=choice.queue)
    return choice.delta


def seen_cutoff(now: datetime) -> datetime:
    """A visit at ``now`` is due when ``last_seen`` is before this (:func:`seen_due`)."""
    return now - LAST_SEEN_RESOLUTION


def nothing_but_the_visit(
    device: Device,
    known: offers.Catalogue,
    now: datetime,
    *,
    version: str | None = None,
    board: str | None = None,
    manufacturer: str | None = None,
    manufacturer_id: str | None = None,
    boots: int | None = None,
    image_sha256: str | None = None,
) -> bool:
    """Whether :func:`check_in` of ``device`` (as stored) with what it says would write
    nothing but ``last_seen`` (when :func:`seen_due`) and answer nothing: what it says is what
    is stored, the check-in shows no end of an update (reports.note_checkin), no abort notice
    can be due and no active offer of ``known`` targets it. False means "ask check_in" (the
    idle fast path, api/idle.py, decides only the True case itself, and writes the due visit
    with :func:`seen_due`'s rule in SQL, so a concurrent writer's visit is not written twice)."""
    told = {"board": board, "manufacturer": manufacturer, "manufacturer_id": manufacturer_id}
    for name, value in told.items():
        if value is not None and (
            getattr(device, name) != value or identity.problem(JOB_FIELDS[name], value)
        ):
            return False
    if version is not None and version != device.version:
        return False
    if image_sha256 is not None and image_sha256 != device.image_sha256:
        return False
    if boots is not None:
        return False
    if device.status in states.UNDECIDED or device.status in states.DOWNLOADING:
        return False
    return not offers.targeting(device, known.active(now))


async def _abort_notice(db: AsyncSession, device: Device, now: datetime) -> Abort | None:
    """The download under way whose rollout was aborted, if any; told once."""
    if device.status not in states.DOWNLOADING:
        return None
    found = (
        await db.execute(
            select(DeploymentDevice, Rollout)
            .join(Rollout, Rollout.deployment_id == DeploymentDevice.deployment_id)
            .where(
                DeploymentDevice.device_serial == device.serial,
                DeploymentDevice.status.in_(states.DOWNLOADING),
                or_(
                    DeploymentDevice.error.is_(None),
                    DeploymentDevice.error.not_in(TOLD_TO_STOP),
                ),
                Rollout.state == rollouts.ABORTED,
            )
        )
    ).first()
    if found is None:
        return None
    row, rollout = found
    await reports.set_standing(
        db, row, states.DeviceState.INTERRUPTED, rollouts.ABORTED_ERROR, now, None, rollout=rollout
    )
    device.status, device.error = states.DeviceState.INTERRUPTED, rollouts.ABORTED_ERROR
    return Abort(row.deployment_id, rollout.reason or "rollout aborted")


# --- the MQTT publisher's requests -------------------------------------------------------------


@dataclass
class MqttOffer:
    offer: offers.Offer | None
    board: str | None = None  # the job's Board: the artifact's, else its product's
    device: Device | None = None  # None: a device the server does not know
    changed: set[int] = field(default_factory=set)


async def mqtt_request(
    db: AsyncSession,
    now: datetime,
    *,
    serial: str,
    product: str,
    version: str,
    explicit: bool,
    artifact_id: str | None,
    fits: Callable[[str | None], bool],
    image_sha256: str | None = None,
) -> MqttOffer:
    """What an MQTT device gets: a registered one (its ``serial``) checks in and is offered
    like over HTTP; one the server does not know gets what the anonymous products (its
    ``product``, when it names one) are offered. ``explicit`` (it asks for the image itself)
    skips the version check and the check-in; ``artifact_id`` pins the image its job named;
    ``fits`` says whether a board is the device's (the topic's, with or without APP_);
    ``image_sha256``: the image digest an otakit agent says it runs, kept on the device by the
    check-in (the publisher chooses the delta, server/publisher.py)."""

    def among(o: offers.Offer) -> bool:
        return fits(o.artifact.board) and (artifact_id is None or o.artifact.id == artifact_id)

    device, at = await load(db, serial) if serial else (None, await revision.current(db))
    known = await offers.catalogue(db, now, at=at)
    changed: set[int] = set()
    if device is not None:
        if not explicit:
            changed = (
                await check_in(
                    db,
                    device,
                    now,
                    at=at,
                    version=version or None,
                    offer=False,
                    image_sha256=image_sha256,
                )
            ).changed
        # the board was matched by ``fits``, with or without APP_; the rest is the offer's
        probe = Device(
            serial=device.serial,
            product=device.product,
            tags=dict(device.tags or {}),
            version=None if explicit else device.version,
            board=None,
        )
        found = await offers.offer_for(db, probe, now, among=among, known=known)
    else:
        products = {product} if product else known.anonymous_products
        found = await offers.anonymous_offer(
            db,
            products,
            now,
            version=None if explicit else (version or None),
            among=among,
            known=known,
        )
    board = None
    if found is not None:
        board = found.artifact.board or known.product_board(found)
        if not fits(board):
            found = None
    return MqttOffer(found, board, device, changed)


# --- reports -----------------------------------------------------------------------------------


async def report(
    db: AsyncSession,
    serial: str,
    now: datetime,
    *,
    status: str,
    error: str | None = None,
    version: str | None = None,
    boots: int | None = None,
    deployment_id: int | None = None,
    artifact_id: str | None = None,
    offered: bool = False,
    delta_error: str | None = None,
    keep: int,
) -> int | None:
    """A registered device's report or result. About ``deployment_id`` when given (it must
    have been offered to the device, unless ``offered`` says the caller knows it was: the
    MQTT session), else about the update on offer or under way (of ``artifact_id``, when the
    result names the file). ``delta_error``: why the delta of that deployment failed on the
    device (a DeltaError reason); from then on it is offered the full image only. Returns the
    deployment whose standing changed."""
    if deployment_id is None or not offered:
        device = await db.get(Device, serial)
        if device is None:
            raise NotFoundError(f"device {serial!r} is not registered")
        if deployment_id is None:
            deployment_id = await offers.attribute(db, device, now, artifact_id=artifact_id)
        else:
            allowed = await offers.reportable(db, device, deployment_id, now)
            if allowed is None:
                raise NotFoundError(f"deployment {deployment_id} not found")
            if not allowed:
                raise NotOfferedError(f"deployment {deployment_id} was not offered to this device")
    return await reports.record_status(
        db,
        serial=serial,
        deployment_id=deployment_id,
        status=status,
        error=error,
        version=version,
        boots=boots,
        now=now,
        keep=keep,
        delta_error=delta_error,
    )


# --- devices that do not identify themselves ---------------------------------------------------


@dataclass(frozen=True)
class Visitor:
    """An anonymous device, as far as it can be told apart (server/anonymous.py)."""

    product: str
    address: str
    user_agent: str


async def anonymous_product(db: AsyncSession, name: str | None, now: datetime) -> str:
    """The product whose anonymous devices a request is for: ``name``, or the one product that
    allows anonymous devices (with several, a device could get another product's image)."""
    known = await offers.catalogue(db, now)
    products = sorted(known.anonymous_products)
    if name is not None:
        if name not in products:
            raise UnauthorizedError(f"product {name!r} does not allow anonymous devices")
        return name
    if not products:
        raise UnauthorizedError("no product allows anonymous devices; send a token")
    if len(products) > 1:
        raise AmbiguousError(
            f"{len(products)} products allow anonymous devices ({', '.join(products[:4])}): "
            "configure the device with /products/NAME/ota_update.json (or /ota-update.bin)",
        )
    return products[0]


async def anonymous_check_in(
    db: AsyncSession, visitor: Visitor, now: datetime, *, keep: int
) -> tuple[offers.Offer | None, str | None]:
    """An anonymous device asks for its job: its offer and the job's board (the artifact's
    board, else its product's); its trace is kept."""
    known = await offers.catalogue(db, now)
    found = await offers.anonymous_offer(db, {visitor.product}, now, known=known)
    await _trace(db, visitor, found, now, keep)
    return found, found.artifact.board or known.product_board(found) if found else None


async def anonymous_fetch(
    db: AsyncSession,
    visitor: Visitor,
    now: datetime,
    *,
    artifact_id: str | None,
    starts: bool,
    keep: int,
) -> offers.Offer:
    """An anonymous device fetches the file its product's devices are offered (``artifact_id``
    None: whichever it is, the direct flow); ``starts``: the first range, from which on it
    counts as downloading."""
    found = await offers.anonymous_offer(db, {visitor.product}, now)
    if found is None:
        raise NotFoundError(f"no file is deployed to {visitor.product}'s anonymous devices")
    if artifact_id is not None and found.artifact.id != artifact_id:
        raise ForbiddenError(f"this file is not offered to {visitor.product}'s devices")
    if starts:
        await _trace(db, visitor, found, now, keep, states.DeviceState.DOWNLOADING)
    return found


async def anonymous_report(
    db: AsyncSession,
    visitor: Visitor,
    now: datetime,
    *,
    status: str,
    error: str | None,
    artifact_id: str | None,
    keep: int,
) -> None:
    """An anonymous device's result: kept as an anonymous report and in its trace; it counts
    for no rollout."""
    found = await offers.anonymous_offer(db, {visitor.product}, now)
    if found is not None and artifact_id is not None and found.artifact.id != artifact_id:
        found = None
    await reports.record_status(
        db,
        serial=None,
        deployment_id=found.deployment.id if found else None,
        status=status,
        error=error,
        now=now,
        keep=keep,
    )
    if found is not None:
        await _trace(db, visitor, found, now, keep, status, error)


async def _trace(
    db: AsyncSession,
    visitor: Visitor,
    offer: offers.Offer | None,
    now: datetime,
    keep: int,
    status: str | None = None,
    error: str | None = None,
) -> None:
    await anonymous.seen(
        db,
        product=visitor.product,
        address=visitor.address,
        user_agent=visitor.user_agent,
        deployment_id=offer.deployment.id if offer else None,
        now=now,
        keep=keep,
        status=status,
        error=error,
    )
