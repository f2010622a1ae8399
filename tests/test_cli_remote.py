"""The remote commands of issue 18 (part 1): ``otakit product``, ``key``, ``artifact`` and
``deploy`` against a real ``otakit serve`` on loopback, and what the client says when the server
refuses the token, when nothing listens at the URL, and when what listens is not otakit (a
real ``http.server`` serving a folder).

Commands run through :func:`otakit.cli.main` in this process (as the console script does), so a
dozen commands cost no dozen interpreter starts; the table layout is checked through the real
console script at a fixed terminal width.
"""

from __future__ import annotations

import functools
import http.server
import json
import os
import random
import socket
import subprocess
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from otakit.cli import main
from otakit.errors import ApiError
from otakit.host import client
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image

from .server_harness import BIN, Server, free_port, start_server

KEY = SigningKey.generate("ecdsa-p256")
BOARD = "BOARD_A"


def image(version: str, seed: str = "") -> bytes:
    payload = random.Random(version + seed).randbytes(3000)
    return sign_image(payload, KEY, SignOptions(ImageVersion.parse(version), pad_header=True))


@dataclass
class Result:
    code: int
    out: str
    err: str

    def one_line_error(self, code: str = "API") -> str:
        """The error's message; fails unless it is one ``otakit: error [CODE]: ...`` line."""
        assert self.code != 0, self.out
        lines = self.err.strip().splitlines()
        assert len(lines) == 1, self.err
        assert lines[0].startswith(f"otakit: error [{code}]: "), self.err
        return lines[0].split("]: ", 1)[1]


