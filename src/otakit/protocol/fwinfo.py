"""``extFwInfo``: the reported state of the gateway model (protocols.md §7).

``extFwInfo.Status`` and ``extFwInfo.Error`` take exactly these strings; the server counts
devices by them and gateways and agents report them.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class FwStatus(StrEnum):
    """``extFwInfo.Status``."""

    DOWNLOADING = "downloading"
    INTERRUPTED = "interrupted"
    APPLYING = "applying"
    APPLIED = "applied"
    ERROR = "error"
    INVALID = "invalid"


class FwError(StrEnum):
    """``extFwInfo.Error``."""

    SHA256_VERIFY_FAIL = "SHA256 verify fail"
    HTTP_RESPONSE = "Http Response > 400"
    NETWORK_TIMEOUT = "Network Timeout"
    MCU_DOWNLOAD_FAIL = "MCU Download fail"
    FILE_OPERATION_FAIL = "File operation fail"
    NONE = "None"


STATES: tuple[str, ...] = tuple(s.value for s in FwStatus)
ERRORS: tuple[str, ...] = tuple(e.value for e in FwError)


@dataclass(frozen=True)
class GatewayStatus:
    """What the gateway reports about the external firmware."""

    status: FwStatus
    error: FwError = FwError.NONE
    version: str | None = None  # the version running on the MCU, when ``applied``

    def to_dict(self) -> dict[str, str]:
        """The ``extFwInfo`` reported properties: Status, Error, and Version when applied."""
        data = {"Status": self.status.value, "Error": self.error.value}
        if self.status is FwStatus.APPLIED and self.version is not None:
            data["Version"] = self.version
        return data
