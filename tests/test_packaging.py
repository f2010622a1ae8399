"""Install and packaging: the extras of pyproject.toml, the agent without the server stack, and
the command lines of the systemd units and the Dockerfile (docs/install.md).

The base install must run the image commands and the device agent without FastAPI, SQLAlchemy
and the rest of the server extra. Rather than a fresh venv per run (minutes), the agent's test
runs the real ``otakit`` with an import hook (a ``sitecustomize`` on ``PYTHONPATH``) that makes
the server extra's modules unimportable, as if not installed, and records every attempt: the
image commands and a whole gateway update (check-in, download, SHA-256, program, report) must
work and must not even try. The server commands must say, in one line, which extra they need.
The static tests check pyproject's extras against the imports of the source.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import importlib.metadata
import os
import re
import shlex
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import typer
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from otakit import agent_command
from otakit.cli import app
from otakit.extras import EXTRAS

from .server_harness import Server, start_server

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "otakit"
BIN = Path(sys.executable).parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]

# Modules of the server extra (and what they bring) that a base install lacks.
SERVER_ONLY = (
    "fastapi",
    "starlette",
    "uvicorn",
    "sqlalchemy",
    "alembic",
    "aiosqlite",
    "asyncpg",
    "boto3",
    "botocore",
    "s3transfer",
    "smp",  # the sim extra
)

BLOCKER = """\
import os, sys

BLOCKED = frozenset(os.environ["OTAKIT_TEST_BLOCK"].split(","))
LOG = os.environ["OTAKIT_TEST_BLOCK_LOG"]


class NotInstalled:
    \"\"\"Refuses the blocked packages as if they were not installed; logs each attempt.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            with open(LOG, "a") as log:
                log.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None


