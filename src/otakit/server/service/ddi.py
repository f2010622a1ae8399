"""Eclipse hawkBit's Direct Device Integration (DDI) API, as otakit's rules: a hawkBit client
(SWUpdate's suricatta, Zephyr's hawkBit subsystem, RAUC's hawkBit updater) is an otakit device,
its *action* is the otakit deployment offered to it (the action id is the deployment id), its
feedback is a status report, and an aborted rollout is a cancelAction.

- **Authorization** (:func:`credential`, :func:`controller`): ``TargetToken`` is the device's
  own token (its serial is the controller id); ``GatewayToken`` an enrollment token, acting for
  any controller of its product and registering an unknown one into its product and group on
  its first poll; no header only where the product allows anonymous devices (the device's
  product, else the product named by the tenant, else the one anonymous product).
- **Base poll** (:func:`poll`): one check-in (checkin.check_in); its links, first that applies:
  ``cancelAction`` (a deployment the device has in flight whose rollout was aborted, until the
  device answers the cancel), ``deploymentBase`` (its offer, unless it closed that action:
  a closed action is never offered again; or an action whose cancel it refused, which goes on
  as in hawkBit although its rollout was aborted), ``installedBase`` (its latest applied action);
  ``configData`` besides while it has sent no attributes.
- **configData** (:func:`configure`): attributes become device tags (merge, replace, remove);
  the server's own tags (product and group) are never changed by a device.
- **Feedback** (:func:`feedback`, :func:`status_of`): a status report about the action
  (checkin.report), so counts, rollouts and the health gate see it.
- **Downloads** (:func:`download`): only of a deployment that was offered to the device
  (offers.reportable) and whose rollout was not aborted, under the artifact's own file name;
  the first byte asked for makes a device with no standing in it downloading
  (:func:`download_started`).
- **Controller ids** are serials of at most 64 characters (letters, digits and ``. _ : -``,
  checked by the route): Zephyr's ``<board>-<hardware id>`` is often longer than a job
  document's SerialNumber, which no DDI device is sent.

Documents are built by pure functions from what was loaded (:func:`deployment_document`,
:func:`poll_document`). Every function takes ``now`` and leaves the commit to the caller.
Every query is by key: the device's rows of ``deployment_devices`` (indexed by serial), a
deployment by id.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from otakit.errors import (
    BlobNotFoundError,
    BlobStoreError,
    ForbiddenError,
    NotFoundError,
    NotOfferedError,
    UnauthorizedError,
    UnavailableError,
    UnprocessableError,
)
from otakit.protocol.states import FAILED, IN_FLIGHT, DeviceState
from otakit.server.blobs import BlobStore
from otakit.server.models import Artifact, Deployment, DeploymentDevice, Device, Rollout, Token
from otakit.server.service import artifacts, checkin, enrollment, offers, rollouts
from otakit.server.targeting import GROUP_TAG, PRODUCT_TAG
from otakit.server.tokens import Role, secret_matches, split_token, usable

log = logging.getLogger("otakit.server")

MAX_ATTRIBUTES = 64  # attributes a device may keep as tags (besides the server's own)
MAX_DETAIL = 64  # characters of a failure's first detail kept as the error
PROTECTED_TAGS = frozenset({PRODUCT_TAG, GROUP_TAG})
MD5SUM_SUFFIX = ".MD5SUM"
DEFAULT_POLL = 300  # seconds between base polls (ServerSettings.ddi_poll)
MAX_POLL = 24 * 3600 - 1  # config.polling.sleep is HH:MM:SS; SWUpdate's strptime takes hours < 24
MAX_DETAILS = 16  # details of a feedback kept (SWUpdate sends up to 48 log lines)
MAX_DETAIL_CHARS = 512

# a chunk's part: Zephyr's client takes only "bApp" (an MCUboot image); Linux clients "os"
PART_MCUBOOT = "bApp"
PART_OS = "os"

# the states of an action that is over for the device: it is not offered again
CLOSED = frozenset({DeviceState.APPLIED, DeviceState.UNKNOWN, *FAILED})


class Scheme(StrEnum):
    """The schemes of hawkBit's ``Authorization`` header."""

    TARGET = "TargetToken"
    GATEWAY = "GatewayToken"


