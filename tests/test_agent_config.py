"""The agent's TOML configuration: §8 defaults, round trips, and one clear error per mistake."""

from __future__ import annotations

import dataclasses
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otakit.device.config import (
    LOG_FACILITIES,
    LOG_LEVELS,
    AgentConfig,
    Behaviour,
    ConfigError,
    Identity,
    LogConfig,
    MqttConfig,
    Timing,
)
from otakit.errors import EXIT_USAGE, InputFileError, OtakitError, UsageError

YEAR = 365 * 24 * 3600

FULL_TOML = """\
[agent]
server = "https://ota.example:8443"
token_file = "/etc/otakit/token"
ca_file = "/etc/otakit/ca.pem"
client_cert = "/etc/otakit/device.pem"
client_key = "/etc/otakit/device.key"
flow = "direct"
job_path = "/jobs/sensor.json"
file_path = "/images/sensor.bin"

[identity]
manufacturer = "ACME"
manufacturer_id = "0001"
product = "sensor"
serial = "S-1"
board = "CY8CPROTO_062_4343W"
version = "1.0.0"

[timing]
initial_check = 10
next_check = 3600
retry_interval = 7.5
check_timeout = 300
job_timeout = 20
data_timeout = 0.5
retries = 0
connect_retries = 100
download_tries = 5
chunk_size = 1048576
http_timeout_ms = 250
retry_backoff = 1.5
retry_backoff_cap = 900
retry_jitter = 0
give_up_after = 0

[behaviour]
reboot_upon_completion = true
validate_after_reboot = true
do_not_send_result = true

[logging]
level = "warning"

[logging.facilities]
http = "debug"
storage = "error"
"""

MINIMAL = {
    "agent": {"server": "http://127.0.0.1:8080"},
    "identity": {"serial": "S-1", "board": "CY8CPROTO_062_4343W", "version": "1.0.0"},
}


def with_value(section: str, key: object, value: object) -> dict[str, Any]:
    """MINIMAL with ``[section] key = value`` added or replaced."""
    data: dict[str, Any] = {name: dict(table) for name, table in MINIMAL.items()}
    data.setdefault(section, {})[key] = value
    return data


