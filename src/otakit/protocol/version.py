"""Firmware versions: one comparable value for every version text otakit meets.

Accepted text forms (:meth:`FirmwareVersion.parse`)::

    N             the gateway model (protocols.md §7): one integer
    a.b           short form
    a.b.c         job documents and packages ("major.minor.build", §1, §6)
    a.b.c+d       MCUboot / imgtool ("major.minor.revision+build", §5)

Each part is ASCII decimal digits, at most 10 of them, without leading zeros (``0`` itself is
fine). Missing parts count as 0, so ``1`` == ``1.0.0`` and ``1.2.3+0`` == ``1.2.3``. Ordering is
part by part, like MCUboot's downgrade check. Nothing else is accepted: no spaces, signs, ``v``
prefix, pre-release tags or non-ASCII digits.

The job document's own ``Version`` field is stricter about shape (§1) and more lenient about
zeros (the original device reads each part with ``atoi``); :func:`job_version` implements it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import total_ordering

from otakit.errors import MalformedJobDocError, VersionFormatError
from otakit.image.header import ImageVersion

MAX_PART_DIGITS = 10
_PART = rf"(0|[1-9][0-9]{{0,{MAX_PART_DIGITS - 1}}})"
_VERSION_RE = re.compile(rf"{_PART}(?:\.{_PART}(?:\.{_PART}(?:\+{_PART})?)?)?")

# Job document Version (§1): exactly major.minor.build, digits only (leading zeros allowed).
_JOB_PART = rf"([0-9]{{1,{MAX_PART_DIGITS}}})"
_JOB_VERSION_RE = re.compile(rf"{_JOB_PART}\.{_JOB_PART}\.{_JOB_PART}")


@total_ordering
@dataclass(frozen=True)
class FirmwareVersion:
    """``major.minor.revision+build``; the job document calls ``revision`` its "build".

    Raises :class:`~otakit.errors.VersionFormatError` if a part is negative, not an ``int`` or
    longer than :data:`MAX_PART_DIGITS` digits.
    """

    major: int
    minor: int = 0
    revision: int = 0
    build: int = 0

    def __post_init__(self) -> None:
        for name, value in zip(("major", "minor", "revision", "build"), self.parts, strict=True):
            if type(value) is not int or not 0 <= value < 10**MAX_PART_DIGITS:
                raise VersionFormatError(
                    f"version {name} {value!r} is not an integer from 0 to "
                    f"{10**MAX_PART_DIGITS - 1}",
                    value=value,
                )

    @classmethod
    def parse(cls, text: str) -> FirmwareVersion:
        """Parse ``N``, ``a.b``, ``a.b.c`` or ``a.b.c+d``; raise VersionFormatError otherwise."""
        match = _VERSION_RE.fullmatch(text) if isinstance(text, str) else None
        if match is None:
            raise VersionFormatError(
                f"invalid version {text!r}: expected N, a.b, a.b.c or a.b.c+build "
                f"(decimal, no leading zeros, at most {MAX_PART_DIGITS} digits each)",
                value=text,
            )
        return cls(*(int(g) if g is not None else 0 for g in match.groups()))

    @classmethod
    def from_image(cls, version: ImageVersion) -> FirmwareVersion:
        """The version an MCUboot image header carries."""
        return cls(version.major, version.minor, version.revision, version.build)

    def to_image(self) -> ImageVersion:
        """This version as an MCUboot header field; VersionFormatError if a part does not fit."""
        return ImageVersion(self.major, self.minor, self.revision, self.build)

    @property
    def parts(self) -> tuple[int, int, int, int]:
        """``(major, minor, revision, build)``."""
        return (self.major, self.minor, self.revision, self.build)

    @property
    def short(self) -> str:
        """``major.minor.revision``, the form job documents and packages use."""
        return f"{self.major}.{self.minor}.{self.revision}"

    def __str__(self) -> str:
        return self.short if self.build == 0 else f"{self.short}+{self.build}"

    def __lt__(self, other: object) -> bool:
        if not isinstance(other, FirmwareVersion):
            return NotImplemented
        return self.parts < other.parts


def job_version(text: str) -> FirmwareVersion:
    """Read a job document ``Version`` (protocols.md §1): ``major.minor.build``, digits only.

    Fewer than two dots is malformed, as on the original device. otakit is stricter than the
    original's ``atoi`` about the rest: each of the three parts must be 1 to
    :data:`MAX_PART_DIGITS` ASCII digits and nothing may follow the third (``1.2.3.4``, ``1.2.3+4``,
    ``1.2.x`` and ``" 1.2.3"`` are refused, since the original would silently read them as
    something else). Leading zeros are accepted and ignored (``1.05.0`` is 1.5.0), as ``atoi``
    does. The result has build 0.

    Raises :class:`~otakit.errors.MalformedJobDocError`.
    """
    if not isinstance(text, str):
        raise MalformedJobDocError(
            f"job document Version must be a string, not {type(text).__name__}", value=text
        )
    if text.count(".") < 2:
        raise MalformedJobDocError(
            f"job document Version {text!r} has fewer than two dots; "
            "expected major.minor.build such as 1.76.0",
            value=text,
        )
    match = _JOB_VERSION_RE.fullmatch(text)
    if match is None:
        raise MalformedJobDocError(
            f"job document Version {text!r} is not major.minor.build: three groups of "
            f"1 to {MAX_PART_DIGITS} digits separated by dots, such as 1.76.0",
            value=text,
        )
    major, minor, build = (int(g) for g in match.groups())
    return FirmwareVersion(major, minor, build)