class Execution(StrEnum):
    """``status.execution`` of a DDI feedback."""

    CLOSED = "closed"
    PROCEEDING = "proceeding"
    CANCELED = "canceled"
    SCHEDULED = "scheduled"
    REJECTED = "rejected"
    RESUMED = "resumed"
    DOWNLOADED = "downloaded"
    DOWNLOAD = "download"


class Finished(StrEnum):
    """``status.result.finished`` of a DDI feedback."""

    SUCCESS = "success"
    FAILURE = "failure"
    NONE = "none"


# --- who is asking ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Credential:
    """What the ``Authorization`` header holds: a scheme and its token, or neither (anonymous)."""

    scheme: Scheme | None = None
    token: Token | None = None


async def credential(db: AsyncSession, header: str | None, now: datetime) -> Credential:
    """The credential of an ``Authorization`` header (None or empty: anonymous).
    UnauthorizedError for another scheme or an unknown, revoked or expired token."""
    if not header or not header.strip():
        return Credential()
    name, _, value = header.strip().partition(" ")
    scheme = next((s for s in Scheme if s.value.lower() == name.lower()), None)
    if scheme is None:
        raise UnauthorizedError(
            "expected 'Authorization: TargetToken otk_...' or 'GatewayToken otk_...'"
        )
    parts = split_token(value)
    token = await db.get(Token, parts[0]) if parts is not None else None
    if token is None or parts is None or not secret_matches(parts[1], token.secret_hash):
        raise UnauthorizedError("unknown or revoked token")
    if not usable(token, now):
        why = "revoked" if token.revoked_at is not None else "expired"
        raise UnauthorizedError(f"this token has {why}")
    return Credential(scheme, token)


@dataclass(frozen=True)
class Controller:
    """The device a DDI request is for; ``revision``: the offers revision read with it (None:
    not read, it was registered now)."""

    device: Device
    revision: int | None = None
    registered: bool = False


async def controller(
    db: AsyncSession,
    tenant: str,
    controller_id: str,
    who: Credential,
    now: datetime,
    *,
    register: bool = False,
) -> Controller:
    """The device ``controller_id`` as ``who`` may act for it (``register``: an unknown one is
    registered, on its first poll). UnauthorizedError, ForbiddenError or NotFoundError."""
    device, at = await checkin.load(db, controller_id)
    token = who.token
    if who.scheme is Scheme.TARGET:
        assert token is not None
        if token.role != Role.DEVICE or not token.device_serial:
            raise ForbiddenError(
                f"a TargetToken must be a device token (this is a {token.role} token)"
            )
        if token.device_serial != controller_id:
            raise ForbiddenError("this TargetToken is another device's")
        if device is None:
            raise NotFoundError(f"device {controller_id!r} is not registered")
        return Controller(device, at)
    if who.scheme is Scheme.GATEWAY:
        assert token is not None
        if token.role != Role.ENROLL:
            raise ForbiddenError(
                f"a GatewayToken must be an enrollment token (this is a {token.role} token)"
            )
        if device is not None:
            if device.product != token.product:
                raise ForbiddenError(
                    f"device {controller_id!r} is not of this GatewayToken's product"
                )
            return Controller(device, at)
        if not register:
            raise NotFoundError(f"device {controller_id!r} is not registered; poll first")
        device, created = await enrollment.register(
            db, controller_id, token.product, token.group, token.id, now, job_serial=False
        )
        if not created and device.product != token.product:
            raise ForbiddenError(f"device {controller_id!r} is not of this GatewayToken's product")
        if created:
            log.info("device %r registered by DDI GatewayToken %s", controller_id, token.id)
        return Controller(device, None, created)
    known = await offers.catalogue(db, now, at=at)
    if device is not None:
        product = known.products.get(device.product) if device.product else None
        if product is None or not product.anonymous:
            raise UnauthorizedError(
                "this device's product does not allow anonymous devices; "
                "send 'Authorization: TargetToken ...'"
            )
        return Controller(device, at)
    if not register:
        raise NotFoundError(f"device {controller_id!r} is not registered; poll first")
    named = tenant if tenant in known.products else None
    product_name = await checkin.anonymous_product(db, named, now)
    device, created = await enrollment.register(
        db, controller_id, product_name, None, None, now, job_serial=False
    )
    if not created and device.product != product_name:
        raise UnauthorizedError("this device's product does not allow anonymous devices")
    if created:
        log.info(
            "anonymous device %r registered for product %r over DDI", controller_id, product_name
        )
    return Controller(device, None, created)