def config_error(data: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        AgentConfig.from_dict(data)  # type: ignore[arg-type]
    error = info.value
    assert "\n" not in str(error)
    return error


# --- defaults ----------------------------------------------------------------------------------


def test_timing_defaults_are_the_originals() -> None:
    """protocols.md §8, with the library's 60 s initial check; the backoff keys are otakit's."""
    assert dataclasses.asdict(Timing()) == {
        "initial_check": 60,
        "next_check": 86400,
        "retry_interval": 5,
        "check_timeout": 600,
        "job_timeout": 30,
        "data_timeout": 1200,
        "retries": 3,
        "connect_retries": 3,
        "download_tries": 3,
        "chunk_size": 4096,
        "http_timeout_ms": 3000,
        "retry_backoff": 2,
        "retry_backoff_cap": 3600,
        "retry_jitter": 0.2,
        "give_up_after": 5,
    }
    assert Timing().http_timeout == 3.0


def test_the_retry_policy_comes_from_the_timing_table() -> None:
    timing = AgentConfig.from_dict(
        {
            **MINIMAL,
            "timing": {
                "retry_interval": 10,
                "retry_backoff": 3,
                "retry_backoff_cap": 600,
                "retry_jitter": 0,
                "give_up_after": 2,
            },
        }
    ).timing
    policy = timing.retry_policy
    assert (policy.first, policy.factor, policy.cap, policy.jitter, policy.give_up_after) == (
        10,
        3,
        600,
        0,
        2,
    )
    assert [policy.delay(n, random=0.5) for n in (1, 2, 3, 4, 5)] == [10, 30, 90, 270, 600]


def test_a_retry_interval_longer_than_the_cap_is_the_cap() -> None:
    """A config from before the backoff keys with retry_interval above the default cap of an
    hour still loads, and its waits start at retry_interval."""
    policy = Timing(retry_interval=7200).retry_policy
    assert policy.cap == 7200
    assert policy.delay(3, random=0.99) <= 7200
    assert policy.delay(1, random=0.0) == pytest.approx(7200 * 0.8)  # jitter only shortens it


def test_a_config_from_before_the_backoff_keys_still_loads() -> None:
    config = AgentConfig.from_dict({**MINIMAL, "timing": {"retry_interval": 30, "retries": 2}})
    assert config.timing.retry_interval == 30
    assert config.timing.retry_policy.first == 30
    assert config.timing.give_up_after == 5


def test_minimal_config_takes_every_default() -> None:
    config = AgentConfig.from_dict(MINIMAL)
    assert config.timing == Timing()
    assert config.behaviour == Behaviour(
        reboot_upon_completion=False, validate_after_reboot=False, do_not_send_result=False
    )
    assert config.logging == LogConfig(level="info")
    assert (config.flow, config.job_path, config.file_path) == (
        "job",
        "/ota_update.json",
        "/ota-update.bin",
    )
    assert (config.token, config.token_file, config.ca_file) == (None, None, None)
    assert config.identity.manufacturer == config.identity.product == ""
    assert config.job_url == "http://127.0.0.1:8080/ota_update.json"
    assert config.file_url == "http://127.0.0.1:8080/ota-update.bin"


# --- files -------------------------------------------------------------------------------------


def test_full_file_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(FULL_TOML)
    config = AgentConfig.from_toml(path)

    assert config.flow == "direct"
    assert config.token_file == Path("/etc/otakit/token")
    assert config.identity.firmware_version.short == "1.0.0"
    assert config.timing.retry_interval == 7.5
    assert config.timing.data_timeout == 0.5
    assert config.timing.http_timeout == 0.25
    assert config.timing.retry_policy.give_up_after == 0  # never gives up
    assert config.behaviour == Behaviour(True, True, True)
    assert config.logging.level_for("http") == LOG_LEVELS["debug"]
    assert config.logging.level_for("mqtt") == LOG_LEVELS["warning"]

    assert config.to_dict() == tomllib.loads(FULL_TOML)
    assert config.to_toml() == FULL_TOML
    assert AgentConfig.from_dict(config.to_dict()) == config
    again = tmp_path / "again.toml"
    again.write_text(config.to_toml())
    assert AgentConfig.from_toml(again) == config


def test_relative_paths_count_from_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "etc").mkdir()
    path = tmp_path / "etc" / "agent.toml"
    path.write_text(
        '[agent]\nserver = "https://ota.example"\nca_file = "ca.pem"\ntoken_file = "/abs/token"\n'
        '[identity]\nserial = "S"\nboard = "B"\nversion = "2"\n'
    )
    config = AgentConfig.from_toml(path)
    assert config.ca_file == tmp_path / "etc" / "ca.pem"
    assert config.token_file == Path("/abs/token")


def test_missing_file_is_an_input_file_error(tmp_path: Path) -> None:
    with pytest.raises(InputFileError, match="agent config"):
        AgentConfig.from_toml(tmp_path / "nope.toml")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"[agent\n", "not valid TOML"),
        (b"\xff\xfe[agent]\n", "not a UTF-8 text file"),
        (b'[agent]\nserver = "http://x"\n', "missing required key identity.serial"),
    ],
)
def test_bad_file_names_the_file(tmp_path: Path, content: bytes, fragment: str) -> None:
    path = tmp_path / "agent.toml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        AgentConfig.from_toml(path)
    assert str(info.value).startswith(f"{path}: ")
    assert fragment in str(info.value)
    assert "\n" not in str(info.value)


def test_config_errors_are_usage_errors() -> None:
    error = config_error(with_value("timing", "retries", -1))
    assert isinstance(error, UsageError)
    assert error.exit_status == EXIT_USAGE
    assert error.code == "CONFIG"
    assert error.agent_error == "BADARG"


# --- range checks ------------------------------------------------------------------------------

