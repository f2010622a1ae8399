"""The management API's client for every remote ``otakit`` command, and their shared output.

The server and admin token come from ``--server``/``--token`` or ``$OTAKIT_SERVER``/
``$OTAKIT_TOKEN``; every failed call becomes one :class:`~otakit.errors.ApiError` line that says
what went wrong and what to do: the token refused (401), a token whose role may not do this
(403), nothing listening at the URL, something listening that is not an otakit server, or the
server's own ``{"error", "message"}`` refusal.

Lists and records are printed with :func:`show_table` (readable at 80 columns: cells wrap, and
whole columns are dropped when the terminal is too narrow) or, with ``--json``, as the server's
JSON (:func:`print_json`).
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

import httpx
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from otakit.errors import ApiError, UsageError, causes

SERVER_ENV = "OTAKIT_SERVER"
TOKEN_ENV = "OTAKIT_TOKEN"
DEFAULT_SERVER = "http://127.0.0.1:8080"
SHORT_ID = 12  # the prefix of an artifact's SHA-256 the dashboard and tables show

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ServerOption = Annotated[
    str | None,
    typer.Option(
        "--server", metavar="URL", help=f"Server URL (default ${SERVER_ENV}).", show_default=False
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token", metavar="TOKEN", help=f"Admin token (default ${TOKEN_ENV}).", show_default=False
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the server's JSON.")]


def _otakit_error(response: httpx.Response) -> tuple[str, str] | None:
    """The ``(error, message)`` of an otakit error answer; None if the body is not one."""
    try:
        body = response.json()
    except ValueError:
        return None
    if (
        isinstance(body, dict)
        and isinstance(body.get("error"), str)
        and isinstance(body.get("message"), str)
    ):
        return body["error"], body["message"]
    return None


def _what(response: httpx.Response) -> str:
    """A few words on an answer that is not otakit's: status and content type."""
    kind = response.headers.get("content-type", "no content type").split(";")[0].strip()
    return f"it answered {response.status_code} {response.reason_phrase} with {kind}".strip()


