"""mqtt sessions: what the publisher answered on each device's unique topic

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "mqtt_sessions",
        sa.Column("topic", sa.String(length=256), nullable=False),
        sa.Column("device_serial", sa.String(length=64), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=True),
        sa.Column("answer", sa.String(length=32), nullable=False),
        sa.Column("answered_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["device_serial"], ["devices.serial"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["deployment_id"], ["deployments.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("topic"),
    )
    with op.batch_alter_table("mqtt_sessions", schema=None) as batch_op:
        batch_op.create_index("ix_mqtt_sessions_device", ["device_serial"], unique=False)
        batch_op.create_index("ix_mqtt_sessions_answered_at", ["answered_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("mqtt_sessions", schema=None) as batch_op:
        batch_op.drop_index("ix_mqtt_sessions_answered_at")
        batch_op.drop_index("ix_mqtt_sessions_device")
    op.drop_table("mqtt_sessions")
