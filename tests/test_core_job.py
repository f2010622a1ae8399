"""The offer rule (device/core/job.py): pure, no server."""

from __future__ import annotations

import pytest

from otakit.device.core.job import check_job, check_offer
from otakit.errors import InvalidVersionError, MalformedJobDocError, WrongBoardError
from otakit.protocol.jobdoc import JobDocument, update_available
from otakit.protocol.version import FirmwareVersion

BOARD = "CY8CPROTO_062_4343W"
V1 = FirmwareVersion(1, 0, 0)


def offer(version: str | FirmwareVersion, board: str | None = BOARD, **kw: bool) -> FirmwareVersion:
    return check_offer(version=version, board=board, running=V1, my_board=BOARD, **kw)


def test_a_newer_version_for_this_board_is_taken() -> None:
    assert offer("1.0.1") == FirmwareVersion(1, 0, 1)
    assert offer("1.0.0+1") == FirmwareVersion(1, 0, 0, 1)  # the build counts
    assert offer("2") == FirmwareVersion(2)
    assert offer(FirmwareVersion(1, 10)) == FirmwareVersion(1, 10)


def test_an_offer_that_names_no_board_fits_every_board() -> None:
    assert offer("1.1.0", board=None) == FirmwareVersion(1, 1, 0)


@pytest.mark.parametrize("board", ["cy8cproto_062_4343w", "APP_" + BOARD, "", BOARD + " "])
def test_another_board_is_refused_exactly(board: str) -> None:
    with pytest.raises(WrongBoardError) as info:
        offer("2.0.0", board=board)
    assert info.value.value == board
    assert repr(board) in info.value.message


def test_the_board_is_checked_before_the_version() -> None:
    with pytest.raises(WrongBoardError):
        offer("not a version", board="OTHER")
    with pytest.raises(WrongBoardError):
        offer("0.1.0", board="OTHER")


@pytest.mark.parametrize("version", ["1.0.0", "1", "1.0.0+0", "0.9.9", "0.99.0+7"])
def test_an_older_or_equal_version_is_refused(version: str) -> None:
    with pytest.raises(InvalidVersionError) as info:
        offer(version)
    assert "not newer than the running version 1.0.0" in info.value.message
    assert info.value.agent_error == "INVALID_VERSION"


def test_allow_downgrade_takes_an_older_version_but_not_the_running_one() -> None:
    assert offer("0.9.0", allow_downgrade=True) == FirmwareVersion(0, 9)
    assert offer("1.2.0", allow_downgrade=True) == FirmwareVersion(1, 2)
    with pytest.raises(InvalidVersionError, match="already runs"):
        offer("1.0.0+0", allow_downgrade=True)


@pytest.mark.parametrize("version", ["", "v1.2.3", "1.2.3-rc1", "01.2.3", " 1.2.3", "1.2.3.4"])
def test_a_bad_version_string_is_an_invalid_version(version: str) -> None:
    with pytest.raises(InvalidVersionError, match="not a version") as info:
        offer(version)
    assert info.value.value == version


# --- the job document (protocols.md §1) goes through the same rule ---------------------------


def job(version: str = "1.76.0", board: str = BOARD) -> JobDocument:
    return update_available(version=version, board=board, connection="HTTP", file="/a.bin")


def test_check_job_returns_the_offered_version() -> None:
    assert check_job(job("1.76.0"), board=BOARD, current_version="1.75.0") == FirmwareVersion(
        1, 76, 0
    )
    # the job document's Version allows leading zeros (the original's atoi)
    assert check_job(job("1.05.0"), board=BOARD, current_version=V1) == FirmwareVersion(1, 5)


def test_check_job_refuses_as_check_offer_does() -> None:
    with pytest.raises(WrongBoardError):
        check_job(job(board="OTHER"), board=BOARD, current_version="1.0.0")
    with pytest.raises(InvalidVersionError):
        check_job(job("1.0.0"), board=BOARD, current_version="1.0.0")
    assert check_job(
        job("0.9.0"), board=BOARD, current_version="1.0.0", allow_downgrade=True
    ) == FirmwareVersion(0, 9)


def test_check_job_a_malformed_version_is_the_documents_fault() -> None:
    doc = JobDocument(message="Update Available", board=BOARD, version="1.2")
    with pytest.raises(MalformedJobDocError):
        check_job(doc, board=BOARD, current_version="1.0.0")
    with pytest.raises(WrongBoardError):  # the board first, as check_offer
        check_job(doc, board="OTHER", current_version="1.0.0")