class ManagementClient:
    """A small client of the management API; every failure is one :class:`ApiError`."""

    def __init__(self, server: str, token: str, *, timeout: float = 60) -> None:
        self.server = server.rstrip("/")
        self._http = httpx.Client(
            base_url=self.server,
            headers={"authorization": f"Bearer {token}"},
            timeout=httpx.Timeout(timeout, connect=min(timeout, 10)),
        )

    def __enter__(self) -> ManagementClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The server's answer; ApiError if it refused, is not otakit, or does not answer.

        A 2xx answer with a body must be JSON (every management call answers JSON or nothing):
        a web page there means the URL is not an otakit server.
        """
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            if isinstance(_cause(exc), socket.gaierror):  # the host name does not resolve
                raise ApiError(
                    f"nothing answers at {self.server}: no host has the name "
                    f"{self._http.base_url.host!r} ({_reason(exc)}): check --server / "
                    f"${SERVER_ENV}"
                ) from None
            raise ApiError(
                f"nothing answers at {self.server}: is `otakit serve` running? ({_reason(exc)})"
            ) from None
        except httpx.TimeoutException:
            raise ApiError(
                f"{self.server} accepted the connection but did not answer {method} {path} in "
                "time: is it an otakit server, and is it overloaded?"
            ) from None
        except httpx.HTTPError as exc:
            raise ApiError(f"no otakit server answers at {self.server} ({_reason(exc)})") from None
        status = response.status_code
        if status < 400:
            if response.content and not _is_json(response):
                raise ApiError(
                    f"no otakit server answers at {self.server} ({_what(response)} to "
                    f"{method} {path}, not JSON): check --server / ${SERVER_ENV}",
                    status=status,
                )
            return response
        refusal = _otakit_error(response)
        if refusal is None:
            raise ApiError(
                f"no otakit server answers at {self.server} ({_what(response)} to "
                f"{method} {path}): check --server / ${SERVER_ENV}",
                status=status,
            )
        code, message = refusal
        if status == 401:
            text = (
                f"the server at {self.server} refused the token ({message}): "
                f"check --token / ${TOKEN_ENV}"
            )
        elif status == 403:
            text = (
                f"{method} {path}: the token's role may not do this ({message}): use an admin token"
            )
        else:
            text = f"{method} {path}: {status} {message}"
        raise ApiError(text, status=status, error=code)

    def json(self, method: str, path: str, **kwargs: Any) -> Any:
        """The JSON body of a call that answers JSON (see :meth:`request`)."""
        response = self.request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise ApiError(
                f"no otakit server answers at {self.server} ({_what(response)} to "
                f"{method} {path}, not JSON)",
                status=response.status_code,
            ) from None

    def pages(
        self, path: str, params: dict[str, Any] | None = None, *, page_size: int = 100
    ) -> Iterator[list[dict[str, Any]]]:
        """The pages of a paged list (GET), following each answer's ``X-Next-Cursor``: a list
        is never asked for whole, and the caller may stop after the pages it needs."""
        query = {**(params or {}), "limit": page_size}
        while True:
            response = self.request("GET", path, params=query)
            page = response.json() if response.content else None
            if not isinstance(page, list):
                raise ApiError(
                    f"no otakit server answers at {self.server} (GET {path} is not a list)"
                )
            yield page
            cursor = response.headers.get("x-next-cursor")
            if not cursor:
                return
            query["cursor"] = cursor

    def items(
        self, path: str, params: dict[str, Any] | None = None, *, limit: int | None = None
    ) -> list[dict[str, Any]]:
        """Up to ``limit`` items of a paged list (all of them when None), page by page."""
        found: list[dict[str, Any]] = []
        size = min(limit, 100) if limit else 100
        for page in self.pages(path, params, page_size=size):
            found.extend(page)
            if limit is not None and len(found) >= limit:
                return found[:limit]
        return found


def _is_json(response: httpx.Response) -> bool:
    kind: str = response.headers.get("content-type", "").split(";")[0].strip().lower()
    return kind == "application/json" or kind.endswith("+json")


def _cause(exc: BaseException) -> BaseException:
    """The innermost exception under ``exc`` (the socket's own error)."""
    *_, innermost = causes(exc)
    return innermost


def _reason(exc: httpx.HTTPError) -> str:
    """The innermost cause's words, on one line (``[Errno 111] Connection refused``)."""
    cause = _cause(exc)
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text[:200]


def connect(server: str | None, token: str | None) -> ManagementClient:
    """A client for ``--server``/``--token``, else ``$OTAKIT_SERVER``/``$OTAKIT_TOKEN``."""
    server = server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    token = token or os.environ.get(TOKEN_ENV)
    if not re.match(r"^https?://[^/\s]+", server):
        raise UsageError(
            f"--server {server!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:8080)",
            value=server,
        )
    if not token:
        raise UsageError(f"give an admin token with --token or ${TOKEN_ENV}")
    return ManagementClient(server, token)


# --- output ------------------------------------------------------------------------------------


def print_json(value: Any) -> None:
    """The server's JSON, as it came (for ``--json``)."""
    out.print_json(json.dumps(value))


@dataclass(frozen=True)
class Column:
    """A column of :func:`show_table`.

    ``key`` is a field of the row or a function of the row. ``drop`` 0: always shown; when the
    terminal is too narrow for every column, the highest ``drop`` goes first. ``min_width``: the
    narrowest the column may wrap to (at least its header's longest word)."""

    header: str
    key: str | Callable[[Mapping[str, Any]], object]
    justify: Literal["left", "right"] = "left"
    drop: int = 0
    min_width: int = 0


# A cell's words longer than this may be folded rather than widen the column's minimum.
_LONG_WORD = 16


def cell(value: object) -> str:
    """A value as a table cell: None "-", booleans yes/no, mappings "k=v, ...", lists "a, b"."""
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={cell(v)}" for k, v in value.items()) or "-"
    if isinstance(value, list | tuple):
        return ", ".join(cell(v) for v in value) or "-"
    return str(value)


def timestamp(value: object) -> str:
    """An ISO 8601 time from the server as ``YYYY-MM-DD HH:MM:SS`` (UTC, as sent); "-" if None."""
    if not value:
        return "-"
    try:
        moment = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return str(value)
    return moment.strftime("%Y-%m-%d %H:%M:%S")


def short_id(value: object) -> str:
    """An artifact's SHA-256 as the 12-character prefix every command accepts."""
    return str(value)[:SHORT_ID] if value else "-"


def _value(row: Mapping[str, Any], column: Column) -> str:
    return cell(column.key(row) if callable(column.key) else row.get(column.key))


def _minimum(column: Column, cells: list[str]) -> int:
    words = [len(w) for w in column.header.split()]
    for text in cells:
        words += [min(len(w), _LONG_WORD) for w in text.split()]
    return max([column.min_width, 1, *words])


def show_record(
    record: Mapping[str, Any],
    fields: Sequence[Column],
    *,
    title: str | None = None,
    console: Console | None = None,
) -> None:
    """One record (``... show``) as a two-column table: each field's header and its value."""
    rows = [{"field": f.header, "value": _value(record, f)} for f in fields]
    show_table(
        rows, (Column("field", "field"), Column("value", "value")), title=title, console=console
    )


def show_table(
    rows: Iterable[Mapping[str, Any]],
    columns: Sequence[Column],
    *,
    title: str | None = None,
    empty: str = "none",
    console: Console | None = None,
) -> None:
    """Print ``rows`` as a table that fits the terminal (``$COLUMNS``, 80 when not a terminal).

    Cells wrap at spaces and long words (ids, hashes) fold, never ellipsised; if even the
    narrowest widths do not fit, whole columns are left out, highest ``drop`` first. No rows:
    ``empty`` on stderr, so that stdout stays empty for scripts."""
    console = console or out
    rows = list(rows)
    if not rows:
        err.print(empty, markup=False)
        return
    cells = [[_value(row, c) for c in columns] for row in rows]
    shown = list(range(len(columns)))
    minimum = {i: _minimum(columns[i], [r[i] for r in cells]) for i in shown}

    def needed() -> int:  # the box: a border per column and one more, one space each side
        return sum(minimum[i] for i in shown) + 3 * len(shown) + 1

    while needed() > console.width:
        droppable = [i for i in shown if columns[i].drop > 0]
        if not droppable:
            break
        shown.remove(max(droppable, key=lambda i: (columns[i].drop, i)))
    table = Table(title=title, title_justify="left")
    for i in shown:
        # no min_width for rich: it clamps after shrinking and would then crop the right edge
        table.add_column(columns[i].header, justify=columns[i].justify, overflow="fold")
    for row in cells:
        table.add_row(*(Text(row[i]) for i in shown))
    console.print(table, soft_wrap=False)


def limit_option(what: str) -> Any:
    """``--limit N``: how many rows a list shows (read a page at a time until then)."""
    return typer.Option("--limit", metavar="N", min=1, help=f"Show at most N {what}.")


def first(
    client: ManagementClient, path: str, params: dict[str, Any], limit: int
) -> tuple[list[dict[str, Any]], bool]:
    """The first ``limit`` items of a paged list, and whether there are more (one more item is
    asked for to know; pages stop being read once there are enough)."""
    items = client.items(path, params, limit=limit + 1)
    return items[:limit], len(items) > limit


def fitting(rows: list[dict[str, Any]], columns: list[Column]) -> list[Column]:
    """The columns to show: optional ones (``drop`` > 0, highest first) are left out until every
    column's widest line fits the console, so that what is shown wraps at spaces at most and
    no serial or id is folded."""
    shown = list(columns)

    def widest(column: Column) -> int:
        values = [column.key(r) if callable(column.key) else r.get(column.key) for r in rows]
        lines = [column.header] + [line for v in values for line in cell(v).splitlines()]
        return max(len(line) for line in lines)

    widths = {id(c): widest(c) for c in columns}
    while sum(widths[id(c)] + 3 for c in shown) + 1 > out.width and any(c.drop for c in shown):
        shown.remove(max((c for c in shown if c.drop), key=lambda c: c.drop))
    return shown


def note_more(more: bool, limit: int, what: str) -> None:
    if more:
        err.print(f"(the first {limit} {what}; --limit N shows more)")
