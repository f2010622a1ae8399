"""Where a device stands in an update: the one vocabulary of the device API, the legacy result
routes, MQTT results, deployment counts, ``/metrics``, the dashboard and the CLI.

A device reports the six states of the cloud reference design (protocols.md §7,
:class:`~otakit.protocol.fwinfo.FwStatus`). The server adds two: ``reverted`` (the device ran the
update and went back: the health gate) and ``unknown`` (a result without a body, as the
original device sends: it finished, but whether it succeeded is not said). Counts use one label
per state; ``invalid`` counts as Error (an image the device refused).
"""

from __future__ import annotations

from enum import StrEnum

from otakit.protocol.fwinfo import FwStatus


class DeviceState(StrEnum):
    DOWNLOADING = FwStatus.DOWNLOADING.value
    INTERRUPTED = FwStatus.INTERRUPTED.value
    APPLYING = FwStatus.APPLYING.value
    APPLIED = FwStatus.APPLIED.value
    ERROR = FwStatus.ERROR.value
    INVALID = FwStatus.INVALID.value
    REVERTED = "reverted"  # ran the update, then went back to an older version
    UNKNOWN = "unknown"  # finished, outcome not said (a result without a body)


STATES: tuple[str, ...] = tuple(s.value for s in DeviceState)
REPORTED: tuple[str, ...] = tuple(s.value for s in FwStatus)  # what a device may report

LABEL: dict[str, str] = {
    DeviceState.DOWNLOADING: "Downloading",
    DeviceState.INTERRUPTED: "Interrupted",
    DeviceState.APPLYING: "Applying",
    DeviceState.APPLIED: "Applied",
    DeviceState.ERROR: "Error",
    DeviceState.INVALID: "Error",
    DeviceState.REVERTED: "Reverted",
    DeviceState.UNKNOWN: "Unknown",
}
LABELS: tuple[str, ...] = tuple(dict.fromkeys(LABEL.values()))  # the count columns, in order

IN_FLIGHT: tuple[str, ...] = (
    DeviceState.DOWNLOADING,
    DeviceState.INTERRUPTED,
    DeviceState.APPLYING,
)
DOWNLOADING: tuple[str, ...] = (DeviceState.DOWNLOADING, DeviceState.INTERRUPTED)
UNDECIDED: tuple[str, ...] = (*IN_FLIGHT, DeviceState.UNKNOWN)  # a check-in may show the end
FAILED: tuple[str, ...] = (DeviceState.ERROR, DeviceState.INVALID, DeviceState.REVERTED)


# The original middleware's result (HTTP POST to the file, MQTT on publish_notify) as a state:
# "Success" means the image was received and verified (the device applies it on reboot).
RESULT_STATES: dict[str, str] = {"Success": DeviceState.APPLYING, "Failure": DeviceState.ERROR}
RESULT_FAILURE = "MCU Download fail"  # the error of a "Failure" that gives no reason


def of_result(message: str, reason: object = None) -> tuple[str, str | None] | None:
    """(state, error) of an original device's result ``message`` (``reason``: the ``Reason``
    or ``Error`` it gave with a Failure), or None for a message that is not a result."""
    state = RESULT_STATES.get(message)
    if state is None:
        return None
    if state == DeviceState.ERROR:
        return state, str(reason)[:64] if reason else RESULT_FAILURE
    return state, None


def label_of(state: str | None) -> str:
    """The count label of ``state`` (anything unknown counts as Error)."""
    return LABEL.get(state or "", "Error")


def empty_counts() -> dict[str, int]:
    return dict.fromkeys(LABELS, 0)
