"""The interface every transport implements, so the agent never branches on which it has."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from otakit.device.storage import Storage
from otakit.protocol.jobdoc import JobDocument

Progress = Callable[[int, int], None]  # (bytes stored, total)


@dataclass(frozen=True)
class DeltaJob:
    """A delta patch the server offers instead of the full image (check-in ``job.delta``, the
    MQTT job document's ``Delta*`` keys): where it is, its size and SHA-256 (of the patch
    file), the exact image it applies to (``base_sha256``, :func:`~otakit.image.delta.
    image_digest` of the running image), the image it makes and its compression. Digests are
    64 lowercase hex characters."""

    url: str  # absolute URL (HTTP) or the publisher's file name (MQTT)
    size: int
    sha256: str
    base_sha256: str
    new_sha256: str
    compression: str


@dataclass(frozen=True)
class Job:
    """What to download: from a job document (job flow) or a known file (direct flow)."""

    url: str  # absolute URL of the image
    file: str  # the file path, where the result is posted
    version: str = ""  # "" in the direct flow (the image says its version)
    board: str = ""
    sha256: str | None = None
    document: JobDocument | None = None
    deployment: str = ""  # the server's deployment id, when the job says it (check-in API)
    delta: DeltaJob | None = None  # a patch offered for the image this device runs

    @property
    def artifact(self) -> str | None:
        """What exactly is offered, as the retry policy counts failures (device/core/retry.py):
        the deployment and SHA-256 when the job has a hash (check-in API), else the file, the
        version and where it comes from (origin and path: never the query, which a signed URL
        changes at each check). None when the job does not say (the direct flow's known file):
        such a job is never given up on."""
        if self.sha256:
            return f"deployment={self.deployment} sha256={self.sha256.upper()}"
        if not self.version:
            return None
        parts = urlsplit(self.url)
        return f"file={self.file} version={self.version} url={parts.netloc}{parts.path}"


class Transport(Protocol):
    def fetch_job(self) -> Job | None:
        """The job to do (job flow), or None when the server has nothing newer.

        Raises an OtakitError named as the original (GET_JOB, NOT_A_JOB_DOC, MALFORMED_JOB_DOC,
        WRONG_BOARD, INVALID_VERSION, TRANSPORT_UNSUPPORTED...).
        """
        ...

    def direct_job(self) -> Job:
        """The job of the direct flow: the known file."""
        ...

    def download(self, job: Job, storage: Storage, progress: Progress) -> int:
        """Download ``job`` into ``storage``, resuming what is durable; return the size."""
        ...

    def send_result(
        self,
        job: Job,
        *,
        success: bool,
        error: str | None,
        message: str | None,
        delta_error: str | None = None,
    ) -> None:
        """Report the outcome (a server that does not answer counts as success, as §2 says).
        ``delta_error`` is why the job's delta patch was not used (a DeltaError reason or
        BASE_MISMATCH): the server then offers this device the full image only. The agent
        passes it only when it is set."""
        ...

    def close(self) -> None: ...
