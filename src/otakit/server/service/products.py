"""Products and their policy: the board their devices have, whether raw (unsigned) files may be
uploaded for them, whether devices without a token (original middleware) are served and whether
unknown serials may register themselves.

``PUT`` replaces the whole policy (anything not given gets its default); ``PATCH`` changes only
what is given. Either creates the product when it does not exist, and records ``product.set``
in the audit log. A product's board and anonymous access are part of what devices are offered,
so both bump the offers revision (revision.py) in their transaction.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import NotFoundError, UsageError
from otakit.server.models import Product
from otakit.server.service import audit, revision

# the policy's fields and their defaults (a new product, or PUT without them)
DEFAULTS: dict[str, Any] = {
    "board": None,
    "allow_raw": False,
    "anonymous": False,
    "self_register": False,
}


async def set_policy(
    db: AsyncSession,
    name: str,
    changes: Mapping[str, Any],
    *,
    replace: bool = False,
    actor: str = audit.LOCAL,
) -> Product:
    """Create or update product ``name``: set the fields in ``changes`` (``replace``: and
    every other field to its default); commits and records ``product.set``. Raises UsageError
    for a field that is not part of a product's policy."""
    unknown = set(changes) - set(DEFAULTS)
    if unknown:
        raise UsageError(f"not a product setting: {', '.join(sorted(unknown))}")
    product = await db.get(Product, name)
    created = product is None
    if product is None:
        product = Product(name=name, **DEFAULTS)
    values = {**DEFAULTS, **changes} if replace else dict(changes)
    for key, value in values.items():
        setattr(product, key, value)
    db.add(product)
    audit.record(
        db,
        actor=actor,
        action="product.set",
        target=f"product {name}",
        details={**values, **({"created": True} if created else {})},
    )
    await revision.bump(db)  # its board and anonymous access are part of what is offered
    await db.commit()
    return product


async def get(db: AsyncSession, name: str) -> Product:
    """Product ``name``; NotFoundError if there is none."""
    product = await db.get(Product, name)
    if product is None:
        raise NotFoundError(f"product {name!r} not found", value=name)
    return product


async def listing(db: AsyncSession) -> list[Product]:
    """Every product, by name (a registry has few)."""
    return list(await db.scalars(select(Product).order_by(Product.name)))
