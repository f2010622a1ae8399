"""The management API's client for every remote ``otakit`` command, and their shared options.

The server and admin token come from ``--server``/``--token`` or ``$OTAKIT_SERVER``/
``$OTAKIT_TOKEN``; every answer the server refuses becomes one :class:`~otakit.errors.ApiError`
line that says what to do.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console

from otakit.errors import ApiError, UsageError

SERVER_ENV = "OTAKIT_SERVER"
TOKEN_ENV = "OTAKIT_TOKEN"
DEFAULT_SERVER = "http://127.0.0.1:8080"

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


class ManagementClient:
    """A small client of the management API."""

    def __init__(self, server: str, token: str, *, timeout: float = 60) -> None:
        self._http = httpx.Client(
            base_url=server.rstrip("/"),
            headers={"authorization": f"Bearer {token}"},
            timeout=timeout,
        )

    def __enter__(self) -> ManagementClient:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ApiError(f"cannot reach {self._http.base_url}: {exc}") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("message") or response.text
            except ValueError:
                message = response.text
            raise ApiError(
                f"{method} {path}: {response.status_code} {str(message)[:300]}",
                status=response.status_code,
            )
        return response

    def pages(
        self, path: str, params: dict[str, Any] | None = None, *, page_size: int = 100
    ) -> Iterator[list[dict[str, Any]]]:
        """The pages of a paged list (GET), following each answer's ``X-Next-Cursor``: a list
        is never asked for whole, and the caller may stop after the pages it needs."""
        query = {**(params or {}), "limit": page_size}
        while True:
            response = self.request("GET", path, params=query)
            yield list(response.json())
            cursor = response.headers.get("x-next-cursor")
            if not cursor:
                return
            query["cursor"] = cursor


def connect(server: str | None, token: str | None) -> ManagementClient:
    """A client for ``--server``/``--token``, else ``$OTAKIT_SERVER``/``$OTAKIT_TOKEN``."""
    server = server or os.environ.get(SERVER_ENV) or DEFAULT_SERVER
    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        raise UsageError(f"give an admin token with --token or ${TOKEN_ENV}")
    return ManagementClient(server, token)


def print_json(value: Any) -> None:
    """The server's JSON, as it came (for ``--json``)."""
    out.print_json(json.dumps(value))
