"""deployment priority no longer derived from the version

Until now ``otakit deploy`` (and ``otakit rollout create --artifact`` without ``--priority``) set
a deployment's priority from its artifact's version, packed so that ``2.0.0`` became 2 but
``1.5.0`` 17104896: with both deployed, a device on 1.0.0 was offered 1.5.0. Deployments are now
ordered by priority, then version, then age, and priority is only an operator's override.

This resets to 0 the priority of every deployment whose priority is exactly what the old rule
gave for its artifact's version, so those deployments are ordered by version. A priority an
operator chose keeps its value (one that happens to equal the old rule's number is reset too:
the two cannot be told apart).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03
"""

from __future__ import annotations

import re

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

# FirmwareVersion's text forms (protocols.md: N, a.b, a.b.c, a.b.c+build), copied here so the
# migration keeps meaning what it meant when it was written.
_PART = r"(0|[1-9][0-9]{0,9})"
_VERSION = re.compile(rf"{_PART}(?:\.{_PART}(?:\.{_PART}(?:\+{_PART})?)?)?")
_MAX_PRIORITY = 2**31 - 1
_BATCH = 500

deployments = sa.table(
    "deployments",
    sa.column("id", sa.Integer),
    sa.column("artifact_id", sa.String),
    sa.column("priority", sa.Integer),
)
artifacts = sa.table("artifacts", sa.column("id", sa.String), sa.column("version", sa.String))


def old_priority(version: str) -> int | None:
    """What ``otakit deploy``'s removed ``priority_of`` gave for ``version`` (None: not a
    version it could have been given)."""
    match = _VERSION.fullmatch(version)
    if match is None:
        return None
    major, minor, revision = (int(g) if g is not None else 0 for g in match.groups()[:3])
    if minor == revision == 0:
        return min(major, _MAX_PRIORITY)
    return min((major << 24) | (minor << 16) | min(revision, 0xFFFF), _MAX_PRIORITY)


def upgrade() -> None:
    bind = op.get_bind()
    rows = bind.execute(
        sa.select(deployments.c.id, deployments.c.priority, artifacts.c.version)
        .join(artifacts, artifacts.c.id == deployments.c.artifact_id)
        .where(deployments.c.priority != 0)
    ).all()
    derived = [i for i, priority, version in rows if priority == old_priority(version)]
    for start in range(0, len(derived), _BATCH):
        bind.execute(
            sa.update(deployments)
            .where(deployments.c.id.in_(derived[start : start + _BATCH]))
            .values(priority=0)
        )


def downgrade() -> None:
    """Nothing to undo: the old code orders priority-0 deployments by age, as it always did."""
