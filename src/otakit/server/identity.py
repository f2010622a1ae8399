"""Names the original device keeps in fixed buffers (protocols.md §1): device serial numbers,
product and board names, manufacturers, and the Version and File of what a job offers.

The server checks each one when it is set (device registration and enrollment, check-ins,
products, artifact uploads) with the job document's own rule
(:func:`otakit.protocol.jobdoc.check_stored_value`, limits from
:data:`~otakit.protocol.jobdoc.MAX_VALUE_BYTES`), so every job document built from them fits the
device: a value that does not is refused with 422 ``BADARG`` naming the field and the limit,
instead of every later job request for that device failing.

The management API takes these names in printable ASCII (serials and product names: letters,
digits and ``. _ : -``; boards and manufacturers: any printable ASCII but ``"`` and ``\\``), so
its OpenAPI schema states each limit exactly (one character is one byte). Check-ins keep what
devices send (any printable text within the byte limit), checked once the caller is known.
"""

from __future__ import annotations

import re
from typing import Annotated, Any
from urllib.parse import quote

from pydantic import AfterValidator, Field
from pydantic_core import PydanticCustomError

from otakit.errors import MalformedJobDocError, UnprocessableError
from otakit.protocol.jobdoc import MAX_VALUE_BYTES, check_stored_value

NAME_RE = re.compile(r"[A-Za-z0-9._:-]+")
NAME_CHARS = "letters, digits and . _ : -"
TEXT_RE = re.compile(r"[ !#-\[\]-~]*")  # printable ASCII but " and \
TEXT_CHARS = 'printable ASCII characters other than " and \\'

ARTIFACT_ID_CHARS = 64  # a SHA-256 in hex
ARTIFACT_NAME_COLUMN = 128  # models.Artifact.name
# A job's File for a device (api/original.py): /devices/SERIAL/files/ID/NAME, SERIAL at most
# MAX_VALUE_BYTES["SerialNumber"]; names up to MAX_ARTIFACT_NAME always fit there.
LONGEST_DEVICE_FILE_PREFIX = (
    len("/devices/") + MAX_VALUE_BYTES["SerialNumber"] + len("/files/") + ARTIFACT_ID_CHARS + 1
)
MAX_ARTIFACT_NAME = min(ARTIFACT_NAME_COLUMN, MAX_VALUE_BYTES["File"] - LONGEST_DEVICE_FILE_PREFIX)
"""Longest artifact file name: a device's job for it names a File within the device's buffer."""


def problem(key: str, value: str) -> str | None:
    """Why ``value`` cannot be kept to be written as the job document's ``key``, or None."""
    try:
        check_stored_value(key, value)
    except MalformedJobDocError as exc:
        return exc.message
    return None


def check(field: str, key: str, value: str) -> str:
    """``value``, or UnprocessableError naming ``field`` if it cannot be the job document's ``key``."""
    reason = problem(key, value)
    if reason is not None:
        raise UnprocessableError(f"{field}: {reason}")
    return value


def device_file(serial: str, artifact_id: str, name: str) -> str:
    """The File a device's job names (api/original.py serves it)."""
    return f"/devices/{serial}/files/{artifact_id}/{name}"


def product_file(product: str, artifact_id: str, name: str) -> str:
    """The File a job for a product's anonymous devices names."""
    return f"/products/{quote(product, safe='')}/files/{artifact_id}/{name}"


def job_files(artifact_id: str, name: str, product: str | None) -> list[str]:
    """The longest Files a job for this artifact names: for a device with the longest serial
    and, when the deployment names its product, for that product's anonymous devices."""
    paths = [device_file("s" * MAX_VALUE_BYTES["SerialNumber"], artifact_id, name)]
    if product:
        paths.append(product_file(product, artifact_id, name))
    return paths


def check_job_files(artifact_id: str, name: str, product: str | None) -> None:
    """UnprocessableError if a job for this artifact (deployed to ``product``, if known) would name
    a File longer than the device's buffer: the artifact name is too long for it."""
    for path in job_files(artifact_id, name, product):
        reason = problem("File", path)
        if reason is not None:
            raise UnprocessableError(
                f"name: artifact name {name!r} is too long for a job's File {path!r}: {reason}",
            )


def _validator(key: str, pattern: re.Pattern[str], chars: str) -> AfterValidator:
    def validate(value: str) -> str:
        reason = problem(key, value)
        if reason is None and pattern.fullmatch(value) is None:
            reason = f"{value!r} may hold only {chars}"
        if reason is not None:
            # the reason goes in as context, so braces in the value are not a template
            raise PydanticCustomError("job_field", "{reason}", {"reason": reason})
        return value

    return AfterValidator(validate)


def _schema(key: str, pattern: re.Pattern[str], *, name: bool) -> Any:
    return Field(
        json_schema_extra={
            "pattern": f"^{pattern.pattern}$",
            "maxLength": MAX_VALUE_BYTES[key],
            **({"minLength": 1} if name else {}),
            "description": f"At most {MAX_VALUE_BYTES[key]} characters: the original device's "
            f"{key} buffer (protocols.md §1).",
        }
    )


# Types for request models and parameters (``board: Board | None = None``,
# ``serial: Serial`` in a path).
Serial = Annotated[
    str,
    _schema("SerialNumber", NAME_RE, name=True),
    _validator("SerialNumber", NAME_RE, NAME_CHARS),
]
ProductName = Annotated[
    str, _schema("Product", NAME_RE, name=True), _validator("Product", NAME_RE, NAME_CHARS)
]
Board = Annotated[
    str, _schema("Board", TEXT_RE, name=False), _validator("Board", TEXT_RE, TEXT_CHARS)
]
Manufacturer = Annotated[
    str,
    _schema("Manufacturer", TEXT_RE, name=False),
    _validator("Manufacturer", TEXT_RE, TEXT_CHARS),
]