# --- the base poll ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Standing:
    """The device's rows of ``deployment_devices`` (with their rollouts), read once."""

    rows: tuple[tuple[DeploymentDevice, Rollout | None], ...]

    def closed(self) -> set[int]:
        """The actions the device closed (or whose cancel it confirmed)."""
        return {
            row.deployment_id
            for row, _ in self.rows
            if row.status in CLOSED or row.error == checkin.CANCELLED
        }

    def cancel(self) -> DeploymentDevice | None:
        """The newest action in flight whose rollout was aborted and whose cancel the device
        has not answered."""
        pending = [
            row
            for row, rollout in self.rows
            if rollout is not None
            and rollout.state == rollouts.ABORTED
            and row.status in IN_FLIGHT
            and row.error not in (checkin.CANCELLED, checkin.CANCEL_REJECTED)
        ]
        return max(pending, key=lambda r: r.deployment_id, default=None)

    def going_on(self) -> int | None:
        """The newest action whose cancel the device refused and has not closed: it goes on
        (hawkBit's rule), although its rollout was aborted."""
        refused = [
            row.deployment_id
            for row, _ in self.rows
            if row.error == checkin.CANCEL_REJECTED and row.status in IN_FLIGHT
        ]
        return max(refused, default=None)

    def installed(self) -> int | None:
        """The action the device applied last."""
        applied = [row for row, _ in self.rows if row.status == DeviceState.APPLIED]
        latest = max(
            applied, key=lambda r: (r.applied_at or r.updated_at, r.deployment_id), default=None
        )
        return latest.deployment_id if latest is not None else None


async def standing(db: AsyncSession, serial: str) -> Standing:
    """The device's standing in every deployment it was in (by the serial index)."""
    rows = await db.execute(
        select(DeploymentDevice, Rollout)
        .outerjoin(Rollout, Rollout.deployment_id == DeploymentDevice.deployment_id)
        .where(DeploymentDevice.device_serial == serial)
    )
    return Standing(tuple((row, rollout) for row, rollout in rows))


@dataclass(frozen=True)
class Poll:
    """What the base poll answers: the link to follow (at most one action) and whether the
    device is asked for its attributes."""

    cancel: int | None = None
    deployment: int | None = None
    installed: int | None = None
    config: bool = False
    changed: set[int] = field(default_factory=set)  # deployments whose standing changed


def wants_attributes(device: Device) -> bool:
    """Whether the device has sent no attributes yet (it has no tags but the server's)."""
    return not any(key not in PROTECTED_TAGS for key in device.tags or {})


async def poll(db: AsyncSession, ctl: Controller, now: datetime) -> Poll:
    """A base poll: one check-in, and what the device is to do next."""
    device = ctl.device
    before = await standing(db, device.serial)
    closed = before.closed()
    visit = await checkin.check_in(
        db, device, now, at=ctl.revision, among=lambda o: o.deployment.id not in closed
    )
    # the abort notice of the check-in changed the rows it read in place (one session)
    cancel = before.cancel()
    config = wants_attributes(device)
    if cancel is not None:
        return Poll(cancel=cancel.deployment_id, config=config, changed=visit.changed)
    if visit.offer is not None:
        return Poll(deployment=visit.offer.deployment.id, config=config, changed=visit.changed)
    going_on = before.going_on()
    if going_on is not None:
        return Poll(deployment=going_on, config=config, changed=visit.changed)
    return Poll(installed=before.installed(), config=config, changed=visit.changed)


