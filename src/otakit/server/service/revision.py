"""The offers revision: one counter in the database that changes whenever what a device may be
offered can change (a deployment made, cancelled or expired early, a product's settings, an
artifact deleted, a rollout's transition).

Every server process keeps the active offers in memory (offers.catalogue) with the revision it
read them at; a check-in reads the counter (one row, by primary key, in the same statement as
the device) and reloads only when it moved. Whoever changes what is offered calls :func:`bump`
in the same transaction, so every process sees the change with its next check-in.
"""

from __future__ import annotations

from sqlalchemy import ScalarSelect, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.server.models import Revision

OFFERS = "offers"


async def bump(db: AsyncSession) -> None:
    """Count a change of what devices may be offered (in the caller's transaction)."""
    await db.execute(
        update(Revision)
        .where(Revision.name == OFFERS)
        .values(value=Revision.value + 1)
        .execution_options(synchronize_session=False)
    )


def column() -> ScalarSelect[int]:
    """The revision as a column, to read it in the same statement as something else."""
    return select(Revision.value).where(Revision.name == OFFERS).scalar_subquery()


async def current(db: AsyncSession) -> int:
    """The revision now (0 before anything changed)."""
    return await db.scalar(select(Revision.value).where(Revision.name == OFFERS)) or 0
