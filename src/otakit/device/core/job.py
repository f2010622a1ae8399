"""The offer rule: may this device take the firmware it is offered (protocols.md §1, §8)?

One rule for every way an offer arrives: the legacy job document (:func:`check_job`, used by
the agent and ``otakit subscriber``), the JSON check-in API's job and the MQTT publisher's job
(the fleet simulator calls :func:`check_offer` directly). The rule:

- a board the offer names must be this device's board, exactly (case-sensitive, no trimming);
  an offer that names no board (``None``) fits every board;
- the offered version must be strictly newer than the running one, build number included
  (``1.76.0`` is not newer than ``1.76.0+3``); with ``allow_downgrade`` an older one is taken
  too, but never the version that already runs (that would be installed again at every poll).

The board is checked before the version, so an offer for another board is refused as such
whatever its version says.

:func:`choose_download` decides between the delta patch a job offers and its full image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from otakit.errors import InvalidVersionError, VersionFormatError, WrongBoardError
from otakit.protocol.jobdoc import JobDocument
from otakit.protocol.version import FirmwareVersion, job_version


def _check_board(board: str | None, my_board: str) -> None:
    if board is not None and board != my_board:
        raise WrongBoardError(
            f"the offer is for board {board!r}, this device is {my_board!r}", value=board
        )


def check_offer(
    *,
    version: str | FirmwareVersion,
    board: str | None,
    running: FirmwareVersion,
    my_board: str,
    allow_downgrade: bool = False,
) -> FirmwareVersion:
    """The offered version, when this device may take it.

    ``version`` is the offered version (text in any :meth:`FirmwareVersion.parse` form, or
    already parsed), ``board`` the board the offer names (``None``: it names none), ``running``
    the version that runs now and ``my_board`` this device's board.

    Raises :class:`~otakit.errors.WrongBoardError` when ``board`` is not ``my_board``;
    :class:`~otakit.errors.InvalidVersionError` when ``version`` is not a version, or is not
    newer than ``running`` (with ``allow_downgrade``: when it equals ``running``).
    """
    _check_board(board, my_board)
    if isinstance(version, FirmwareVersion):
        offered = version
    else:
        try:
            offered = FirmwareVersion.parse(version)
        except VersionFormatError as exc:
            raise InvalidVersionError(
                f"the offered version is not a version: {exc.message}", value=version
            ) from None
    if offered == running:
        raise InvalidVersionError(
            f"the offered version {offered} is not newer than the running version {running}: "
            "it already runs",
            value=str(offered),
        )
    if offered < running and not allow_downgrade:
        raise InvalidVersionError(
            f"the offered version {offered} is not newer than the running version {running} "
            "(downgrades are not allowed)",
            value=str(offered),
        )
    return offered


def check_job(
    doc: JobDocument,
    *,
    board: str,
    current_version: str | FirmwareVersion,
    allow_downgrade: bool = False,
) -> FirmwareVersion:
    """:func:`check_offer` for a job document (protocols.md §1); the offered version.

    ``Board`` must equal ``board`` exactly (an empty ``Board`` is a board that does not match),
    else :class:`~otakit.errors.WrongBoardError`; ``Version`` must be strictly newer than
    ``current_version`` (any :meth:`FirmwareVersion.parse` form), else
    :class:`~otakit.errors.InvalidVersionError`. A malformed ``Version`` raises
    :class:`~otakit.errors.MalformedJobDocError` (the document's fault); a malformed
    ``current_version`` :class:`~otakit.errors.VersionFormatError` (the caller's).
    """
    current = (
        current_version
        if isinstance(current_version, FirmwareVersion)
        else FirmwareVersion.parse(current_version)
    )
    _check_board(doc.board, board)  # before Version: another board's job is refused as such
    return check_offer(
        version=job_version(doc.version),
        board=doc.board,
        running=current,
        my_board=board,
        allow_downgrade=allow_downgrade,
    )


# --- delta or full image -------------------------------------------------------------------------

BASE_MISMATCH = "BASE_MISMATCH"
"""The reason reported when a delta was offered for another image than the one running."""


class OfferedDelta(Protocol):
    """What :func:`choose_download` reads of an offered patch
    (:class:`~otakit.device.transports.base.DeltaJob`)."""

    @property
    def base_sha256(self) -> str: ...

    @property
    def compression(self) -> str: ...


@dataclass(frozen=True, slots=True)
class DownloadChoice:
    """Download the delta patch (``delta``) or the full image. ``reason`` says why not the
    delta; ``report`` is the reason to send the server as the status's ``delta_error`` (None:
    nothing to report, e.g. no delta was offered or this device cannot apply any)."""

    delta: bool
    reason: str | None = None
    report: str | None = None


def choose_download(
    offered: OfferedDelta | None,
    *,
    running_sha256: str | None,
    accepts: tuple[str, ...] | frozenset[str],
    single_image: bool,
) -> DownloadChoice:
    """The delta patch or the full image, before anything is downloaded.

    The delta only when one is ``offered``, this device applies deltas into a single-image
    slot (``single_image``: an MCUboot device's image 0, not a package and not a gateway's
    MCU), it applies the patch's compression (``accepts``) and the image it runs
    (``running_sha256``: :func:`~otakit.image.delta.image_digest` of its primary slot, hex) is
    exactly the patch's base. A delta for another base is reported as ``BASE_MISMATCH`` and an
    offered compression it cannot apply as ``UNSUPPORTED``, so the server offers the full image
    next time; the full image is downloaded in this attempt either way.
    """
    if offered is None:
        return DownloadChoice(False, "no delta offered")
    if not single_image or not accepts:
        return DownloadChoice(False, "this device does not apply deltas")
    if offered.compression not in accepts:
        return DownloadChoice(
            False,
            f"the delta is compressed with {offered.compression!r}, which this device does not "
            "apply",
            "UNSUPPORTED",
        )
    if running_sha256 is None:
        return DownloadChoice(False, "the running image cannot be identified", BASE_MISMATCH)
    if offered.base_sha256.lower() != running_sha256.lower():
        return DownloadChoice(
            False,
            f"the delta is for image {offered.base_sha256[:16]}..., this device runs "
            f"{running_sha256[:16]}...",
            BASE_MISMATCH,
        )
    return DownloadChoice(True)
