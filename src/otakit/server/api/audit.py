"""Audit log API (``/api/v1/audit``): who did what, when, on which thing (service/audit.py).

Admin and viewer tokens read it, newest first, one page at a time like every other list
(``limit``, ``cursor``, the next page's cursor in ``X-Next-Cursor``). ``/api/v1/whoami`` tells a
client (the dashboard) which role its token has and the name the log records it under.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response
from pydantic import BaseModel, ConfigDict, Field

from otakit.server.api.management import PAGED, Cursor, Limit, paged
from otakit.server.context import Db, Reader, error_responses
from otakit.server.service import audit, listings

router = APIRouter(
    prefix="/api/v1", tags=["management"], responses=error_responses(400, 401, 403, 404, 422)
)


class AuditEventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    at: datetime
    actor: str = Field(description="The token's label and id, 'engine' or 'local'.")
    action: str = Field(description="<thing>.<verb>, e.g. rollout.abort.")
    target: str = Field(description="What it was done to, e.g. 'rollout 3'.")
    details: dict[str, Any]


@router.get("/audit", response_model=list[AuditEventOut], responses=PAGED)
async def list_audit(
    request: Request,
    response: Response,
    db: Db,
    _reader: Reader,
    action: Annotated[
        audit.AuditAction | None, Query(description="Only this action, e.g. rollout.abort.")
    ] = None,
    actor: str | None = Query(
        default=None,
        max_length=160,
        description="Only this actor: as recorded, or a token label (every token so labelled).",
    ),
    limit: Limit = listings.DEFAULT_LIMIT,
    cursor: Cursor = None,
) -> list[AuditEventOut]:
    """Operator actions, newest first, one page at a time."""
    found = await audit.listing(db, action=action, actor=actor, limit=limit, cursor=cursor)
    paged(request, response, found.next)
    return [AuditEventOut.model_validate(e) for e in found.items]


class WhoAmIOut(BaseModel):
    role: str = Field(description="admin or viewer.")
    actor: str = Field(description="The name the audit log records this token's actions under.")
    expires_at: datetime | None


@router.get("/whoami", response_model=WhoAmIOut)
async def whoami(token: Reader) -> WhoAmIOut:
    """The calling token's role (a viewer changes nothing) and its name in the audit log."""
    return WhoAmIOut(role=token.role, actor=audit.actor_of(token), expires_at=token.expires_at)