def sleep_text(seconds: int) -> str:
    """``config.polling.sleep``: HH:MM:SS."""
    seconds = max(1, min(seconds, MAX_POLL))
    return f"{seconds // 3600:02d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def poll_document(answer: Poll, base: str, sleep: int) -> dict[str, Any]:
    """The base poll's JSON; ``base``: the controller's absolute URL."""
    links: dict[str, dict[str, str]] = {}
    if answer.cancel is not None:
        # a leading zero: Zephyr 4.1+ reads the id one character after "cancelAction/"
        links["cancelAction"] = {"href": f"{base}/cancelAction/0{answer.cancel}"}
    elif answer.deployment is not None:
        links["deploymentBase"] = {"href": f"{base}/deploymentBase/{answer.deployment}"}
    elif answer.installed is not None:
        links["installedBase"] = {"href": f"{base}/installedBase/{answer.installed}"}
    if answer.config:
        links["configData"] = {"href": f"{base}/configData"}
    return {"config": {"polling": {"sleep": sleep_text(sleep)}}, "_links": links}


# --- configData ---------------------------------------------------------------------------------


def configured_tags(tags: Mapping[str, str], mode: str, data: Mapping[str, str]) -> dict[str, str]:
    """The device's tags after a configData of ``mode`` (merge, replace, remove) with
    ``data``; the server's tags stay as they are. UnprocessableError past MAX_ATTRIBUTES."""
    own = {k: v for k, v in tags.items() if k in PROTECTED_TAGS}
    sent = {k: v for k, v in data.items() if k not in PROTECTED_TAGS}
    attributes = {k: v for k, v in tags.items() if k not in PROTECTED_TAGS}
    if mode == "replace":
        attributes = sent
    elif mode == "remove":
        attributes = {k: v for k, v in attributes.items() if k not in sent}
    else:
        attributes.update(sent)
    if len(attributes) > MAX_ATTRIBUTES:
        raise UnprocessableError(
            f"a device keeps at most {MAX_ATTRIBUTES} attributes ({len(attributes)} with these)"
        )
    return {**attributes, **own}


def configure(device: Device, mode: str, data: Mapping[str, str], now: datetime) -> None:
    """The device's attributes (a configData) become its tags."""
    tags = configured_tags(device.tags or {}, mode, data)
    if tags != (device.tags or {}):
        device.tags = tags  # a new dict: the JSON column sees the change
    checkin.seen(device, now)


# --- actions ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Action:
    deployment: Deployment
    artifact: Artifact


async def action(db: AsyncSession, device: Device, action_id: int, now: datetime) -> Action:
    """Deployment ``action_id`` as an action of ``device``: NotFoundError when there is no such
    deployment, NotOfferedError (403) when it was not offered to the device."""
    allowed = await offers.reportable(db, device, action_id, now)
    if allowed is None:
        raise NotFoundError(f"action {action_id} not found")
    if not allowed:
        raise NotOfferedError(f"action {action_id} was not offered to this device")
    deployment = await db.get(Deployment, action_id)
    artifact = await db.get(Artifact, deployment.artifact_id) if deployment else None
    if deployment is None or artifact is None:
        raise NotFoundError(f"action {action_id} not found")
    return Action(deployment, artifact)


async def with_hashes(db: AsyncSession, store: BlobStore, artifact: Artifact) -> bool:
    """Fill the artifact's SHA-1 and MD5 when it has none (uploaded before they were kept);
    True when the caller has something to commit."""
    if artifact.sha1 is not None and artifact.md5 is not None:
        return False
    try:
        await artifacts.ensure_hashes(db, store, artifact)
    except BlobNotFoundError:
        raise NotFoundError("no such file") from None
    except BlobStoreError as exc:  # S3 unreachable, or bytes that are not the artifact's
        raise UnavailableError(f"the blob store is unavailable: {exc.message}") from None
    return True


async def installed(db: AsyncSession, device: Device, action_id: int, now: datetime) -> Action:
    """Action ``action_id`` when the device applied it (installedBase), else NotFoundError."""
    row = await db.get(DeploymentDevice, (action_id, device.serial))
    if row is None or row.status != DeviceState.APPLIED:
        raise NotFoundError(f"action {action_id} is not installed on this device")
    return await action(db, device, action_id, now)


def part_of(artifact: Artifact) -> str:
    """The chunk's part: ``bApp`` for an MCUboot image, ``os`` for a raw file or a package."""
    return PART_MCUBOOT if artifact.kind == "image" else PART_OS


def artifact_url(base: str, deployment_id: int, artifact: Artifact) -> str:
    return f"{base}/softwaremodules/{deployment_id}/artifacts/{artifact.name}"


