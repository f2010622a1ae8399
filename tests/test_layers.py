"""The layers of src/otakit import downwards only (docs/architecture.md).

An AST scan of every module, no import executed: each ``import``/``from ... import`` anywhere in
a module (top level, inside functions, under ``TYPE_CHECKING``), relative ones resolved, and
string constants that name a module (``importlib.import_module("otakit.sim.x")``, tables of
``"module:Class"``) count.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import otakit

SRC = Path(otakit.__file__).parent

_MODULE_STRING = re.compile(r"otakit(\.\w+)+(:\w+)?")


@dataclass(frozen=True)
class Rule:
    layer: str  # a package under otakit, e.g. "device.core"
    forbidden: tuple[str, ...]  # modules (and their submodules) it must not import
    why: str


RULES = (
    Rule(
        "device",
        ("otakit.sim", "otakit.server", "otakit.host", "otakit.cli"),
        "the device layer runs on devices: it never depends on the simulator, the server or the "
        "host tools (they are handed in, e.g. AgentService(simulator=...))",
    ),
    Rule(
        "device.core",
        ("httpx", "paho", "aiomqtt", "asyncio", "threading", "socket", "ssl"),
        "the device core is I/O-free: its drivers (agent, fleet, subscriber) own the network, "
        "threads and event loops",
    ),
    Rule(
        "protocol",
        ("otakit.device", "otakit.server", "otakit.sim", "otakit.host", "otakit.cli"),
        "the wire formats are shared by every side and depend on none",
    ),
    Rule(
        "server",
        ("otakit.device", "otakit.sim", "otakit.host", "otakit.cli"),
        "the server never runs device or simulator code",
    ),
    Rule(
        "image",
        ("otakit.device", "otakit.server", "otakit.sim", "otakit.host", "otakit.cli"),
        "images (MCUboot format, signing) are below every layer that uses them",
    ),
)

# (importing module, imported module) pairs that break a rule today, each with the reason and
# the issue that removes it. Empty: every rule holds.
KNOWN_EXCEPTIONS: frozenset[tuple[str, str]] = frozenset()


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(source: str, module: str, *, package: bool = False) -> Iterator[tuple[str, int]]:
    """Every module ``source`` (the text of ``module``) imports, with its line."""
    tree = ast.parse(source)
    base = module.split(".") if package else module.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                root = base[: len(base) - node.level + 1]
                name = ".".join(root + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            yield name, node.lineno
            for alias in node.names:  # from otakit import sim
                yield f"{name}.{alias.name}", node.lineno
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and _MODULE_STRING.fullmatch(node.value)
        ):
            yield node.value.partition(":")[0], node.lineno


def modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(SRC.rglob("*.py")):
        yield module_name(path), path


def matches(name: str, prefixes: tuple[str, ...]) -> str | None:
    for prefix in prefixes:
        if name == prefix or name.startswith(prefix + "."):
            return prefix
    return None


def violations(rule: Rule) -> list[str]:
    found = []
    layer = f"otakit.{rule.layer}"
    for module, path in modules():
        if not matches(module, (layer,)):
            continue
        text = path.read_text(encoding="utf-8")
        for name, line in imports(text, module, package=path.name == "__init__.py"):
            hit = matches(name, rule.forbidden)
            if hit is not None and (module, hit) not in KNOWN_EXCEPTIONS:
                found.append(f"{path.relative_to(SRC.parent)}:{line} imports {name}")
    return sorted(set(found))


@pytest.mark.parametrize("rule", RULES, ids=[r.layer for r in RULES])
def test_layer_imports_downwards_only(rule: Rule) -> None:
    found = violations(rule)
    assert not found, f"{rule.layer}: {rule.why}:\n" + "\n".join(found)


def test_known_exceptions_still_exist() -> None:
    """An exception that no longer happens is removed from the list, so it cannot come back."""
    seen = set()
    for module, path in modules():
        for name, _ in imports(path.read_text(encoding="utf-8"), module):
            for importer, imported in KNOWN_EXCEPTIONS:
                if module == importer and matches(name, (imported,)):
                    seen.add((importer, imported))
    assert seen == set(KNOWN_EXCEPTIONS)


def test_the_scan_sees_the_layers() -> None:
    names = {name for name, _ in modules()}
    for layer in ("device", "device.core", "device.core.job", "protocol", "server", "sim"):
        assert f"otakit.{layer}" in names
    core = dict(imports((SRC / "device/core/job.py").read_text(), "otakit.device.core.job"))
    assert "otakit.protocol.version" in core


def test_the_scan_sees_every_kind_of_import() -> None:
    source = '''
import otakit.sim.device
from otakit.server import api
from ..sim import agent
from . import gateway
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from otakit.host.deploy import deploy
def late():
    import threading
    importlib.import_module("otakit.sim.fleet")
MODES = {"x": "otakit.sim.device:SimDevice"}
"""A docstring naming otakit.sim is prose, not an import."""
'''
    found = {name for name, _ in imports(source, "otakit.device.service")}
    assert {
        "otakit.sim.device",
        "otakit.server",
        "otakit.server.api",
        "otakit.sim",
        "otakit.sim.agent",
        "otakit.device.gateway",
        "otakit.host.deploy",
        "threading",
        "otakit.sim.fleet",
    } <= found
    assert "A docstring naming otakit.sim is prose, not an import." not in found
    assert matches("otakit.simulator", ("otakit.sim",)) is None
    assert matches("otakit.sim.agent", ("otakit.sim",)) == "otakit.sim"


@pytest.mark.parametrize(
    ("storage", "key"),
    [
        ({"path": "device"}, "storage.kind"),
        ({"kind": "gateway", "path": "gw.bin", "mcu": "mcu"}, "storage.mcu"),
    ],
)
def test_the_agent_gets_simulated_parts_handed_in(
    storage: dict[str, str], key: str, tmp_path: Path
) -> None:
    """The device layer cannot reach the simulator by itself: a configuration naming simulated
    parts needs ``simulator=`` (``otakit agent run`` passes it)."""
    from otakit.device.config import AgentConfig, ConfigError
    from otakit.device.service import AgentService
    from otakit.sim.agent import SIMULATOR

    paths = {name: str(tmp_path / value) for name, value in storage.items() if name != "kind"}
    config = AgentConfig.from_dict(
        {
            "agent": {"server": "http://127.0.0.1:9"},
            "identity": {"serial": "S-1", "board": "B", "version": "1.0.0"},
            "storage": {**storage, **paths},
        }
    )
    with pytest.raises(ConfigError, match="simulator") as info:
        AgentService(config)
    assert info.value.key == key
    assert AgentService(config, simulator=SIMULATOR).simulator is SIMULATOR