RANGES = [
    *[(name, 5, YEAR, "from 5 to 31536000 s") for name in Timing.INTERVALS],
    *[(name, None, YEAR, "greater than 0 and at most 31536000 s") for name in Timing.TIMEOUTS],
    ("retries", 0, 100, "from 0 to 100"),
    ("connect_retries", 0, 100, "from 0 to 100"),
    ("download_tries", 1, 100, "from 1 to 100"),
    ("chunk_size", 512, 16 * 1024 * 1024, "from 512 to 16777216 bytes"),
    ("http_timeout_ms", 1, YEAR * 1000, "from 1 to 31536000000 ms"),
    ("retry_backoff", 1, 100, "from 1 to 100"),
    ("give_up_after", 0, 100, "from 0 to 100"),
]


@pytest.mark.parametrize(("name", "low", "high", "allowed"), RANGES)
def test_timing_range_edges(name: str, low: int | None, high: int, allowed: str) -> None:
    # The edges themselves are allowed...
    for good in (low if low is not None else 0.001, high):
        assert getattr(AgentConfig.from_dict(with_value("timing", name, good)).timing, name) == good
    # ...one step outside is not, and the message names the key and the range.
    below = low - 1 if low is not None else 0
    for bad in (below, high + 1):
        error = config_error(with_value("timing", name, bad))
        assert error.key == f"timing.{name}"
        assert str(error).startswith(f"timing.{name} is {bad}")
        assert allowed in str(error)
        assert error.value == bad


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Timing)])
@pytest.mark.parametrize("bad", [True, "60", None, [5], math.inf, math.nan])
def test_timing_values_must_be_numbers(name: str, bad: object) -> None:
    error = config_error(with_value("timing", name, bad))
    assert error.key == f"timing.{name}"
    assert str(error).startswith(f"timing.{name} ")


@pytest.mark.parametrize("bad", [-0.1, 1, 1.5])
def test_retry_jitter_is_a_fraction_below_one(bad: float) -> None:
    assert AgentConfig.from_dict(with_value("timing", "retry_jitter", 0)).timing.retry_jitter == 0
    error = config_error(with_value("timing", "retry_jitter", bad))
    assert error.key == "timing.retry_jitter"
    assert str(error) == f"timing.retry_jitter is {bad} but must be from 0 to below 1"
    assert error.value == bad


@pytest.mark.parametrize(
    "name",
    ["retries", "connect_retries", "chunk_size", "http_timeout_ms", "give_up_after"],
)
def test_counts_must_be_integers(name: str) -> None:
    error = config_error(with_value("timing", name, 1024.0))
    assert str(error) == f"timing.{name} must be an integer, not a number (1024.0)"


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Behaviour)])
def test_behaviour_values_must_be_booleans(name: str) -> None:
    error = config_error(with_value("behaviour", name, 1))
    assert str(error) == f"behaviour.{name} must be true or false, not an integer (1)"


def test_dataclasses_check_values_when_built_in_code() -> None:
    with pytest.raises(ConfigError, match=r"^timing\.retry_interval is 1 s "):
        Timing(retry_interval=1)
    with pytest.raises(ConfigError, match=r"^identity\.board must not be empty$"):
        Identity(serial="S", board="", version="1")
    with pytest.raises(ConfigError, match=r"^identity must be of type Identity, not 'S-1'$"):
        AgentConfig(server="http://x", identity="S-1")  # type: ignore[arg-type]
    config = AgentConfig.from_dict(MINIMAL)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server = "http://y"  # type: ignore[misc]
    with pytest.raises(TypeError):
        config.logging.facilities["http"] = "debug"  # type: ignore[index]


