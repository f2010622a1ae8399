"""The operator's journey of issue 18, through the ``otakit`` command only.

From an empty server (``otakit serve`` on a free loopback port) to a phased rollout of a signed
image to simulated devices, then its abort: every step is an ``otakit`` command run as a user
runs it (no HTTP call, no Python API); what happened is read back from the commands' ``--json``
output. The README shows the same journey.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .server_harness import BIN, Server, start_server

# about 25 `otakit` processes: half a minute on an idle machine, minutes on a loaded one
pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

PRODUCT = "sensor"
BOARD = "CY8CPROTO_062_4343W"


class Operator:
    """A shell in ``work``: runs ``otakit ...`` with ``$OTAKIT_SERVER``/``$OTAKIT_TOKEN`` set."""

    def __init__(self, work: Path, server: str) -> None:
        self.work = work
        self.env = {
            **os.environ,
            "COLUMNS": "80",
            "NO_COLOR": "1",
            "OTAKIT_SERVER": server,
            "OTAKIT_TOKEN": "",
        }

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "otakit"), *args],
            capture_output=True,
            text=True,
            cwd=self.work,
            env={**self.env, **env},
            timeout=120,
            check=False,
        )

    def ok(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        done = self.run(*args, **env)
        assert done.returncode == 0, f"otakit {' '.join(args)}:\n{done.stdout}{done.stderr}"
        assert "Traceback" not in done.stderr
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json").stdout)


@pytest.fixture
def empty_server(tmp_path: Path) -> Iterator[Server]:
    server = start_server(tmp_path / "server", extra=("--rollout-interval", "0.2"))
    try:
        yield server
    finally:
        server.stop()


def test_from_an_empty_server_to_an_aborted_phased_rollout(
    empty_server: Server, tmp_path: Path
) -> None:
    me = Operator(tmp_path, empty_server.url)
    data = str(empty_server.data)

    # the first admin token of my own, made on the server's machine from its data folder
    admin = me.ok("token", "create", "--role", "admin", "--label", "ops", "--data", data)
    me.env["OTAKIT_TOKEN"] = admin.stdout.strip()

    # a signing key, two signed versions of the application, the key trusted by the server
    me.ok("keygen", "-t", "ecdsa-p256", "-o", "key.pem")
    (tmp_path / "app.bin").write_bytes(os.urandom(40000))
    for version in ("1.0.0", "2.0.0"):
        me.ok("sign", "app.bin", f"app-{version}.img", "-v", version, "-k", "key.pem",
              "--pad-header")  # fmt: skip
    me.ok("key", "trust", "key.pem")
    me.ok("product", "set", PRODUCT, "--board", BOARD)

    # enrollment tokens for two groups, and a simulated device in each, running 1.0.0
    enroll = {
        group: me.ok(
            "token", "create", "--role", "enroll", "--product", PRODUCT, "--group", group,
            "--label", f"{group} devices",
        ).stdout.strip()
        for group in ("canary", "field")
    }  # fmt: skip
    for group in enroll:
        me.ok("sim", "create", group, "--image", "app-1.0.0.img", "-k", "key.pem",
              "--product", PRODUCT, "--board", BOARD, "--serial", group.upper())  # fmt: skip

    # upload 2.0.0 and roll it out: the canary group first, the field once it is approved
    artifact = me.json("artifact", "upload", "app-2.0.0.img", "--product", PRODUCT)
    assert artifact["version"] == "2.0.0"
    rollout = me.json(
        "rollout", "create", "--artifact", artifact["id"][:12], "--product", PRODUCT,
        "--phase", "group:canary,manual", "--phase", "group:field",
    )  # fmt: skip
    number, deployment = str(rollout["id"]), str(rollout["deployment_id"])
    assert rollout["state"] == "running"

    # the canary enrolls with its token (from the environment) and updates
    canary = me.ok("sim", "run", "canary", "--once", OTAKIT_TOKEN=enroll["canary"])
    assert "updated to 2.0.0" in canary.stderr
    assert "confirmed" in canary.stderr

    # watch: the canary phase succeeds, and waits for approval before the field gets it
    for _ in range(50):
        watched = me.json("rollout", "show", number)
        if watched["awaiting_approval"]:
            break
    assert watched["phase"] == 1, watched
    assert watched["awaiting_approval"] is True
    assert watched["phases"][0]["succeeded"] == 1
    assert watched["phases"][1]["status"] == "waiting"

    # the field device is not offered the update while the phase waits
    field = me.ok("sim", "run", "field", "--once", OTAKIT_TOKEN=enroll["field"])
    assert "no update; running 1.0.0" in field.stderr

    # abort: the deployment ends, nobody else gets 2.0.0
    me.ok("rollout", "abort", number, "--reason", "stop after the canary")
    assert me.json("rollout", "show", number)["state"] == "aborted"
    ended = me.json("deployment", "show", deployment)
    assert ended["active"] is False
    assert ended["counts"]["Applied"] == 1
    again = me.ok("sim", "run", "field", "--once")  # the device now has its own token
    assert "no update; running 1.0.0" in again.stderr
    devices = me.json("device", "list", "--product", PRODUCT)
    assert {d["serial"]: d["version"] for d in devices} == {"CANARY": "2.0.0", "FIELD": "1.0.0"}
    canary_device = me.json("device", "show", "CANARY")
    assert canary_device["status"] == "applied"

    # the audit log says who did what: the abort by the "ops" token, the first token locally
    events = me.json("audit", "list")
    actions = [e["action"] for e in events]
    assert actions[0] == "rollout.abort", actions
    assert events[0]["actor"].startswith("ops (")
    assert number in events[0]["target"]
    for action in ("rollout.create", "artifact.upload", "product.set", "key.trust"):
        assert action in actions, actions
    ops = "ops (" + admin.stdout.split("_")[1] + ")"
    made = [e["actor"] for e in events if e["action"] == "token.create"]
    assert made[:3] == [ops, ops, "local"], made  # two enroll tokens, then the admin's own
