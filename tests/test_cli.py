"""The ``otakit`` command, run through its installed entry point as a user would."""

from __future__ import annotations

import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import Run

Otakit = Callable[..., Run]


@pytest.fixture
def workdir(tmp_path: Path, otakit: Otakit) -> Path:
    (tmp_path / "app.bin").write_bytes(os.urandom(20000))
    result = otakit("keygen", "-t", "ecdsa-p256", "-o", tmp_path / "key.pem")
    assert result.returncode == 0, result.stderr
    return tmp_path


def _one_line_error(result: Run, code: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"otakit: error [{code}]: "), result.stderr
    assert "Traceback" not in result.stderr


def test_keygen_writes_private_key_and_refuses_to_overwrite(workdir: Path, otakit: Otakit) -> None:
    key = workdir / "key.pem"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    before = key.read_bytes()
    result = otakit("keygen", "-t", "ed25519", "-o", key)
    assert result.returncode == 2
    _one_line_error(result, "FILE")
    assert key.read_bytes() == before
    result = otakit("keygen", "-t", "rsa-1024", "-o", workdir / "rsa.pem")
    assert result.returncode == 2
    _one_line_error(result, "KEY_UNSUPPORTED")


def test_getpub_pem_c_and_raw(workdir: Path, otakit: Otakit) -> None:
    pem = otakit("getpub", "-k", workdir / "key.pem")
    assert pem.returncode == 0
    assert pem.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    c = otakit("getpub", "-k", workdir / "key.pem", "-l", "c")
    assert "const unsigned char ecdsa_pub_key[] = {" in c.stdout
    assert "const unsigned int ecdsa_pub_key_len = 91;" in c.stdout
    assert (
        otakit(
            "getpub", "-k", workdir / "key.pem", "-l", "raw", "-o", workdir / "pub.der"
        ).returncode
        == 0
    )
    assert len((workdir / "pub.der").read_bytes()) == 91
    # the public key alone is enough to export it again
    (workdir / "pub.pem").write_text(pem.stdout)
    assert otakit("getpub", "-k", workdir / "pub.pem").stdout == pem.stdout
    bad = otakit("getpub", "-k", workdir / "key.pem", "-l", "cobol")
    assert bad.returncode == 2
    _one_line_error(bad, "BADARG")


