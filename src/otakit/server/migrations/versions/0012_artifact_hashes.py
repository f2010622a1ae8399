"""SHA-1 and MD5 of artifacts, next to the SHA-256 that names them (issue 19)

hawkBit DDI clients check an artifact's SHA-1 or MD5. Uploads compute both while the body
streams; artifacts uploaded before this migration have NULL until service/artifacts.py
ensure_hashes reads their blob once (when a deployment is created, or a DDI client asks).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.add_column(sa.Column("sha1", sa.String(40), nullable=True))
        batch_op.add_column(sa.Column("md5", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("artifacts", schema=None) as batch_op:
        batch_op.drop_column("md5")
        batch_op.drop_column("sha1")
