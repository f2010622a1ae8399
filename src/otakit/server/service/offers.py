"""Offers: which artifact a device gets now.

A device gets the best active deployment (not cancelled, not expired) that targets it
(targeting.targets: its tags match the condition, the artifact is for its board when it names
one, and its version is strictly newer than the device's; a deployment marked ``downgrade`` may
offer any other version). Best is :func:`rank`: the highest priority (0 unless the operator set
one, an override), then the highest artifact version (protocols.md version order), then the
newest deployment.

A deployment with a rollout (rollouts.py) is offered only to the devices its rollout admits at
the time: its phase is open, the rollout runs, the clock is inside its maintenance window.
:func:`offer_for` is the one call for "what does this device get now"; it loads what the rollout
needs to know about the device (:class:`rollouts.Standing`).

What is offered changes rarely and is asked for on every check-in, so each process keeps the
active offers and the products in memory (:func:`catalogue`), tagged with the offers revision
(revision.py) they were read at; a check-in reads the revision (one row) and reloads only when
it moved. A device's standing (its statuses and rollout rows) is loaded only when some active
offer targets it, so the common "nothing for you" answer costs no query of its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any, TypeVar

from sqlalchemy import inspect, select
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.protocol.states import UNDECIDED, DeviceState
from otakit.server.models import (
    Artifact,
    ArtifactDelta,
    Deployment,
    DeploymentDevice,
    Device,
    Product,
    Rollout,
    utcnow,
)
from otakit.server.service import deltas, revision, rollouts
from otakit.server.targeting import (
    GROUP_TAG,
    PRODUCT_TAG,
    board_fits,
    device_tags,
    matches,
    parse_condition,
    version_of,
    wanted,
)


@dataclass(frozen=True)
class Offer:
    deployment: Deployment
    artifact: Artifact
    rollout: Rollout | None = None  # when the deployment is phased


def rank(offer: Offer) -> tuple[int, tuple[int, ...], int]:
    """Sort key, highest best: the operator's priority, then the artifact's version (one that
    does not parse ranks below every version), then the newest deployment."""
    version = version_of(offer.artifact.version)
    return (
        offer.deployment.priority or 0,
        version.parts if version is not None else (-1,),
        offer.deployment.id or 0,  # None: not stored yet
    )


def best_first(offers: Iterable[Offer]) -> list[Offer]:
    """``offers`` in the order a device is offered them (:func:`rank`)."""
    return sorted(offers, key=rank, reverse=True)


async def active(session: AsyncSession, now: datetime | None = None) -> list[Offer]:
    """Active deployments with their artifacts and rollouts, best first (:func:`rank`; there
    are few active deployments, so they are ordered here rather than by the database). Read
    from the database each time: check-ins use :func:`catalogue`."""
    now = now or utcnow()
    rows = await session.execute(
        select(Deployment, Artifact, Rollout)
        .join(Artifact, Artifact.id == Deployment.artifact_id)
        .outerjoin(Rollout, Rollout.deployment_id == Deployment.id)
        .where(Deployment.cancelled_at.is_(None), Deployment.expires_at > now)
    )
    return best_first(Offer(d, a, r) for d, a, r in rows)


@dataclass(frozen=True)
class ProductInfo:
    board: str | None
    anonymous: bool


@dataclass(frozen=True)
class Catalogue:
    """What every device's offer is chosen from, as of one offers revision: the deployments
    active when it was read (best first) and the products. Shared by the requests of one
    process: its rows are copies that belong to no database session; never change them."""

    revision: int
    loaded_at: datetime
    offers: tuple[Offer, ...]
    products: Mapping[str, ProductInfo] = field(default_factory=dict)

    def active(self, now: datetime) -> list[Offer]:
        """The offers still active at ``now`` (one may have expired since it was read)."""
        return [o for o in self.offers if o.deployment.expires_at > now]

    @property
    def anonymous_products(self) -> set[str]:
        return {name for name, p in self.products.items() if p.anonymous}

    def product_board(self, offer: Offer | None) -> str | None:
        """The board of the product an offer is for (the job's Board when the artifact names
        none)."""
        if offer is None:
            return None
        name = _required(offer.deployment.condition).get(PRODUCT_TAG) or offer.artifact.product
        product = self.products.get(name) if name else None
        return product.board if product else None


# one catalogue per database engine in this process (tests run several servers in one process)
_catalogues: weakref.WeakKeyDictionary[Any, Catalogue] = weakref.WeakKeyDictionary()

_Row = TypeVar("_Row", Deployment, Artifact, Rollout)


def _copy(row: _Row) -> _Row:
    """A copy of ``row``'s columns that no session holds (so no rollback or commit of the
    session that read it can expire it, and no request changes the shared copy)."""
    mapper = inspect(type(row))
    return type(row)(**{a.key: getattr(row, a.key) for a in mapper.column_attrs})


def cached(bind: Any, at: int, now: datetime) -> Catalogue | None:
    """This process's catalogue of engine ``bind`` (a session's ``get_bind()``) when it is of
    offers revision ``at`` (and was read before ``now``), else None: :func:`catalogue` reads
    it then."""
    found = _catalogues.get(bind)
    if found is not None and found.revision == at and found.loaded_at <= now:
        return found
    return None


async def catalogue(
    session: AsyncSession, now: datetime | None = None, *, at: int | None = None
) -> Catalogue:
    """The catalogue of the current offers revision (``at``: the revision the caller already
    read, e.g. with the device: :func:`revision.column`). Reads the database only when the
    revision moved since this process last read it."""
    now = now or utcnow()
    current = at if at is not None else await revision.current(session)
    key = session.get_bind()
    found_cached = cached(key, current, now)
    if found_cached is not None:
        return found_cached
    rows = await session.execute(
        select(Deployment, Artifact, Rollout)
        .join(Artifact, Artifact.id == Deployment.artifact_id)
        .outerjoin(Rollout, Rollout.deployment_id == Deployment.id)
        .where(Deployment.cancelled_at.is_(None), Deployment.expires_at > now)
    )
    found = best_first(
        Offer(_copy(d), _copy(a), _copy(r) if r is not None else None) for d, a, r in rows
    )
    products = {
        name: ProductInfo(board, bool(anonymous))
        for name, board, anonymous in await session.execute(
            select(Product.name, Product.board, Product.anonymous)
        )
    }
    loaded = Catalogue(current, now, tuple(found), products)
    _catalogues[key] = loaded
    return loaded


@lru_cache(maxsize=1024)
def _required(condition: str) -> dict[str, str]:
    """A deployment's parsed condition (do not change the dict: it is shared)."""
    return parse_condition(condition)


