"""binary deltas between image artifacts (issue 20): artifact_deltas, the image identity of
artifacts and devices, and a deployment device's delta error

``artifacts.image_sha256`` / ``image_size`` name an MCUboot image artifact as a delta's base or
result (otakit.image.delta.image_digest: the image proper, without padding); images uploaded
before this migration have NULL until service/artifacts.py ensure_image_digest reads their blob
once (when a deployment is created). ``devices.image_sha256`` is what a device last said it
runs. ``deployment_devices.delta_error`` is why a device's delta failed (full image since).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("image_sha256", sa.String(64), nullable=True))
        batch_op.add_column(sa.Column("image_size", sa.BigInteger(), nullable=True))
    op.create_index("ix_artifacts_image_sha256", "artifacts", ["image_sha256"])
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("image_sha256", sa.String(64), nullable=True))
    with op.batch_alter_table("deployment_devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("delta_error", sa.String(32), nullable=True))
    op.create_table(
        "artifact_deltas",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("artifact_id", sa.String(length=64), nullable=False),
        sa.Column("base_sha256", sa.String(length=64), nullable=False),
        sa.Column("base_artifact_id", sa.String(length=64), nullable=True),
        sa.Column("compression", sa.String(length=16), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("progress", sa.Integer(), nullable=False),
        sa.Column("blob_key", sa.String(length=64), nullable=True),
        sa.Column("size", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.String(length=200), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["artifact_id"], ["artifacts.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "artifact_id", "base_sha256", "compression", name="ux_artifact_deltas_base"
        ),
    )
    op.create_index("ix_artifact_deltas_artifact_id", "artifact_deltas", ["artifact_id"])
    op.create_index("ix_artifact_deltas_state", "artifact_deltas", ["state", "id"])


def downgrade() -> None:
    op.drop_index("ix_artifact_deltas_state", table_name="artifact_deltas")
    op.drop_index("ix_artifact_deltas_artifact_id", table_name="artifact_deltas")
    op.drop_table("artifact_deltas")
    with op.batch_alter_table("deployment_devices", schema=None) as batch_op:
        batch_op.drop_column("delta_error")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("image_sha256")
    op.drop_index("ix_artifacts_image_sha256", table_name="artifacts")
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_column("image_size")
        batch_op.drop_column("image_sha256")
