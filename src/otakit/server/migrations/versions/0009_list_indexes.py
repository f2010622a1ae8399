"""indexes for paged lists and counts (issue 16)

Every list of the management API is read a page at a time in the order of one of these
indexes (service/listings.py), and the device and deployment counts are grouped counts over
them: a page or a count never reads the whole registry.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

GROUP_TAG = "deviceGroup"  # targeting.GROUP_TAG (the expression must match listings.group_of)


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    group = f"(tags ->> '{GROUP_TAG}')" if postgres else f"json_extract(tags, '$.{GROUP_TAG}')"
    # devices never seen sort as the oldest on both databases (SQLite's NULLs are the smallest)
    last_seen = "last_seen NULLS FIRST" if postgres else "last_seen"
    op.create_index("ix_devices_product_serial", "devices", ["product", "serial"])
    op.create_index("ix_devices_status_serial", "devices", ["status", "serial"])
    op.create_index("ix_devices_group_serial", "devices", [sa.text(group), "serial"])
    op.create_index("ix_devices_last_seen_serial", "devices", [sa.text(last_seen), "serial"])
    op.create_index("ix_devices_created_serial", "devices", ["created_at", "serial"])
    op.create_index("ix_artifacts_created_id", "artifacts", ["created_at", "id"])
    op.create_index(
        "ix_deployment_devices_deployment_status",
        "deployment_devices",
        ["deployment_id", "status"],
    )
    op.create_index("ix_status_reports_device_id", "status_reports", ["device_serial", "id"])


def downgrade() -> None:
    op.drop_index("ix_status_reports_device_id", table_name="status_reports")
    op.drop_index("ix_deployment_devices_deployment_status", table_name="deployment_devices")
    op.drop_index("ix_artifacts_created_id", table_name="artifacts")
    op.drop_index("ix_devices_created_serial", table_name="devices")
    op.drop_index("ix_devices_last_seen_serial", table_name="devices")
    op.drop_index("ix_devices_group_serial", table_name="devices")
    op.drop_index("ix_devices_status_serial", table_name="devices")
    op.drop_index("ix_devices_product_serial", table_name="devices")
