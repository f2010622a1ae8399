"""rollouts counted per device row and per phase (rollout_devices, rollout_phase_counts,
rollouts.seeded_at)

Replaces rollout_targets (a frozen rollout's snapshot) with one row per (rollout, device) for
every rollout, and per-phase counters; the rows and counts of the rollouts that have started
are made here, as the server would have made them (service/phases.py).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections import Counter
from datetime import UTC, datetime
from typing import Any, cast

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

PAGE = 2000


def upgrade() -> None:
    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_serial", sa.String(length=64), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=True),
        sa.Column("soak_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("rollout_id", "device_serial"),
    )
    op.create_index("ix_rollout_devices_serial", "rollout_devices", ["device_serial"])
    op.create_index(
        "ix_rollout_devices_status", "rollout_devices", ["rollout_id", "status", "updated_at"]
    )
    op.create_index("ix_rollout_devices_soak", "rollout_devices", ["rollout_id", "soak_until"])
    op.create_table(
        "rollout_phase_counts",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("key", sa.String(length=16), nullable=False),
        sa.Column("count", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("rollout_id", "phase", "key"),
    )
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("seeded_at", sa.DateTime(timezone=True), nullable=True))
    _fill(op.get_bind())
    op.drop_index("ix_rollout_targets_serial", table_name="rollout_targets")
    op.drop_table("rollout_targets")


# the tables as they are at this revision (the models may grow later)
_rollouts = sa.table(
    "rollouts",
    sa.column("id", sa.Integer),
    sa.column("deployment_id", sa.Integer),
    sa.column("phases", sa.JSON),
    sa.column("frozen", sa.Boolean),
    sa.column("soak", sa.Integer),
    sa.column("updated_at", sa.DateTime(timezone=True)),
    sa.column("phase_started_at", sa.DateTime(timezone=True)),
    sa.column("seeded_at", sa.DateTime(timezone=True)),
)
_deployments = sa.table(
    "deployments",
    sa.column("id", sa.Integer),
    sa.column("artifact_id", sa.String),
    sa.column("condition", sa.Text),
    sa.column("downgrade", sa.Boolean),
)
_artifacts = sa.table(
    "artifacts", sa.column("id", sa.String), sa.column("board"), sa.column("version")
)
_devices = sa.table(
    "devices",
    sa.column("serial", sa.String),
    sa.column("product", sa.String),
    sa.column("tags", sa.JSON),
    sa.column("board", sa.String),
    sa.column("version", sa.String),
)
_deployment_devices = sa.table(
    "deployment_devices",
    sa.column("deployment_id", sa.Integer),
    sa.column("device_serial", sa.String),
    sa.column("status", sa.String),
    sa.column("applied_at", sa.DateTime(timezone=True)),
)
_targets = sa.table(
    "rollout_targets", sa.column("rollout_id", sa.Integer), sa.column("device_serial")
)
_rows = sa.table(
    "rollout_devices",
    sa.column("rollout_id", sa.Integer),
    sa.column("device_serial", sa.String),
    sa.column("phase", sa.Integer),
    sa.column("status", sa.String),
    sa.column("soak_until", sa.DateTime(timezone=True)),
    sa.column("updated_at", sa.DateTime(timezone=True)),
)
_counts = sa.table(
    "rollout_phase_counts",
    sa.column("rollout_id", sa.Integer),
    sa.column("phase", sa.Integer),
    sa.column("key", sa.String),
    sa.column("count", sa.BigInteger),
)


def _fill(bind: sa.Connection) -> None:
    """Rows and counts of every rollout that has started, as the server makes them at a
    start (phases.seeds): a frozen rollout's rows are its snapshot. Scheduled rollouts are
    left to the engine (``seeded_at`` None: it makes their rows at its next round)."""
    from otakit.server.service.phases import SUCCEEDED, TARGETED, seeds

    now = datetime.now(UTC)
    started = bind.execute(
        sa.select(_rollouts).where(_rollouts.c.phase_started_at.is_not(None))
    ).all()
    for rollout in started:
        deployment = bind.execute(
            sa.select(_deployments).where(_deployments.c.id == rollout.deployment_id)
        ).one()
        artifact = bind.execute(
            sa.select(_artifacts).where(_artifacts.c.id == deployment.artifact_id)
        ).one()
        dd = _deployment_devices.c
        statuses = {
            serial: (status, applied_at)
            for serial, status, applied_at in bind.execute(
                sa.select(dd.device_serial, dd.status, dd.applied_at).where(
                    dd.deployment_id == deployment.id
                )
            )
        }
        members = None
        if rollout.frozen:
            members = frozenset(
                bind.scalars(
                    sa.select(_targets.c.device_serial).where(_targets.c.rollout_id == rollout.id)
                )
            )
        counts: Counter[tuple[int, str]] = Counter()
        after = ""
        while True:
            page = bind.execute(
                sa.select(_devices)
                .where(_devices.c.serial > after)
                .order_by(_devices.c.serial)
                .limit(PAGE)
            ).all()
            if not page:
                break
            after = page[-1].serial
            # rows carry the attributes that targeting and phases read
            found = seeds(
                cast("Any", rollout),
                cast("Any", deployment),
                cast("Any", artifact),
                cast("list[Any]", page),
                statuses,
                members,
            )
            if not found:
                continue
            bind.execute(
                sa.insert(_rows),
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
            for s in found:
                counts[(s.phase, TARGETED)] += 1
                if s.status is not None:
                    counts[(s.phase, s.status)] += 1
                    if s.status == "applied" and s.soak_until is None:
                        counts[(s.phase, SUCCEEDED)] += 1
        bind.execute(sa.update(_rollouts).where(_rollouts.c.id == rollout.id).values(seeded_at=now))
        if counts:
            bind.execute(
                sa.insert(_counts),
                [
                    {"rollout_id": rollout.id, "phase": phase, "key": key, "count": n}
                    for (phase, key), n in sorted(counts.items())
                ],
            )


def downgrade() -> None:
    op.create_table(
        "rollout_targets",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_serial", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("rollout_id", "device_serial"),
    )
    op.create_index("ix_rollout_targets_serial", "rollout_targets", ["device_serial"])
    op.execute(
        "INSERT INTO rollout_targets (rollout_id, device_serial) "
        "SELECT d.rollout_id, d.device_serial FROM rollout_devices d "
        "JOIN rollouts r ON r.id = d.rollout_id WHERE r.frozen"
    )
    op.drop_table("rollout_phase_counts")
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_column("seeded_at")
    op.drop_index("ix_rollout_devices_soak", table_name="rollout_devices")
    op.drop_index("ix_rollout_devices_status", table_name="rollout_devices")
    op.drop_index("ix_rollout_devices_serial", table_name="rollout_devices")
    op.drop_table("rollout_devices")