# --- the other tables --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("agent", "server", "ftp://x", "agent.server 'ftp://x' is not a server URL"),
        ("agent", "server", "https://", "agent.server 'https://' is not a server URL"),
        ("agent", "server", "http://x:99999", "agent.server 'http://x:99999' is not a server"),
        ("agent", "server", "http://u:p@x", "credentials belong in agent.token"),
        ("agent", "server", "http://x/?a=1", "must not hold a query"),
        ("agent", "server", 8080, "agent.server must be a string, not an integer (8080)"),
        ("agent", "server", "", "agent.server must not be empty"),
        ("agent", "flow", "push", "agent.flow is 'push' but must be one of job, direct"),
        ("agent", "job_path", "ota_update.json", "agent.job_path 'ota_update.json' must be a"),
        ("agent", "file_path", "/a b", "agent.file_path '/a b' must be a path"),
        ("agent", "file_path", "/" + "x" * 256, "agent.file_path is 257 bytes long"),
        ("agent", "token", "", "agent.token must not be empty"),
        ("agent", "token", "a\nb", "agent.token 'a\\nb' holds a control"),
        ("agent", "ca_file", 5, "agent.ca_file must be a string, not an integer (5)"),
        ("agent", "ca_file", "", "agent.ca_file must not be empty"),
        ("identity", "serial", "S" * 32, "identity.serial is 32 bytes long but must be at most 31"),
        ("identity", "board", "B" * 48, "identity.board is 48 bytes long but must be at most 47"),
        ("identity", "manufacturer_id", "é" * 9, "identity.manufacturer_id is 18 bytes long"),
        ("identity", "version", "1.0.0-rc1", "identity.version: invalid version '1.0.0-rc1'"),
        ("identity", "version", 1, "identity.version must be a string, not an integer (1)"),
        ("logging", "level", "INFO", "logging.level is 'INFO' but must be one of debug, info"),
        ("logging", "facilities", {"http": "loud"}, "logging.facilities.http is 'loud' but"),
        ("logging", "facilities", "http", "[logging.facilities] must be a table, not a string"),
    ],
)
def test_bad_value_is_named(section: str, key: str, value: object, message: str) -> None:
    error = config_error(with_value(section, key, value))
    assert message in str(error)
    assert (error.key or "").startswith(f"{section}.")


def test_token_and_token_file_exclude_each_other() -> None:
    data = with_value("agent", "token", "otk_1")
    data["agent"]["token_file"] = "/etc/otakit/token"
    assert str(config_error(data)) == "agent.token and agent.token_file are both given; keep one"


def test_client_key_needs_client_cert() -> None:
    data = with_value("agent", "client_key", "/k.pem")
    data["agent"]["server"] = "https://x"
    assert str(config_error(data)) == "agent.client_key is given without agent.client_cert"


@pytest.mark.parametrize("name", ["ca_file", "client_cert"])
def test_tls_files_need_https(name: str) -> None:
    error = config_error(with_value("agent", name, "/x.pem"))
    assert error.key == f"agent.{name}"
    assert "only used with an https:// server" in str(error)


# --- unknown and missing keys ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**MINIMAL, "timings": {}}, "unknown key timings; did you mean timing?"),
        ({**MINIMAL, "ble": {}}, "unknown key ble; expected one of agent, identity, timing"),
        (with_value("agent", "sever", "x"), "unknown key agent.sever; did you mean server?"),
        (with_value("identity", "serial_number", "x"), "unknown key identity.serial_number"),
        (
            with_value("timing", "retry_intervall", 5),
            "unknown key timing.retry_intervall; did you mean retry_interval?",
        ),
        (with_value("behaviour", "reboot", True), "unknown key behaviour.reboot"),
        (with_value("logging", "lvl", "info"), "unknown key logging.lvl; did you mean level?"),
        (
            with_value("logging", "facilities", {"htp": "debug"}),
            "unknown key logging.facilities.htp; did you mean http?",
        ),
        (with_value("timing", 5, 5), "key 5 in timing is not a string"),
    ],
)
def test_unknown_key_is_named(data: dict[str, Any], message: str) -> None:
    assert message in str(config_error(data))