sys.meta_path.insert(0, NotInstalled())
"""


# --- pyproject's extras against the source's imports ---------------------------------------------


def _requirements(extra: str | None = None) -> list[Requirement]:
    texts = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(text) for text in texts]


def _closure(requirements: list[Requirement]) -> set[str]:
    """The installed distributions ``requirements`` bring, themselves included (canonical
    names); ``otakit[...]`` entries are followed into the named extras."""
    found: set[str] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name == "otakit":
            for extra in req.extras:
                todo += _requirements(extra)
            continue
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in found:
            continue
        found |= {key, name}
        try:
            needs = importlib.metadata.requires(name) or []
        except importlib.metadata.PackageNotFoundError:  # an optional extra not installed (ble)
            continue
        for text in needs:
            sub = Requirement(text)
            wanted = sub.marker is None or any(
                sub.marker.evaluate({"extra": extra}) for extra in {"", *req.extras}
            )
            if wanted:
                todo.append(sub)
    return {name for name in found if "[" not in name}


@functools.cache
def _installed() -> Mapping[str, list[str]]:
    return importlib.metadata.packages_distributions()


def _distributions(module: str) -> set[str]:
    return {canonicalize_name(d) for d in _installed().get(module, [])}


def _imports(path: Path) -> Iterator[tuple[str, bool]]:
    """Third-party and otakit modules ``path`` imports: (name, at module level), leaving out
    ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text())

    def walk(node: ast.AST, top: bool) -> Iterator[tuple[str, bool]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                yield from (x for n in child.orelse for x in walk_one(n, top))
                continue
            yield from walk_one(child, top)

    def walk_one(node: ast.AST, top: bool) -> Iterator[tuple[str, bool]]:
        if isinstance(node, ast.Import):
            yield from ((alias.name, top) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module, top
            yield from ((f"{node.module}.{alias.name}", top) for alias in node.names)
        nested = isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
        yield from walk(node, top and not nested)

    yield from walk(tree, True)


def _module_path(module: str) -> Path | None:
    base = SRC.parent / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _third_party(module: str) -> str | None:
    top = module.partition(".")[0]
    if top == "otakit" or top in sys.stdlib_module_names or top == "__future__":
        return None
    return top


@pytest.mark.unit
def test_the_otakit_command_imports_only_the_base_install() -> None:
    """Every module ``import otakit.cli`` loads (module-level imports, followed through otakit's
    own modules) needs only the base dependencies and what they bring."""
    base = _closure(_requirements())
    seen: set[str] = set()
    todo = ["otakit.cli"]
    outside: dict[str, str] = {}
    while todo:
        module = todo.pop()
        path = _module_path(module)
        if module in seen or path is None:
            continue
        seen.add(module)
        for parent in (".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)):
            todo.append(parent)
        for name, top in _imports(path):
            if not top:
                continue
            if name.startswith("otakit"):
                todo.append(name)
            elif (package := _third_party(name)) is not None and not _distributions(package) & base:
                outside[package] = module
    assert {"otakit.device.service", "otakit.image.sign", "otakit.server.cli"} <= seen
    assert outside == {}, f"imported at module level, not in the base dependencies: {outside}"


@pytest.mark.unit
def test_every_import_of_the_source_is_a_declared_dependency() -> None:
    """Each third-party module the source imports comes with the base or an extra (not only
    with the dev tools), and none of the server extra's is imported at module level outside
    otakit.server."""
    everything = _closure(
        _requirements() + [r for x in ("agent", "server", "sim", "ble") for r in _requirements(x)]
    )
    base = _closure(_requirements())
    undeclared: dict[str, str] = {}
    server_at_top: dict[str, str] = {}
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC).as_posix()
        for name, top in _imports(path):
            package = _third_party(name)
            if package is None or package == "bleak":  # bleak: looked up at run time only
                continue
            dists = _distributions(package)
            if not dists & everything:
                undeclared[package] = rel
            if top and not rel.startswith("server/") and not dists & base:
                server_at_top[package] = rel
    assert undeclared == {}, f"imported but in no dependency list: {undeclared}"
    # device/transports/smp.py is the sim extra's (imported only by `otakit sim serve-smp`)
    server_at_top.pop("smp", None)
    assert server_at_top == {}, f"outside otakit.server, at module level: {server_at_top}"


@pytest.mark.unit
def test_extras_table_matches_pyproject() -> None:
    """otakit.extras.EXTRAS (what `require` checks) lists modules of the extra it names, and
    those are not already in the base (else the check could never fail)."""
    base = _closure(_requirements())
    for extra, modules in EXTRAS.items():
        declared = {canonicalize_name(r.name) for r in _requirements(extra)}
        for module in modules:
            dists = _distributions(module)
            assert dists & declared, f"{module} is not in pyproject's {extra} extra"
            assert not dists & base, f"{module} comes with the base: requiring it checks nothing"
    optional = PROJECT["optional-dependencies"]
    assert set(optional) >= {"agent", "server", "sim", "all", "dev"}
    assert Requirement(optional["all"][0]).extras == {"agent", "server", "sim"}
    assert "otakit[all]" in optional["dev"]
    # the server stack is the server extra's alone
    server = {canonicalize_name(r.name) for r in _requirements("server")}
    assert not server & {canonicalize_name(r.name) for r in _requirements()} - {"pydantic"}


@pytest.mark.unit
def test_python_versions() -> None:
    """3.11 to 3.13, the classifiers saying the same."""
    assert PROJECT["requires-python"] == ">=3.11,<3.14"
    versions = {
        c.rsplit(" :: ", 1)[1]
        for c in PROJECT["classifiers"]
        if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert versions == {"3.11", "3.12", "3.13"}


# --- the base install, for real: the server extra unimportable ---------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A real update server, with every extra (this test's own environment)."""
    running = start_server(tmp_path_factory.mktemp("packaging-server"))
    yield running
    running.stop()


class BaseInstall:
    """The ``otakit`` command as a base install runs it: the server extra's modules missing."""

    def __init__(self, tmp: Path) -> None:
        hook = tmp / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(BLOCKER)
        self.log = tmp / "blocked.log"
        self.tmp = tmp
        self.env = {
            **os.environ,
            "PYTHONPATH": str(hook),
            "OTAKIT_TEST_BLOCK": ",".join(SERVER_ONLY),
            "OTAKIT_TEST_BLOCK_LOG": str(self.log),
            "COLUMNS": "200",
            "NO_COLOR": "1",
        }

    def run(self, *args: str | Path, command: str = "otakit") -> subprocess.CompletedProcess[str]:
        """``otakit ARGS``; with ``command="otakit-agent"``, ``otakit-agent`` with the arguments
        after ``agent run``."""
        if command == "otakit-agent":
            assert args[:2] == ("agent", "run")
            args = args[2:]
        return subprocess.run(
            [str(BIN / command), *map(str, args)],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.tmp,
            timeout=120,
            check=False,
        )

    def blocked(self) -> list[str]:
        """Imports of the server extra tried since the last call."""
        if not self.log.exists():
            return []
        names = self.log.read_text().split()
        self.log.unlink()
        return names


@pytest.fixture
def base(tmp_path: Path) -> BaseInstall:
    return BaseInstall(tmp_path)


@pytest.mark.integration
def test_the_hook_really_hides_the_server_stack(base: BaseInstall) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import fastapi"],
        capture_output=True,
        text=True,
        env=base.env,
        check=False,
    )
    assert done.returncode == 1
    assert "ModuleNotFoundError: No module named 'fastapi'" in done.stderr
    assert base.blocked() == ["fastapi"]


@pytest.mark.integration
def test_images_and_a_gateway_update_without_the_server_extra(
    base: BaseInstall, server: Server
) -> None:
    """keygen, sign, verify, then ``otakit-agent --once`` (what the systemd unit starts) on a
    gateway: enrolls, downloads the image just signed, checks its SHA-256, programs it (a copy
    command) and reports, all without the server stack, and without even trying to import it."""
    assert "--config" in base.run("agent", "run", "--help").stdout
    key, public = base.tmp / "key.pem", base.tmp / "public.pem"
    payload, signed = base.tmp / "app.bin", base.tmp / "app.img"
    payload.write_bytes(os.urandom(20_000))
    for args in (
        ("keygen", "-t", "ecdsa-p256", "-o", key),
        ("sign", payload, signed, "-v", "1.1.0", "-k", key, "--pad-header"),
        ("getpub", "-k", key, "-o", public),
    ):
        done = base.run(*args)
        assert done.returncode == 0, (args, done.stderr)
    assert "valid, version 1.1.0" in base.run("verify", signed, "-k", public).stdout
    assert base.blocked() == []

    admin = server.admin_client()
    assert admin.post("/api/v1/keys", content=public.read_bytes()).status_code in (200, 201)
    product, board = f"p-{uuid.uuid4().hex[:8]}", "BOARD_PKG"
    assert admin.put(f"/api/v1/products/{product}", json={"board": board}).status_code in (200, 201)
    data = signed.read_bytes()
    uploaded = admin.post("/api/v1/artifacts", params={"name": "app.img"}, content=data)
    assert uploaded.status_code in (200, 201), uploaded.text
    artifact = uploaded.json()
    body = {"artifact_id": artifact["id"], "product": product, "group": "g"}
    assert admin.post("/api/v1/deployments", json=body).status_code == 201
    enroll = server.token("enroll", "--product", product, "--group", "g")
    programmed = base.tmp / "programmed.bin"
    copy = "import shutil, sys; shutil.copy(sys.argv[1], sys.argv[2])"
    config = base.tmp / "agent.toml"
    serial = f"GW-{uuid.uuid4().hex[:8]}"
    config.write_text(
        f"""[agent]
server = "{server.url}"
token = "{enroll}"

[identity]
serial = "{serial}"
board = "{board}"
product = "{product}"
version = "1.0.0"

[storage]
kind = "gateway"
path = "flash.bin"
fs_size = 524288
program = ["{sys.executable}", "-c", "{copy}", "{{file}}", "{programmed}"]
"""
    )
    first = base.run("agent", "run", "--config", config, "--once", command="otakit-agent")
    assert first.returncode == 0, first.stderr
    assert first.stderr.splitlines()[-1] == "updated to 1.1.0"
    assert hashlib.sha256(programmed.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert base.blocked() == []
    device = admin.get(f"/api/v1/devices/{serial}").json()
    assert device["version"].startswith("1.1.0"), device


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "command", "extra"),
    [
        (("serve", "--data", "DATA"), "otakit serve", "server"),
        (("token", "create", "--role", "admin", "--data", "DATA"), "otakit token --data", "server"),
        (("publisher", "--data", "DATA"), "otakit publisher --data", "server"),
        (("demo", "-n", "2"), "otakit demo", "server"),
        (("sim", "serve-smp", "DATA"), "otakit sim serve-smp", "sim"),
    ],
)
def test_a_command_of_a_missing_extra_says_which_in_one_line(
    base: BaseInstall, args: tuple[str, ...], command: str, extra: str
) -> None:
    data = base.tmp / "data"
    done = base.run(*(str(data) if a == "DATA" else a for a in args))
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"otakit: error [MISSING_EXTRA]: {command} needs the {extra} extra: "
        f"pip install 'otakit[{extra}]'\n"
    )
    assert not data.exists()  # nothing created before the refusal


