"""``otakit sim run``: the OTA agent on a simulated device folder.

The simulated device keeps, next to its flash, the agent's resume journal
(``agent-journal.json``) and its device token (``agent-token``, readable by its owner only).
On first contact the token given may be an enrollment token: the agent checks in with the
JSON API, receives its own device token and keeps it. Then it runs the update (job or direct
flow), reboots the device (the simulated bootloader swaps), confirms the new image unless told
not to, and checks in again so the server learns the version that runs.

With an MQTT broker (``mqtt``) the job or the direct flow's image comes over MQTT instead
(protocols.md §3): the device announces itself with its identity and running version. An
HTTP(S) job from the publisher is downloaded over HTTP; an MQTT job from the HTTP server over
MQTT when a broker is given. The server URL is then optional: without it there is no
enrollment, check-in or revert report (those are the JSON API's).

With ``fetch_with="checkin"`` the job comes from the JSON check-in API (protocols.md §7), which
offers delta updates, as the MQTT publisher does: the device says which image it runs
(``image_sha256``, the digest of its primary slot) and which compressions it applies, and a
patch offered for exactly that image is downloaded into ``agent-journal-delta.part`` and
applied into the secondary slot (:class:`~otakit.device.delta_storage.DeltaStorage`). Every
check-in says ``image_sha256``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx

from otakit.device.agent import Flow, Outcome, Result, RetryState, update_once
from otakit.device.bootloader import Action, ImageBoot
from otakit.device.core.after_boot import AfterBoot, BootVerdict, after_boot
from otakit.device.delta_storage import DeltaStorage, delta_compressions
from otakit.device.events import Answer, Event, Reason, State
from otakit.device.flash import PowerCut
from otakit.device.journal import Journal
from otakit.device.service import AgentService
from otakit.device.storage import UpdateStorage
from otakit.device.transports.base import Transport
from otakit.device.transports.checkin import CheckinTransport
from otakit.device.transports.http import (
    MAX_JSON_BYTES,
    HttpSettings,
    HttpTransport,
    read_body,
)
from otakit.device.transports.mqtt import MqttSettings, MqttTransport
from otakit.errors import ApiError, DeviceError, UsageError
from otakit.files import write_atomic
from otakit.image.header import ImageVersion
from otakit.protocol.fwinfo import FwStatus, GatewayStatus
from otakit.protocol.version import FirmwareVersion
from otakit.sim.device import SimDevice
from otakit.sim.programmer import SimMcuProgrammer

log = logging.getLogger("otakit.agent")

TOKEN_FILE = "agent-token"
JOURNAL_FILE = "agent-journal.json"


@dataclass(frozen=True)
class RunReport:
    result: Result
    boot: dict[str, Any] | None  # the boot after the update
    confirmed: bool
    running: str | None


def _identity(device: SimDevice, version: str) -> dict[str, object]:
    ident = device.state.identity
    return {
        "serial": ident.serial,
        "board": ident.board,
        "product": ident.product,
        "manufacturer": ident.manufacturer,
        "version": version,
        "boots": device.state.boots,  # the server's health gate notices boot loops
        **({"image_sha256": running} if (running := device.image_sha256()) else {}),
    }


def _post(settings: HttpSettings, path: str, body: object) -> tuple[int, bytes]:
    """POST ``body`` to ``path`` on the configured server; the status and the answer (read up
    to MAX_JSON_BYTES). Raises ApiError when the server cannot be reached or says too much."""
    headers = {"accept-encoding": "identity"}
    if settings.token:
        headers["authorization"] = f"Bearer {settings.token}"
    server = settings.server
    try:
        with httpx.stream(
            "POST",
            f"{server.rstrip('/')}{path}",
            json=body,
            headers=headers,
            timeout=settings.timeout,
            verify=settings.verify(),
        ) as response:
            return response.status_code, read_body(
                response, MAX_JSON_BYTES, f"the answer to {path}", ApiError
            )
    except httpx.HTTPError as exc:
        raise ApiError(f"cannot reach {server}: {exc}") from None


def check_in(settings: HttpSettings, identity: dict[str, object]) -> dict[str, Any] | None:
    """POST /api/v1/device/checkin; the JSON answer, or None for 204."""
    status, raw = _post(settings, "/api/v1/device/checkin", identity)
    if status == 204:
        return None
    try:
        answer = json.loads(raw)
    except (ValueError, RecursionError):
        answer = None
    if status >= 400 or not isinstance(answer, dict):
        text = raw[:200].decode("utf-8", "replace")
        message = answer.get("message", text) if isinstance(answer, dict) else text
        raise ApiError(f"check-in refused: {status} {message}", status=status)
    return answer


def device_token(device: SimDevice, settings: HttpSettings, version: str) -> str | None:
    """The device's own token: kept from an earlier enrollment, or obtained now with the
    enrollment token ``settings.token``."""
    stored = device.dir / TOKEN_FILE
    if stored.exists():
        return stored.read_text().strip()
    if settings.token is None:
        return None
    try:
        answer = check_in(settings, _identity(device, version))
    except ApiError as exc:
        if exc.status in (403, 409):
            return settings.token  # already a device token, or already enrolled with this one
        raise
    minted = (answer or {}).get("device_token")
    if isinstance(minted, str) and minted.isprintable() and minted:
        write_atomic(stored, minted.encode() + b"\n", mode=0o600)
        return minted
    return settings.token


def run(
    directory: str | os.PathLike[str],
    server: str | HttpSettings | None,
    *,
    mqtt: MqttSettings | None = None,
    fetch_with: str | None = None,
    token: str | None = None,
    flow: Flow = Flow.JOB,
    confirm: bool = True,
    reboot: bool = True,
    validate_after_reboot: bool = True,
    send_result: bool = True,
    chunk_size: int = 4096,
    power_cut_after: int | None = None,
    callback: Callable[[Event], Answer | None] | None = None,
    retry: RetryState | None = None,
) -> RunReport:
    """One agent run. ``server`` is the server's URL (with ``token`` and ``chunk_size``) or the
    whole HTTP settings; ``mqtt`` the broker of the MQTT transport. ``fetch_with`` (``"http"`` or
    ``"mqtt"``, or ``"checkin"``: the JSON check-in API, with delta updates) says which asks
    for the job, by default MQTT when a broker is given. Without
    ``reboot`` the verified update is left pending for the next boot. With ``power_cut_after``,
    the flash loses power after that many operations during the update (torn), as a real device
    would; the next run resumes."""
    if isinstance(server, HttpSettings):
        settings = server
    elif server or mqtt is not None:  # MQTT only: HTTP(S) jobs name their server
        settings = HttpSettings(server=server or "", token=token, chunk_size=chunk_size)
    else:
        raise UsageError("give the update server's URL or an MQTT broker")
    fetch_with = fetch_with or ("mqtt" if mqtt is not None else "http")
    if fetch_with not in ("http", "mqtt", "checkin") or (fetch_with == "mqtt" and mqtt is None):
        raise UsageError(f"cannot ask for jobs with {fetch_with!r}", value=fetch_with)
    if fetch_with in ("http", "checkin") and not settings.server:
        raise UsageError("asking the server for jobs needs its URL")
    device = SimDevice(directory)
    status = device.status()["slots"][0]
    version = status["running"]
    if version is None:
        raise DeviceError(f"{device.dir} has no running image; boot it first (`otakit sim boot`)")
    version = version.split("+")[0]
    if settings.server:
        settings = replace(settings, token=device_token(device, settings, version))
        _report_revert(device, settings, version)
    board = device.state.identity.board
    transports: dict[str, Transport] = {"HTTP": HttpTransport(settings, board=board)}
    asks = transports["HTTP"]
    running = device.image_sha256()  # what the check-in (or the MQTT request) says it runs
    if fetch_with == "checkin":
        ident = device.state.identity
        transports["HTTP"].close()
        asks = transports["HTTP"] = CheckinTransport(
            settings,
            identity={
                "serial": ident.serial,
                "board": board,
                "product": ident.product,
                "manufacturer": ident.manufacturer,
            },
            version=lambda: version,
            reported=lambda: GatewayStatus(FwStatus.APPLYING),  # pending: the reboot applies it
            image_sha256=lambda: running,
            delta=delta_compressions(),
        )
    try:
        if mqtt is not None:
            ident = device.state.identity
            transports["MQTT"] = MqttTransport(
                mqtt,
                board=board,
                version=version,
                serial=ident.serial,
                manufacturer=ident.manufacturer,
                product=ident.product,
                image_sha256=running,
                delta=delta_compressions(),
            )
        with device.bootloader() as boot:
            storage = UpdateStorage(
                boot,
                Journal(Path(device.dir) / JOURNAL_FILE),
                device.keys,
                current_version=version,
                allow_downgrade=device.state.allow_downgrade,
            )
            delta = DeltaStorage.beside(storage, boot.primary(0), Path(device.dir) / JOURNAL_FILE)
            if power_cut_after is not None:
                boot.flash.cut_after(power_cut_after, tear=True, seed=power_cut_after)
            try:
                result = update_once(
                    asks if fetch_with != "mqtt" else transports["MQTT"],
                    storage,
                    board=board,
                    version=version,
                    flow=flow,
                    validate_after_reboot=validate_after_reboot,
                    send_result=send_result,
                    callback=callback,
                    transports=transports,
                    retry=retry,
                    delta=delta,
                )
            except PowerCut:
                boot.flash.power_on()
                message = f"power cut after {power_cut_after} flash operations"
                return RunReport(
                    Result(Outcome.FAILED, error="POWER_CUT", message=message), None, False, version
                )
    finally:
        for transport in transports.values():
            transport.close()
    if result.outcome is not Outcome.UPDATED or not reboot:
        return RunReport(result, None, False, version)
    booted = device.boot()
    # what the update installed: every image of a package, else the one image it verified
    expected = dict(storage.installed) if storage.installed else _versions(result.version)
    verdict = after_boot(
        booted.result.images if booted.result is not None else (),
        expected=expected,
        previous=FirmwareVersion.parse(version),
    )
    confirmed = confirm and verdict.confirm
    if confirmed:
        for image in booted.result.images if booted.result is not None else ():
            device.confirm(image.image)
    running = device.status()["slots"][0]["running"]
    if settings.token is not None:
        _report(device, settings, verdict, running)
    if callback is not None:
        if verdict.verdict is BootVerdict.UPDATED:
            callback(Event(State.AGENT_WAITING, Reason.SUCCESS, message=f"running {running}"))
        else:
            callback(
                Event(
                    State.AGENT_WAITING,
                    Reason.FAILURE,
                    error=verdict.error,
                    message=verdict.reason,
                )
            )
    return RunReport(result, booted.to_dict(), confirmed, running)


def _versions(text: str | None) -> list[FirmwareVersion] | None:
    return None if text is None else [FirmwareVersion.parse(text)]


def _report(
    device: SimDevice, settings: HttpSettings, verdict: AfterBoot, running: str | None
) -> None:
    """Tell the server what the boot did: check in with what runs now (the JSON API counts the
    new version as Applied), after a status report when the boot went wrong."""
    if verdict.report is FwStatus.ERROR:
        body: dict[str, object] = {"status": FwStatus.ERROR.value, "error": verdict.error}
        if verdict.running is not None:
            body["version"] = str(verdict.running)
        with contextlib.suppress(ApiError):
            _post(settings, "/api/v1/device/status", body)
    if running:
        with contextlib.suppress(ApiError):
            check_in(settings, _identity(device, running.split("+")[0]))


REVERT_FILE = "agent-reported-revert"


def _boot_images(last_boot: dict[str, Any] | None) -> tuple[ImageBoot, ...]:
    """The per-image results of the device's last boot, as the device file keeps them
    (:meth:`BootResult.to_dict`); none after a power cut during the boot."""
    images: list[ImageBoot] = []
    for item in (last_boot or {}).get("images") or ():
        version = item.get("version")
        images.append(
            ImageBoot(
                image=int(item.get("image", 0)),
                action=Action(item.get("action", "none")),
                resumed=bool(item.get("resumed", False)),
                version=ImageVersion.parse(version) if version else None,
                reason=item.get("reason"),
                error=item.get("error"),
            )
        )
    return tuple(images)


def _report_revert(device: SimDevice, settings: HttpSettings, version: str) -> None:
    """Tell the server once when the last boot swapped back an unconfirmed image."""
    if settings.token is None:
        return
    verdict = after_boot(
        _boot_images(device.state.last_boot),
        expected=None,
        previous=FirmwareVersion.parse(version),
    )
    if verdict.verdict is not BootVerdict.REVERTED:
        return
    marker = device.dir / REVERT_FILE
    if marker.exists() and marker.read_text().strip() == str(device.state.boots):
        return
    body = {"status": FwStatus.ERROR.value, "error": verdict.error, "version": version}
    with contextlib.suppress(ApiError):
        _post(settings, "/api/v1/device/status", body)
    write_atomic(marker, str(device.state.boots).encode())


class Simulator:
    """The simulated parts of ``otakit agent run`` (:class:`otakit.device.service.Simulator`):
    a simulated device folder updated by :func:`run`, and a simulated MCU behind a gateway."""

    def device_attempt(self, service: AgentService) -> Result:
        """One :func:`run` on the configured device folder; logs what runs after the reboot."""
        config = service.config
        behaviour = config.behaviour
        report = run(
            service.storage_config.path,
            service.settings,
            mqtt=service.mqtt,
            fetch_with=config.transport,
            flow=Flow(config.flow),
            confirm=service.storage_config.confirm,
            reboot=behaviour.reboot_upon_completion,
            validate_after_reboot=behaviour.validate_after_reboot,
            send_result=not behaviour.do_not_send_result,
            callback=service.callback,
            retry=service.device_retry,
        )
        if report.result.outcome is Outcome.UPDATED and report.boot is not None:
            state = "confirmed" if report.confirmed else "not confirmed: reverts at next boot"
            log.info("rebooted; running %s, %s", report.running, state)
        return report.result

    def mcu_programmer(self, path: Path) -> SimMcuProgrammer:
        """The simulated MCU in the device folder ``path``."""
        return SimMcuProgrammer(path)


SIMULATOR = Simulator()
"""What ``otakit agent run`` hands to :class:`~otakit.device.service.AgentService`."""