@pytest.mark.parametrize(
    ("data", "key"),
    [
        ({"identity": MINIMAL["identity"]}, "agent.server"),
        ({"agent": {}, "identity": MINIMAL["identity"]}, "agent.server"),
        ({"agent": MINIMAL["agent"]}, "identity.serial"),
        *[
            (
                {
                    "agent": MINIMAL["agent"],
                    "identity": {k: v for k, v in MINIMAL["identity"].items() if k != missing},
                },
                f"identity.{missing}",
            )
            for missing in ("serial", "board", "version")
        ],
    ],
)
def test_missing_required_key_is_named(data: dict[str, Any], key: str) -> None:
    error = config_error(data)
    assert str(error) == f"missing required key {key}"
    assert error.key == key


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ([], "the configuration must be a table, not a list ([])"),
        ({**MINIMAL, "timing": 5}, "[timing] must be a table, not an integer (5)"),
        ({**MINIMAL, "agent": "http://x"}, "[agent] must be a table, not a string ('http://x')"),
    ],
)
def test_tables_must_be_tables(data: object, message: str) -> None:
    assert str(config_error(data)) == message


# --- token -------------------------------------------------------------------------------------


def test_load_token(tmp_path: Path) -> None:
    assert AgentConfig.from_dict(MINIMAL).load_token() is None
    assert AgentConfig.from_dict(with_value("agent", "token", "otk_1")).load_token() == "otk_1"

    token_file = tmp_path / "token"
    config = AgentConfig.from_dict(with_value("agent", "token_file", str(token_file)))
    with pytest.raises(InputFileError, match="token file"):
        config.load_token()
    token_file.write_text("otk_2\n")
    assert config.load_token() == "otk_2"
    token_file.write_text("\n")
    with pytest.raises(ConfigError, match="must not be empty") as info:
        config.load_token()
    assert info.value.key == "agent.token_file"
    token_file.write_bytes(b"\xff")
    with pytest.raises(ConfigError, match="not UTF-8"):
        config.load_token()


# --- properties --------------------------------------------------------------------------------

_LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=8),
    st.datetimes(),
)
_KEYS = st.one_of(
    st.sampled_from(
        [
            "agent",
            "identity",
            "timing",
            "behaviour",
            "logging",
            "facilities",
            *[f.name for f in dataclasses.fields(Timing)],
            *[f.name for f in dataclasses.fields(Behaviour)],
            *Identity.JOB_KEYS,
            *LOG_FACILITIES,
            "server",
            "token",
            "token_file",
            "ca_file",
            "client_cert",
            "client_key",
            "flow",
            "job_path",
            "file_path",
            "level",
        ]
    ),
    st.text(max_size=10),
    st.integers(),
)
_VALUES = st.recursive(
    _LEAVES,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner, max_size=5),
    max_leaves=20,
)


@given(st.dictionaries(_KEYS, _VALUES, max_size=6) | _VALUES)
def test_random_input_raises_only_otakit_errors(data: Any) -> None:
    message = ""
    try:
        AgentConfig.from_dict(data)
    except OtakitError as exc:
        message = str(exc)
    assert "\n" not in message


@given(
    section=st.sampled_from(["agent", "identity", "timing", "behaviour", "logging"]),
    key=_KEYS,
    value=_VALUES,
)
def test_one_bad_value_in_a_full_config_raises_only_otakit_errors(
    section: str, key: Any, value: Any
) -> None:
    data = tomllib.loads(FULL_TOML)
    data[section][key] = value
    try:
        config = AgentConfig.from_dict(data)
    except OtakitError as exc:
        message = str(exc)
    else:
        message = ""
        assert AgentConfig.from_dict(config.to_dict()) == config
    assert "\n" not in message


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=["C", "Z"]), max_size=8)
_SECONDS_INTERVAL = st.integers(5, YEAR) | st.floats(5, YEAR)
_SECONDS_TIMEOUT = st.integers(1, YEAR) | st.floats(0.001, YEAR)


