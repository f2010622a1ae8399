"""Multi-image TAR packages: build, read and unpack, and refuse hostile archives by name."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otakit.errors import (
    InputFileError,
    ManifestError,
    OtakitError,
    PackageFormatError,
    PackageLimitError,
    UnsafeMemberError,
    UsageError,
    VersionFormatError,
)
from otakit.image.package import (
    COMPONENT_TYPES,
    DEFAULT_MAX_MEMBER_SIZE,
    MAX_FILES,
    USTAR_STRUCT,
    Component,
    PackageManifest,
    PackageReader,
    build_package,
    is_package,
    parse_manifest,
    read_manifest,
    unpack_package,
)
from otakit.image.source import BytesSource, iter_range

APP = bytes(range(256)) * 5 + b"app-tail"  # 1288 bytes, not a multiple of 512
SPE = b"secure image" * 10
END = bytes(1024)


# --- helpers -----------------------------------------------------------------------------------


def manifest_json(*files: tuple[str, str, int], version: str = "1.0.0") -> bytes:
    """A components.json listing itself and ``files`` as (name, type, size)."""
    entries: list[dict[str, str]] = [{"fileName": "components.json", "fileType": "component_list"}]
    entries += [{"fileName": n, "fileType": t, "fileSize": str(s)} for n, t, s in files]
    doc = {"numberOfComponents": str(len(entries)), "version": version, "files": entries}
    return json.dumps(doc).encode()


def member(
    name: str,
    data: bytes = b"",
    *,
    kind: bytes = tarfile.REGTYPE,
    linkname: str = "",
    size: int | None = None,
    fmt: Literal[0, 1, 2] = tarfile.USTAR_FORMAT,
) -> bytes:
    """A tar member (header block(s), data, padding) as the stdlib writes it."""
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = len(data) if size is None else size
    info.linkname = linkname
    info.mode = 0o644
    return info.tobuf(fmt, "utf-8", "strict") + data + bytes(-len(data) % 512)


def manifest_member(*files: tuple[str, str, int]) -> bytes:
    return member("components.json", manifest_json(*files))


def archive(*members: bytes) -> bytes:
    return b"".join(members) + END


def app_package(*extra: bytes) -> bytes:
    """A package with app.bin, then ``extra`` members."""
    return archive(manifest_member(("app.bin", "NSPE", len(APP))), member("app.bin", APP), *extra)


def rechecksum(buf: bytearray, at: int) -> None:
    """Recompute the checksum of the header block at ``at`` after editing it."""
    block = bytearray(buf[at : at + 512])
    block[148:156] = b" " * 8
    buf[at + 148 : at + 156] = b"%06o\x00 " % sum(block)


def header_offsets(data: bytes) -> list[int]:
    """Offsets of the member headers of a well-formed ustar archive."""
    offsets, pos = [], 0
    while data[pos : pos + 512].strip(b"\x00"):
        offsets.append(pos)
        size = int(data[pos + 124 : pos + 136].strip(b"\x00 "), 8)
        pos += 512 + size + (-size % 512)
    return offsets


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


class Trickle(io.RawIOBase):
    """A forward-only stream that hands out at most 7 bytes per read and cannot seek."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, size: int = -1, /) -> bytes:
        size = 7 if size < 0 else min(size, 7)
        chunk = self._data[self._pos : self._pos + size]
        self._pos += len(chunk)
        return chunk


