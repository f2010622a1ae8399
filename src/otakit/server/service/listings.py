"""Paged lists of the registry: devices, artifacts and a device's history, and the device counts
the dashboard shows next to a page.

A list is read one page at a time by keyset paging: a page is ordered by a sort key that ends
in a unique column, and the cursor of the next page is the last row's key (an opaque token to
clients, :func:`encode`). A page therefore costs the same on the first page and the thousandth,
and rows added or removed meanwhile never make a page skip or repeat a row. Every filter and
sort is backed by an index (migration 0009); counts are one grouped aggregate over an indexed
column, never a row per device in Python.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, TypeVar, get_args

from sqlalchemy import (
    ColumnElement,
    DateTime,
    Select,
    and_,
    func,
    literal,
    literal_column,
    select,
    true,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from otakit.errors import NotFoundError, UsageError
from otakit.protocol.states import STATES
from otakit.server.models import Artifact, Device, StatusReport
from otakit.server.targeting import GROUP_TAG

T = TypeVar("T")
S = TypeVar("S", bound=Select[*tuple[Any, ...]])

MAX_LIMIT = 1000
DEFAULT_LIMIT = 100
NEVER_REPORTED = "none"  # the status filter and count of devices that never reported
DeviceStatus = Literal[
    "downloading",
    "interrupted",
    "applying",
    "applied",
    "error",
    "invalid",
    "reverted",
    "unknown",
    "none",
]
DEVICE_STATUSES: tuple[str, ...] = get_args(DeviceStatus)  # protocol/states.py and none
DeviceSort = Literal["serial", "-serial", "last_seen", "-last_seen", "created_at", "-created_at"]
DEVICE_SORTS: tuple[str, ...] = get_args(DeviceSort)


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list and the cursor of the next (None: this was the last)."""

    items: list[T]
    next: str | None


@dataclass(frozen=True)
class Key:
    """One column of a sort key; ``nullable`` columns sort their NULLs as the smallest value."""

    column: InstrumentedAttribute[Any]
    nullable: bool = False


# --- cursors -----------------------------------------------------------------------------------


