"""rollouts, device health and status history

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-28
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

ONCE = "kind IN ('started', 'advanced', 'completed', 'aborted')"


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("phases", sa.JSON(), nullable=False),
        sa.Column("start_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("window", sa.String(length=256), nullable=True),
        sa.Column("frozen", sa.Boolean(), nullable=False),
        sa.Column("confirm_timeout", sa.Integer(), nullable=True),
        sa.Column("max_boots", sa.Integer(), nullable=True),
        sa.Column("soak", sa.Integer(), nullable=False),
        sa.Column("acknowledged", sa.JSON(), nullable=False),
        sa.Column("reason", sa.String(length=256), nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("phase_started_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("deployment_id"),
    )
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.create_index("ix_rollouts_state", ["state"], unique=False)

    op.create_table(
        "rollout_events",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("phase", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(length=64), nullable=False),
        sa.Column("detail", sa.String(length=256), nullable=True),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("rollout_events", schema=None) as batch_op:
        batch_op.create_index("ix_rollout_events_rollout", ["rollout_id", "id"], unique=False)
        batch_op.create_index(
            "ux_rollout_events_once",
            ["rollout_id", "kind", "phase"],
            unique=True,
            sqlite_where=sa.text(ONCE),
            postgresql_where=sa.text(ONCE),
        )

    op.create_table(
        "rollout_targets",
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("device_serial", sa.String(length=64), nullable=False),
        sa.ForeignKeyConstraint(["rollout_id"], ["rollouts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("rollout_id", "device_serial"),
    )
    with op.batch_alter_table("rollout_targets", schema=None) as batch_op:
        batch_op.create_index("ix_rollout_targets_serial", ["device_serial"], unique=False)

    with op.batch_alter_table("deployment_devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("applied_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("boots_at_apply", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("boots", sa.BigInteger(), nullable=True))
        batch_op.create_index("ix_deployment_devices_serial", ["device_serial"], unique=False)

    with op.batch_alter_table("status_reports", schema=None) as batch_op:
        batch_op.add_column(sa.Column("boots", sa.BigInteger(), nullable=True))
        batch_op.add_column(
            sa.Column("source", sa.String(length=8), server_default="device", nullable=False)
        )
        batch_op.create_index("ix_status_reports_created_at", ["created_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("status_reports", schema=None) as batch_op:
        batch_op.drop_index("ix_status_reports_created_at")
        batch_op.drop_column("source")
        batch_op.drop_column("boots")

    with op.batch_alter_table("deployment_devices", schema=None) as batch_op:
        batch_op.drop_index("ix_deployment_devices_serial")
        batch_op.drop_column("boots")
        batch_op.drop_column("boots_at_apply")
        batch_op.drop_column("applied_at")

    with op.batch_alter_table("rollout_targets", schema=None) as batch_op:
        batch_op.drop_index("ix_rollout_targets_serial")
    op.drop_table("rollout_targets")
    with op.batch_alter_table("rollout_events", schema=None) as batch_op:
        batch_op.drop_index("ux_rollout_events_once")
        batch_op.drop_index("ix_rollout_events_rollout")
    op.drop_table("rollout_events")
    with op.batch_alter_table("rollouts", schema=None) as batch_op:
        batch_op.drop_index("ix_rollouts_state")
    op.drop_table("rollouts")
