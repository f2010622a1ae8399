"""Desired and reported state of a device, in the ``extFwInfo`` shape of protocols.md §7.

``desired.extFwInfo`` is what the device should run: version (an integer when the version is
one, as the gateway reference design uses), size, the download URL and its signature part
(``sas``, as the reference design splits them) and the SHA-256 in upper-case hex.
``reported.extFwInfo`` is what the device last said: Status, Error and, once applied, Version.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.server import deployments
from otakit.server.context import ServerState
from otakit.server.models import Artifact, Device
from otakit.server.urls import sign_path

SECONDS_PER_DAY = 86400


class Twin(BaseModel):
    serial: str
    desired: dict[str, Any]
    reported: dict[str, Any]


def download_path(artifact: Artifact) -> str:
    return f"/dl/{artifact.id}/{artifact.name}"


def signed_download(st: ServerState, artifact: Artifact) -> str:
    """The path and query of an expiring signed URL for ``artifact``."""
    lifetime = int(st.settings.url_days * SECONDS_PER_DAY)
    return sign_path(st.signing_key, download_path(artifact), lifetime)


def _version_value(text: str) -> int | str:
    plain = text.split("+")[0]
    if plain.isdigit():
        return int(plain)
    parts = plain.split(".")
    if len(parts) == 3 and parts[1:] == ["0", "0"] and parts[0].isdigit():
        return int(parts[0])
    return text


async def twin_of(db: AsyncSession, st: ServerState, device: Device, base_url: str) -> Twin:
    offer = deployments.select_offer(device, await deployments.active(db))
    desired: dict[str, Any] = {}
    if offer is not None:
        path, _, sas = signed_download(st, offer.artifact).partition("?")
        desired["extFwInfo"] = {
            "version": _version_value(offer.artifact.version),
            "size": offer.artifact.size,
            "url": base_url.rstrip("/") + path,
            "sas": sas,
            "sha256": offer.artifact.id.upper(),
        }
    reported: dict[str, Any] = {}
    if device.status:
        info: dict[str, Any] = {"Status": device.status, "Error": device.error or "None"}
        if device.status == "applied" and device.version:
            info["Version"] = _version_value(device.version)
        reported["extFwInfo"] = info
    return Twin(serial=device.serial, desired=desired, reported=reported)