@st.composite
def _configs(draw: st.DrawFn) -> AgentConfig:
    def opt_path() -> Path | None:
        return draw(st.none() | st.builds(Path, st.sampled_from(["/etc/a.pem", '/b "q\\.pem'])))

    server = draw(st.sampled_from(["https://ota.example", "https://[::1]:8443/ota/", "https://h"]))
    token = draw(st.none() | _TEXT.filter(bool))
    client_cert = opt_path()
    return AgentConfig(
        server=server,
        token=token,
        token_file=opt_path() if token is None else None,
        ca_file=opt_path(),
        client_cert=client_cert,
        client_key=opt_path() if client_cert is not None else None,
        flow=draw(st.sampled_from(["job", "direct"])),
        job_path="/" + draw(_TEXT.filter(lambda t: not set(t) & set(" ?#"))),
        identity=Identity(
            serial=draw(_TEXT.filter(bool)),
            board=draw(_TEXT.filter(bool)),
            version=draw(st.sampled_from(["1", "1.2", "1.2.3", "1.2.3+4"])),
            manufacturer=draw(_TEXT),
            product=draw(_TEXT),
        ),
        timing=Timing(
            initial_check=draw(_SECONDS_INTERVAL),
            retry_interval=draw(_SECONDS_INTERVAL),
            data_timeout=draw(_SECONDS_TIMEOUT),
            retries=draw(st.integers(0, 100)),
            chunk_size=draw(st.integers(512, 16 * 1024 * 1024)),
            retry_backoff=draw(st.floats(1, 100)),
            retry_backoff_cap=draw(_SECONDS_INTERVAL),
            retry_jitter=draw(st.floats(0, 1, exclude_max=True)),
            give_up_after=draw(st.integers(0, 100)),
        ),
        behaviour=Behaviour(*draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))),
        logging=LogConfig(
            level=draw(st.sampled_from(list(LOG_LEVELS))),
            facilities=draw(
                st.dictionaries(st.sampled_from(LOG_FACILITIES), st.sampled_from(list(LOG_LEVELS)))
            ),
        ),
    )


@given(_configs())
def test_any_valid_config_round_trips_through_toml(config: AgentConfig) -> None:
    text = config.to_toml()
    assert AgentConfig.from_dict(tomllib.loads(text)) == config
    assert AgentConfig.from_dict(config.to_dict()) == config


# --- [storage] ---------------------------------------------------------------------------------

GATEWAY = {"kind": "gateway", "path": "flash.bin", "program": ["pyocd", "flash", "{file}"]}


