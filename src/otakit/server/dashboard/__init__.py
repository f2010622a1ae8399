"""The operator's dashboard, served at ``/``: one HTML page, a stylesheet and a script.

The page is a small front-end in plain JavaScript (no build step, nothing fetched from anywhere
but this server) that calls the management API with the token the operator signs in with: an
admin token, or a viewer token (read-only: the page then shows no control that changes
anything, and the server refuses such calls anyway). The token is kept in the tab's
``sessionStorage`` and sent only in the ``Authorization`` header: never in a URL, so it is in
no access log. The routes are left out of the OpenAPI spec.

Every response carries a strict Content-Security-Policy (scripts, styles and API calls from
this server only; no inline script), so injected markup could neither run nor send the token
elsewhere; the script itself builds the page with ``textContent``, never with HTML strings.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from fastapi import APIRouter, Request, Response

from otakit.errors import NotFoundError

ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
}
PREFIX = "/dashboard/"  # the script and the stylesheet; the page itself is at /
SECURITY_HEADERS = {
    "content-security-policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "x-frame-options": "DENY",
    "cache-control": "no-cache",  # revalidate with the ETag: a new otakit shows at once
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    media_type: str
    etag: str


@cache
def asset(name: str) -> Asset:
    """One of the dashboard's files, read from the package once."""
    body = resources.files(__package__).joinpath("static", name).read_bytes()
    return Asset(body, ASSETS[name], f'"{hashlib.sha256(body).hexdigest()[:32]}"')


def _answer(request: Request, name: str) -> Response:
    found = asset(name)
    headers = {**SECURITY_HEADERS, "etag": found.etag}
    if request.headers.get("if-none-match") == found.etag:
        return Response(status_code=304, headers=headers)
    return Response(found.body, media_type=found.media_type, headers=headers)


router = APIRouter(include_in_schema=False)


@router.get("/")
async def index(request: Request) -> Response:
    """The dashboard page."""
    return _answer(request, "index.html")


@router.get(PREFIX + "{name}")
async def static(name: str, request: Request) -> Response:
    """The dashboard's script and stylesheet."""
    if name not in ASSETS or name == "index.html":
        raise NotFoundError(f"no dashboard file {name!r}")
    return _answer(request, name)
