"""FirmwareVersion and the job document's Version (protocols.md §1, §5, §7)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otakit.errors import MalformedJobDocError, VersionFormatError
from otakit.image.header import ImageVersion
from otakit.protocol.version import MAX_PART_DIGITS, FirmwareVersion, job_version

parts = st.integers(min_value=0, max_value=10**MAX_PART_DIGITS - 1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", (0, 0, 0, 0)),
        ("7", (7, 0, 0, 0)),  # the gateway model's plain integer
        ("1.2", (1, 2, 0, 0)),
        ("1.76.0", (1, 76, 0, 0)),
        ("1.2.3+4", (1, 2, 3, 4)),
        ("10.20.30+40", (10, 20, 30, 40)),
        ("9999999999.0.0+9999999999", (9999999999, 0, 0, 9999999999)),
    ],
)
def test_parse_accepted_forms(text: str, expected: tuple[int, int, int, int]) -> None:
    assert FirmwareVersion.parse(text).parts == expected


def test_missing_parts_are_zero() -> None:
    assert FirmwareVersion.parse("1") == FirmwareVersion.parse("1.0.0")
    assert FirmwareVersion.parse("1.2") == FirmwareVersion.parse("1.2.0+0")
    assert FirmwareVersion.parse("1.2.3+0") == FirmwareVersion.parse("1.2.3")
    assert len({FirmwareVersion.parse(t) for t in ("1", "1.0", "1.0.0", "1.0.0+0")}) == 1


@pytest.mark.parametrize(
    ("text", "normalised"),
    [
        ("1", "1.0.0"),
        ("1.2", "1.2.0"),
        ("1.2.3", "1.2.3"),
        ("1.2.3+0", "1.2.3"),
        ("1.2.3+4", "1.2.3+4"),
    ],
)
def test_str_is_normalised(text: str, normalised: str) -> None:
    assert str(FirmwareVersion.parse(text)) == normalised


def test_short_drops_build() -> None:
    assert FirmwareVersion.parse("1.2.3+4").short == "1.2.3"


@pytest.mark.parametrize(
    "text",
    [
        "",
        " 1.2.3",
        "1.2.3 ",
        "1.2.3\n",
        "v1.2.3",
        "-1",
        "+1",
        "01",
        "1.02",
        "1.2.03",
        "1.2.3+04",
        "1.",
        ".1",
        "1..2",
        "1.2.3.4",
        "1.2+3",
        "1+3",
        "1.2.3+",
        "1.2.3+4+5",
        "1.2.3-rc1",
        "1.2.x",
        "1e3",
        "12345678901",  # 11 digits
        "1.2.3+12345678901",
        "\uff11.2.3",  # fullwidth digit one
        "\u0663",  # Arabic-Indic digit three
    ],
)
def test_parse_rejects(text: str) -> None:
    with pytest.raises(VersionFormatError) as info:
        FirmwareVersion.parse(text)
    assert "\n" not in str(info.value)
    assert info.value.value == text


@pytest.mark.parametrize("value", [None, 1, 1.0, b"1.2.3"])
def test_parse_rejects_non_text(value: object) -> None:
    with pytest.raises(VersionFormatError):
        FirmwareVersion.parse(value)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [-1, 10**MAX_PART_DIGITS, True, 1.0])
def test_constructor_checks_parts(bad: object) -> None:
    with pytest.raises(VersionFormatError):
        FirmwareVersion(1, bad)  # type: ignore[arg-type]


def test_ordering() -> None:
    v = FirmwareVersion.parse
    assert v("1.10.0") > v("1.9.0")
    assert v("2") > v("1.99.99+99")
    assert v("1.2.3+1") > v("1.2.3")
    assert v("1.2.3") < v("1.2.4") <= v("1.2.4") < v("1.3")
    assert sorted([v("3"), v("1.2"), v("1.10"), v("1.2.3+1")]) == [
        v("1.2"),
        v("1.2.3+1"),
        v("1.10"),
        v("3"),
    ]


def test_not_comparable_with_other_types() -> None:
    assert FirmwareVersion(1) != "1.0.0"  # type: ignore[comparison-overlap]
    with pytest.raises(TypeError):
        _ = FirmwareVersion(1) < "2"


def test_image_version_round_trip() -> None:
    image = ImageVersion(1, 2, 300, 70000)
    version = FirmwareVersion.from_image(image)
    assert version.parts == (1, 2, 300, 70000)
    assert str(version) == "1.2.300+70000"
    assert version.to_image() == image


def test_to_image_refuses_what_mcuboot_cannot_hold() -> None:
    with pytest.raises(VersionFormatError):
        FirmwareVersion(256).to_image()  # major is a u8 in the header


@settings(max_examples=300)
@given(parts, parts, parts, parts)
def test_str_parse_round_trip(major: int, minor: int, revision: int, build: int) -> None:
    version = FirmwareVersion(major, minor, revision, build)
    assert FirmwareVersion.parse(str(version)) == version
    assert FirmwareVersion.parse(version.short) == FirmwareVersion(major, minor, revision)


@settings(max_examples=300)
@given(st.tuples(parts, parts, parts, parts), st.tuples(parts, parts, parts, parts))
def test_order_is_part_by_part(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> None:
    va, vb = FirmwareVersion(*a), FirmwareVersion(*b)
    assert (va < vb) == (a < b)
    assert (va == vb) == (a == b)


@settings(max_examples=300)
@given(st.text(max_size=40))
def test_parse_any_text_only_raises_version_format_error(text: str) -> None:
    try:
        version = FirmwareVersion.parse(text)
    except VersionFormatError:
        return
    assert str(FirmwareVersion.parse(str(version))) == str(version)


# --- job document Version (§1) -----------------------------------------------------------------


def test_job_version_example() -> None:
    version = job_version("1.76.0")
    assert version == FirmwareVersion(1, 76, 0)
    assert str(version) == "1.76.0"


@pytest.mark.parametrize("text", ["1.76", "1", "", "176", "1_76_0", "1,76,0"])
def test_job_version_needs_two_dots(text: str) -> None:
    with pytest.raises(MalformedJobDocError, match="fewer than two dots"):
        job_version(text)


@pytest.mark.parametrize(
    "text",
    [
        "1.2.3.4",
        "1.2.3+4",
        "1.2.x",
        "a.b.c",
        "1..3",
        ".1.2",
        "1.2.",
        " 1.2.3",
        "1.2.3 ",
        "-1.2.3",
        "+1.2.3",
        "1.2.3\n",
        "\uff11.2.3",
        "1.2.12345678901",
    ],
)
def test_job_version_digits_only(text: str) -> None:
    with pytest.raises(MalformedJobDocError):
        job_version(text)


def test_job_version_reads_leading_zeros_like_atoi() -> None:
    assert job_version("01.05.000") == FirmwareVersion(1, 5, 0)


def test_job_version_refuses_non_text() -> None:
    with pytest.raises(MalformedJobDocError):
        job_version(1.76)  # type: ignore[arg-type]