def targeting(device: Device, offers: Iterable[Offer]) -> list[Offer]:
    """The offers that target ``device`` before rollouts have their say: the condition matches
    its tags, the board fits, the version is wanted."""
    tags = device_tags(device)
    return [
        o
        for o in offers
        if matches(_required(o.deployment.condition), tags)
        and board_fits(o.artifact, device)
        and wanted(o.deployment, o.artifact, device.version)
    ]


def select_offer(
    device: Device,
    offers: Sequence[Offer],
    *,
    standing: rollouts.Standing | None = None,
    now: datetime | None = None,
) -> Offer | None:
    """The best offer (:func:`rank`) for ``device``: its target matches, its board fits, its
    version is wanted, the device did not revert it already, and its rollout (if any) admits
    the device at ``now``. Pass the device's ``standing`` (or use :func:`offer_for`): without it
    frozen rollouts admit nobody and a revert is not known."""
    tags = device_tags(device)
    now = now or utcnow()
    for offer in best_first(offers):
        if not matches(_required(offer.deployment.condition), tags):
            continue
        if standing is not None and _reverted(standing, offer.deployment.id):
            continue
        if not board_fits(offer.artifact, device):
            continue
        if not wanted(offer.deployment, offer.artifact, device.version):
            continue
        if offer.rollout is not None and not rollouts.admits(offer.rollout, device, standing, now):
            continue
        return offer
    return None


def _reverted(standing: rollouts.Standing, deployment_id: int) -> bool:
    return standing.statuses.get(deployment_id, (None, None))[0] == DeviceState.REVERTED


def _phased(offers: Iterable[Offer]) -> list[tuple[Deployment, Artifact, Rollout]]:
    return [(o.deployment, o.artifact, o.rollout) for o in offers if o.rollout is not None]


