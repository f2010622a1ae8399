"""Deployments: deploy an artifact, cancel a deployment, list them with their counts.

A deployment offers an artifact to the devices its condition targets (targeting.py) until it is
cancelled or expires; offers.py decides who gets which. Making or cancelling one changes what
devices may be offered, so both bump the offers revision (revision.py) in their transaction.

Counts are the devices per state label (protocol/states.py) in a deployment: one grouped count
over that deployment's ``deployment_devices`` rows (indexed by deployment and status), read for
a whole page of deployments at once, never a row per device in Python. ``targeted`` is how many
registered devices the target matches now: one count over the devices' product (or group)
index per distinct target on a page; None for a condition on other tags (it could only be
counted by reading every device).

Deploying is idempotent: the same artifact to the same target (the same required tags: product,
group, board or condition) with the same priority and downgrade setting, while such a
deployment is active, gives that deployment back (``existing``), not a second one.

A deployment's artifact always has its SHA-1 and MD5 (what hawkBit DDI clients check): one
uploaded before they were kept gets them when it is deployed (artifacts.ensure_hashes).
Deploying an image queues deltas to it from the product's earlier images (deltas.plan).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import NotFoundError, OtakitError, UsageError
from otakit.image.delta import DEFAULT_COMPRESSION
from otakit.protocol import states
from otakit.server import identity
from otakit.server.blobs import BlobStore
from otakit.server.models import (
    AnonymousDevice,
    Artifact,
    Deployment,
    DeploymentDevice,
    Device,
    Rollout,
    utcnow,
)
from otakit.server.service import audit, deltas, revision
from otakit.server.service.artifacts import (
    MIN_PREFIX,
    ensure_hashes,
    ensure_image_digest,
    resolve,
)
from otakit.server.service.listings import DEFAULT_LIMIT, Key, Page, group_of, page
from otakit.server.targeting import (
    BOARD_TAG,
    GROUP_TAG,
    PRODUCT_TAG,
    board_term,
    parse_condition,
    product_group_condition,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeploymentSpec:
    """What to deploy to whom: a product (and group) or a tag condition, not both; ``board``:
    only the devices of that board. ``artifact_id``: the whole SHA-256 or a prefix of at least
    artifacts.MIN_PREFIX hex digits."""

    artifact_id: str
    product: str | None = None
    group: str | None = None
    condition: str | None = None
    priority: int = 0
    expiry_days: float = 365
    downgrade: bool = False
    board: str | None = None


@dataclass
class DeploymentView:
    """A deployment as the management API shows it. ``counts`` are the devices per state
    label (protocol/states.py LABELS: disjoint, as in /metrics and the dashboard)."""

    id: int
    artifact_id: str
    version: str
    condition: str
    priority: int
    downgrade: bool
    created_at: datetime
    expires_at: datetime
    cancelled_at: datetime | None
    active: bool
    counts: dict[str, int]
    anonymous: dict[str, int] = field(default_factory=dict)
    rollout_id: int | None = None
    targeted: int | None = None  # registered devices the target matches (None: not counted)
    existing: bool = False  # deploy(): an identical active deployment was given back


def is_active(deployment: Deployment, now: datetime) -> bool:
    return deployment.cancelled_at is None and deployment.expires_at > now


def condition_of(spec: DeploymentSpec) -> str:
    """The tag condition a spec targets (its board as one more term); UsageError if the spec
    names both or neither of product and condition, or the condition cannot be read."""
    if (spec.condition is None) == (spec.product is None):
        raise UsageError("give either product (and group) or condition")
    if spec.condition is not None:
        if spec.group:
            raise UsageError("group goes with product; put it in the condition instead")
        condition = spec.condition.strip()
        if spec.board:
            condition = f"{condition} AND {board_term(spec.board)}"
    else:
        condition = product_group_condition(spec.product or "", spec.group, spec.board)
    parse_condition(condition)
    return condition


async def _artifact(db: AsyncSession, artifact_id: str) -> Artifact:
    artifact = await db.get(Artifact, await resolve(db, artifact_id))
    if artifact is None:
        raise NotFoundError(f"artifact {artifact_id!r} not found", value=artifact_id)
    return artifact


async def new_deployment(
    db: AsyncSession,
    spec: DeploymentSpec,
    now: datetime | None = None,
    *,
    blobs: BlobStore,
    actor: str | None = None,
    delta_compression: str = DEFAULT_COMPRESSION,
) -> Deployment:
    """Add a deployment (flushed, not committed: a rollout may be created with it); with
    ``actor``, record ``deployment.create`` in the same transaction. An artifact without its
    SHA-1 and MD5 gets them from one read of its blob in ``blobs`` (stored by the same commit).

    An image artifact gets deltas queued from its product's earlier images
    (deltas.plan, in ``delta_compression``; made in the background, never here).

    Raises NotFoundError, UsageError and AmbiguousError (the artifact or the target), and
    BlobNotFoundError or BlobStoreError (an artifact without its hashes whose blob cannot be
    read)."""
    artifact = await _artifact(db, spec.artifact_id)
    condition = condition_of(spec)
    required = parse_condition(condition)
    identity.check_job_files(artifact.id, artifact.name, required.get(PRODUCT_TAG))
    await ensure_hashes(db, blobs, artifact)
    now = now or utcnow()
    await _plan_deltas(db, blobs, artifact, now, delta_compression)
    deployment = Deployment(
        artifact_id=artifact.id,
        condition=condition,
        priority=spec.priority,
        downgrade=spec.downgrade,
        created_at=now,
        expires_at=now + timedelta(days=spec.expiry_days),
    )
    db.add(deployment)
    await db.flush()
    if actor is not None:
        audit.record(
            db,
            actor=actor,
            action="deployment.create",
            target=f"deployment {deployment.id}",
            details={
                "artifact": artifact.id,
                "version": artifact.version,
                "condition": condition,
                **({"priority": spec.priority} if spec.priority else {}),
                **({"downgrade": True} if spec.downgrade else {}),
            },
        )
    await revision.bump(db)
    return deployment


async def _plan_deltas(
    db: AsyncSession, blobs: BlobStore, artifact: Artifact, now: datetime, compression: str
) -> None:
    """Queue the artifact's deltas (an image uploaded before image identities were kept gets
    its own first); a blob that is not a readable image only means no deltas."""
    if artifact.kind != "image":
        return
    try:
        await ensure_image_digest(db, blobs, artifact)
    except OtakitError as exc:
        log.warning("no deltas to artifact %s: %s", artifact.id[:MIN_PREFIX], exc.message)
        return
    await deltas.plan(db, artifact, now, compression=compression, blobs=blobs)


async def active_twin(
    db: AsyncSession, artifact_id: str, spec: DeploymentSpec, now: datetime | None = None
) -> Deployment | None:
    """An active deployment of ``artifact_id`` whose condition requires the same tags as the
    spec's, with its priority and downgrade setting (the oldest), or None. Reads the artifact's
    deployments (indexed)."""
    now = now or utcnow()
    required = parse_condition(condition_of(spec))
    rows = await db.scalars(
        select(Deployment)
        .where(
            Deployment.artifact_id == artifact_id,
            Deployment.cancelled_at.is_(None),
            Deployment.expires_at > now,
            Deployment.priority == spec.priority,
            Deployment.downgrade == spec.downgrade,
        )
        .order_by(Deployment.id)
    )
    for row in rows:
        try:
            if parse_condition(row.condition) == required:
                return row
        except UsageError:
            continue
    return None


async def deploy(
    db: AsyncSession,
    spec: DeploymentSpec,
    *,
    blobs: BlobStore,
    actor: str = audit.LOCAL,
    delta_compression: str = DEFAULT_COMPRESSION,
) -> DeploymentView:
    """Deploy an artifact: offered at once to every targeted device. If an active deployment
    of the same artifact to the same target exists, it is given back (``existing`` True) and
    nothing changes. Records ``deployment.create`` (by ``actor``) for a new one. ``blobs``:
    where an artifact without its SHA-1 and MD5 is read (:func:`new_deployment`)."""
    artifact = await _artifact(db, spec.artifact_id)
    twin = await active_twin(db, artifact.id, spec)
    if twin is not None:
        view = await get(db, twin.id)
        view.existing = True
        return view
    spec = replace(spec, artifact_id=artifact.id)
    deployment = await new_deployment(
        db, spec, blobs=blobs, actor=actor, delta_compression=delta_compression
    )
    await db.commit()
    return await get(db, deployment.id)


async def cancel(
    db: AsyncSession, deployment_id: int, *, actor: str = audit.LOCAL
) -> DeploymentView:
    """Stop offering a deployment (devices that got it keep it); cancelling again is a no-op.
    Records ``deployment.cancel`` (by ``actor``) when it stops one."""
    deployment = await _found(db, deployment_id)
    if deployment.cancelled_at is None:
        deployment.cancelled_at = utcnow()
        audit.record(
            db,
            actor=actor,
            action="deployment.cancel",
            target=f"deployment {deployment_id}",
            details={"artifact": deployment.artifact_id[:MIN_PREFIX]},
        )
        await revision.bump(db)
        await db.commit()
    return await get(db, deployment_id)


async def _found(db: AsyncSession, deployment_id: int) -> Deployment:
    deployment = await db.get(Deployment, deployment_id)
    if deployment is None:
        raise NotFoundError(f"deployment {deployment_id} not found")
    return deployment


async def get(db: AsyncSession, deployment_id: int) -> DeploymentView:
    deployment = await _found(db, deployment_id)
    return (await views(db, [deployment]))[0]


async def listing(
    db: AsyncSession,
    *,
    active: bool | None = None,
    artifact_id: str | None = None,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    now: datetime | None = None,
) -> Page[DeploymentView]:
    """A page of deployments, newest first, with their counts (a few queries a page)."""
    now = now or utcnow()
    query = select(Deployment)
    live = Deployment.cancelled_at.is_(None) & (Deployment.expires_at > now)
    if active is True:
        query = query.where(live)
    elif active is False:
        query = query.where(~live)
    if artifact_id:
        query = query.where(Deployment.artifact_id == await resolve(db, artifact_id))
    found: Page[Deployment] = await page(
        db,
        query,
        kind="deployments",
        keys=[Key(Deployment.id)],
        descending=True,
        limit=limit,
        cursor=cursor,
    )
    return Page(await views(db, found.items, now), found.next)


async def counts(db: AsyncSession, deployment_ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """Devices per state label in each deployment: one grouped count over their rows."""
    result = {i: states.empty_counts() for i in deployment_ids}
    if not result:
        return result
    rows = await db.execute(
        select(DeploymentDevice.deployment_id, DeploymentDevice.status, func.count())
        .where(DeploymentDevice.deployment_id.in_(list(result)))
        .group_by(DeploymentDevice.deployment_id, DeploymentDevice.status)
    )
    for deployment_id, status, count in rows:
        result[deployment_id][states.label_of(status)] += int(count)
    return result


async def anonymous_counts(
    db: AsyncSession, deployment_ids: Sequence[int]
) -> dict[int, dict[str, int]]:
    """Anonymous devices per state label (``Offered``: fetched the job only) in each."""
    result: dict[int, dict[str, int]] = {}
    if not deployment_ids:
        return result
    rows = await db.execute(
        select(AnonymousDevice.deployment_id, AnonymousDevice.status, func.count())
        .where(AnonymousDevice.deployment_id.in_(list(deployment_ids)))
        .group_by(AnonymousDevice.deployment_id, AnonymousDevice.status)
    )
    for deployment_id, status, count in rows:
        if deployment_id is None:
            continue
        shown = result.setdefault(deployment_id, {})
        label = "Offered" if status is None else states.label_of(status)
        shown[label] = shown.get(label, 0) + int(count)
    return result


async def views(
    db: AsyncSession, deployments: Sequence[Deployment], now: datetime | None = None
) -> list[DeploymentView]:
    """The views of ``deployments``: their versions, rollouts and counts in three queries."""
    now = now or utcnow()
    ids = [d.id for d in deployments]
    if not ids:
        return []
    versions: dict[int, str] = {}
    boards: dict[int, str | None] = {}
    for i, v, b in await db.execute(
        select(Deployment.id, Artifact.version, Artifact.board)
        .join(Artifact, Artifact.id == Deployment.artifact_id)
        .where(Deployment.id.in_(ids))
    ):
        versions[i], boards[i] = v, b
    rollout_ids: dict[int, int] = {
        d: r
        for d, r in await db.execute(
            select(Rollout.deployment_id, Rollout.id).where(Rollout.deployment_id.in_(ids))
        )
    }
    by_state = await counts(db, ids)
    anonymous = await anonymous_counts(db, ids)
    targeted = await targeted_counts(
        db, [(d.id, d.condition, boards.get(d.id)) for d in deployments]
    )
    result = []
    for d in deployments:
        shown = by_state[d.id]
        result.append(
            DeploymentView(
                id=d.id,
                artifact_id=d.artifact_id,
                version=versions.get(d.id, ""),
                condition=d.condition,
                priority=d.priority,
                downgrade=d.downgrade,
                created_at=d.created_at,
                expires_at=d.expires_at,
                cancelled_at=d.cancelled_at,
                active=is_active(d, now),
                counts=shown,
                anonymous={k: v for k, v in anonymous.get(d.id, {}).items() if v},
                rollout_id=rollout_ids.get(d.id),
                targeted=targeted.get(d.id),
            )
        )
    return result


_COUNTABLE = frozenset({PRODUCT_TAG, GROUP_TAG, BOARD_TAG})


async def targeted_counts(
    db: AsyncSession, targets: Sequence[tuple[int, str, str | None]]
) -> dict[int, int | None]:
    """Registered devices each deployment's target matches (``targets``: deployment id, its
    condition, its artifact's board). A condition of product, group and board terms is one
    count over the devices' product (or group) index, once per distinct target; a device's
    tags for these are its product, group and board columns (explicit tags that disagree with
    them are not looked at). Any other condition: None."""
    result: dict[int, int | None] = {}
    known: dict[tuple[tuple[str, str], ...], int] = {}
    for deployment_id, condition, artifact_board in targets:
        try:
            required = parse_condition(condition)
        except UsageError:
            result[deployment_id] = None
            continue
        if not set(required) <= _COUNTABLE or not ({PRODUCT_TAG, GROUP_TAG} & set(required)):
            result[deployment_id] = None
            continue
        key = tuple(sorted(required.items())) + ((("", artifact_board),) if artifact_board else ())
        if key not in known:
            query = select(func.count()).select_from(Device)
            if PRODUCT_TAG in required:
                query = query.where(Device.product == required[PRODUCT_TAG])
            if GROUP_TAG in required:
                query = query.where(group_of(db) == required[GROUP_TAG])
            if BOARD_TAG in required:
                query = query.where(Device.board == required[BOARD_TAG])
            if artifact_board:  # targeting.board_fits: a device of another board never gets it
                query = query.where(or_(Device.board.is_(None), Device.board == artifact_board))
            known[key] = int(await db.scalar(query) or 0)
        result[deployment_id] = known[key]
    return result