def encode(kind: str, values: Sequence[Any]) -> str:
    """The opaque cursor after a row whose sort key is ``values`` (in a list ``kind``)."""
    plain = [v.isoformat() if isinstance(v, datetime) else v for v in values]
    raw = json.dumps([kind, plain], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode(kind: str, cursor: str, keys: Sequence[Key]) -> list[Any]:
    """The sort key a cursor of list ``kind`` names; NotFoundError for anything else."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        found, values = json.loads(raw)
        if found != kind or not isinstance(values, list) or len(values) != len(keys):
            raise ValueError(kind)
        result = []
        for key, value in zip(keys, values, strict=True):
            if value is None and not key.nullable:
                raise ValueError(value)
            kind_of = key.column.type
            if isinstance(getattr(kind_of, "impl", kind_of), DateTime):
                if value is not None:
                    value = datetime.fromisoformat(value)
            elif value is not None and not isinstance(value, kind_of.python_type):
                raise ValueError(value)
            result.append(value)
        return result
    except (ValueError, TypeError, binascii.Error, NotImplementedError):
        # the page it names does not exist (a cursor of another list, or of another sort)
        raise NotFoundError(
            f"no such page: not a cursor of this list ({kind})", value=cursor[:64]
        ) from None


def _beyond(keys: Sequence[Key], values: Sequence[Any], descending: bool) -> ColumnElement[bool]:
    """Rows past ``values`` on non-NULL keys: one row-value comparison, which SQLite and
    PostgreSQL both answer by seeking the index to ``values`` (not by reading from its start)."""
    if len(keys) == 1:
        column, value = keys[0].column, literal(values[0], keys[0].column.type)
        return column < value if descending else column > value
    columns = tuple_(*(k.column for k in keys))
    bound = tuple_(*(literal(v, k.column.type) for k, v in zip(keys, values, strict=True)))
    result: ColumnElement[bool] = columns < bound if descending else columns > bound
    return result


ANY_ROW: ColumnElement[bool] = true()


def segments(
    keys: Sequence[Key], values: Sequence[Any] | None, descending: bool
) -> list[ColumnElement[bool]]:
    """The ranges of rows after ``values`` (None: from the start), in the order they are read.

    Only the first key may be nullable; its NULLs sort as the smallest value. They are read as
    a range of their own, so that each range is a seek in the index: rows with a value past
    ``values``, then the NULL rows (descending), or the reverse (ascending)."""
    head = keys[0]
    if not head.nullable:
        return [ANY_ROW if values is None else _beyond(keys, values, descending)]
    nulls, present = head.column.is_(None), head.column.is_not(None)
    null_part: ColumnElement[bool] | None
    value_part: ColumnElement[bool] | None
    if values is None:
        null_part, value_part = nulls, present
    elif values[0] is None:
        null_part = and_(nulls, _beyond(keys[1:], values[1:], descending))
        value_part = None if descending else present
    else:
        null_part = nulls if descending else None
        value_part = and_(present, _beyond(keys, values, descending))
    ordered = [value_part, null_part] if descending else [null_part, value_part]
    return [part for part in ordered if part is not None]


def order(keys: Sequence[Key], descending: bool) -> list[Any]:
    return [k.column.desc() if descending else k.column.asc() for k in keys]


async def page(
    db: AsyncSession,
    query: Select[T],
    *,
    kind: str,
    keys: Sequence[Key],
    descending: bool,
    limit: int,
    cursor: str | None,
) -> Page[T]:
    """One page of ``query`` in the order of ``keys``, after ``cursor``: at most ``limit`` + 1
    rows read, from an index seek (two at the edge between NULL and non-NULL first keys)."""
    limit = max(1, min(limit, MAX_LIMIT))
    values = decode(kind, cursor, keys) if cursor else None
    rows: list[T] = []
    for part in segments(keys, values, descending):
        wanted = limit + 1 - len(rows)
        bounded = query if part is ANY_ROW else query.where(part)
        ordered = bounded.order_by(*order(keys, descending)).limit(wanted)
        rows += list(await db.scalars(ordered))
        if len(rows) > limit:
            break
    more = len(rows) > limit
    rows = rows[:limit]
    last = rows[-1] if rows and more else None
    token = encode(kind, [getattr(last, k.column.key) for k in keys]) if last is not None else None
    return Page(rows, token)


# --- devices -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceFilter:
    """Which devices: all the given filters hold. ``status`` is a device state or ``none``
    (never reported); ``version`` and ``q`` (the serial) match from the start."""

    product: str | None = None
    group: str | None = None
    status: str | None = None
    version: str | None = None
    q: str | None = None


def group_of(db: AsyncSession) -> ColumnElement[Any]:
    """The device's group tag, as the expression its index (migration 0009) was built on."""
    if db.get_bind().dialect.name == "postgresql":
        return literal_column(f"(devices.tags ->> '{GROUP_TAG}')")
    return literal_column(f"json_extract(devices.tags, '$.{GROUP_TAG}')")


def _starts(column: Any, prefix: str) -> ColumnElement[bool]:
    # substr, not LIKE: the same case-sensitive answer on SQLite and PostgreSQL, no wildcards
    result: ColumnElement[bool] = func.substr(column, 1, len(prefix)) == prefix
    return result


def _device_where(db: AsyncSession, query: S, where: DeviceFilter) -> S:
    if where.product:
        query = query.where(Device.product == where.product)
    if where.group:
        query = query.where(group_of(db) == where.group)
    if where.status == NEVER_REPORTED:
        query = query.where(Device.status.is_(None))
    elif where.status:
        if where.status not in STATES:
            raise UsageError(
                f"unknown status {where.status!r}; expected one of "
                f"{', '.join((*STATES, NEVER_REPORTED))}",
                value=where.status,
            )
        query = query.where(Device.status == where.status)
    if where.version:
        query = query.where(_starts(Device.version, where.version))
    if where.q:
        query = query.where(_starts(Device.serial, where.q))
    return query


def _device_keys(sort: str) -> tuple[list[Key], bool]:
    if sort not in DEVICE_SORTS:
        raise UsageError(f"unknown sort {sort!r}; expected one of {', '.join(DEVICE_SORTS)}")
    name = sort.lstrip("-")
    keys = [Key(Device.serial)]
    if name == "last_seen":
        keys.insert(0, Key(Device.last_seen, nullable=True))
    elif name == "created_at":
        keys.insert(0, Key(Device.created_at))
    return keys, sort.startswith("-")


async def devices(
    db: AsyncSession,
    where: DeviceFilter,
    *,
    sort: DeviceSort | str = "serial",
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
) -> Page[Device]:
    """A page of the registered devices that match ``where``, in ``sort`` order (a leading
    ``-``: descending; devices never seen sort as the oldest)."""
    keys, descending = _device_keys(sort)
    query = _device_where(db, select(Device), where)
    return await page(
        db,
        query,
        kind=f"devices:{sort}",
        keys=keys,
        descending=descending,
        limit=limit,
        cursor=cursor,
    )


@dataclass(frozen=True)
class DeviceCounts:
    """How many devices match a filter (without its status), and how many per status."""

    total: int
    statuses: dict[str, int]


async def device_counts(db: AsyncSession, where: DeviceFilter) -> DeviceCounts:
    """One grouped count over the devices' status (an indexed column)."""
    unfiltered = DeviceFilter(where.product, where.group, None, where.version, where.q)
    query = _device_where(db, select(Device.status, func.count()), unfiltered)
    statuses = dict.fromkeys((*STATES, NEVER_REPORTED), 0)
    for status, count in await db.execute(query.group_by(Device.status)):
        key = status or NEVER_REPORTED
        statuses[key] = statuses.get(key, 0) + int(count)
    return DeviceCounts(sum(statuses.values()), statuses)


# --- artifacts and history ---------------------------------------------------------------------


@dataclass(frozen=True)
class ArtifactFilter:
    product: str | None = None
    board: str | None = None
    name: str | None = None
    version: str | None = None


async def artifacts(
    db: AsyncSession, where: ArtifactFilter, *, limit: int = DEFAULT_LIMIT, cursor: str | None
) -> Page[Artifact]:
    """A page of the artifacts, newest first."""
    query = select(Artifact)
    if where.product:
        query = query.where(Artifact.product == where.product)
    if where.board:
        query = query.where(Artifact.board == where.board)
    if where.name:
        query = query.where(Artifact.name == where.name)
    if where.version:
        query = query.where(_starts(Artifact.version, where.version))
    keys = [Key(Artifact.created_at), Key(Artifact.id)]
    return await page(
        db, query, kind="artifacts", keys=keys, descending=True, limit=limit, cursor=cursor
    )


async def history(
    db: AsyncSession,
    serial: str,
    *,
    limit: int = DEFAULT_LIMIT,
    cursor: str | None = None,
    before: int | None = None,
) -> Page[StatusReport]:
    """A page of the device's reports, newest first (``before``: only older than that id)."""
    query = select(StatusReport).where(StatusReport.device_serial == serial)
    if before is not None:
        query = query.where(StatusReport.id < before)
    return await page(
        db,
        query,
        kind="history",
        keys=[Key(StatusReport.id)],
        descending=True,
        limit=limit,
        cursor=cursor,
    )
