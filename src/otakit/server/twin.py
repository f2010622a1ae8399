"""Desired and reported state of a device, in the ``extFwInfo`` shape of protocols.md §7.

``desired.extFwInfo`` is what the device should run: version (an integer when the version is
one, as the gateway reference design uses), size, the download URL and its signature part
(``sas``, as the reference design splits them) and the SHA-256 in upper-case hex.
``reported.extFwInfo`` is what the device last said: Status, Error and, once applied, Version.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.protocol.states import DeviceState
from otakit.server.context import ServerState
from otakit.server.models import Artifact, ArtifactDelta, Device
from otakit.server.service import offers
from otakit.server.urls import sign_path

SECONDS_PER_DAY = 86400


class Twin(BaseModel):
    serial: str
    desired: dict[str, Any]
    reported: dict[str, Any]


def download_path(artifact: Artifact) -> str:
    return f"/dl/{artifact.id}/{artifact.name}"


# S3 pre-signed URLs (SigV4) live at most a week.
MAX_PRESIGNED_SECONDS = 7 * SECONDS_PER_DAY


def download_url(st: ServerState, artifact: Artifact, base_url: str) -> str:
    """An expiring URL for ``artifact``: the server's own signed URL, or, with
    ``direct_downloads`` and an S3 blob store, a pre-signed URL straight to the bucket."""
    lifetime = int(st.settings.url_days * SECONDS_PER_DAY)
    if st.settings.direct_downloads:
        direct = st.blobs.presigned_url(
            artifact.id, min(lifetime, MAX_PRESIGNED_SECONDS), filename=artifact.name
        )
        if direct is not None:
            return direct
    return base_url.rstrip("/") + sign_path(st.signing_key, download_path(artifact), lifetime)


DELTA_PREFIX = "/api/v1/device/deltas"  # api/device.py's delta_file
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def delta_path(delta: ArtifactDelta, name: str, serial: str) -> str:
    """Where device ``serial`` fetches ``delta`` (of the artifact called ``name``): the path
    names the device, so a URL signed for one device is no use to another."""
    return f"{DELTA_PREFIX}/{delta.id}/{serial}/{_UNSAFE.sub('_', name)}.delta"


def delta_url(st: ServerState, delta: ArtifactDelta, name: str, serial: str, base_url: str) -> str:
    """An expiring signed URL of ``delta`` for device ``serial`` (always the server's own: the
    route checks the device may fetch it, which a pre-signed S3 URL could not)."""
    lifetime = int(st.settings.url_days * SECONDS_PER_DAY)
    return base_url.rstrip("/") + sign_path(
        st.signing_key, delta_path(delta, name, serial), lifetime
    )


def _version_value(text: str) -> int | str:
    plain = text.split("+")[0]
    if plain.isdigit():
        return int(plain)
    parts = plain.split(".")
    if len(parts) == 3 and parts[1:] == ["0", "0"] and parts[0].isdigit():
        return int(parts[0])
    return text


async def twin_of(db: AsyncSession, st: ServerState, device: Device, base_url: str) -> Twin:
    offer = await offers.offer_for(db, device)
    desired: dict[str, Any] = {}
    if offer is not None:
        url, _, sas = download_url(st, offer.artifact, base_url).partition("?")
        desired["extFwInfo"] = {
            "version": _version_value(offer.artifact.version),
            "size": offer.artifact.size,
            "url": url,
            "sas": sas,
            "sha256": offer.artifact.id.upper(),
        }
    reported: dict[str, Any] = {}
    if device.status:
        info: dict[str, Any] = {"Status": device.status, "Error": device.error or "None"}
        if device.status == DeviceState.APPLIED and device.version:
            info["Version"] = _version_value(device.version)
        reported["extFwInfo"] = info
    return Twin(serial=device.serial, desired=desired, reported=reported)