# --- systemd units and the Dockerfile -----------------------------------------------------------


def _parses(argv: list[str]) -> Any:
    """Parse ``otakit ARGV`` as the command line would, without running it: the subcommand
    exists and its options and arguments are valid. Returns the command's context (typer's
    own click)."""
    command: Any = typer.main.get_command(app)
    args = list(argv)
    parent: Any = None
    while isinstance(command, typer.core.TyperGroup):
        name = args.pop(0)
        ctx = command.make_context("otakit", [name], parent=parent)
        sub = command.get_command(ctx, name)
        assert sub is not None, f"otakit has no command {name!r} ({argv})"
        parent, command = ctx, sub
    return command.make_context(command.name or "", args, parent=parent)


def _exec_start(unit: Path) -> list[str]:
    lines = [
        line.split("=", 1)[1]
        for line in unit.read_text().splitlines()
        if line.startswith("ExecStart=")
    ]
    assert len(lines) == 1, unit
    return shlex.split(lines[0])


@pytest.mark.unit
@pytest.mark.parametrize("unit", ["otakit-serve.service", "otakit-agent.service"])
def test_systemd_units_start_valid_otakit_commands(unit: str) -> None:
    """Each unit's ExecStart parses as its command's command line would parse it, with the
    paths the unit gives the service (StateDirectory, ConfigurationDirectory)."""
    argv = _exec_start(ROOT / "packaging" / unit)
    assert argv[0].startswith("/opt/otakit/bin/")
    command = argv[0].rsplit("/", 1)[1]
    module, _, function = PROJECT["scripts"][command].partition(":")  # a console script of ours
    assert callable(getattr(importlib.import_module(module), function))
    text = (ROOT / "packaging" / unit).read_text()
    if command == "otakit":
        ctx = _parses(argv[1:])
        assert ctx.command.name == "serve"
        assert ctx.params["host"] == "127.0.0.1"  # behind a proxy, or give --tls-cert
        assert str(ctx.params["data"]) == "/var/lib/otakit"
        assert "StateDirectory=otakit\n" in text
    else:
        assert command == "otakit-agent"
        args = agent_command.parser().parse_args(argv[1:])
        assert (str(args.config), args.once) == ("/etc/otakit/agent.toml", False)
        assert "ConfigurationDirectory=otakit\n" in text
    for hardening in ("NoNewPrivileges=yes", "ProtectSystem=strict", "DynamicUser=yes"):
        assert hardening in text


@pytest.mark.unit
def test_the_dockerfile_serves_on_all_interfaces_from_its_volume() -> None:
    text = (ROOT / "Dockerfile").read_text()

    def json_list(instruction: str) -> list[str]:
        match = re.search(rf"^{instruction} (\[.*\])$", text, re.MULTILINE)
        assert match, instruction
        return list(ast.literal_eval(match.group(1)))

    assert json_list("ENTRYPOINT") == ["otakit"]
    argv = json_list("CMD")
    ctx = _parses(argv)
    assert (ctx.params["host"], ctx.params["port"], str(ctx.params["data"])) == (
        "0.0.0.0",
        8080,
        "/data",
    )
    assert json_list("VOLUME") == ["/data"]
    assert re.search(r"^USER otakit$", text, re.MULTILINE)
    assert "'otakit[server]'" in text