def test_storage_round_trips_and_resolves_paths(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    data = {**MINIMAL, "storage": {**GATEWAY, "fs_size": 65536, "sector_size": 4096}}
    path.write_text(AgentConfig.from_dict(data).to_toml())
    config = AgentConfig.from_toml(path)
    assert config.storage is not None
    assert config.storage.path == tmp_path / "flash.bin"
    assert config.storage.program == ("pyocd", "flash", "{file}")
    assert AgentConfig.from_dict(config.to_dict()) == config
    sim = AgentConfig.from_dict({**MINIMAL, "storage": {"path": "dev"}}, base_dir=tmp_path)
    assert sim.storage is not None
    assert (sim.storage.kind, sim.storage.path, sim.storage.confirm) == (
        "sim-device",
        tmp_path / "dev",
        True,
    )
    assert AgentConfig.from_dict(MINIMAL).storage is None


@pytest.mark.parametrize(
    ("storage", "message"),
    [
        ({"kind": "gateway"}, "missing required key storage.path"),
        ({**GATEWAY, "kind": "disk"}, "storage.kind is 'disk' but must be one of sim-device"),
        ({"kind": "gateway", "path": "f"}, "a gateway needs exactly one of storage.program"),
        ({**GATEWAY, "mcu": "mcu"}, "a gateway needs exactly one of storage.program"),
        (
            {"path": "d", "program": ["x"]},
            'storage.mcu and storage.program are for kind = "gateway"',
        ),
        ({**GATEWAY, "program": "pyocd flash"}, "storage.program must be a list"),
        ({**GATEWAY, "program": ["pyocd", ""]}, "storage.program must be a list"),
        ({**GATEWAY, "fs_size": 4096}, "storage.fs_size is 4096 but must be from 65536"),
        ({**GATEWAY, "fs_size": 65536 + 100}, "is not a multiple of storage.sector_size"),
        ({**GATEWAY, "confirm": "yes"}, "storage.confirm must be true or false"),
        ({**GATEWAY, "size": 1}, "unknown key storage.size"),
    ],
)
def test_bad_storage_is_named(storage: dict[str, Any], message: str) -> None:
    error = config_error({**MINIMAL, "storage": storage})
    assert message in error.message


def test_gateway_takes_the_job_flow_only() -> None:
    data = {**MINIMAL, "agent": {**MINIMAL["agent"], "flow": "direct"}, "storage": GATEWAY}
    assert 'agent.flow must be "job"' in config_error(data).message


# --- [mqtt] and agent.transport ------------------------------------------------------------------

MQTT_TOML = """\
[agent]
transport = "mqtt"
flow = "job"
job_path = "/ota_update.json"
file_path = "/ota-update.bin"

[identity]
manufacturer = ""
manufacturer_id = ""
product = ""
serial = "S-1"
board = "CY8CPROTO_062_4343W"
version = "1.0.0"

[timing]
initial_check = 60
next_check = 86400
retry_interval = 5
check_timeout = 600
job_timeout = 30
data_timeout = 1200
retries = 3
connect_retries = 3
download_tries = 3
chunk_size = 4096
http_timeout_ms = 3000
retry_backoff = 2
retry_backoff_cap = 3600
retry_jitter = 0.2
give_up_after = 5

[behaviour]
reboot_upon_completion = false
validate_after_reboot = false
do_not_send_result = false

[logging]
level = "info"

[mqtt]
broker = "broker.example"
port = 8884
tls = false
ca_file = "ca.pem"
client_cert = "device.pem"
client_key = "device.key"
company = "ACME"
app_prefix = false
keepalive = 30
chunk_timeout = 2.5
request_tries = 5
result_timeout = 1
"""


def test_mqtt_defaults_are_the_originals() -> None:
    mqtt = MqttConfig(broker="broker.example")
    assert dataclasses.asdict(mqtt) == {
        "broker": "broker.example",
        "port": 1883,
        "tls": False,
        "ca_file": None,
        "client_cert": None,
        "client_key": None,
        "company": "OTAUpdate",
        "app_prefix": True,
        "keepalive": 60,
        "chunk_timeout": 10,
        "request_tries": 3,
        "result_timeout": 5,
    }
    assert not mqtt.secure
    assert MqttConfig(broker="b", tls=True).secure
    assert MqttConfig(broker="b", ca_file=Path("ca.pem")).secure
    assert AgentConfig.from_dict(MINIMAL).transport == "http"


def test_mqtt_file_round_trips_without_a_server(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(MQTT_TOML)
    config = AgentConfig.from_toml(path)
    assert (config.server, config.transport) == (None, "mqtt")
    assert config.mqtt is not None
    assert config.mqtt.ca_file == tmp_path / "ca.pem"
    assert config.mqtt.client_key == tmp_path / "device.key"
    assert (config.mqtt.port, config.mqtt.company, config.mqtt.app_prefix) == (8884, "ACME", False)
    assert config.mqtt.chunk_timeout == 2.5
    assert AgentConfig.from_dict(config.to_dict()) == config
    relative = AgentConfig.from_dict(tomllib.loads(MQTT_TOML))
    assert relative.to_toml() == MQTT_TOML
    with pytest.raises(ConfigError, match=r"agent\.server is not set"):
        config.url("/x")


def test_a_simulated_device_may_ask_the_check_in_api() -> None:
    """transport = "checkin": the JSON check-in API (delta updates), kept in the file."""
    config = AgentConfig.from_dict(with_value("agent", "transport", "checkin"))
    assert config.transport == "checkin"
    assert config.to_dict()["agent"]["transport"] == "checkin"
    assert AgentConfig.from_dict(config.to_dict()) == config


def test_http_agents_keep_their_files() -> None:
    """agent.transport is written only when it is not the default."""
    config = AgentConfig.from_dict({**MINIMAL, "mqtt": {"broker": "b"}})
    assert "transport" not in config.to_dict()["agent"]
    assert config.to_dict()["mqtt"]["broker"] == "b"
    assert AgentConfig.from_dict(config.to_dict()) == config


def with_mqtt(key: str, value: object) -> dict[str, Any]:
    """MINIMAL with an ``[mqtt]`` table for broker ``b`` and ``key = value``."""
    return {**MINIMAL, "mqtt": {"broker": "b", key: value}}


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({**MINIMAL, "mqtt": {"port": 1883}}, "missing required key mqtt.broker"),
        (with_mqtt("broker", "mqtt://b"), "mqtt.broker 'mqtt://b' must be a host name"),
        (with_mqtt("broker", ""), "mqtt.broker must not be empty"),
        (with_mqtt("port", 0), "mqtt.port is 0 but must be from 1 to 65535"),
        (with_mqtt("port", "1883"), "mqtt.port must be an integer"),
        (with_mqtt("company", "a/b"), "mqtt.company 'a/b' must be one topic level"),
        (with_mqtt("company", "#"), "must be one topic level"),
        (with_mqtt("client_key", "k.pem"), "mqtt.client_key is given without"),
        (with_mqtt("chunk_timeout", 0), "mqtt.chunk_timeout is 0 s but must be"),
        (with_mqtt("result_timeout", math.inf), "mqtt.result_timeout is inf s"),
        (with_mqtt("request_tries", -1), "mqtt.request_tries is -1 but must be"),
        (with_mqtt("keepalive", 0), "mqtt.keepalive is 0 but must be from 1"),
        (with_mqtt("app_prefix", "yes"), "mqtt.app_prefix must be true or false"),
        (with_mqtt("tls", 1), "mqtt.tls must be true or false"),
        (with_mqtt("host", "b"), "unknown key mqtt.host"),
        (with_value("agent", "transport", "ftp"), "agent.transport is 'ftp' but must be one of"),
        (
            {"agent": {"transport": "mqtt"}, "identity": MINIMAL["identity"]},
            'agent.transport is "mqtt" but there is no [mqtt] table',
        ),
        (
            {"agent": {"transport": "http"}, "identity": MINIMAL["identity"]},
            "missing required key agent.server",
        ),
        (
            {"agent": {"transport": "checkin"}, "identity": MINIMAL["identity"]},
            "missing required key agent.server",
        ),
        (
            {
                **with_value("agent", "transport", "mqtt"),
                "mqtt": {"broker": "b"},
                "storage": {"kind": "gateway", "path": "f", "program": ["x"]},
            },
            'agent.transport must be "http"',
        ),
    ],
)
def test_bad_mqtt_is_named(data: dict[str, Any], message: str) -> None:
    assert message in str(config_error(data))


