"""The update server's metadata: SQLAlchemy 2 models (the schema is created by Alembic).

Everything that matters lives here or in the blob store, never in a server process, so several
workers or hosts on one PostgreSQL behave as one server.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp that always comes back timezone-aware (SQLite stores it without a zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    pass


class Setting(Base):
    """Server-wide values shared by every process (e.g. the URL signing key)."""

    __tablename__ = "settings"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Token(Base):
    """An API credential. Only a hash of the secret part is stored."""

    __tablename__ = "tokens"
    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    secret_hash: Mapped[str] = mapped_column(String(64))
    role: Mapped[str] = mapped_column(String(16))  # tokens.Role: admin, viewer, enroll, device
    product: Mapped[str | None] = mapped_column(String(64))
    group: Mapped[str | None] = mapped_column(String(64))
    device_serial: Mapped[str | None] = mapped_column(String(64), index=True)
    label: Mapped[str | None] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class Product(Base):
    """Per-product policy."""

    __tablename__ = "products"
    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    board: Mapped[str | None] = mapped_column(String(48))
    allow_raw: Mapped[bool] = mapped_column(Boolean, default=False)  # unsigned files (gateways)
    anonymous: Mapped[bool] = mapped_column(Boolean, default=False)  # original devices, no token
    self_register: Mapped[bool] = mapped_column(Boolean, default=False)  # unknown serials join
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class TrustedKey(Base):
    """A public key that artifacts are checked against."""

    __tablename__ = "trusted_keys"
    fingerprint: Mapped[str] = mapped_column(String(16), primary_key=True)
    key_type: Mapped[str] = mapped_column(String(16))
    pem: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)


class Device(Base):
    __tablename__ = "devices"
    serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    product: Mapped[str | None] = mapped_column(String(64), index=True)
    board: Mapped[str | None] = mapped_column(String(48))
    manufacturer: Mapped[str | None] = mapped_column(String(64))
    manufacturer_id: Mapped[str | None] = mapped_column(String(16))
    tags: Mapped[dict[str, str]] = mapped_column(JSON, default=dict)
    version: Mapped[str | None] = mapped_column(String(32))
    last_seen: Mapped[datetime | None] = mapped_column(UtcDateTime())
    status: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(String(64))
    status_version: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    # the enrollment token that registered it: the same token may enroll it again (a lost answer)
    enrolled_by: Mapped[str | None] = mapped_column(String(32))
    # image_digest of the image it last said it runs (check-in ``image_sha256``): a delta's base
    image_sha256: Mapped[str | None] = mapped_column(String(64))


class Artifact(Base):
    """An uploaded file, addressed by its SHA-256."""

    __tablename__ = "artifacts"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex
    # SHA-1 and MD5 hex, for clients that check those (hawkBit DDI); None for an artifact
    # uploaded before they were kept until service/artifacts.ensure_hashes fills them
    sha1: Mapped[str | None] = mapped_column(String(40))
    md5: Mapped[str | None] = mapped_column(String(32))
    name: Mapped[str] = mapped_column(String(128))
    container: Mapped[str] = mapped_column(String(64), default="ota")
    kind: Mapped[str] = mapped_column(String(16))  # image, package, raw
    version: Mapped[str] = mapped_column(String(32))
    size: Mapped[int] = mapped_column(BigInteger)
    board: Mapped[str | None] = mapped_column(String(48))
    product: Mapped[str | None] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(16))  # valid, unsigned, raw
    signed_by: Mapped[str | None] = mapped_column(String(16))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    # an MCUboot image (kind "image"): SHA-256 and size of the image proper (header to the end
    # of the TLVs, otakit.image.delta.image_digest), what a slot holds once it runs and what a
    # delta starts from or produces; None for other kinds, and for an image uploaded before
    # they were kept until service/artifacts.ensure_image_digest fills them
    image_sha256: Mapped[str | None] = mapped_column(String(64), index=True)
    image_size: Mapped[int | None] = mapped_column(BigInteger)


class ArtifactDelta(Base):
    """A binary delta (otakit.image.delta) that turns the image whose image_sha256 is
    ``base_sha256`` into the image artifact ``artifact_id`` (service/deltas.py).

    Queued when a deployment is created (the product's earlier images as bases) or when a
    device on a known base checks in; made in the background by a DeltaWorker, which claims a
    ``queued`` row (``making``, ``claimed_at``) and leaves it ``ready`` (the patch is the blob
    ``blob_key``, its SHA-256), ``not-smaller`` (not worth offering) or ``failed`` (``error``,
    one line). ``base_artifact_id``: the artifact the base came from, when known."""

    __tablename__ = "artifact_deltas"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    artifact_id: Mapped[str] = mapped_column(
        ForeignKey("artifacts.id", ondelete="CASCADE"), index=True
    )
    base_sha256: Mapped[str] = mapped_column(String(64))
    base_artifact_id: Mapped[str | None] = mapped_column(String(64))
    compression: Mapped[str] = mapped_column(String(16))
    state: Mapped[str] = mapped_column(String(16))  # queued making ready not-smaller failed
    progress: Mapped[int] = mapped_column(Integer, default=0)  # 0..100
    blob_key: Mapped[str | None] = mapped_column(String(64))
    size: Mapped[int | None] = mapped_column(BigInteger)
    error: Mapped[str | None] = mapped_column(String(200))
    claimed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    __table_args__ = (
        UniqueConstraint(
            "artifact_id", "base_sha256", "compression", name="ux_artifact_deltas_base"
        ),
        Index("ix_artifact_deltas_state", "state", "id"),
    )


class Deployment(Base):
    __tablename__ = "deployments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    artifact_id: Mapped[str] = mapped_column(ForeignKey("artifacts.id"), index=True)
    condition: Mapped[str] = mapped_column(
        Text
    )  # e.g. tags.productType='X' AND tags.deviceGroup='Y'
    priority: Mapped[int] = mapped_column(Integer, default=0)
    downgrade: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    cancelled_at: Mapped[datetime | None] = mapped_column(UtcDateTime())


class DeploymentDevice(Base):
    """Where one device stands in one deployment."""

    __tablename__ = "deployment_devices"
    deployment_id: Mapped[int] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), primary_key=True
    )
    device_serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    status: Mapped[str] = mapped_column(String(16))  # a §7 state, or "reverted"
    error: Mapped[str | None] = mapped_column(String(64))
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    # health gate (rollout.py): when the device first ran the new version, and its boot counter
    # then and since (reported in the optional ``boots`` field of check-ins and reports)
    applied_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    boots_at_apply: Mapped[int | None] = mapped_column(BigInteger)
    boots: Mapped[int | None] = mapped_column(BigInteger)
    # why this device's delta failed (a DeltaError reason it reported): full image only since
    delta_error: Mapped[str | None] = mapped_column(String(32))

    __table_args__ = (Index("ix_deployment_devices_serial", "device_serial"),)


class StatusReport(Base):
    """Every status a device reported (history), capped per device and kept for a number of
    days (ServerSettings.history_per_device, history_days).

    ``source`` says where it came from: ``device`` (a report as sent), ``checkin`` (what a
    check-in showed: the new version running, or the old one again), ``admin`` (the version an
    operator set) or ``server`` (the health gate: not confirmed in time)."""

    __tablename__ = "status_reports"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    device_serial: Mapped[str | None] = mapped_column(String(64))
    deployment_id: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(String(64))
    version: Mapped[str | None] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    boots: Mapped[int | None] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(8), default="device", server_default="device")

    __table_args__ = (
        Index("ix_status_reports_device_time", "device_serial", "created_at"),
        Index("ix_status_reports_created_at", "created_at"),
    )


class AnonymousDevice(Base):
    """A device that does not identify itself (original middleware on an anonymous product),
    told apart by its network address and User-Agent: what it was last offered and where it
    stands (``downloading``, then the result: ``applying``, ``unknown`` or ``error``). Devices
    behind one NAT address count as one. Capped at ServerSettings.anonymous_history rows."""

    __tablename__ = "anonymous_devices"
    key: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256(product, addr, UA)
    product: Mapped[str] = mapped_column(String(64))
    address: Mapped[str] = mapped_column(String(64))
    user_agent: Mapped[str] = mapped_column(String(128))
    deployment_id: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str | None] = mapped_column(String(16))
    error: Mapped[str | None] = mapped_column(String(64))
    first_seen: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    __table_args__ = (
        Index("ix_anonymous_devices_deployment", "deployment_id", "status"),
        Index("ix_anonymous_devices_last_seen", "last_seen"),
    )


class Rollout(Base):
    """A phased deployment (rollout.py): one per deployment.

    ``phases`` is the list of phase specs (JSON, see rollout.Phase); ``phase`` the current one,
    counted from 1. ``revision`` grows with every transition: transitions are compare-and-set
    on it (and take the row lock on PostgreSQL), so several server processes never apply one
    twice. ``acknowledged`` holds, per phase, the failures an operator accepted by resuming.
    """

    __tablename__ = "rollouts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    deployment_id: Mapped[int] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE"), unique=True
    )
    state: Mapped[str] = mapped_column(String(16))  # scheduled running paused aborted completed
    phase: Mapped[int] = mapped_column(Integer, default=1)
    phases: Mapped[list[dict[str, Any]]] = mapped_column(JSON)
    start_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    window: Mapped[str | None] = mapped_column(String(256))
    frozen: Mapped[bool] = mapped_column(Boolean, default=False)
    confirm_timeout: Mapped[int | None] = mapped_column(Integer)  # seconds
    max_boots: Mapped[int | None] = mapped_column(Integer)
    soak: Mapped[int] = mapped_column(Integer, default=0)  # seconds applied before it counts
    acknowledged: Mapped[dict[str, int]] = mapped_column(JSON, default=dict)
    reason: Mapped[str | None] = mapped_column(String(256))
    revision: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    phase_started_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    # when the registry's devices got their rollout_devices rows (service/phases.py: at
    # creation for a scheduled rollout, again at the start); None: not yet
    seeded_at: Mapped[datetime | None] = mapped_column(UtcDateTime())

    __table_args__ = (Index("ix_rollouts_state", "state"),)


# Transitions that can happen once per (rollout, phase): a unique index makes a second one fail
# even if everything else went wrong.
ONCE_PER_PHASE = ("started", "advanced", "completed", "aborted")
_ONCE_SQL = "kind IN (" + ", ".join(f"'{kind}'" for kind in ONCE_PER_PHASE) + ")"


class RolloutEvent(Base):
    """What happened to a rollout, in order: created, started, advanced (phase N passed),
    completed, paused, resumed, aborted, approved."""

    __tablename__ = "rollout_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))
    phase: Mapped[int] = mapped_column(Integer)
    actor: Mapped[str] = mapped_column(String(64))  # "engine", or audit.actor_of(token)
    detail: Mapped[str | None] = mapped_column(String(256))

    __table_args__ = (
        Index("ix_rollout_events_rollout", "rollout_id", "id"),
        Index(
            "ux_rollout_events_once",
            "rollout_id",
            "kind",
            "phase",
            unique=True,
            sqlite_where=text(_ONCE_SQL),
            postgresql_where=text(_ONCE_SQL),
        ),
    )


class RolloutDevice(Base):
    """One device's place in one rollout (service/phases.py): the phase it fell into when it was
    first targeted (at the rollout's start, or when first seen after it: the snapshot of a
    frozen rollout is the rows taken at its start) and its status in the deployment (None until
    it reports). ``soak_until``: applied, but counted as succeeded only from then (the rollout's
    ``soak``). ``updated_at``: when ``status`` last changed."""

    __tablename__ = "rollout_devices"
    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_serial: Mapped[str] = mapped_column(String(64), primary_key=True)
    phase: Mapped[int] = mapped_column(Integer)
    status: Mapped[str | None] = mapped_column(String(16))
    soak_until: Mapped[datetime | None] = mapped_column(UtcDateTime())
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    __table_args__ = (
        Index("ix_rollout_devices_serial", "device_serial"),
        Index("ix_rollout_devices_status", "rollout_id", "status", "updated_at"),
        Index("ix_rollout_devices_soak", "rollout_id", "soak_until"),
    )


class RolloutCount(Base):
    """How many devices of one rollout phase stand where (service/phases.py): ``key`` is
    ``targeted``, ``succeeded`` (applied and soaked) or a status; updated in the transaction
    that changes a device's row, so reading a rollout's counts never reads its devices."""

    __tablename__ = "rollout_phase_counts"
    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    phase: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(16), primary_key=True)
    count: Mapped[int] = mapped_column(BigInteger, default=0)


class Revision(Base):
    """Counters that change whenever what devices are offered may change (service/revision.py):
    one row, ``offers``, read on every check-in to know whether a process's cached offers are
    still good."""

    __tablename__ = "revisions"
    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    value: Mapped[int] = mapped_column(BigInteger, default=0)


class MqttSession(Base):
    """What the MQTT publisher answered on a device's unique topic (server/publisher.py).

    The original device's result names only its unique topic, so the answer to "Update
    Availability" or "Request Update" (or a first "Request Data Chunk") is kept here, by
    topic, for whichever publisher receives
    the result: which registered device asked, the deployment it was offered or sent (None: it
    was told "No Update Available" or got nothing) and the answer. One row per device: a new
    session replaces the previous one; rows older than ``publisher.SESSION_TTL`` are deleted.
    Found by primary key only.
    """

    __tablename__ = "mqtt_sessions"
    topic: Mapped[str] = mapped_column(String(256), primary_key=True)
    device_serial: Mapped[str] = mapped_column(ForeignKey("devices.serial", ondelete="CASCADE"))
    deployment_id: Mapped[int | None] = mapped_column(
        ForeignKey("deployments.id", ondelete="CASCADE")
    )
    answer: Mapped[str] = mapped_column(String(32))  # publisher.Answer
    answered_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)

    __table_args__ = (
        Index("ix_mqtt_sessions_device", "device_serial"),
        Index("ix_mqtt_sessions_answered_at", "answered_at"),
    )


class AuditEvent(Base):
    """One operator action (service/audit.py): who (the token's label, or its id), when, what
    (``action``, e.g. ``rollout.abort``) on which ``target`` (e.g. ``rollout 3``)."""

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    actor: Mapped[str] = mapped_column(String(160))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(160))
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)

    __table_args__ = (
        Index("ix_audit_events_action_id", "action", "id"),
        Index("ix_audit_events_actor_id", "actor", "id"),
    )