async def offer_for(
    session: AsyncSession,
    device: Device,
    now: datetime | None = None,
    *,
    among: Callable[[Offer], bool] | None = None,
    known: Catalogue | None = None,
) -> Offer | None:
    """What ``device`` is offered now (``among``: only offers this accepts; ``known``: the
    catalogue the caller already has). Its standing is loaded only when some offer targets
    it."""
    now = now or utcnow()
    found = known or await catalogue(session, now)
    candidates = targeting(device, (o for o in found.active(now) if among is None or among(o)))
    if not candidates:
        return None
    standing = await rollouts.standing_of(session, device, _phased(candidates), now)
    return select_offer(device, candidates, standing=standing, now=now)


async def reportable(
    session: AsyncSession, device: Device, deployment_id: int, now: datetime | None = None
) -> bool | None:
    """Whether ``device`` may report about deployment ``deployment_id`` (None: no such
    deployment). It may when it already stands in it, or when the deployment targets it (its
    condition matches the device's tags, its board fits) and, if phased, the rollout has opened
    the device's phase (or the device is downloading it): a report counts only for what was
    offered to the device, so no device can steer another product's or phase's rollout."""
    found = (
        await session.execute(
            select(Deployment, Artifact, Rollout)
            .join(Artifact, Artifact.id == Deployment.artifact_id)
            .outerjoin(Rollout, Rollout.deployment_id == Deployment.id)
            .where(Deployment.id == deployment_id)
        )
    ).one_or_none()
    if found is None:
        return None
    deployment, artifact, rollout = found
    if await session.get(DeploymentDevice, (deployment_id, device.serial)) is not None:
        return True
    if not matches(_required(deployment.condition), device_tags(device)):
        return False
    if artifact.board and device.board and artifact.board != device.board:
        return False
    if rollout is None:
        return True
    standing = await rollouts.standing_of(
        session, device, [(deployment, artifact, rollout)], now or utcnow()
    )
    return rollouts.may_download(rollout, device, standing)


async def attribute(
    session: AsyncSession,
    device: Device,
    now: datetime | None = None,
    *,
    artifact_id: str | None = None,
) -> int | None:
    """The deployment a report without a deployment id is about: the update on offer (worked
    out before an applied version is kept), else the device's latest one still under way (a
    rollout may have paused its offer, or the device may already run the new version)."""
    offer = await offer_for(session, device, now)
    if offer is not None and artifact_id in (None, offer.artifact.id):
        return offer.deployment.id
    query = (
        select(DeploymentDevice.deployment_id)
        .join(Deployment, Deployment.id == DeploymentDevice.deployment_id)
        .where(
            DeploymentDevice.device_serial == device.serial,
            DeploymentDevice.status.in_((*UNDECIDED, DeviceState.APPLIED)),
        )
        .order_by(DeploymentDevice.updated_at.desc())
        .limit(1)
    )
    if artifact_id is not None:
        query = query.where(Deployment.artifact_id == artifact_id)
    return await session.scalar(query)


def select_for_products(
    products: set[str], offers: Sequence[Offer], now: datetime | None = None
) -> Offer | None:
    """For devices that do not identify themselves: the best offer (:func:`rank`) aimed at one
    of ``products`` (a phased deployment only once its rollout completed)."""
    now = now or utcnow()
    for offer in best_first(offers):
        required = _required(offer.deployment.condition)
        if required.get(PRODUCT_TAG) in products and set(required) <= {PRODUCT_TAG, GROUP_TAG}:
            if offer.rollout is not None and not rollouts.admits_anonymous(offer.rollout, now):
                continue
            return offer
    return None


async def anonymous_offer(
    session: AsyncSession,
    products: set[str],
    now: datetime,
    *,
    version: str | None = None,
    among: Callable[[Offer], bool] | None = None,
    known: Catalogue | None = None,
) -> Offer | None:
    """What the anonymous devices of ``products`` are offered (``version``: the one the
    device says it runs, when it says)."""
    found = known or await catalogue(session, now)
    candidates = [
        o
        for o in found.active(now)
        if (among is None or among(o)) and wanted(o.deployment, o.artifact, version)
    ]
    return select_for_products(products & found.anonymous_products, candidates, now)


