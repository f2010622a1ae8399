"""How the ``otakit`` command fails and helps: usage errors in otakit's one-line form, Ctrl-C,
a full disk, ``otakit serve`` refusing a bad or busy port before it creates anything, the
server's answer to unknown routes, help placeholders, one meaning per short flag, shell
completion, and tables that stay readable at 80 columns."""

from __future__ import annotations

import hashlib
import os
import queue
import re
import resource
import signal
import socket
import struct
import subprocess
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from otakit import cli
from otakit.host import rollout

from .conftest import BIN, Run

Otakit = Callable[..., Run]


def _one_line_error(result: Run, code: str, status: int = 2) -> str:
    """The message of ``otakit: error [CODE]: message``, the only line on stderr."""
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    prefix = f"otakit: error [{code}]: "
    assert lines[0].startswith(prefix), result.stderr
    assert "Traceback" not in result.stderr
    assert "╭" not in result.stderr
    return lines[0].removeprefix(prefix)


def _in_process(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return Run(status, captured.out, captured.err)


def _commands() -> Iterator[tuple[str, Any]]:
    """Every command of the tree (groups too), by its path, with placeholders as main() sets."""
    root = cli.command()

    def walk(command: Any, path: str) -> Iterator[tuple[str, Any]]:
        yield path, command
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, f"{path} {name}")

    yield from walk(root, "otakit")


# --- usage errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["sign", "--bogus"], "no such option: --bogus (see: otakit sign --help)"),
        (["sign"], "missing argument 'INFILE' (see: otakit sign --help)"),
        (["sign", "a.bin", "b.img"], "missing option '-v' / '--version'"),
        (["nosuch"], "no such command 'nosuch' (see: otakit --help)"),
        (["sim", "status"], "missing argument 'DIRECTORY' (see: otakit sim status --help)"),
        (["serve", "--port", "99999"], "invalid value for '--port'"),
        (["serve", "--port", "eighty"], "invalid value for '--port'"),
        (["info", "a.img", "extra"], "got unexpected extra argument(s) (extra)"),
        (["sign", "--unsigned=yes"], "option '--unsigned' does not take a value"),
    ],
)
def test_usage_errors_are_one_line(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    argv: list[str],
    said: str,
) -> None:
    monkeypatch.chdir(tmp_path)
    message = _one_line_error(_in_process(capsys, *argv), "BADARG")
    assert said in message, message
    assert list(tmp_path.iterdir()) == []


def test_usage_errors_through_the_entry_point(otakit: Otakit, tmp_path: Path) -> None:
    result = otakit("verify", "--frobnicate", tmp_path / "x.img")
    assert _one_line_error(result, "BADARG").startswith("no such option: --frobnicate")
    assert result.stdout == ""
    assert otakit("--version").stdout.strip().startswith("otakit ")
    # a group without its command shows the group's help, as before
    assert "Commands" in otakit("sim").stdout


# what typer shows without placeholders: <bool>, <str>, <path>, <list[Path]>, <int range>...
TYPE_NAMES = re.compile(r"<(bool|str|int|float|path|file|dir|list\[\w+\]|[\w ]+ range)>")