def test_sign_verify_info_round_trip(
    workdir: Path, otakit: Otakit, imgtool: Callable[..., Run]
) -> None:
    image = workdir / "app.img"
    result = otakit(
        "sign", "--key", workdir / "key.pem", "--version", "1.4.2+7", "--header-size", "0x200",
        "--pad-header", "--align", "8", "--slot-size", "0x20000", "--confirm",
        "--security-counter", "auto", workdir / "app.bin", image,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert image.stat().st_size == 0x20000

    ok = otakit("verify", "--key", workdir / "key.pem", image)
    assert ok.returncode == 0, ok.stderr
    assert "valid, version 1.4.2+7" in ok.stdout
    assert imgtool("verify", "-k", workdir / "key.pem", image).returncode == 0

    info = otakit("info", image, "--json")
    assert info.returncode == 0
    data = json.loads(info.stdout)
    assert data["header"]["version"] == "1.4.2+7"
    assert data["header"]["hdr_size"] == 0x200
    assert data["header"]["img_size"] == 20000
    assert data["security_counter"] == (1 << 24) | (4 << 16) | 2
    assert data["trailer"]["request"] == "permanent"
    assert data["hash_ok"] is True

    table = otakit("info", image)
    assert table.returncode == 0
    assert "1.4.2+7" in table.stdout
    assert "ECDSA_SIG" in table.stdout


def test_verify_exit_codes(workdir: Path, otakit: Otakit) -> None:
    image = workdir / "app.img"
    key = workdir / "key.pem"
    assert (
        otakit(
            "sign", "-k", key, "-v", "1.0.0", "--pad-header", workdir / "app.bin", image
        ).returncode
        == 0
    )
    otakit("keygen", "-t", "ed25519", "-o", workdir / "other.pem")

    wrong = otakit("verify", "-k", workdir / "other.pem", image)
    assert wrong.returncode == 1
    _one_line_error(wrong, "KEY_MISMATCH")

    tampered = workdir / "tampered.img"
    data = bytearray(image.read_bytes())
    data[500] ^= 1
    tampered.write_bytes(bytes(data))
    bad = otakit("verify", "-k", key, tampered)
    assert bad.returncode == 1
    _one_line_error(bad, "HASH_MISMATCH")

    truncated = workdir / "truncated.img"
    truncated.write_bytes(image.read_bytes()[:1000])
    cut = otakit("verify", "-k", key, truncated)
    assert cut.returncode == 1
    _one_line_error(cut, "TRUNCATED")

    not_image = otakit("verify", "-k", key, workdir / "app.bin")
    assert not_image.returncode == 1
    _one_line_error(not_image, "BAD_MAGIC")

    missing = otakit("verify", "-k", key, workdir / "nope.img")
    assert missing.returncode == 2
    _one_line_error(missing, "FILE")

    no_key = otakit("verify", image)
    assert no_key.returncode == 2
    assert otakit("verify", "--hash-only", image).returncode == 0
    assert otakit("verify", "--frobnicate", image).returncode == 2


@pytest.mark.parametrize(
    ("args", "code"),
    [
        (["-v", "1.x"], "BAD_VERSION"),
        (["-v", "1.0.0", "-H", "0xzz"], "BADARG"),
        (["-v", "1.0.0"], "SIGN"),  # no --pad-header and the payload does not start with zeros
        (["-v", "1.0.0", "--pad-header", "-S", "0x1000", "--pad"], "SIGN"),  # larger than slot
        (["-v", "1.0.0", "--pad-header", "--confirm"], "SIGN"),  # no slot size
        (["-v", "1.0.0", "--pad-header", "-d", "(1 1.0)"], "BADARG"),
    ],
)
def test_sign_usage_errors(workdir: Path, otakit: Otakit, args: list[str], code: str) -> None:
    out = workdir / "out.img"
    result = otakit("sign", "-k", workdir / "key.pem", *args, workdir / "app.bin", out)
    assert result.returncode == 2
    _one_line_error(result, code)
    assert not out.exists()


def test_sign_needs_a_key_or_unsigned(workdir: Path, otakit: Otakit) -> None:
    out = workdir / "out.img"
    result = otakit("sign", "-v", "1.0.0", "--pad-header", workdir / "app.bin", out)
    assert result.returncode == 2
    _one_line_error(result, "BADARG")
    assert (
        otakit(
            "sign", "--unsigned", "-v", "1.0.0", "--pad-header", workdir / "app.bin", out
        ).returncode
        == 0
    )
    assert otakit("verify", "--hash-only", out).returncode == 0
    unsigned = otakit("verify", "-k", workdir / "key.pem", out)
    assert unsigned.returncode == 1
    _one_line_error(unsigned, "UNSIGNED")


def test_encrypted_key_needs_its_password(tmp_path: Path, otakit: Otakit) -> None:
    from otakit.image.keys import SigningKey

    key = tmp_path / "enc.pem"
    key.write_bytes(SigningKey.generate("ed25519").to_pem(b"s3cret"))
    (tmp_path / "app.bin").write_bytes(b"payload")
    args = [
        "sign",
        "-k",
        key,
        "-v",
        "1.0.0",
        "--pad-header",
        tmp_path / "app.bin",
        tmp_path / "o.img",
    ]
    missing = otakit(*args)
    assert missing.returncode == 2
    _one_line_error(missing, "KEY_PASSWORD")
    wrong = otakit(*args, env={"OTAKIT_KEY_PASSWORD": "nope"})
    _one_line_error(wrong, "KEY_PASSWORD")
    assert "nope" not in wrong.stderr
    assert otakit(*args, env={"OTAKIT_KEY_PASSWORD": "s3cret"}).returncode == 0


def test_garbage_key_file(tmp_path: Path, otakit: Otakit) -> None:
    (tmp_path / "k.pem").write_text("not a key")
    result = otakit("getpub", "-k", tmp_path / "k.pem")
    assert result.returncode == 2
    _one_line_error(result, "KEY_FORMAT")


def test_version_and_help(otakit: Otakit) -> None:
    assert otakit("--version").stdout.startswith("otakit ")
    helped = otakit("--help")
    assert helped.returncode == 0
    for command in ("keygen", "getpub", "sign", "verify", "info", "package", "unpack"):
        assert command in helped.stdout


def test_package_info_unpack(workdir: Path, otakit: Otakit) -> None:
    key = workdir / "key.pem"
    (workdir / "spe.bin").write_bytes(os.urandom(3000))
    for name, version in (("app", "2.1.0+5"), ("spe", "1.0.3")):
        signed = otakit(
            "sign",
            "-k",
            key,
            "-v",
            version,
            "--pad-header",
            workdir / f"{name}.bin",
            workdir / f"{name}.img",
        )
        assert signed.returncode == 0, signed.stderr
    pkg = workdir / "update.tar"
    built = otakit("package", "-o", pkg, workdir / "app.img", "--spe", workdir / "spe.img")
    assert built.returncode == 0, built.stderr
    assert "package version 2.1.0" in built.stderr  # defaults to the application's version

    data = json.loads(otakit("info", "--json", pkg).stdout)["package"]
    assert data["version"] == "2.1.0"
    assert [(c["name"], c["file_type"], c["image_index"]) for c in data["components"]] == [
        ("app.img", "NSPE", 0),
        ("spe.img", "SPE", 1),
    ]
    assert data["components"][0]["image"]["header"]["version"] == "2.1.0+5"
    assert data["components"][1]["image"]["hash_ok"] is True
    assert "spe.img (SPE, image 1)" in otakit("info", pkg).stdout

    unpacked = otakit("unpack", pkg, "-C", workdir / "out")
    assert unpacked.returncode == 0, unpacked.stderr
    assert (workdir / "out" / "app.img").read_bytes() == (workdir / "app.img").read_bytes()
    assert (workdir / "out" / "spe.img").read_bytes() == (workdir / "spe.img").read_bytes()
    assert otakit("verify", "-k", key, workdir / "out" / "app.img").returncode == 0


def test_package_refuses_unsigned_payloads_and_bad_versions(workdir: Path, otakit: Otakit) -> None:
    out = workdir / "update.tar"
    raw = otakit("package", "-o", out, workdir / "app.bin")
    assert raw.returncode == 2
    _one_line_error(raw, "BADARG")
    assert "sign it first" in raw.stderr
    assert (
        otakit(
            "sign",
            "-k",
            workdir / "key.pem",
            "-v",
            "1.0.0",
            "--pad-header",
            workdir / "app.bin",
            workdir / "app.img",
        ).returncode
        == 0
    )
    bad_version = otakit("package", "-o", out, "--version", "one", workdir / "app.img")
    assert bad_version.returncode == 2
    _one_line_error(bad_version, "BAD_VERSION")
    assert not out.exists()


def test_unpack_hostile_package_writes_nothing(tmp_path: Path, otakit: Otakit) -> None:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        manifest = b'{"numberOfComponents":"2","version":"1.0.0","files":[{"fileName":"components.json","fileType":"component_list"},{"fileName":"app.bin","fileType":"NSPE","fileSize":"4"}]}'
        info = tarfile.TarInfo("components.json")
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        evil = tarfile.TarInfo("../app.bin")
        evil.size = 4
        tar.addfile(evil, io.BytesIO(b"evil"))
    pkg = tmp_path / "evil.tar"
    pkg.write_bytes(buf.getvalue())
    result = otakit("unpack", pkg, "-C", tmp_path / "out")
    assert result.returncode == 1
    _one_line_error(result, "PACKAGE_UNSAFE_MEMBER")
    assert not (tmp_path / "app.bin").exists()
    assert not (tmp_path / "out").exists()