async def product_of(session: AsyncSession, artifact_id: str, now: datetime) -> str | None:
    """The anonymous product whose offer ``artifact_id`` is (the file paths without a product),
    or None."""
    found = await catalogue(session, now)
    for product in sorted(found.anonymous_products):
        offer = select_for_products({product}, found.active(now), now)
        if offer is not None and offer.artifact.id == artifact_id:
            return product
    return None


async def may_fetch(
    session: AsyncSession, device: Device, artifact_id: str, now: datetime
) -> str | None:
    """Why ``device`` may not fetch the artifact's file, or None when it may: a deployment of
    it targets the device and, when every such deployment is phased, one of their rollouts
    lets the device download (it was offered it, or is downloading it)."""
    found = await catalogue(session, now)
    tags = device_tags(device)
    candidates = [
        o
        for o in found.active(now)
        if o.artifact.id == artifact_id and matches(_required(o.deployment.condition), tags)
    ]
    if not candidates:
        return "this file is not deployed to this device"
    if all(o.rollout is not None for o in candidates):
        standing = await rollouts.standing_of(session, device, _phased(candidates), now)
        if not any(
            rollouts.may_download(o.rollout, device, standing) for o in candidates if o.rollout
        ):
            return "this file is not offered to this device yet"
    return None


# --- deltas ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeltaChoice:
    """What a check-in with an offer learns about deltas: the ready one to offer (None: the
    full image), and the compression to queue one in (None: nothing to queue)."""

    delta: ArtifactDelta | None
    queue: str | None = None


NO_DELTA = DeltaChoice(None)


async def delta_for(
    session: AsyncSession,
    offer: Offer,
    serial: str,
    base_sha256: str,
    accepts: Sequence[str],
    *,
    preferred: str,
) -> DeltaChoice:
    """The delta ``offer`` comes with for device ``serial``, which runs the image whose
    image_digest is ``base_sha256`` and applies the compressions ``accepts`` (its order: the
    device's preference): a ``ready`` delta of the offered image from that base, unless the
    device reported a failed delta for this deployment (``DeploymentDevice.delta_error``).

    One statement, on the unique index (artifact, base, compression), with the device's
    ``delta_error`` as a scalar subquery. When none is ready and no delta of that base exists
    in ``preferred`` (the compression the server makes deltas in) and the device applies that
    one, the choice says to queue it (deltas.queue, which finds out whether the base is a known
    image; this check-in gets the full image)."""
    artifact = offer.artifact
    if (
        artifact.kind != "image"
        or artifact.image_sha256 is None
        or artifact.image_sha256 == base_sha256
        or not accepts
    ):
        return NO_DELTA
    failed = (
        select(DeploymentDevice.delta_error)
        .where(
            DeploymentDevice.deployment_id == offer.deployment.id,
            DeploymentDevice.device_serial == serial,
        )
        .scalar_subquery()
    )
    rows = (
        await session.execute(
            select(failed, ArtifactDelta).where(
                ArtifactDelta.artifact_id == artifact.id,
                ArtifactDelta.base_sha256 == base_sha256,
            )
        )
    ).all()
    made = {delta.compression: delta for _, delta in rows}
    error = next((e for e, _ in rows if e is not None), None)
    chosen = None
    if error is None:
        chosen = next(
            (
                made[c]
                for c in accepts
                if c in made
                and made[c].state == deltas.READY
                and made[c].blob_key is not None
                and made[c].size is not None
            ),
            None,
        )
    if chosen is None and error is None and preferred in accepts and preferred not in made:
        return DeltaChoice(None, preferred)
    return DeltaChoice(chosen)


async def may_fetch_delta(
    session: AsyncSession, serial: str, delta_id: int, now: datetime
) -> tuple[ArtifactDelta | None, str | None]:
    """The delta ``delta_id`` and why device ``serial`` may not fetch it (None: it may): the
    delta is ready and its image is one the device may fetch (:func:`may_fetch`), as an
    artifact download is authorised."""
    delta = await session.get(ArtifactDelta, delta_id)
    if delta is None or delta.state != deltas.READY or delta.blob_key is None:
        return None, "no such file"
    device = await session.get(Device, serial)
    if device is None:
        return delta, "this file is not deployed to this device"
    return delta, await may_fetch(session, device, delta.artifact_id, now)
