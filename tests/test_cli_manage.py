"""``otakit device|deployment|audit|token`` against a real ``otakit serve`` on loopback, and
``otakit sim run|fleet`` taking the server and token from ``$OTAKIT_SERVER``/``$OTAKIT_TOKEN``.

One server for the module (SQLite). Its registry and a deployment are set up through the
management API; the commands under test run in this process (``otakit.cli.main``, as the
console script calls it) so that each costs no interpreter start; the 80-column tables and the
simulated devices run as the installed ``otakit`` command with ``COLUMNS=80``.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.core import TyperGroup

from otakit.cli import command, main
from otakit.host import client
from otakit.image.header import ImageVersion
from otakit.image.keys import SigningKey
from otakit.image.sign import SignOptions, sign_image

from .server_harness import BIN, Server, start_server

PRODUCT = "mgr"
DEVICES = 105  # more than one page of the API (100)
LABEL = "ops-cli"


@dataclass
class Setup:
    server: Server
    admin: str  # an admin token labelled LABEL
    key: SigningKey
    image: Path  # a signed image, version 1.0.0
    deployment: dict[str, Any]
    work: Path


def _ok(response: httpx.Response) -> Any:
    assert response.status_code < 300, response.text
    return response.json() if response.content else None


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    work = tmp_path_factory.mktemp("cli-manage")
    server = start_server(work / "data")
    try:
        with server.admin_client() as first:
            made = _ok(first.post("/api/v1/tokens", json={"role": "admin", "label": LABEL}))
        admin = made["token"]
        key = SigningKey.generate("ecdsa-p256")
        key.save(work / "key.pem")
        payload = os.urandom(20000)
        image = work / "v1.img"
        v1, v2 = (SignOptions(ImageVersion.parse(v), pad_header=True) for v in ("1.0.0", "2.0.0"))
        image.write_bytes(sign_image(payload, key, v1))
        update = sign_image(payload, key, v2)
        with server.client(admin) as api:
            _ok(api.post("/api/v1/keys", content=key.public_key.pem()))
            _ok(api.put(f"/api/v1/products/{PRODUCT}", json={}))
            for n in range(DEVICES):
                device = {
                    "product": PRODUCT,
                    "group": "lab" if n % 3 == 0 else "field",
                    "version": f"1.0.{n % 2}",
                    "tags": {"site": "berlin"} if n % 5 == 0 else {},
                }
                _ok(api.put(f"/api/v1/devices/mgr-{n:04d}", json=device))
            artifact = _ok(
                api.post(
                    "/api/v1/artifacts",
                    params={"name": "app.img", "product": PRODUCT},
                    content=update,
                )
            )
            body = {"artifact_id": artifact["id"], "product": PRODUCT, "group": "lab"}
            deployment = _ok(api.post("/api/v1/deployments", json=body))
            # mgr-0003 (group lab) downloads it and reports so, with its own token
            own = _ok(api.post("/api/v1/tokens", json={"role": "device", "device": "mgr-0003"}))
        with server.client(own["token"]) as reporter:
            for status in ("downloading", "applying"):
                report = {"status": status, "deployment_id": deployment["id"]}
                assert reporter.post("/api/v1/device/status", json=report).status_code == 204
        yield Setup(server, admin, key, image, deployment, work)
    finally:
        server.stop()


@dataclass
class Done:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        assert self.code == 0, self.err
        return json.loads(self.out)


Cli = Callable[..., Done]


@pytest.fixture
def cli(live: Setup, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Cli:
    """``otakit ARGS`` in this process, with ``$OTAKIT_SERVER`` and the admin token set."""
    monkeypatch.setenv("OTAKIT_SERVER", live.server.url)
    monkeypatch.setenv("OTAKIT_TOKEN", live.admin)

    def run(*args: str) -> Done:
        capsys.readouterr()
        code = main(list(args))
        captured = capsys.readouterr()
        return Done(code, captured.out, captured.err)

    return run


def _command(live: Setup, *args: str, **env: str) -> Done:
    """The installed ``otakit`` command, 80 columns wide, server and admin token in its env."""
    full = {
        **os.environ,
        "COLUMNS": "80",
        "NO_COLOR": "1",
        "OTAKIT_SERVER": live.server.url,
        "OTAKIT_TOKEN": live.admin,
        **env,
    }
    done = subprocess.run(
        [str(BIN / "otakit"), *args], capture_output=True, text=True, env=full, timeout=120
    )
    return Done(done.returncode, done.stdout, done.stderr)


def _one_line_error(done: Done, status: int, *words: str) -> None:
    assert done.code == status, (done.out, done.err)
    assert done.err.startswith("otakit: error ["), done.err
    assert done.err.count("\n") == 1, done.err
    for word in words:
        assert word in done.err, done.err


# --- devices ------------------------------------------------------------------------------------


def test_device_list_follows_the_pages_and_applies_filters_and_sort(cli: Cli) -> None:
    everything = cli("device", "list", "--product", PRODUCT, "--limit", "1000", "--json").json()
    # more than a page (100): the cursor was followed, each device once, in serial order
    assert [d["serial"] for d in everything] == [f"mgr-{n:04d}" for n in range(DEVICES)]
    some = cli("device", "list", "--limit", "102", "--json").json()
    assert [d["serial"] for d in some] == [f"mgr-{n:04d}" for n in range(102)]

    lab = cli("device", "list", "--group", "lab", "--limit", "1000", "--json").json()
    assert len(lab) == len(range(0, DEVICES, 3))
    assert {d["tags"]["deviceGroup"] for d in lab} == {"lab"}
    newer = cli("device", "list", "--version", "1.0.1", "--limit", "1000", "--json").json()
    assert {d["version"] for d in newer} == {"1.0.1"}
    assert len(newer) == DEVICES // 2
    found = cli("device", "list", "--search", "mgr-001", "--json").json()
    assert [d["serial"] for d in found] == [f"mgr-{n:04d}" for n in range(10, 20)]
    last = cli("device", "list", "--sort", "-serial", "--limit", "2", "--json").json()
    assert [d["serial"] for d in last] == [f"mgr-{DEVICES - 1:04d}", f"mgr-{DEVICES - 2:04d}"]
    never = cli("device", "list", "--status", "none", "--limit", "1", "--json").json()
    assert never[0]["status"] is None
    busy = cli("device", "list", "--status", "applying", "--json").json()
    assert [d["serial"] for d in busy] == ["mgr-0003"]

    table = cli("device", "list", "--limit", "3")
    assert table.code == 0, table.err
    assert "mgr-0002" in table.out
    assert "mgr-0003" not in table.out
    assert "the first 3 devices; --limit N shows more" in table.err


def test_device_list_refuses_bad_filters_in_one_line(cli: Cli) -> None:
    _one_line_error(cli("device", "list", "--status", "broken"), 2, "--status", "applied")
    _one_line_error(cli("device", "list", "--sort", "name"), 2, "--sort", "last_seen")


def test_device_show_has_the_current_offer_and_the_last_report(cli: Cli, live: Setup) -> None:
    artifact = live.deployment["artifact_id"]
    shown = cli("device", "show", "mgr-0003", "--json").json()  # group lab: targeted
    assert shown["serial"] == "mgr-0003"
    assert shown["offer"]["id"] == artifact
    assert shown["offer"]["version"] == "2.0.0"
    assert shown["twin"]["desired"]["extFwInfo"]["sha256"].lower() == artifact
    assert shown["last_report"]["status"] == "applying"
    assert shown["last_report"]["deployment_id"] == live.deployment["id"]
    text = cli("device", "show", "mgr-0003")
    assert text.code == 0, text.err
    assert f"version 2.0.0, artifact {artifact[:12]} (app.img" in text.out
    field = cli("device", "show", "mgr-0001")  # group field: not targeted
    assert "nothing (up to date, or no deployment targets it)" in field.out
    _one_line_error(cli("device", "show", "no-such-device"), 1, "404", "no-such-device")


def test_device_set_changes_only_what_is_given(cli: Cli) -> None:
    changed = cli(
        "device", "set", "mgr-0010", "--group", "lab", "--tag", "floor=3", "--json"
    ).json()
    assert changed["tags"]["deviceGroup"] == "lab"
    assert changed["tags"]["floor"] == "3"
    assert changed["tags"]["site"] == "berlin"  # kept
    assert changed["version"] == "1.0.0"
    assert changed["product"] == PRODUCT
    again = cli("device", "show", "mgr-0010", "--json").json()
    assert again["tags"] == changed["tags"]

    # a serial that is not registered is refused, not registered by a typo
    _one_line_error(cli("device", "set", "mgr-typo", "--group", "lab"), 1, "mgr-typo")
    assert cli("device", "show", "mgr-typo").code == 1
    _one_line_error(cli("device", "set", "mgr-0010"), 2, "--group", "--tag")
    _one_line_error(cli("device", "set", "mgr-0010", "--tag", "floor"), 2, "NAME=VALUE")


def test_device_add_registers_once_and_set_records_a_known_version(cli: Cli) -> None:
    added = cli(
        "device", "add", "mgr-added", "--product", PRODUCT, "--group", "lab", "--json"
    ).json()
    assert added["product"] == PRODUCT
    assert added["tags"]["deviceGroup"] == "lab"
    assert added["version"] is None
    # a second add does not change the registered device
    _one_line_error(
        cli("device", "add", "mgr-added", "--product", PRODUCT, "--group", "x"), 2, "already"
    )
    assert cli("device", "show", "mgr-added", "--json").json()["tags"]["deviceGroup"] == "lab"
    known = cli("device", "set", "mgr-added", "--version", "1.0.0", "--json").json()
    assert known["version"] == "1.0.0"
    assert cli("device", "show", "mgr-added", "--json").json()["version"] == "1.0.0"


def test_device_history_is_newest_first_and_limited(cli: Cli, live: Setup) -> None:
    reports = cli("device", "history", "mgr-0003", "--json").json()
    assert [r["status"] for r in reports] == ["applying", "downloading"]
    assert {r["deployment_id"] for r in reports} == {live.deployment["id"]}
    one = cli("device", "history", "mgr-0003", "--limit", "1", "--json").json()
    assert one == reports[:1]
    table = cli("device", "history", "mgr-0003", "--limit", "1")
    assert "applying" in table.out
    assert "downloading" not in table.out
    assert "the first 1 reports; --limit N shows more" in table.err
    assert "no reports from mgr-0004" in cli("device", "history", "mgr-0004").err


# --- deployments and the audit log ---------------------------------------------------------------


def test_deployment_list_show_cancel(cli: Cli, live: Setup) -> None:
    with live.server.client(live.admin) as api:
        body = {"artifact_id": live.deployment["artifact_id"], "product": PRODUCT}
        made = _ok(api.post("/api/v1/deployments", json={**body, "group": "field"}))
    number = str(made["id"])
    active = cli("deployment", "list", "--active", "--json").json()
    assert number in {str(d["id"]) for d in active}
    assert all(d["active"] for d in active)
    shown = cli("deployment", "show", number, "--json").json()
    assert shown["id"] == made["id"]
    assert shown["active"] is True
    text = cli("deployment", "show", number)
    assert f"deployment {number}: version 2.0.0" in text.out
    assert "active" in text.out
    short = live.deployment["artifact_id"][:12]
    of_artifact = cli("deployment", "list", "--artifact", short, "--json").json()
    assert {d["id"] for d in of_artifact} >= {made["id"], live.deployment["id"]}

    cancelled = cli("deployment", "cancel", number)
    assert cancelled.code == 0, cancelled.err
    assert f"deployment {number} cancelled" in cancelled.err
    finished = cli("deployment", "list", "--finished", "--json").json()
    assert [d["id"] for d in finished] == [made["id"]]
    assert finished[0]["cancelled_at"] is not None
    assert made["id"] not in {
        d["id"] for d in cli("deployment", "list", "--active", "--json").json()
    }
    assert "cancelled" in cli("deployment", "show", number).out
    _one_line_error(cli("deployment", "show", "first"), 2, "deployment id")
    _one_line_error(cli("deployment", "show", "999999"), 1, "404")

    # the audit log names the action, its target and who did it (the token's label)
    events = cli("audit", "list", "--action", "deployment.cancel", "--json").json()
    assert events, "no deployment.cancel in the audit log"
    assert events[0]["action"] == "deployment.cancel"
    assert number in events[0]["target"]
    assert LABEL in events[0]["actor"]
    mine = cli("audit", "list", "--actor", events[0]["actor"], "--json").json()
    assert {e["action"] for e in mine} >= {"deployment.create", "deployment.cancel"}
    assert cli("audit", "list", "--limit", "1", "--json").json() == events[:1]


# --- tokens --------------------------------------------------------------------------------------


def test_token_create_list_revoke_on_a_running_server(cli: Cli, live: Setup) -> None:
    made = cli("token", "create", "--role", "viewer", "--label", "wall-screen")
    assert made.code == 0, made.err
    viewer = made.out.strip()
    assert viewer.startswith("otk_")
    token_id = viewer.split("_")[1]
    listed = cli("token", "list", "--role", "viewer", "--json").json()
    assert [(t["id"], t["label"], t["revoked_at"]) for t in listed] == [
        (token_id, "wall-screen", None)
    ]
    assert viewer not in json.dumps(listed)  # never the secret

    # a viewer reads, and is told it may not change anything
    assert cli("device", "list", "--token", viewer, "--limit", "1", "--json").json()
    _one_line_error(
        cli("device", "set", "mgr-0000", "--group", "x", "--token", viewer), 1, "viewer", "role"
    )

    revoked = cli("token", "revoke", token_id)
    assert revoked.code == 0, revoked.err
    _one_line_error(
        cli("device", "list", "--token", viewer), 1, "refused the token", "$OTAKIT_TOKEN"
    )
    again = cli("token", "list", "--role", "viewer", "--json").json()
    assert again[0]["revoked_at"] is not None
    events = cli("audit", "list", "--action", "token.revoke", "--json").json()
    assert token_id in events[0]["target"]
    assert LABEL in events[0]["actor"]


def test_token_commands_on_the_server_data_folder(cli: Cli, live: Setup) -> None:
    data = str(live.server.data)
    made = cli("token", "create", "--role", "enroll", "--product", PRODUCT, "--data", data)
    assert made.code == 0, made.err
    token_id = made.out.strip().split("_")[1]
    local = cli("token", "list", "--data", data, "--json").json()
    assert token_id in {t["id"] for t in local}
    remote = cli("token", "list", "--limit", "1000", "--json").json()
    assert {t["id"] for t in local} == {t["id"] for t in remote}
    # made on this machine: the audit log says so
    events = cli("audit", "list", "--action", "token.create", "--limit", "1000", "--json").json()
    assert any(token_id in e["target"] and e["actor"] == "local" for e in events), events
    assert cli("token", "revoke", token_id, "--data", data).code == 0
    after = cli("token", "list", "--data", data, "--role", "enroll", "--json").json()
    assert next(t for t in after if t["id"] == token_id)["revoked_at"] is not None


def test_token_commands_say_where_they_work(
    cli: Cli, live: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    both = cli("token", "list", "--data", str(live.server.data), "--server", live.server.url)
    _one_line_error(both, 2, "--data", "--server", "one or the other")
    monkeypatch.delenv("OTAKIT_TOKEN")
    nothing = cli("token", "list")
    _one_line_error(nothing, 2, "--token", "$OTAKIT_TOKEN", "--data DIR")
    _one_line_error(cli("token", "create", "--role", "root"), 2, "admin, viewer, enroll")


# --- 80 columns and the environment of the simulated devices ------------------------------------


def _fits_80_columns(args: tuple[str, ...], done: Done) -> None:
    assert done.code == 0, (args, done.err)
    lines = done.out.splitlines()
    assert len(lines) > 4, (args, done.out)
    assert max(len(line) for line in lines) <= 80, (args, done.out)
    assert "…" not in done.out, (args, done.out)


def test_tables_fit_80_columns(live: Setup, cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    # the command itself in a terminal of $COLUMNS=80
    args: tuple[str, ...] = ("device", "list", "--limit", "20")
    _fits_80_columns(args, _command(live, *args))
    # the others in this process, on an 80-column console
    monkeypatch.setattr(client.out, "width", 80)
    for args in (
        ("device", "history", "mgr-0003"),
        ("deployment", "list"),
        ("audit", "list"),
        ("token", "list"),
    ):
        _fits_80_columns(args, cli(*args))
    # ids are never folded: every token id, and the admin token's in the audit log, whole
    ids = [t["id"] for t in cli("token", "list", "--json").json()]
    tokens = cli("token", "list").out
    assert all(i in tokens for i in ids), tokens
    assert f"({live.admin.split('_')[1]})" in cli("audit", "list").out


def test_sim_run_and_fleet_take_the_server_and_token_from_the_environment(
    live: Setup, cli: Cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    enroll = cli("token", "create", "--role", "enroll", "--product", PRODUCT, "--group", "envgroup")
    assert enroll.code == 0, enroll.err
    token = enroll.out.strip()
    device = live.work / "sim-env"
    created = cli(
        "sim", "create", str(device), "--image", str(live.image),
        "-k", str(live.work / "key.pem"), "--product", PRODUCT, "--serial", "ENV-SIM-1",
    )  # fmt: skip
    assert created.code == 0, created.err
    # the command in a process of its own, given nothing but its environment
    ran = _command(live, "sim", "run", str(device), "--once", OTAKIT_TOKEN=token)
    assert ran.code == 0, ran.err
    assert "no update; running 1.0.0" in ran.err
    shown = cli("device", "show", "ENV-SIM-1", "--json").json()
    assert shown["tags"]["deviceGroup"] == "envgroup"

    monkeypatch.setenv("OTAKIT_TOKEN", token)
    fleet = cli(
        "sim", "fleet", "--devices", "2", "--product", PRODUCT, "--serial-prefix", "ENVFLEET",
        "--group", "envgroup", "--poll", "0.1", "--timeout", "60",
    )  # fmt: skip
    assert fleet.code == 0, fleet.err
    assert json.loads(fleet.out)["devices"] == 2
    monkeypatch.setenv("OTAKIT_TOKEN", live.admin)
    enrolled = cli("device", "list", "--search", "ENVFLEET", "--json").json()
    assert [d["serial"] for d in enrolled] == ["ENVFLEET-000000", "ENVFLEET-000001"]


# --- docs/cli.md -----------------------------------------------------------------------------------

DOCS = Path(__file__).parent.parent / "docs" / "cli.md"


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    if isinstance(command, TyperGroup):
        for name, sub in command.commands.items():
            yield from _commands(sub, (*path, name))
    else:
        yield path


def _examples() -> Iterator[list[str]]:
    """The ``otakit`` command lines of the ```sh blocks in docs/cli.md, as argv (without a
    leading ``VAR=value`` or a trailing ``&``)."""
    block = False
    for line in DOCS.read_text().splitlines():
        if line.startswith("```"):
            block = line == "```sh"
            continue
        words = shlex.split(line, comments=True) if block else []
        while words and "=" in words[0] and not words[0].startswith("-"):
            words.pop(0)
        if words[:1] == ["otakit"]:
            yield [w for w in words[1:] if w != "&"]


@pytest.mark.unit
def test_docs_cli_has_an_example_of_every_command_and_each_parses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # examples leave the server and token to the environment, as users do
    monkeypatch.setenv("OTAKIT_SERVER", "http://127.0.0.1:8080")
    monkeypatch.setenv("OTAKIT_TOKEN", "otk_id_secret")
    root = command()  # what main() runs (typer's own click: typer.core's classes)
    assert isinstance(root, TyperGroup)
    examples = list(_examples())
    shown: set[tuple[str, ...]] = set()
    for argv in examples:
        found: Any = root
        args = list(argv)
        path: list[str] = []
        while isinstance(found, TyperGroup):
            group = found
            found = group.get_command(group.context_class(group), args[0])
            assert found is not None, f"docs/cli.md: otakit {' '.join(argv)}: no {args[0]!r}"
            path.append(args.pop(0))
        shown.add(tuple(path))
        # parses as the command would: every option exists, every required one is there
        found.make_context("otakit " + " ".join(path), args)
    commands = set(_commands(root))
    assert len(commands) > 40  # the walk found the command tree
    missing = commands - shown
    assert not missing, f"docs/cli.md has no example of: {sorted(' '.join(m) for m in missing)}"
