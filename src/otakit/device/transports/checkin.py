"""HTTP(S) transport over otakit's device JSON API, for gateways (protocols.md §7).

The job comes from ``POST /api/v1/device/checkin``: the device says who it is and which version
it runs, and the answer names the image with its size, SHA-256 and an expiring signed URL (the
§7 desired state; the job document of §1 carries no hash, and the gateway model needs one).
The image is downloaded with the same resumable ranged GETs as :class:`HttpTransport`; the
result goes to ``POST /api/v1/device/status`` in the reported-state shape of §7
(``{"extFwInfo": {"Status": ..., "Error": ..., "Version": ...}}``; a report that says why an
offered delta was not used goes in the API's flat shape, ``{"status": ..., "error": ...,
"delta_error": ...}``, the same fields).

Delta updates: given ``image_sha256`` (the running image's
:func:`~otakit.image.delta.image_digest`, hex) and ``delta`` (the compressions the agent
applies, :func:`~otakit.device.delta_storage.delta_compressions`), the check-in says both and
the answer's ``job.delta`` (url, size, sha256, base_sha256, new_sha256, compression) becomes
:attr:`Job.delta <otakit.device.transports.base.Job.delta>`; a malformed one is ignored (the
full image is still offered). The status report carries ``delta_error`` when the agent did not
use the offered patch. Without them the check-in is what it always was.

On first contact the token may be an enrollment token: the answer then carries the device's own
token, which is handed to ``on_token`` to be kept, and used from then on.

The check-in answer is read up to ``MAX_JSON_BYTES`` (16 KiB); the answers to reports are not
read. The image URL gets the device's credentials only when it is on the configured server (or
a trusted origin): an S3 pre-signed URL on another host is fetched without them
(:meth:`HttpSettings.credentials_for`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from urllib.parse import urljoin

import httpx

from otakit.device.storage import Storage
from otakit.device.transports.base import DeltaJob, Job, Progress
from otakit.device.transports.http import MAX_JSON_BYTES, HttpSettings, HttpTransport, read_body
from otakit.errors import JobFetchError, TransferError
from otakit.protocol.fwinfo import FwError, FwStatus, GatewayStatus

log = logging.getLogger("otakit.http")

CHECKIN_PATH = "/api/v1/device/checkin"
STATUS_PATH = "/api/v1/device/status"
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckinTransport(HttpTransport):
    """``identity`` holds serial, board, product... (the check-in body without ``version``);
    ``version`` gives the running version at each check; ``reported`` the storage's §7 state."""

    def __init__(
        self,
        settings: HttpSettings,
        *,
        identity: Mapping[str, str],
        version: Callable[[], str],
        reported: Callable[[], GatewayStatus],
        on_token: Callable[[str], None] | None = None,
        image_sha256: Callable[[], str | None] | None = None,
        delta: Sequence[str] = (),
    ) -> None:
        super().__init__(settings, board=identity.get("board", ""))
        self.identity = dict(identity)
        self.image_sha256 = image_sha256
        self.delta = tuple(delta)[:4]
        self.version = version
        self.reported = reported
        self.on_token = on_token
        self._transfer_failure = FwError.NETWORK_TIMEOUT
        self.aborted: dict[str, object] | None = None  # the server aborted the update under way

    def _url(self, path: str) -> str:
        return self.settings.server.rstrip("/") + path

    def _checkin(self, body: object) -> tuple[int, bytes]:
        """POST the check-in; its status and answer (at most MAX_JSON_BYTES)."""
        failure, url = "", self._url(CHECKIN_PATH)
        for _ in range(max(1, self.settings.connect_retries)):
            try:
                with self._client.stream("POST", url, json=body) as response:
                    answer = read_body(
                        response, MAX_JSON_BYTES, "the check-in answer", JobFetchError
                    )
                    return response.status_code, answer
            except httpx.HTTPError as exc:
                failure = f"{type(exc).__name__}: {exc}"
                self._reconnect()
        raise JobFetchError(f"cannot reach {self.settings.server}: {failure}", value=CHECKIN_PATH)

    def _body(self) -> dict[str, object]:
        """The check-in: identity, version and, when known, what runs and what applies."""
        body: dict[str, object] = {**self.identity, "version": self.version()}
        running = self.image_sha256() if self.image_sha256 is not None else None
        if running is not None:
            body["image_sha256"] = running
            if self.delta:
                body["delta"] = list(self.delta)
        return body

    def fetch_job(self) -> Job | None:
        status, raw = self._checkin(self._body())
        if status == 204:
            return None
        try:
            answer = json.loads(raw)
        except (ValueError, RecursionError):
            answer = None
        if status != 200 or not isinstance(answer, dict):
            message = answer.get("message") if isinstance(answer, dict) else None
            text = message or raw[:200].decode("utf-8", "replace")
            raise JobFetchError(f"check-in refused: {status} {text:.200}", value=status)
        abort = answer.get("abort")
        self.aborted = abort if isinstance(abort, dict) else None
        minted = answer.get("device_token")
        if isinstance(minted, str) and minted:
            self._use_token(minted)
        job = answer.get("job")
        if job is None:
            return None
        try:
            return Job(
                url=urljoin(self.settings.server, str(job["url"])),
                file=str(job["name"]),
                version=str(job["version"]),
                board=str(job.get("board") or ""),
                sha256=str(job["sha256"]).upper(),
                deployment=str(job.get("deployment_id") or ""),
                delta=self._delta(job.get("delta")),
            )
        except (KeyError, TypeError):
            raise JobFetchError(
                f"the check-in answer holds a malformed job: {job!r:.200}"
            ) from None

    def _delta(self, offer: object) -> DeltaJob | None:
        """The answer's ``job.delta``; None when absent, not asked for, or malformed."""
        if offer is None or not self.delta:
            return None
        try:
            assert isinstance(offer, dict)
            delta = DeltaJob(
                url=urljoin(self.settings.server, str(offer["url"])),
                size=int(offer["size"]),
                sha256=str(offer["sha256"]).lower(),
                base_sha256=str(offer["base_sha256"]).lower(),
                new_sha256=str(offer["new_sha256"]).lower(),
                compression=str(offer["compression"]),
            )
            assert delta.size > 0
            assert all(
                _SHA256.fullmatch(d) for d in (delta.sha256, delta.base_sha256, delta.new_sha256)
            )
        except (AssertionError, KeyError, TypeError, ValueError):
            log.warning("ignoring a malformed delta offer: %.200r", offer)
            return None
        return delta

    def _use_token(self, token: str) -> None:
        self.settings = replace(self.settings, token=token)
        self._reconnect()
        if self.on_token is not None:
            self.on_token(token)
        log.info("enrolled: the server issued this device's own token")

    def direct_job(self) -> Job:
        raise JobFetchError("the check-in API has no direct flow; use flow = job")

    def download(self, job: Job, storage: Storage, progress: Progress) -> int:
        self._report(GatewayStatus(FwStatus.DOWNLOADING))
        try:
            return super().download(job, storage, progress)
        except TransferError as exc:
            answered = exc.status is not None and exc.status >= 400
            self._transfer_failure = FwError.HTTP_RESPONSE if answered else FwError.NETWORK_TIMEOUT
            raise

    def send_result(
        self,
        job: Job,
        *,
        success: bool,
        error: str | None,
        message: str | None,
        delta_error: str | None = None,
    ) -> None:
        status = self.reported()
        if not success and error == TransferError.agent_error:
            status = GatewayStatus(FwStatus.INTERRUPTED, self._transfer_failure)
        elif not success and status.status not in (FwStatus.ERROR, FwStatus.INVALID):
            status = GatewayStatus(FwStatus.ERROR)  # a failure the storage did not see
        self._report(status, delta_error=delta_error)

    def _report(self, status: GatewayStatus, *, delta_error: str | None = None) -> None:
        info = status.to_dict()
        body: dict[str, object] = {"extFwInfo": info}
        if delta_error:
            # the same report in the API's flat shape, which carries delta_error
            body = {
                "status": info["Status"],
                "error": info["Error"],
                "delta_error": delta_error[:32],
            }
            if "Version" in info:
                body["version"] = info["Version"]
        log.info("reporting %s", body)
        try:  # the answer is not read
            with self._client.stream("POST", self._url(STATUS_PATH), json=body):
                pass
        except httpx.HTTPError as exc:  # a report lost is sent again with the next one
            log.warning("status report not delivered: %s", exc)