def assert_unpack_fails(
    data: bytes, error: type[OtakitError], tmp_path: Path, **limits: int
) -> OtakitError:
    """Unpacking ``data`` raises ``error`` and leaves nothing behind, outside or in the target."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    source = tmp_path / "pkg.tar"
    source.write_bytes(data)
    work = tmp_path / "work"
    kept = work / "kept"
    kept.mkdir(parents=True)
    (kept / "app.bin").write_bytes(b"previous app")  # an existing file must survive a failure
    before = files_under(tmp_path)

    with pytest.raises(error) as new_dir:
        unpack_package(source, work / "new" / "out", **limits)
    with pytest.raises(error):
        unpack_package(source, kept, **limits)

    assert files_under(tmp_path) == before
    assert (kept / "app.bin").read_bytes() == b"previous app"
    with pytest.raises(error):
        read_manifest(data, **limits)
    return new_dir.value


# --- building and reading ----------------------------------------------------------------------


def test_round_trip_app_only(tmp_path: Path) -> None:
    package = build_package([("app.bin", "NSPE", APP)], "1.2.3")
    assert is_package(package)

    manifest = read_manifest(package)
    assert manifest.version == "1.2.3"
    (app,) = manifest.components
    assert (app.name, app.file_type, app.size, app.image_index) == ("app.bin", "NSPE", len(APP), 0)
    assert app.offset is not None
    assert package[app.offset : app.offset + app.size] == APP

    assert unpack_package(package, tmp_path / "out") == manifest
    assert files_under(tmp_path / "out") == {"app.bin"}
    assert (tmp_path / "out" / "app.bin").read_bytes() == APP


def test_round_trip_app_and_secure_image(tmp_path: Path) -> None:
    package = build_package([("app.bin", "NSPE", APP), ("spe.bin", "SPE", SPE)], "2.0")
    path = tmp_path / "pkg.tar"
    path.write_bytes(package)

    manifest = read_manifest(path)
    assert manifest.version == "2.0.0"  # normalised to major.minor.revision
    assert [(c.name, c.image_index) for c in manifest.components] == [
        ("app.bin", 0),
        ("spe.bin", 1),
    ]
    assert manifest.component(1) == manifest.components[1]

    assert unpack_package(path, tmp_path / "a" / "b") == manifest
    assert (tmp_path / "a" / "b" / "app.bin").read_bytes() == APP
    assert (tmp_path / "a" / "b" / "spe.bin").read_bytes() == SPE
    assert files_under(tmp_path / "a" / "b") == {"app.bin", "spe.bin"}


def test_manifest_json_has_the_protocol_form() -> None:
    package = build_package([("app.bin", "NSPE", b"12345")], "1.0.0")
    with tarfile.open(fileobj=io.BytesIO(package)) as tar:
        assert tar.getnames() == ["components.json", "app.bin"]
        extracted = tar.extractfile("components.json")
        assert extracted is not None
        text = extracted.read()
    assert text == (
        b'{"numberOfComponents":"2","version":"1.0.0","files":['
        b'{"fileName":"components.json","fileType":"component_list"},'
        b'{"fileName":"app.bin","fileType":"NSPE","fileSize":"5"}]}'
    )
    assert parse_manifest(text) == PackageManifest("1.0.0", (Component("app.bin", "NSPE", 5, 0),))


def test_build_is_deterministic(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    first = build_package([("app.bin", "NSPE", APP)], "1.0.0")
    assert first == build_package([("app.bin", "NSPE", APP)], "1.0.0")
    with tarfile.open(fileobj=io.BytesIO(first)) as tar:
        for info in tar.getmembers():
            assert (info.mtime, info.mode, info.uid, info.gid) == (0, 0o644, 0, 0)
            assert (info.uname, info.gname) == ("", "")

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1700000000")
    dated = build_package([("app.bin", "NSPE", APP)], "1.0.0")
    with tarfile.open(fileobj=io.BytesIO(dated)) as tar:
        assert {info.mtime for info in tar.getmembers()} == {1700000000}

    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(UsageError):
        build_package([("app.bin", "NSPE", APP)], "1.0.0")


@pytest.mark.parametrize(
    ("components", "version", "error"),
    [
        ([("../app.bin", "NSPE", b"x")], "1.0.0", UnsafeMemberError),
        ([("/abs.bin", "NSPE", b"x")], "1.0.0", UnsafeMemberError),
        ([("a/b.bin", "NSPE", b"x")], "1.0.0", UnsafeMemberError),
        ([("..", "NSPE", b"x")], "1.0.0", UnsafeMemberError),
        ([("", "NSPE", b"x")], "1.0.0", UnsafeMemberError),
        ([("a\nb", "NSPE", b"x")], "1.0.0", UnsafeMemberError),
        ([("x" * 101, "NSPE", b"x")], "1.0.0", PackageLimitError),
        ([("components.json", "NSPE", b"x")], "1.0.0", ManifestError),
        ([("a.bin", "NSPE", b"x"), ("a.bin", "SPE", b"y")], "1.0.0", ManifestError),
        ([("a.bin", "NSPE", b"x"), ("b.bin", "NSPE", b"y")], "1.0.0", ManifestError),
        ([("a.bin", "BOOT", b"x")], "1.0.0", ManifestError),
        ([], "1.0.0", ManifestError),
        ([(f"{i}.bin", "NSPE", b"x") for i in range(MAX_FILES)], "1.0.0", PackageLimitError),
        ([("a.bin", "NSPE", b"x")], "1.0.0+4", VersionFormatError),
        ([("a.bin", "NSPE", b"x")], "one", VersionFormatError),
        ([("a.bin", "NSPE", b"x")], "1.2.3.4", VersionFormatError),
    ],
)
def test_build_refuses_bad_input(
    components: list[tuple[str, str, bytes]], version: str, error: type[OtakitError]
) -> None:
    with pytest.raises(error) as info:
        build_package(components, version)
    assert info.value.message


def test_is_package() -> None:
    assert is_package(build_package([("a.bin", "NSPE", b"x")], "1.0.0")[:512])
    assert not is_package(b"\x3d\xb8\xf3\x96" + bytes(508))  # an MCUboot image
    assert not is_package(b"")
    assert not is_package(bytes(300))


def test_reads_archive_from_stdlib_tarfile_formats(tmp_path: Path) -> None:
    for fmt in (tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT):
        out = io.BytesIO()
        with tarfile.open(fileobj=out, mode="w", format=fmt) as tar:
            for name, data in (
                ("components.json", manifest_json(("spe.bin", "SPE", len(SPE)))),
                ("spe.bin", SPE),
            ):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        manifest = unpack_package(out.getvalue(), tmp_path / str(fmt))
        assert manifest.components == (
            Component("spe.bin", "SPE", len(SPE), 1, offset=manifest.components[0].offset),
        )
        assert (tmp_path / str(fmt) / "spe.bin").read_bytes() == SPE


MEMBERS_IN_TAR_ORDER = ("components.json", "spe.bin", "app.bin")


@pytest.mark.skipif(shutil.which("tar") is None, reason="needs the tar command")
def test_reads_archive_from_gnu_tar(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "components.json").write_bytes(
        manifest_json(("app.bin", "NSPE", len(APP)), ("spe.bin", "SPE", len(SPE)), version="3.1.4")
    )
    (src / "app.bin").write_bytes(APP)
    (src / "spe.bin").write_bytes(SPE)
    package = tmp_path / "pkg.tar"
    subprocess.run(
        # The archive order differs from the manifest's.
        ["tar", "--format=ustar", "-cf", str(package), "-C", str(src), *MEMBERS_IN_TAR_ORDER],
        check=True,
    )
    manifest = unpack_package(package, tmp_path / "out")
    assert manifest.version == "3.1.4"
    assert [c.name for c in manifest.components] == ["app.bin", "spe.bin"]
    assert (tmp_path / "out" / "app.bin").read_bytes() == APP
    assert (tmp_path / "out" / "spe.bin").read_bytes() == SPE


def test_reader_streams_a_non_seekable_source_in_chunks() -> None:
    package = build_package([("app.bin", "NSPE", APP), ("spe.bin", "SPE", SPE)], "1.0.0")
    reader = PackageReader(Trickle(package), chunk_size=100)  # type: ignore[arg-type]
    assert [c.name for c in reader.manifest.components] == ["app.bin", "spe.bin"]
    assert reader.manifest.components[0].offset is None  # not reached yet

    received: dict[str, bytes] = {}
    for component, chunks in reader:
        pieces = list(chunks)
        assert all(len(piece) <= 100 for piece in pieces)
        received[component.name] = b"".join(pieces)
    assert received == {"app.bin": APP, "spe.bin": SPE}


def test_reader_skips_unread_members() -> None:
    package = build_package([("app.bin", "NSPE", APP), ("spe.bin", "SPE", SPE)], "1.0.0")
    reader = PackageReader(io.BytesIO(package), chunk_size=64)
    (app, app_chunks), (spe, spe_chunks) = list(reader)
    assert list(app_chunks) == []  # overtaken by the next member: skipped
    assert b"".join(spe_chunks) == b""
    assert (app.name, spe.name) == ("app.bin", "spe.bin")

    reader = PackageReader(io.BytesIO(package), chunk_size=64)
    _, chunks = next(reader)
    next(chunks)  # read part of app.bin only
    _, chunks = next(reader)
    assert b"".join(chunks) == SPE


def test_read_manifest_from_a_byte_source_gives_offsets() -> None:
    package = build_package([("app.bin", "NSPE", APP), ("spe.bin", "SPE", SPE)], "1.0.0")
    source = BytesSource(package)
    manifest = read_manifest(source)
    for component, data in zip(manifest.components, (APP, SPE), strict=True):
        assert component.offset is not None
        assert (
            b"".join(iter_range(source, component.offset, component.offset + component.size))
            == data
        )


def test_unpack_replaces_existing_files(tmp_path: Path) -> None:
    (tmp_path / "app.bin").write_bytes(b"old")
    (tmp_path / "other").write_bytes(b"untouched")
    unpack_package(build_package([("app.bin", "NSPE", APP)], "1.0.0"), tmp_path)
    assert (tmp_path / "app.bin").read_bytes() == APP
    assert (tmp_path / "other").read_bytes() == b"untouched"


def test_missing_package_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError):
        read_manifest(tmp_path / "absent.tar")
    with pytest.raises(InputFileError):
        unpack_package(tmp_path / "absent.tar", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_constants() -> None:
    assert USTAR_STRUCT.size == 512
    assert COMPONENT_TYPES == {"NSPE": 0, "SPE": 1}
    assert MAX_FILES == 8
    assert DEFAULT_MAX_MEMBER_SIZE >= 1024 * 1024


# --- hostile archives --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad_member",
    [
        pytest.param(member("../x", b"evil"), id="parent-traversal"),
        pytest.param(member("/abs", b"evil"), id="absolute-path"),
        pytest.param(member("a/b", b"evil"), id="sub-path"),
        pytest.param(member("a\\b", b"evil"), id="backslash-path"),
        pytest.param(member("p" * 120 + "/x", b"evil"), id="ustar-prefix"),
        pytest.param(member("link", kind=tarfile.SYMTYPE, linkname="/etc/passwd"), id="symlink"),
        pytest.param(member("hard", kind=tarfile.LNKTYPE, linkname="app.bin"), id="hardlink"),
        pytest.param(member("dev", kind=tarfile.CHRTYPE), id="char-device"),
        pytest.param(member("blk", kind=tarfile.BLKTYPE), id="block-device"),
        pytest.param(member("fifo", kind=tarfile.FIFOTYPE), id="fifo"),
        pytest.param(member("dir", kind=tarfile.DIRTYPE), id="folder"),
        pytest.param(member("n" * 120, b"evil", fmt=tarfile.GNU_FORMAT), id="gnu-long-name"),
        pytest.param(
            member("l", kind=tarfile.SYMTYPE, linkname="t" * 120, fmt=tarfile.GNU_FORMAT),
            id="gnu-long-link",
        ),
        pytest.param(member("é" * 70, b"evil", fmt=tarfile.PAX_FORMAT), id="pax-header"),
        pytest.param(member("s", b"evil", kind=b"S"), id="unknown-type"),
    ],
)
def test_unsafe_members_are_refused(bad_member: bytes, tmp_path: Path) -> None:
    error = assert_unpack_fails(app_package(bad_member), UnsafeMemberError, tmp_path)
    assert error.value is not None
    assert not (tmp_path / "x").exists()
    assert not (tmp_path / "work" / "x").exists()


def test_pax_global_header_first_is_refused(tmp_path: Path) -> None:
    out = io.BytesIO()
    with tarfile.open(
        fileobj=out, mode="w", format=tarfile.PAX_FORMAT, pax_headers={"comment": "hi"}
    ) as tar:
        data = manifest_json(("app.bin", "NSPE", 1))
        info = tarfile.TarInfo("components.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert_unpack_fails(out.getvalue(), UnsafeMemberError, tmp_path)


@pytest.mark.parametrize(
    "files",
    [
        pytest.param([("../app.bin", "NSPE", 4)], id="traversal"),
        pytest.param([("a/app.bin", "NSPE", 4)], id="sub-path"),
    ],
)
def test_unsafe_names_in_manifest_are_refused(
    files: list[tuple[str, str, int]], tmp_path: Path
) -> None:
    data = archive(manifest_member(*files), member(files[0][0], b"evil"))
    assert_unpack_fails(data, UnsafeMemberError, tmp_path)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(END, id="empty-archive"),
        pytest.param(archive(member("app.bin", APP)), id="no-components-json"),
        pytest.param(
            archive(member("app.bin", APP), manifest_member(("app.bin", "NSPE", len(APP)))),
            id="components-json-not-first",
        ),
        pytest.param(app_package(member("app.bin", APP)), id="duplicate-member"),
        pytest.param(app_package(member("extra.bin", b"x")), id="unlisted-member"),
        pytest.param(
            archive(manifest_member(("app.bin", "NSPE", len(APP) + 1)), member("app.bin", APP)),
            id="size-differs-from-fileSize",
        ),
        pytest.param(
            archive(
                manifest_member(("app.bin", "NSPE", 3), ("spe.bin", "SPE", 3)),
                member("app.bin", b"abc"),
            ),
            id="listed-file-missing",
        ),
        pytest.param(
            archive(
                manifest_member(("app.bin", "NSPE", 3), ("app.bin", "SPE", 3)),
                member("app.bin", b"abc"),
            ),
            id="name-listed-twice",
        ),
        pytest.param(
            archive(
                manifest_member(("a.bin", "NSPE", 3), ("b.bin", "NSPE", 3)),
                member("a.bin", b"abc"),
                member("b.bin", b"abc"),
            ),
            id="type-listed-twice",
        ),
        pytest.param(
            archive(manifest_member(("a.bin", "BOOT", 3)), member("a.bin", b"abc")),
            id="unknown-file-type",
        ),
        pytest.param(archive(manifest_member()), id="no-component"),
    ],
)
def test_manifest_and_member_mismatch_is_refused(data: bytes, tmp_path: Path) -> None:
    assert_unpack_fails(data, ManifestError, tmp_path)


def test_failure_after_a_component_was_written_leaves_nothing(tmp_path: Path) -> None:
    # app.bin is complete and staged before the unlisted member is met.
    data = app_package(member("spe.bin", SPE))
    error = assert_unpack_fails(data, ManifestError, tmp_path)
    assert error.value == "spe.bin"


def raw_manifest_package(text: bytes) -> bytes:
    return archive(member("components.json", text), member("app.bin", b"abc"))


GOOD_FILES = [
    {"fileName": "components.json", "fileType": "component_list"},
    {"fileName": "app.bin", "fileType": "NSPE", "fileSize": "3"},
]


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(b"{not json", id="invalid-json"),
        pytest.param(b"\xff\xfe{}", id="not-utf8"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(b"[" * 5000 + b"]" * 5000, id="deeply-nested"),
        pytest.param(
            json.dumps({"numberOfComponents": 2, "version": "1.0.0", "files": GOOD_FILES}),
            id="count-not-a-string",
        ),
        pytest.param(
            json.dumps({"numberOfComponents": "3", "version": "1.0.0", "files": GOOD_FILES}),
            id="count-disagrees",
        ),
        pytest.param(
            json.dumps({"numberOfComponents": "\uff12", "version": "1.0.0", "files": GOOD_FILES}),
            id="count-not-ascii-digits",
        ),
        pytest.param(
            json.dumps({"numberOfComponents": "2", "version": 1, "files": GOOD_FILES}),
            id="version-not-a-string",
        ),
        pytest.param(
            json.dumps({"numberOfComponents": "2", "version": "1.0", "files": GOOD_FILES}),
            id="version-short",
        ),
        pytest.param(
            json.dumps({"numberOfComponents": "2", "version": "1.0.0+1", "files": GOOD_FILES}),
            id="version-with-build",
        ),
        pytest.param(
            json.dumps({"numberOfComponents": "2", "version": "1.300.0", "files": GOOD_FILES}),
            id="version-out-of-range",
        ),
        pytest.param(json.dumps({"numberOfComponents": "2", "version": "1.0.0"}), id="no-files"),
        pytest.param(
            json.dumps({"numberOfComponents": "2", "version": "1.0.0", "files": "app.bin"}),
            id="files-not-a-list",
        ),
        pytest.param(
            json.dumps(
                {"numberOfComponents": "2", "version": "1.0.0", "files": GOOD_FILES, "x": "y"}
            ),
            id="unknown-key",
        ),
        pytest.param(
            b'{"numberOfComponents":"2","numberOfComponents":"2","version":"1.0.0","files":'
            + json.dumps(GOOD_FILES).encode()
            + b"}",
            id="repeated-key",
        ),
        pytest.param(
            json.dumps(
                {
                    "numberOfComponents": "2",
                    "version": "1.0.0",
                    "files": [GOOD_FILES[0], {**GOOD_FILES[1], "fileSize": 3}],
                }
            ),
            id="size-not-a-string",
        ),
        pytest.param(
            json.dumps(
                {
                    "numberOfComponents": "2",
                    "version": "1.0.0",
                    "files": [GOOD_FILES[0], {**GOOD_FILES[1], "fileSize": "-3"}],
                }
            ),
            id="size-negative",
        ),
        pytest.param(
            json.dumps(
                {
                    "numberOfComponents": "2",
                    "version": "1.0.0",
                    "files": [GOOD_FILES[0], {**GOOD_FILES[1], "fileSize": "9" * 5000}],
                }
            ),
            id="size-huge-digits",
        ),
        pytest.param(
            json.dumps(
                {
                    "numberOfComponents": "2",
                    "version": "1.0.0",
                    "files": [GOOD_FILES[0], {"fileName": "app.bin", "fileType": "NSPE"}],
                }
            ),
            id="size-missing",
        ),
        pytest.param(
            json.dumps(
                {
                    "numberOfComponents": "2",
                    "version": "1.0.0",
                    "files": [GOOD_FILES[0], {"fileName": ["app.bin"], "fileType": "NSPE"}],
                }
            ),
            id="name-not-a-string",
        ),
        pytest.param(
            json.dumps(
                {
                    "numberOfComponents": "2",
                    "version": "1.0.0",
                    "files": [{**GOOD_FILES[0], "fileType": "NSPE"}, GOOD_FILES[1]],
                }
            ),
            id="components-json-wrong-type",
        ),
        pytest.param(
            json.dumps({"numberOfComponents": "1", "version": "1.0.0", "files": GOOD_FILES[1:]}),
            id="components-json-not-listed",
        ),
        pytest.param(
            json.dumps(
                {"numberOfComponents": "2", "version": "1.0.0", "files": [GOOD_FILES[0], "app"]}
            ),
            id="entry-not-an-object",
        ),
    ],
)
def test_invalid_components_json_is_refused(text: bytes | str, tmp_path: Path) -> None:
    raw = text.encode() if isinstance(text, str) else text
    assert_unpack_fails(raw_manifest_package(raw), ManifestError, tmp_path)


def test_too_many_files_in_manifest(tmp_path: Path) -> None:
    files = [(f"{i}.bin", "NSPE", 1) for i in range(MAX_FILES)]  # 9 with components.json
    text = manifest_json(*files)
    assert_unpack_fails(raw_manifest_package(text), PackageLimitError, tmp_path)


def test_more_members_than_max_files(tmp_path: Path) -> None:
    two = archive(
        manifest_member(("app.bin", "NSPE", len(APP)), ("spe.bin", "SPE", len(SPE))),
        member("app.bin", APP),
        member("spe.bin", SPE),
    )
    assert len(read_manifest(two).components) == 2
    assert_unpack_fails(two, PackageLimitError, tmp_path, max_files=2)  # manifest lists 3

    extra = app_package(member("extra.bin", b"x"))  # member count checked before the listing
    assert_unpack_fails(extra, PackageLimitError, tmp_path / "b", max_files=2)


def test_member_larger_than_limit_is_refused_before_its_data(tmp_path: Path) -> None:
    # The manifest is within the limit, the header is not: the archive is cut right after that
    # header, so reaching for the data would be a truncation error instead.
    data = bytearray(manifest_member(("app.bin", "NSPE", 10)) + member("app.bin", size=10))
    at = header_offsets(bytes(data))[1]
    data[at + 124 : at + 136] = b"77777777777\x00"
    rechecksum(data, at)
    assert_unpack_fails(bytes(data), PackageLimitError, tmp_path)

    # Through the manifest's fileSize, and through max_member_size.
    assert_unpack_fails(app_package(), PackageLimitError, tmp_path / "b", max_member_size=1000)
    big = archive(member("components.json", b" " * 70_000))
    assert_unpack_fails(big, PackageLimitError, tmp_path / "c")


def test_bad_checksum_is_refused(tmp_path: Path) -> None:
    data = bytearray(app_package())
    at = header_offsets(bytes(data))[1]
    data[at] ^= 0x01  # 'app.bin' -> '`pp.bin', checksum not updated
    assert_unpack_fails(bytes(data), PackageFormatError, tmp_path)


@pytest.mark.parametrize("size_field", [b"00000000x12\x00", b"\x80" + bytes(11), b"\x00" * 12])
def test_non_octal_size_is_refused(size_field: bytes, tmp_path: Path) -> None:
    data = bytearray(app_package())
    at = header_offsets(bytes(data))[1]
    data[at + 124 : at + 136] = size_field
    rechecksum(data, at)
    assert_unpack_fails(bytes(data), PackageFormatError, tmp_path)


def test_non_ustar_header_is_refused(tmp_path: Path) -> None:
    data = bytearray(app_package())
    at = header_offsets(bytes(data))[1]
    data[at + 257 : at + 265] = bytes(8)  # a v7 header
    rechecksum(data, at)
    assert_unpack_fails(bytes(data), PackageFormatError, tmp_path)


@pytest.mark.parametrize(
    "cut",
    [
        pytest.param(lambda p: p[:100], id="inside-first-header"),
        pytest.param(lambda p: p[:600], id="inside-manifest"),
        pytest.param(lambda p: p[: header_offsets(p)[1] + 512 + 700], id="inside-app-data"),
        pytest.param(lambda p: p[: -len(END)], id="no-end-marker"),
        pytest.param(lambda p: p[: -len(END) + 512], id="one-end-block"),
        pytest.param(lambda p: p[: -len(END) + 512] + b"\x01" + bytes(511), id="lone-zero-block"),
    ],
)
def test_truncated_archive_is_refused(cut: Callable[[bytes], bytes], tmp_path: Path) -> None:
    package = app_package()
    assert_unpack_fails(cut(package), PackageFormatError, tmp_path)


def test_random_bytes_are_a_format_error(tmp_path: Path) -> None:
    assert_unpack_fails(b"\x3d\xb8\xf3\x96" + bytes(range(256)) * 4, PackageFormatError, tmp_path)


def test_reader_repeats_its_error() -> None:
    package = app_package(member("extra.bin", b"x"))
    reader = PackageReader(io.BytesIO(package))
    _, chunks = next(reader)
    assert b"".join(chunks) == APP
    with pytest.raises(ManifestError) as first:
        next(reader)
    with pytest.raises(ManifestError) as again:
        next(reader)
    assert again.value is first.value


# --- fuzzing -----------------------------------------------------------------------------------

VALID = build_package([("app.bin", "NSPE", APP[:700]), ("spe.bin", "SPE", SPE)], "1.0.0")

_LAST = read_manifest(VALID).components[-1]
assert _LAST.offset is not None
VALID_END = _LAST.offset + 512 + 1024  # without tarfile's padding to a 10 KiB record


@st.composite
def hostile_packages(draw: st.DrawFn) -> bytes:
    """Random bytes, or a valid package with bytes overwritten (then, mostly, its header
    checksums fixed so that the edits reach the parser) and perhaps cut short."""
    if draw(st.integers(0, 4)) == 0:
        return draw(st.binary(max_size=4096))
    data = bytearray(VALID[:VALID_END])
    headers = header_offsets(VALID)
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.booleans()):  # aim at a header or the manifest
            index = draw(st.sampled_from(headers)) + draw(st.integers(0, 1023))
        else:
            index = draw(st.integers(0, len(data) - 1))
        data[index] = draw(st.integers(0, 255))
    if draw(st.integers(0, 3)) > 0:
        for at in headers:
            rechecksum(data, at)
    if draw(st.integers(0, 3)) == 0:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(hostile_packages())
def test_hostile_input_raises_only_otakit_errors(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        dest = Path(tmp) / "out"
        with contextlib.suppress(OtakitError):
            read_manifest(data)
        try:
            manifest = unpack_package(io.BytesIO(data), dest, max_member_size=4096)
        except OtakitError:
            assert not dest.exists()
        else:
            assert {p.name for p in dest.iterdir()} == {c.name for c in manifest.components}
