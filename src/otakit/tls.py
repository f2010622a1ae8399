"""TLS client contexts for every otakit client (HTTP agent, MQTT device, publisher)."""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable

from otakit.errors import InputFileError, UsageError

PathLike = str | os.PathLike[str]


def client_context(
    ca_file: PathLike | None = None,
    cert_file: PathLike | None = None,
    key_file: PathLike | None = None,
) -> ssl.SSLContext:
    """A context that trusts ``ca_file`` (else the system's CAs) and presents ``cert_file``
    (with ``key_file`` when the key is in its own file).

    Raises :class:`~otakit.errors.InputFileError` for a file that cannot be read and
    :class:`~otakit.errors.UsageError` for one that holds no usable certificate or key.
    """
    context = ssl.create_default_context()
    if ca_file is not None:
        _load(ca_file, "CA file", lambda: context.load_verify_locations(ca_file))
    if cert_file is not None:
        _load(cert_file, "client certificate", lambda: context.load_cert_chain(cert_file, key_file))
    return context


def _load(path: PathLike, what: str, load: Callable[[], object]) -> None:
    try:
        load()
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        raise UsageError(f"{what} {path} cannot be used: {reason}", value=str(path)) from None
    except OSError as exc:
        raise InputFileError(
            f"cannot read {what} {path}: {exc.strerror or exc}", value=str(path)
        ) from None
