"""indexes for the token list and the one-binary-per-version rule (issue 18)

``GET /api/v1/tokens`` pages tokens newest first, optionally of one role (service/tokens.py);
an upload asks whether its product already has its version (service/artifacts.py). Both are
index reads.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-03
"""

from __future__ import annotations

from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_index("ix_tokens_created_id", "tokens", ["created_at", "id"])
    op.create_index("ix_tokens_role_created_id", "tokens", ["role", "created_at", "id"])
    op.create_index(
        "ix_artifacts_product_version", "artifacts", ["product", "container", "version"]
    )


def downgrade() -> None:
    op.drop_index("ix_artifacts_product_version", table_name="artifacts")
    op.drop_index("ix_tokens_role_created_id", table_name="tokens")
    op.drop_index("ix_tokens_created_id", table_name="tokens")