def test_help_works_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` and ``-h`` on every command and group: exit 0, a usage line, and placeholders
    instead of type names (``<bool>``, ``<list[Path]>``, ``<str>``)."""
    seen = 0
    for path, _command in _commands():
        for flag in ("--help", "-h") if path.count(" ") < 2 else ("--help",):
            shown = _in_process(capsys, *path.split()[1:], flag)
            assert shown.returncode == 0, (path, shown.stderr)
            assert f"Usage: {path}" in shown.stdout, path
            assert not TYPE_NAMES.search(shown.stdout), (path, shown.stdout)
            seen += 1
    assert seen > 60


def test_placeholders_say_what_a_value_is(capsys: pytest.CaptureFixture[str]) -> None:
    options = {
        (path, option): param.metavar
        for path, command in _commands()
        for param in command.params
        if param.param_type_name == "option"
        for option in param.opts
    }
    assert options[("otakit sign", "--unsigned")] == ""  # a flag: no placeholder at all
    assert options[("otakit verify", "--key")] == "FILE"  # was <list[Path]>
    assert options[("otakit sign", "--slot-size")] == "SIZE"
    assert options[("otakit serve", "--port")] == "PORT"
    assert options[("otakit serve", "--data")] == "DIR"
    assert options[("otakit serve", "--rollout-interval")] == "SECONDS"
    assert options[("otakit rollout list", "--server")] == "URL"
    assert options[("otakit token create", "--device")] == "SERIAL"
    assert options[("otakit rollout list", "--limit")] == "N"
    assert all(m is not None and "<" not in m for m in options.values())
    shown = _in_process(capsys, "verify", "--help").stdout
    assert re.search(r"--key\s+-k\s+FILE\s", shown), shown
    assert re.search(r"--hash-only\s+Check", shown), shown


# --- one meaning per short flag ------------------------------------------------------------------

# Commands that keep the flags of what they mirror: the original scripts (publisher, subscriber,
# deploy: -c is the company, the chunk size or the container there) and imgtool (the image
# commands: -k is the key file, -v the version, -S the slot size...).
SCRIPT_COMMANDS = frozenset({"otakit publisher", "otakit subscriber", "otakit deploy"})
IMAGE_COMMANDS = frozenset({"otakit keygen", "otakit getpub", "otakit sign", "otakit verify"})


def short_flags() -> dict[str, list[tuple[str, frozenset[str]]]]:
    """Each short flag -> [(command, the long names of its option)] over the whole tree."""
    flags: dict[str, list[tuple[str, frozenset[str]]]] = defaultdict(list)
    for path, command in _commands():
        for param in command.params:
            if param.param_type_name != "option":
                continue
            names = [*param.opts, *param.secondary_opts]
            longs = frozenset(n for n in names if n.startswith("--"))
            for name in names:
                if not name.startswith("--"):
                    flags[name].append((path, longs))
    return flags


def test_every_short_flag_has_one_meaning() -> None:
    """Outside the commands that mirror a script or imgtool, a short flag means one thing (its
    options share a long name), and the same thing as on the image commands."""
    flags = short_flags()
    assert {"-k", "-c", "-v", "-o"} <= flags.keys()  # the walk sees the tree
    problems = []
    for flag, uses in sorted(flags.items()):
        general = [(p, longs) for p, longs in uses if p not in SCRIPT_COMMANDS | IMAGE_COMMANDS]
        imaged = [(p, longs) for p, longs in uses if p in IMAGE_COMMANDS]
        for path, longs in general:
            for other, other_longs in general + imaged:
                if not longs & other_longs:
                    problems.append(
                        f"{flag}: {path} {sorted(longs)} vs {other} {sorted(other_longs)}"
                    )
    assert problems == []
    # the key file everywhere it is a short flag outside the scripts
    assert all("--key" in longs for path, longs in flags["-k"] if path not in SCRIPT_COMMANDS)


# --- Ctrl-C --------------------------------------------------------------------------------------


def test_ctrl_c_in_a_command_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    def interrupted(*_args: object, **_kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "verify_image", interrupted)
    (tmp_path / "app.img").write_bytes(b"\0" * 64)
    result = _in_process(capsys, "verify", "--hash-only", str(tmp_path / "app.img"))
    assert _one_line_error(result, "INTERRUPTED", 130) == "interrupted (Ctrl-C)"


@pytest.mark.integration
def test_ctrl_c_at_a_prompt_is_one_line(tmp_path: Path) -> None:
    """A real SIGINT while ``keygen -p`` waits for the password (no terminal: a new session)."""
    key = tmp_path / "key.pem"
    proc = subprocess.Popen(
        [str(BIN / "otakit"), "keygen", "-t", "ed25519", "-o", str(key), "-p"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "COLUMNS": "200", "PYTHONWARNINGS": "ignore"},
    )
    assert proc.stdout is not None
    assert proc.stdout.read(len("Password:")) == "Password:"  # it waits for input now
    proc.send_signal(signal.SIGINT)
    _out, errors = proc.communicate(timeout=30)
    assert proc.returncode == 130, errors
    # before it, Python's getpass may warn that it cannot hide the input (no terminal)
    assert errors.splitlines()[-1].strip() == "otakit: error [INTERRUPTED]: interrupted (Ctrl-C)"
    assert "Traceback" not in errors
    assert errors.count("otakit:") == 1
    assert not key.exists()


# --- a full disk -----------------------------------------------------------------------------------


def _file_size_limit(limit: int) -> Callable[[], None]:
    """A child whose files cannot grow past ``limit`` bytes: writes fail with EFBIG (SIGXFSZ,
    which would kill it, is ignored), as on a full disk."""

    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def _limited(argv: list[str], limit: int) -> Run:
    env = {**os.environ, "COLUMNS": "200", "NO_COLOR": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [str(BIN / "otakit"), *argv],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
        preexec_fn=_file_size_limit(limit),
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


@pytest.mark.integration
def test_a_full_disk_under_sign_is_one_line(tmp_path: Path, otakit: Otakit) -> None:
    (tmp_path / "app.bin").write_bytes(os.urandom(20000))
    image = tmp_path / "app.img"
    result = _limited(["sign", "--unsigned", "-v", "1.0.0", "--pad-header",
                       str(tmp_path / "app.bin"), str(image)], 4096)  # fmt: skip
    message = _one_line_error(result, "STORAGE_FULL", 1)
    assert f"cannot write {image}" in message
    assert "too large" in message.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["app.bin"]  # no temporary left


@pytest.mark.integration
def test_stdout_on_a_full_disk_is_one_line(tmp_path: Path, otakit: Otakit) -> None:
    assert otakit("keygen", "-t", "ed25519", "-o", tmp_path / "key.pem").returncode == 0
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [str(BIN / "otakit"), "getpub", "-k", str(tmp_path / "key.pem")],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            check=False,
        )
    message = _one_line_error(Run(proc.returncode, "", proc.stderr), "STORAGE_FULL", 1)
    assert "no space left on device" in message.lower()


@pytest.fixture
def server_data(tmp_path: Path) -> Path:
    """A server's data folder, as ``otakit serve`` leaves it (database, signing key)."""
    from otakit.server.app import initialise
    from otakit.server.database import database_url
    from otakit.server.settings import ServerSettings

    data = tmp_path / "data"
    initialise(ServerSettings(data_dir=data, database_url=database_url(None, data)))
    return data


@pytest.mark.integration
def test_token_create_at_a_file_size_limit_is_one_line(server_data: Path) -> None:
    before = (server_data / "otakit.db").read_bytes()
    result = _limited(["token", "create", "--role", "admin", "--data", str(server_data)], 1024)
    message = _one_line_error(result, "STORAGE_FULL", 1)
    assert "free some space" in message
    assert result.stdout == ""  # no token printed: none was made
    assert (server_data / "otakit.db").read_bytes() == before


# a tmpfs of 4 MiB in a mount namespace of its own, filled up to FREE bytes: a real ENOSPC
_FULL_DISK = """
set -e
mount -t tmpfs -o size=4m tmpfs "$1"
cp -a "$2" "$1/data"
head -c $((4 * 1024 * 1024 - $3)) /dev/zero > "$1/fill" 2>/dev/null || true
sha256sum "$1/data/otakit.db" >&2
"$4" token create --role admin --data "$1/data" || echo "exit $?"
sha256sum "$1/data/otakit.db" >&2
"""


@pytest.mark.integration
def test_token_create_on_a_full_disk_is_one_line(tmp_path: Path, server_data: Path) -> None:
    mount = tmp_path / "mnt"
    mount.mkdir()
    try:
        ours = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "true"],
            capture_output=True, timeout=60, check=False,
        )  # fmt: skip
    except FileNotFoundError:
        pytest.skip("no unshare here (util-linux)")
    if ours.returncode != 0:
        pytest.skip(f"no user namespaces here: {ours.stderr!r}")
    proc = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", _FULL_DISK, "sh",
         str(mount), str(server_data), "300000", str(BIN / "otakit")],
        capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
    )  # fmt: skip
    assert proc.stdout.strip() == "exit 1", (proc.stdout, proc.stderr)  # and no token
    hashes = [line.split()[0] for line in proc.stderr.splitlines() if "otakit.db" in line]
    errors = [line for line in proc.stderr.splitlines() if "otakit.db" not in line]
    assert len(hashes) == 2
    assert hashes[0] == hashes[1]  # the database is as it was
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith("otakit: error [STORAGE_FULL]: the server's storage is full;")


# --- otakit serve: the port ----------------------------------------------------------------------


@pytest.mark.integration
def test_serve_refuses_a_port_out_of_range_and_a_busy_port(tmp_path: Path) -> None:
    data = tmp_path / "data"
    out_of_range = cli_run("serve", "--data", str(data), "--port", "99999")
    assert "invalid value for '--port'" in _one_line_error(out_of_range, "BADARG")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        in_use = cli_run("serve", "--data", str(data), "--port", str(port))
    message = _one_line_error(in_use, "LISTEN")
    assert f"127.0.0.1:{port}" in message
    assert "in use" in message
    assert in_use.stdout == ""  # no admin token
    assert not data.exists()  # no data folder, no database


def cli_run(*args: str) -> Run:
    proc = subprocess.run(
        [str(BIN / "otakit"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        timeout=60,
        check=False,
    )
    return Run(proc.returncode, proc.stdout, proc.stderr)


@dataclass
class Served:
    url: str
    proc: subprocess.Popen[str]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """``otakit serve --port 0``: it picks a free port and says which."""
    data = tmp_path_factory.mktemp("serve")
    proc = subprocess.Popen(
        [str(BIN / "otakit"), "serve", "--data", str(data), "--port", "0"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    url = None
    try:
        while True:
            line = lines.get(timeout=60)
            assert line is not None, "the server exited"
            found = re.search(r"otakit server on (http://127\.0\.0\.1:(\d+))", line)
            if found:
                assert found.group(2) != "0"
                url = found.group(1)
            if "Uvicorn running on" in line:
                assert url is not None
                assert url.rsplit(":", 1)[1] in line
                break
        yield Served(url, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/no/such/page", 404),
        ("GET", "/api/v1/no-such-thing", 404),
        ("GET", "/api/v1", 404),
        ("GET", "/api/v2/products", 404),
        ("GET", "/dashboard/no-such-file.js", 404),
        ("POST", "/no/such/page", 404),
        ("POST", "/", 405),
        ("DELETE", "/", 405),
        ("GET", "/dl/no-such-artifact/app.bin", 403),  # a download URL without its signature
    ],
)
def test_unknown_routes_answer_in_the_error_shape(
    server: Served, method: str, path: str, status: int
) -> None:
    answer = httpx.request(method, server.url + path, timeout=30)
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("application/json")
    body = answer.json()
    assert set(body) == {"error", "message"}, body
    assert body["error"] == {403: "FORBIDDEN", 404: "NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}[status]
    head = httpx.head(server.url + path, timeout=30)
    if method == "GET":
        # HEAD answers as GET does (405 where the route exists only for GET), without a body
        assert head.status_code in (status, 405)
        assert head.content == b""
        assert head.headers["content-type"].startswith("application/json")


# --- verify: which hash ------------------------------------------------------------------------------


def test_verify_names_both_hashes(tmp_path: Path, otakit: Otakit) -> None:
    (tmp_path / "app.bin").write_bytes(os.urandom(3000))
    image = tmp_path / "app.img"
    signed = otakit(
        "sign", "--unsigned", "-v", "1.2.3", "--pad-header", tmp_path / "app.bin", image
    )
    assert signed.returncode == 0, signed.stderr
    data = image.read_bytes()
    hdr_size, protected, img_size = struct.unpack_from("<HHI", data, 8)
    image_hash = hashlib.sha256(data[: hdr_size + img_size + protected]).hexdigest()
    file_hash = hashlib.sha256(data).hexdigest()
    assert image_hash != file_hash
    shown = otakit("verify", "--hash-only", image)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"{image}: valid, version 1.2.3")
    assert re.search(
        rf"image hash \(SHA256 TLV, over header and payload\): {image_hash}$", lines[1]
    )
    assert re.search(rf"file SHA-256 \(the server's artifact id\): {file_hash}$", lines[2])


# --- shell completion --------------------------------------------------------------------------------


def test_shell_completion_installs_and_completes(tmp_path: Path, otakit: Otakit) -> None:
    home = tmp_path / "home"
    home.mkdir()
    installed = otakit("--install-completion", "bash", env={"HOME": str(home)})
    assert installed.returncode == 0, installed.stderr
    script = home / ".bash_completions" / "otakit.sh"
    assert f"source '{script}'" in (home / ".bashrc").read_text()
    shown = otakit("--show-completion", "bash")
    assert shown.stdout.strip() == script.read_text().strip()
    # the installed script, in a real bash, completes commands and options
    completed = subprocess.run(
        ["bash", "-c", f'source "{script}"; COMP_WORDS=(otakit si); COMP_CWORD=1; '
         '_otakit_completion otakit; printf "%s\\n" "${COMPREPLY[@]}"'],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"},
    )  # fmt: skip
    assert completed.stdout.split() == ["sign", "sim"], completed.stderr
    options = subprocess.run(
        [str(BIN / "otakit")],
        capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "_OTAKIT_COMPLETE": "complete_bash",
             "COMP_WORDS": "otakit verify --ha", "COMP_CWORD": "2"},
    )  # fmt: skip
    assert options.stdout.split() == ["--hash-only"]


# --- tables at 80 columns ----------------------------------------------------------------------------


def _phase(number: int, status: str, **extra: Any) -> dict[str, Any]:
    return {
        "number": number, "percent": 100.0 * number / 3, "group": None, "manual": False,
        "success": 95, "max_errors": 2, "on_error": "abort", "status": status,
        "targeted": 12345, "succeeded": 12000, "failed": 17, "acknowledged": 3,
        "counts": {"Downloading": 11, "Applying": 4, "Applied": 12000, "Error": 17}, **extra,
    }  # fmt: skip


def test_rollout_show_fits_80_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    console = Console(width=80, record=True, highlight=False, soft_wrap=True)
    monkeypatch.setattr(rollout, "out", console)
    rollout.print_rollout(
        {
            "id": 7, "state": "running", "phase": 2, "deployment_id": 41,
            "version": "2.0.0+17", "condition": "product sensor, group field",
            "phases": [_phase(1, "passed"), _phase(2, "current"), _phase(3, "waiting")],
            "confirm_timeout": 3600, "max_boots": None, "soak": 0, "frozen": False,
        }
    )  # fmt: skip
    text = console.export_text()
    table = [line for line in text.splitlines() if line[:1] in "┏┃┡│└╭╰┌├"]
    assert table
    assert all(len(line) <= 80 for line in table), text
    assert "…" not in text
    for must in ("phase", "admits", "status", "devices", "12000 (97%)", "accepted)"):
        assert must in text, text
    assert "2 *" in text  # the current phase is marked without colour


def test_sim_status_fits_80_columns(tmp_path: Path, otakit: Otakit) -> None:
    assert otakit("keygen", "-t", "ed25519", "-o", tmp_path / "key.pem").returncode == 0
    (tmp_path / "app.bin").write_bytes(os.urandom(2000))
    signed = otakit("sign", "-k", tmp_path / "key.pem", "-v", "1.0.0+123456", "--pad-header",
                    tmp_path / "app.bin", tmp_path / "app.img")  # fmt: skip
    assert signed.returncode == 0, signed.stderr
    dev = tmp_path / "device"
    created = otakit("sim", "create", dev, "--image", tmp_path / "app.img",
                     "-k", tmp_path / "key.pem")  # fmt: skip
    assert created.returncode == 0, created.stderr
    shown = otakit("sim", "status", dev, env={"COLUMNS": "80"})
    assert shown.returncode == 0, shown.stderr
    assert all(len(line) <= 80 for line in shown.stdout.splitlines()[1:]), shown.stdout
    assert "1.0.0+123456" in shown.stdout
    assert "confirmed" in shown.stdout
    narrow = otakit("sim", "status", dev, env={"COLUMNS": "50"})  # cells wrap, never "…"
    assert narrow.returncode == 0, narrow.stderr
    assert "…" not in narrow.stdout
    assert all(len(line) <= 50 for line in narrow.stdout.splitlines()[1:]), narrow.stdout


def test_flag_table_script_prints_every_short_flag() -> None:
    """The table in docs/cli.md comes from this walk; it lists the exceptions as such."""
    flags = short_flags()
    assert [p for p, _ in flags["-c"]].count("otakit agent run") == 1
    assert all(p in SCRIPT_COMMANDS for p, longs in flags["-c"] if "--config" not in longs)