def test_mqtt_settings_take_the_timing_table() -> None:
    from otakit.device.service import mqtt_settings

    data = tomllib.loads(MQTT_TOML)
    data["timing"] |= {"job_timeout": 7, "data_timeout": 99}
    settings = mqtt_settings(AgentConfig.from_dict(data, base_dir="/etc/otakit"))
    assert settings is not None
    assert (settings.host, settings.port, settings.company, settings.app_prefix) == (
        "broker.example",
        8884,
        "ACME",
        False,
    )
    assert (settings.job_timeout, settings.data_timeout, settings.chunk_timeout) == (7, 99, 2.5)
    assert (settings.ca_file, settings.client_key) == (
        "/etc/otakit/ca.pem",
        "/etc/otakit/device.key",
    )
    assert settings.secure
    assert mqtt_settings(AgentConfig.from_dict(MINIMAL)) is None


def test_tls_files_that_cannot_be_used_are_one_line_errors(tmp_path: Path) -> None:
    """Every client (HTTP agent, MQTT device, publisher) loads its TLS files the same way."""
    from otakit.errors import InputFileError
    from otakit.tls import client_context

    with pytest.raises(InputFileError, match="cannot read CA file"):
        client_context(tmp_path / "missing.pem")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    with pytest.raises(UsageError, match=r"client certificate .* cannot be used"):
        client_context(None, junk)