def deployment_document(
    deployment_id: int, artifact: Artifact, base: str, *, https: bool = False
) -> dict[str, Any]:
    """The deploymentBase (and installedBase) JSON of an action: one chunk with one artifact;
    ``https``: the request came over HTTPS (the ``download`` and ``md5sum`` links too). No
    value is null (Zephyr's parser fails on null)."""
    url = artifact_url(base, deployment_id, artifact)
    links = {"download-http": {"href": url}, "md5sum-http": {"href": url + MD5SUM_SUFFIX}}
    if https:
        links["download"] = {"href": url}
        links["md5sum"] = {"href": url + MD5SUM_SUFFIX}
    hashes = {"sha1": artifact.sha1, "md5": artifact.md5, "sha256": artifact.id}
    entry = {
        "filename": artifact.name,
        "size": artifact.size,
        "hashes": {k: v for k, v in hashes.items() if v},
        "_links": links,
    }
    chunk = {
        "part": part_of(artifact),
        "version": artifact.version,
        "name": artifact.name,
        "artifacts": [entry],
    }
    return {
        "id": str(deployment_id),
        "deployment": {"download": "forced", "update": "forced", "chunks": [chunk]},
    }


# --- feedback -----------------------------------------------------------------------------------


def status_of(
    execution: Execution, finished: Finished, details: list[str]
) -> tuple[str, str | None]:
    """The status report (state, error) of a deploymentBase feedback."""
    if execution in (
        Execution.PROCEEDING,
        Execution.SCHEDULED,
        Execution.RESUMED,
        Execution.DOWNLOAD,
    ):
        return DeviceState.DOWNLOADING, None
    if execution is Execution.DOWNLOADED:
        return DeviceState.APPLYING, None
    if execution is Execution.REJECTED:
        return DeviceState.ERROR, "rejected"
    if execution is Execution.CANCELED:
        return DeviceState.INTERRUPTED, checkin.CANCELLED
    if finished is Finished.SUCCESS:
        return DeviceState.APPLIED, None
    if finished is Finished.FAILURE:
        reason = next((" ".join(d.split()) for d in details if d.strip()), "failure")
        return DeviceState.ERROR, reason[:MAX_DETAIL]
    return DeviceState.UNKNOWN, None


_EXECUTION = re.compile(r'"execution"\s*:\s*"([A-Za-z]{1,16})"')
_FINISHED = re.compile(r'"finished"\s*:\s*"([A-Za-z]{1,16})"')
_DETAILS = re.compile(r'"details"\s*:\s*\[\s*"(.*)"\s*\]', re.DOTALL)


def salvage_feedback(body: bytes) -> bytes | None:
    """A feedback whose body is not JSON, as JSON, when its execution can be read; else None.
    SWUpdate writes its failure details into the JSON unescaped, so an error message with a
    quote makes the body invalid: its result must still count (protocols.md: accept what a
    client sends, behave correctly). The details are kept as far as they can be read."""
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError):
        pass
    else:
        return None
    text = body.decode("utf-8", "replace")
    execution = _EXECUTION.search(text)
    if execution is None:
        return None
    finished = _FINISHED.search(text)
    details = _DETAILS.search(text)
    status = {
        "execution": execution.group(1),
        "result": {"finished": finished.group(1) if finished else Finished.NONE.value},
        "details": re.split(r'"\s*,\s*"', details.group(1)) if details else [],
    }
    return json.dumps({"status": status}).encode()


def bounded_details(details: object) -> object:
    """A feedback's details, at most MAX_DETAILS of at most MAX_DETAIL_CHARS each (the rest is
    dropped, not refused: SWUpdate's log lines would be lost with the report)."""
    if not isinstance(details, list):
        return details
    return [d[:MAX_DETAIL_CHARS] if isinstance(d, str) else d for d in details[:MAX_DETAILS]]


async def feedback(
    db: AsyncSession,
    device: Device,
    action_id: int,
    now: datetime,
    *,
    execution: Execution,
    finished: Finished,
    details: list[str],
    keep: int,
) -> int | None:
    """A deploymentBase feedback as a status report about the action (an applied one carries
    the artifact's version, which the device then runs). Returns the deployment whose standing
    changed."""
    found = await action(db, device, action_id, now)
    state, error = status_of(execution, finished, details)
    version = found.artifact.version if state == DeviceState.APPLIED else None
    return await checkin.report(
        db,
        device.serial,
        now,
        status=state,
        error=error,
        version=version,
        deployment_id=action_id,
        offered=True,  # action() checked it
        keep=keep,
    )