Cli = Callable[..., Result]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    srv = start_server(tmp_path_factory.mktemp("remote-cli"))
    try:
        with srv.admin_client() as admin:
            trusted = admin.post(
                "/api/v1/keys",
                content=KEY.public_key.pem(),
                headers={"content-type": "application/x-pem-file"},
            )
            assert trusted.status_code == 201, trusted.text
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def cli(server: Server, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """``otakit ARGS...`` with $OTAKIT_SERVER/$OTAKIT_TOKEN naming the module's server."""
    monkeypatch.setenv("OTAKIT_SERVER", server.url)
    monkeypatch.setenv("OTAKIT_TOKEN", server.admin)

    def run(*args: object) -> Result:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run


def _json(result: Result) -> Any:
    assert result.code == 0, result.err
    return json.loads(result.out)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# --- products ----------------------------------------------------------------------------------


def test_product_set_changes_only_what_is_given(cli: Cli) -> None:
    product = _name("prod")
    created = cli("product", "set", product, "--anonymous")
    assert created.code == 0, created.err
    assert f"product {product}: board -, anonymous" in created.out
    # setting the board later leaves anonymous access on (PUT used to turn it off)
    assert cli("product", "set", product, "--board", BOARD, "--self-register").code == 0
    shown = _json(cli("product", "show", product, "--json"))
    assert shown == {
        "name": product,
        "board": BOARD,
        "anonymous": True,
        "self_register": True,
        "allow_raw": False,
    }
    assert cli("product", "set", product, "--no-anonymous").code == 0
    assert _json(cli("product", "show", product, "--json"))["self_register"] is True
    listed = _json(cli("product", "list", "--json"))
    assert [p["anonymous"] for p in listed if p["name"] == product] == [False]
    table = cli("product", "list")
    assert product in table.out
    assert BOARD in table.out
    missing = cli("product", "show", "no-such-product").one_line_error()
    assert "404" in missing
    assert "no-such-product" in missing


# --- keys --------------------------------------------------------------------------------------


def test_key_trust_sends_only_the_public_part_of_an_encrypted_private_key(
    cli: Cli, server: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = SigningKey.generate("ed25519")
    private = tmp_path / "signing.pem"
    key.save(private, password=b"s3cret")
    with server.admin_client() as admin:
        # the server refuses a private key outright, so a trusted key proves only its public
        # part travelled
        refused = admin.post(
            "/api/v1/keys",
            content=key.to_pem(),
            headers={"content-type": "application/x-pem-file"},
        )
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"] == "PRIVATE_KEY"

        no_password = cli("key", "trust", private).one_line_error("KEY_PASSWORD")
        assert "OTAKIT_KEY_PASSWORD" in no_password
        monkeypatch.setenv("OTAKIT_KEY_PASSWORD", "s3cret")
        trusted = cli("key", "trust", private)
        assert trusted.code == 0, trusted.err
        fingerprint = key.public_key.fingerprint
        assert trusted.out.strip() == f"trusted ed25519 key {fingerprint}"
        stored = {k["fingerprint"]: k for k in admin.get("/api/v1/keys").json()}
        assert stored[fingerprint]["pem"].encode() == key.public_key.pem()
        assert "PRIVATE" not in stored[fingerprint]["pem"]

    listed = cli("key", "list")
    assert fingerprint in listed.out
    assert "ed25519" in listed.out
    assert fingerprint in [k["fingerprint"] for k in _json(cli("key", "list", "--json"))]
    assert cli("key", "remove", fingerprint).code == 0
    assert fingerprint not in cli("key", "list").out
    gone = cli("key", "remove", fingerprint).one_line_error()
    assert "404" in gone
    assert "not a key fingerprint" in cli("key", "remove", "../x").one_line_error("BADARG")


def test_key_trust_of_a_file_that_is_no_key_is_one_line(cli: Cli, tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pem"
    bogus.write_text("hello\n")
    assert "not a PEM key" in cli("key", "trust", bogus).one_line_error("KEY_FORMAT")


# --- artifacts ---------------------------------------------------------------------------------


def test_artifact_upload_list_show_delete_with_short_ids(cli: Cli, tmp_path: Path) -> None:
    product = _name("art")
    assert cli("product", "set", product, "--board", BOARD).code == 0
    path = tmp_path / "app.img"
    path.write_bytes(image("2.1.0", product))

    uploaded = cli("artifact", "upload", path, "--version", "2.1.0", "--product", product)
    assert uploaded.code == 0, uploaded.err
    assert uploaded.out.startswith("uploaded app.img 2.1.0 (image, signature valid) ")
    sha = uploaded.out.split()[-1]
    assert len(sha) == 64
    again = cli("artifact", "upload", path, "--product", product, "--json")
    assert _json(again)["id"] == sha  # the same bytes: the existing artifact

    listed = _json(cli("artifact", "list", "--product", product, "--json"))
    assert [a["id"] for a in listed] == [sha]
    assert sha[:12] in cli("artifact", "list", "--product", product).out

    shown = cli("artifact", "show", sha[:12])
    assert shown.code == 0, shown.err
    assert sha in shown.out
    assert "2.1.0" in shown.out
    assert _json(cli("artifact", "show", sha[:12].upper(), "--json"))["id"] == sha
    short = cli("artifact", "show", sha[:8]).one_line_error("BADARG")
    assert "at least its first 12 hex digits" in short

    deleted = cli("artifact", "delete", sha[:16])
    assert deleted.code == 0, deleted.err
    assert f"deleted app.img 2.1.0 ({sha[:12]})" in deleted.out
    assert "404" in cli("artifact", "show", sha).one_line_error()


def test_artifact_upload_of_another_version_stores_nothing(cli: Cli, tmp_path: Path) -> None:
    product = _name("ver")
    assert cli("product", "set", product, "--board", BOARD).code == 0
    path = tmp_path / "app.img"
    path.write_bytes(image("3.0.0", product))
    refused = cli("artifact", "upload", path, "--version", "3.0.1", "--product", product)
    assert "422" in refused.one_line_error()
    assert _json(cli("artifact", "list", "--product", product, "--json")) == []


# --- deploy ------------------------------------------------------------------------------------


def test_deploy_twice_gives_the_existing_deployment(
    cli: Cli, server: Server, tmp_path: Path
) -> None:
    product = _name("dep")
    assert cli("product", "set", product, "--board", BOARD).code == 0
    path = tmp_path / "app.img"
    path.write_bytes(image("1.4.0", product))

    first = cli("deploy", path, "1.4.0", product, "field", "--board", BOARD)
    assert first.code == 0, first.err
    number = int(first.out.strip())
    assert f"deployed app.img 1.4.0 to {product}/field (board {BOARD})" in first.err
    with server.admin_client() as admin:
        deployment = admin.get(f"/api/v1/deployments/{number}").json()
    assert BOARD in json.dumps(deployment)  # the target names the board

    second = cli("deploy", path, "1.4.0", product, "field", "--board", BOARD)
    assert second.code == 0, second.err
    assert int(second.out.strip()) == number
    assert f"already deployed: deployment {number}" in second.err

    # another binary that claims the same version is refused with the server's words
    other = tmp_path / "other.img"
    other.write_bytes(image("1.4.0", product + "-other"))
    taken = cli("deploy", other, "1.4.0", product, "field").one_line_error()
    assert "already has version 1.4.0" in taken
    assert "bump the version" in taken
    artifacts = _json(cli("artifact", "list", "--product", product, "--json"))
    assert len(artifacts) == 1


def test_deploy_of_a_wrong_version_leaves_no_artifact(cli: Cli, tmp_path: Path) -> None:
    product = _name("wrong")
    assert cli("product", "set", product, "--board", BOARD).code == 0
    path = tmp_path / "app.img"
    path.write_bytes(image("1.8.0", product))
    wrong = cli("deploy", path, "1.9.0", product, "field").one_line_error("BADARG")
    assert "app.img is version 1.8.0, not 1.9.0" in wrong
    assert "nothing uploaded" in wrong
    assert _json(cli("artifact", "list", "--product", product, "--json")) == []


# --- tables ------------------------------------------------------------------------------------


def _artifact_with_long_names(cli: Cli, tmp_path: Path) -> str:
    product = _name("table-with-a-long-product-name")
    assert cli("product", "set", product, "--board", "CY8CPROTO_062_4343W_LONG").code == 0
    path = tmp_path / "firmware-with-a-rather-long-file-name-v1.2.3.img"
    path.write_bytes(image("1.2.3", product))
    assert cli("artifact", "upload", path, "--product", product).code == 0
    return product


def _fits(table: str, columns: int) -> list[str]:
    """The table's lines, checked: none wider than the terminal, none cut with an ellipsis
    ("ph… ad…"), every one ending in the table's right edge (nothing cropped)."""
    lines = table.splitlines()
    assert lines, table
    assert max(len(line) for line in lines) <= columns, table
    assert "…" not in table
    assert all(line.endswith(("┓", "┃", "┩", "│", "┘")) for line in lines), table
    return lines


def test_artifact_table_fits_80_columns(cli: Cli, server: Server, tmp_path: Path) -> None:
    """The console script at $COLUMNS=80 (no terminal): cells wrap, nothing is cut."""
    product = _artifact_with_long_names(cli, tmp_path)
    env = {**os.environ, "COLUMNS": "80", "OTAKIT_SERVER": server.url, "OTAKIT_TOKEN": server.admin}
    done = subprocess.run(
        [str(BIN / "otakit"), "artifact", "list", "--product", product],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    lines = _fits(done.stdout, 80)
    for header in ("id", "name", "version", "product"):
        assert header in lines[1]
    assert "firmware-with" in done.stdout
    assert "1.2.3" in done.stdout


def test_a_narrow_terminal_drops_columns_rather_than_squeeze_them(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    product = _artifact_with_long_names(cli, tmp_path)
    monkeypatch.setattr(client, "out", Console(width=50, highlight=False))
    lines = _fits(cli("artifact", "list", "--product", product).out, 50)
    assert "version" in lines[1]
    assert "uploaded" not in lines[1]
    assert "board" not in lines[1]
    assert "1.2.3" in "".join(lines)


def test_show_table_formats_cells_and_drops_by_priority() -> None:
    rows = [
        {"a": None, "b": True, "c": {"k": "v", "n": 1}, "d": ["x", "y"], "e": "[bold]not markup"},
    ]
    columns = [
        client.Column("first", "a"),
        client.Column("flag", "b"),
        client.Column("tags", "c", drop=1),
        client.Column("list", "d", drop=2),
        client.Column("text", "e"),
    ]
    wide = Console(width=100, record=True)
    client.show_table(rows, columns, console=wide)
    text = wide.export_text()
    for shown in ("-", "yes", "k=v, n=1", "x, y", "[bold]not markup"):
        assert shown in text
    narrow = Console(width=40, record=True)
    client.show_table(rows, columns, console=narrow)
    header = _fits(narrow.export_text(), 40)[1]
    assert "list" not in header  # the highest drop goes first
    assert "first" in header
    assert "text" in header
    assert client.timestamp("2026-12-03T16:30:06.123456Z") == "2026-12-03 16:30:06"
    assert client.short_id("ab" * 32) == "ab" * 6


# --- what the client says when the server refuses or is not there ------------------------------


def test_a_wrong_token_is_refused_in_one_line(cli: Cli, server: Server) -> None:
    refused = cli("product", "list", "--token", "otk_wrong_token").one_line_error()
    assert refused.startswith(f"the server at {server.url} refused the token (")
    assert refused.endswith("check --token / $OTAKIT_TOKEN")


def test_a_viewer_token_may_read_but_not_change(cli: Cli, server: Server) -> None:
    with server.admin_client() as admin:
        made = admin.post("/api/v1/tokens", json={"role": "viewer", "label": "auditor"})
        assert made.status_code == 201, made.text
        viewer = made.json()["token"]
    assert cli("product", "list", "--token", viewer).code == 0
    refused = cli("product", "set", _name("v"), "--anonymous", "--token", viewer).one_line_error()
    assert "the token's role may not do this" in refused
    assert "viewer" in refused


def test_nothing_listening_says_is_otakit_serve_running(cli: Cli) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # bound and closed again: nothing listens
    down = cli("key", "list", "--server", url).one_line_error()
    assert down.startswith(f"nothing answers at {url}: is `otakit serve` running?")


@pytest.mark.integration
def test_a_listener_that_never_answers_is_named() -> None:
    """A socket that listens but never reads (the kernel completes the connection): the
    client gives up after its timeout and says so in one line."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with (
            client.ManagementClient(url, "otk_x_y", timeout=0.3) as api,
            pytest.raises(ApiError, match="accepted the connection but did not answer") as info,
        ):
            api.request("GET", "/api/v1/keys")
    assert info.value.message.startswith(url)
    assert "\n" not in info.value.message


def test_a_server_url_without_scheme_is_a_usage_error(cli: Cli) -> None:
    bad = cli("product", "list", "--server", "127.0.0.1:8080").one_line_error("BADARG")
    assert "is not an http:// or https:// URL" in bad


@pytest.fixture(scope="module")
def web_folder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real web server that is not otakit: Python's http.server serving a folder in which
    ``/api/v1/products`` is a page."""
    root = tmp_path_factory.mktemp("web")
    (root / "api" / "v1").mkdir(parents=True)
    (root / "api" / "v1" / "products").write_text("<html><body>products</body></html>\n")

    class Folder(http.server.SimpleHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Folder, directory=str(root))
    )
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "answer"),
    [
        (("product", "show", "sensor"), "404 File not found with text/html"),  # an HTML 404
        (("product", "list"), "200 OK with application/octet-stream"),  # a 200 that is no JSON
        (("product", "set", "sensor", "--anonymous"), "501 Unsupported method"),  # PATCH
    ],
)
def test_a_web_server_that_is_not_otakit_is_named(
    cli: Cli, web_folder: str, args: tuple[str, ...], answer: str
) -> None:
    said = cli(*args, "--server", web_folder).one_line_error()
    assert said.startswith(f"no otakit server answers at {web_folder} (it answered {answer}")
    assert said.endswith("check --server / $OTAKIT_SERVER")
