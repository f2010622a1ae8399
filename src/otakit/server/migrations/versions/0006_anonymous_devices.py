"""anonymous devices

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "anonymous_devices",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("product", sa.String(64), nullable=False),
        sa.Column("address", sa.String(64), nullable=False),
        sa.Column("user_agent", sa.String(128), nullable=False),
        sa.Column("deployment_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("error", sa.String(64), nullable=True),
        sa.Column("first_seen", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index(
        "ix_anonymous_devices_deployment", "anonymous_devices", ["deployment_id", "status"]
    )
    op.create_index("ix_anonymous_devices_last_seen", "anonymous_devices", ["last_seen"])


def downgrade() -> None:
    op.drop_index("ix_anonymous_devices_last_seen", table_name="anonymous_devices")
    op.drop_index("ix_anonymous_devices_deployment", table_name="anonymous_devices")
    op.drop_table("anonymous_devices")
