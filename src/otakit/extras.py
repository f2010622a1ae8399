"""Which optional extras a command needs, and the one-line error when one is missing.

The base install (``pip install otakit``, or ``otakit[agent]`` on a gateway) signs and checks
images, runs the device agent and the remote management commands; the update server's stack
(FastAPI, SQLAlchemy, uvicorn, ...) comes with ``otakit[server]``. Modules of an extra are
imported only inside the commands that need them, each of which calls :func:`require` first, so
a gateway never loads them and a missing one is one line, not a traceback.
"""

from __future__ import annotations

import importlib.util

from otakit.errors import MissingExtraError

# The modules each extra brings (import names), as pyproject.toml's optional-dependencies list
# their distributions; tests/test_packaging.py keeps the two in step.
EXTRAS: dict[str, tuple[str, ...]] = {
    "server": (
        "fastapi",
        "uvicorn",
        "sqlalchemy",
        "alembic",
        "aiosqlite",
        "asyncpg",
        "boto3",
    ),
    "sim": ("smp",),
}


def missing(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (none: the extra is installed)."""
    absent = []
    for name in EXTRAS[extra]:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # a broken install, or an import hook refusing it
            found = False
        if not found:
            absent.append(name)
    return absent


def require(extra: str, command: str) -> None:
    """Raise :class:`MissingExtraError` (one line: ``command``, the extra, the pip command)
    unless every module of ``extra`` is installed.

    Raises:
        MissingExtraError: some of the extra's modules are not installed.
    """
    absent = missing(extra)
    if absent:
        raise MissingExtraError(
            f"{command} needs the {extra} extra: pip install 'otakit[{extra}]'", value=absent
        )