async def cancel(db: AsyncSession, device: Device, action_id: int) -> DeploymentDevice:
    """The action whose cancel is pending (cancelAction), else NotFoundError."""
    row = await db.get(DeploymentDevice, (action_id, device.serial))
    rollout = await db.scalar(select(Rollout).where(Rollout.deployment_id == action_id))
    pending = Standing(((row, rollout),)).cancel() if row is not None else None
    if pending is None:
        raise NotFoundError(f"no cancel is pending for action {action_id}")
    return pending


async def cancel_feedback(
    db: AsyncSession,
    device: Device,
    action_id: int,
    now: datetime,
    *,
    execution: Execution,
    finished: Finished,
    keep: int,
) -> int | None:
    """The device's answer to a cancelAction: closed (but not failed) or canceled confirms it
    (the action stays interrupted, error ``cancelled``); rejected or closed with failure
    refuses it (``cancel rejected``); either way it is not asked again. Anything else (it is
    still working on it) changes nothing. An answer to a cancel already answered is accepted
    and changes nothing. Returns the deployment whose standing changed."""
    row = await db.get(DeploymentDevice, (action_id, device.serial))
    if row is not None and row.error in (checkin.CANCELLED, checkin.CANCEL_REJECTED):
        return None
    pending = await cancel(db, device, action_id)
    confirmed = execution is Execution.CANCELED or (
        execution is Execution.CLOSED and finished is not Finished.FAILURE
    )
    refused = execution is Execution.REJECTED or (
        execution is Execution.CLOSED and finished is Finished.FAILURE
    )
    if confirmed:
        state, error = DeviceState.INTERRUPTED.value, checkin.CANCELLED
    elif refused:
        state, error = pending.status, checkin.CANCEL_REJECTED
    else:
        return None
    return await checkin.report(
        db,
        device.serial,
        now,
        status=state,
        error=error,
        deployment_id=action_id,
        offered=True,  # it stands in the deployment
        keep=keep,
    )


# --- downloads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Download:
    artifact: Artifact
    md5sum: bool  # the ``<file>.MD5SUM`` text, not the file


async def download(
    db: AsyncSession, device: Device, module_id: int, filename: str, now: datetime
) -> Download:
    """The file ``filename`` of software module ``module_id`` (the deployment), when it was
    offered to the device and its rollout, if any, was not aborted (an abort stops downloads
    too, as rollouts.may_download says); ``filename`` + ``.MD5SUM`` is its MD5 line."""
    found = await action(db, device, module_id, now)
    state = await db.scalar(select(Rollout.state).where(Rollout.deployment_id == module_id))
    row = await db.get(DeploymentDevice, (module_id, device.serial))
    if state == rollouts.ABORTED and (row is None or row.error != checkin.CANCEL_REJECTED):
        raise ForbiddenError(f"action {module_id} was cancelled: its rollout was aborted")
    name = found.artifact.name
    if filename == name:
        return Download(found.artifact, md5sum=False)
    if filename == name + MD5SUM_SUFFIX:
        return Download(found.artifact, md5sum=True)
    raise NotFoundError(f"software module {module_id} has no artifact {filename!r}")


async def download_started(
    db: AsyncSession, device: Device, action_id: int, now: datetime, *, keep: int
) -> int | None:
    """The first byte of an action's file was asked for: a device that has no standing in it
    yet is downloading it (Zephyr's client sends no feedback before it has installed, and a
    cancel is offered only for what is in flight). Returns the deployment whose standing
    changed."""
    if await db.get(DeploymentDevice, (action_id, device.serial)) is not None:
        return None
    return await checkin.report(
        db,
        device.serial,
        now,
        status=DeviceState.DOWNLOADING,
        deployment_id=action_id,
        offered=True,  # download() checked it
        keep=keep,
    )


def md5sum_text(artifact: Artifact) -> str:
    """The MD5SUM resource: ``<md5>  <filename>`` and a newline (md5sum's own format)."""
    return f"{artifact.md5}  {artifact.name}\n"
