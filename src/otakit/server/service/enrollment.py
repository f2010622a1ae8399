"""Enrollment: a device joins the registry on its first check-in, and gets its device token.

A device may join with an enrollment token (bound to a product and group) or, when its product
allows self-registration, with no token at all. Serials are one namespace across products: a
registered serial is never taken over by another product's token or an anonymous request.

Enrolling is idempotent for the token that enrolled the device: when the answer carrying the
device token was lost, the device checks in again with the same enrollment token and gets a
fresh device token; every earlier token of the device stops working, and the device's history
notes it (``source`` ``enroll``). The device row is inserted with ``ON CONFLICT DO NOTHING``, so
the same serial enrolling through two servers at once gives one device: the second request
finds the first's row and enrolls again. :func:`register` is that insert, shared with hawkBit's
DDI API (service/ddi.py), which registers a device on its first poll without minting a token.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import ForbiddenError, NotFoundError, RegisteredError, UnauthorizedError
from otakit.server import identity
from otakit.server.database import insert
from otakit.server.models import Device, Product, StatusReport, Token
from otakit.server.service.checkin import load
from otakit.server.targeting import GROUP_TAG, PRODUCT_TAG
from otakit.server.tokens import Role, add_token

log = logging.getLogger("otakit.server")

ENROLLED_LABEL = "enrolled"
REENROLLED = "re-enrolled"  # the history entry's status


@dataclass(frozen=True)
class Enrolled:
    """The calling device; ``device_token`` only when this call (re-)enrolled it;
    ``revision`` the offers revision read with the device (None: not read)."""

    device: Device
    device_token: str | None = None
    revision: int | None = None


async def enroll(
    db: AsyncSession, serial: str, token: Token | None, product: str | None, now: datetime
) -> Enrolled:
    """The device ``serial`` checking in with ``token`` (``product``: the product it names,
    for self-registration), enrolling it when the token allows. The caller commits."""
    if token is not None and token.role == Role.DEVICE:
        if token.device_serial != serial:
            raise ForbiddenError("a device token can only check in for its device")
        device, revision = await load(db, serial)
        if device is None:
            raise NotFoundError(f"device {serial!r} is not registered")
        return Enrolled(device, None, revision)
    if token is not None and token.role == Role.ENROLL:
        product_name, group, by = token.product, token.group, token.id
    elif token is None:
        product_row = await db.get(Product, product) if product else None
        if product_row is None or not product_row.self_register:
            raise UnauthorizedError("this call needs a device or enrollment token")
        product_name, group, by = product_row.name, None, None
    else:
        raise ForbiddenError("admin tokens cannot check in as a device")
    device, created = await register(db, serial, product_name, group, by, now)
    if not created:
        if by is None or device.enrolled_by != by:
            # another product's token (or a leaked one, or a self-registration) never takes
            # over a registered device
            log.warning(
                "refused to enroll serial %r for product %r: already registered (product %r)",
                serial,
                product_name,
                device.product,
            )
            raise RegisteredError(f"device {serial!r} is already registered; use its token")
        await db.execute(
            update(Token)
            .where(
                Token.device_serial == serial,
                Token.role == Role.DEVICE,
                Token.revoked_at.is_(None),
            )
            .values(revoked_at=now)
            .execution_options(synchronize_session=False)
        )
        db.add(
            StatusReport(
                device_serial=serial,
                status=REENROLLED,
                error=None,
                version=device.version,
                created_at=now,
                source="enroll",
            )
        )
        log.info(
            "device %r enrolled again with token %s: earlier device tokens revoked", serial, by
        )
    token_text = add_token(
        db,
        Role.DEVICE,
        product=product_name,
        group=group,
        device_serial=serial,
        label=ENROLLED_LABEL,
    )
    return Enrolled(device, token_text)


async def register(
    db: AsyncSession,
    serial: str,
    product: str | None,
    group: str | None,
    by: str | None,
    now: datetime,
    *,
    job_serial: bool = True,
) -> tuple[Device, bool]:
    """The device ``serial``, registered now for ``product`` and ``group`` (its tags say so)
    by enrollment token ``by`` (None: it enrolled itself) unless it was already: (the device,
    whether this call registered it). The row is inserted with ``ON CONFLICT DO NOTHING``, so a
    registered device is never changed here; the caller decides whether it may act for it and
    commits. ``job_serial``: the serial must fit a job document's SerialNumber (False: a
    hawkBit controller id, which no job document carries; the caller checks its form)."""
    if job_serial:
        identity.check("serial", "SerialNumber", serial)  # the job documents carry it
    tags = {PRODUCT_TAG: product} if product else {}
    if group:
        tags[GROUP_TAG] = group
    created = await db.execute(
        insert(db, Device)
        .values(
            serial=serial,
            product=product,
            tags=tags,
            enrolled_by=by,
            created_at=now,
            last_seen=now,
        )
        .on_conflict_do_nothing(index_elements=["serial"])
    )
    device = await db.get(Device, serial)
    assert device is not None  # inserted now, or there already
    return device, getattr(created, "rowcount", 0) == 1
