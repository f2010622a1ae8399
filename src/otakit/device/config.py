"""The agent's configuration: one TOML file, checked whole when it is read.

The file has one table per concern, and each table is one frozen dataclass here::

    [agent]                                   -> AgentConfig (server, credentials, flow, paths)
    server = "https://ota.example:8443"       # not needed with transport = "mqtt"
    transport = "http"                        # or "mqtt", or "checkin" (deltas): who asks for the job
    token = "otk_..."                         # or token_file = "/etc/otakit/token"
    ca_file = "/etc/otakit/ca.pem"
    client_cert = "/etc/otakit/device.pem"    # client_key too if the key is in its own file
    flow = "job"                              # or "direct"
    job_path = "/ota_update.json"
    file_path = "/ota-update.bin"
    trusted_origins = ["https://cdn.example"] # other origins that get the token and certificate
    allow_insecure_redirects = false          # follow http:// URLs from an https:// server

    [identity]                                -> Identity (what the device says it is)
    manufacturer = "ACME"
    manufacturer_id = "0001"
    product = "sensor"
    serial = "S-1"
    board = "CY8CPROTO_062_4343W"
    version = "1.0.0"

    [timing]                                  -> Timing (the original's knobs, protocols.md §8)
    initial_check = 60
    next_check = 86400
    retry_interval = 5                        # the first wait after a failed attempt
    retry_backoff = 2                         # each further wait twice the one before
    retry_backoff_cap = 3600                  # at most an hour
    retry_jitter = 0.2                        # +- 20 %
    give_up_after = 5                         # skip an update that failed 5 times
    ...

    [behaviour]                               -> Behaviour (the original's agent parameters)
    reboot_upon_completion = true
    validate_after_reboot = true
    do_not_send_result = false

    [logging]                                 -> LogConfig
    level = "info"
    [logging.facilities]
    http = "debug"

    [storage]                                 -> StorageConfig (where the image goes)
    kind = "sim-device"                       # or "gateway"
    path = "device"                           # device folder, or the gateway's flash file

    [mqtt]                                    -> MqttConfig (the MQTT transport's broker)
    broker = "broker.example"
    port = 8884
    ca_file = "/etc/otakit/mqtt-ca.pem"       # client_cert, client_key; or tls = true
    company = "OTAUpdate"
    app_prefix = true                         # topics name the board APP_<board>

:class:`AgentConfig` is the whole file: ``config.timing.retry_interval``,
``config.behaviour.reboot_upon_completion``. Only ``agent.server`` (or, with
``agent.transport = "mqtt"``, ``mqtt.broker``) and ``identity.serial``, ``identity.board`` and
``identity.version`` are required; every other key has the default of
the original middleware (§8). The one exception is ``timing.initial_check``: §8's devices wait
10 s, its library defaults 60 s; otakit takes the library's 60 s. The backoff keys
(``timing.retry_backoff``, ``retry_backoff_cap``, ``retry_jitter``, ``give_up_after``) are
otakit's own: the original retries at a constant interval and never gives up.

Every check runs when a dataclass is built, so a config made in code is held to the same rules
as one read from a file. Every problem is a :class:`ConfigError` whose one-line message names
the key (``timing.retry_interval``) and the allowed values; an unknown key is an error, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any, ClassVar
from urllib.parse import urlsplit

from otakit.device.core.retry import RetryPolicy
from otakit.errors import UsageError, VersionFormatError
from otakit.files import read_input
from otakit.protocol.jobdoc import MAX_VALUE_BYTES
from otakit.protocol.version import FirmwareVersion

SECONDS_PER_YEAR = 365 * 24 * 60 * 60
MIN_INTERVAL_S = 5  # CY_OTA_INTERVAL_SECS_MIN
MAX_INTERVAL_S = SECONDS_PER_YEAR  # CY_OTA_INTERVAL_SECS_MAX
MAX_TIMEOUT_S = SECONDS_PER_YEAR
MAX_RETRIES = 100
MAX_BACKOFF = 100  # timing.retry_backoff: the factor between two waits after failures
MIN_CHUNK_SIZE = 512
MAX_CHUNK_SIZE = 16 * 1024 * 1024  # Linux-class devices download in MiBs
MAX_PATH_BYTES = MAX_VALUE_BYTES["File"]  # job_path and file_path end up in a job's File field

FLOWS = ("job", "direct")
LOG_LEVELS: Mapping[str, int] = MappingProxyType(
    {"debug": 10, "info": 20, "warning": 30, "error": 40, "critical": 50}
)
"""Level names the file accepts, with their :mod:`logging` numbers."""
LOG_FACILITIES = ("agent", "http", "mqtt", "ble", "smp", "storage")
"""Parts of the agent whose level ``[logging.facilities]`` can set on their own."""


class ConfigError(UsageError):
    """The agent configuration is invalid; ``key`` is the dotted key at fault, when one is."""

    code = "CONFIG"

    def __init__(self, message: str, *, key: str | None = None, value: object = None) -> None:
        super().__init__(message, value=value)
        self.key = key


# --- value checks ------------------------------------------------------------------------------


def _show(value: object) -> str:
    """``repr(value)``, cut short so that a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _type_name(value: object) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        type(value), f"a {type(value).__name__}"
    )


def _check_int(key: str, value: object, low: int, high: int, unit: str = "") -> None:
    if type(value) is not int:
        raise ConfigError(
            f"{key} must be an integer, not {_type_name(value)} ({_show(value)})",
            key=key,
            value=value,
        )
    if not low <= value <= high:
        raise ConfigError(
            f"{key} is {_show(value)} but must be from {low} to {high}{unit}", key=key, value=value
        )


def _check_seconds(key: str, value: object, low: float, high: float, *, above: bool) -> None:
    """``value`` in seconds: an int or finite float in ``[low, high]`` (``(low, high]`` if above)."""
    if type(value) not in (int, float):
        raise ConfigError(
            f"{key} must be a number of seconds, not {_type_name(value)} ({_show(value)})",
            key=key,
            value=value,
        )
    assert isinstance(value, int | float)
    ok = (
        (type(value) is int or math.isfinite(value))
        and (low < value if above else low <= value)
        and value <= high
    )
    if not ok:
        allowed = f"greater than {low} and at most {high}" if above else f"from {low} to {high}"
        raise ConfigError(
            f"{key} is {_show(value)} s but must be {allowed} s (1 year)", key=key, value=value
        )


def _check_number(key: str, value: object, low: float, high: float, *, upto: bool) -> None:
    """``value`` an int or finite float from ``low`` to ``high`` (below ``high`` unless
    ``upto``)."""
    if type(value) not in (int, float):
        raise ConfigError(
            f"{key} must be a number, not {_type_name(value)} ({_show(value)})",
            key=key,
            value=value,
        )
    assert isinstance(value, int | float)
    ok = math.isfinite(value) and low <= value and (value <= high if upto else value < high)
    if not ok:
        allowed = f"from {low} to {high}" if upto else f"from {low} to below {high}"
        raise ConfigError(f"{key} is {_show(value)} but must be {allowed}", key=key, value=value)


def _check_bool(key: str, value: object) -> None:
    if type(value) is not bool:
        raise ConfigError(
            f"{key} must be true or false, not {_type_name(value)} ({_show(value)})",
            key=key,
            value=value,
        )


def _check_text(key: str, value: object, *, limit: int | None = None, empty: bool = False) -> str:
    """A one-line printable string, non-empty unless ``empty``, at most ``limit`` UTF-8 bytes."""
    if type(value) is not str:
        raise ConfigError(
            f"{key} must be a string, not {_type_name(value)} ({_show(value)})",
            key=key,
            value=value,
        )
    if not value and not empty:
        raise ConfigError(f"{key} must not be empty", key=key, value=value)
    if not value.isprintable():
        raise ConfigError(
            f"{key} {_show(value)} holds a control or unprintable character", key=key, value=value
        )
    if limit is not None and len(value.encode("utf-8")) > limit:
        raise ConfigError(
            f"{key} is {len(value.encode('utf-8'))} bytes long but must be at most {limit}",
            key=key,
            value=value,
        )
    return value


def _check_path(key: str, value: object) -> None:
    """A local file path (``Path``); the file itself is only read when used."""
    if not isinstance(value, Path):
        raise ConfigError(f"{key} must be a path, not {_show(value)}", key=key, value=value)
    _check_text(key, str(value))


MAX_TRUSTED_ORIGINS = 16


def _check_origins(key: str, value: object, server: str | None, insecure: bool) -> None:
    """A list of origins (``https://host[:port]``, no path); plain-HTTP ones only when
    ``insecure`` or the server is not HTTPS (they would never be fetched)."""
    if not isinstance(value, list | tuple) or len(value) > MAX_TRUSTED_ORIGINS:
        raise ConfigError(
            f"{key} must be a list of at most {MAX_TRUSTED_ORIGINS} origins like "
            f'["https://cdn.example"], not {_show(value)}',
            key=key,
            value=value,
        )
    for index, item in enumerate(value):
        _check_server(f"{key}[{index}]", item)
        assert isinstance(item, str)
        if urlsplit(item).path not in ("", "/"):
            raise ConfigError(
                f"{key}[{index}] {item!r} must be an origin: scheme, host and port, no path",
                key=key,
                value=item,
            )
        plain = item.lower().startswith("http:")
        if plain and not insecure and (server or "").lower().startswith("https:"):
            raise ConfigError(
                f"{key}[{index}] {item!r} is plain HTTP but agent.server is HTTPS; set "
                "agent.allow_insecure_redirects = true to fetch from it",
                key=key,
                value=item,
            )


def _check_url_path(key: str, value: object) -> None:
    """A path on the server: starts with ``/``, no spaces, query or fragment."""
    text = _check_text(key, value, limit=MAX_PATH_BYTES)
    if not text.startswith("/") or any(c in text for c in " ?#"):
        raise ConfigError(
            f"{key} {text!r} must be a path on the server starting with / "
            "(no spaces, query or fragment)",
            key=key,
            value=text,
        )


def _check_server(key: str, value: object) -> None:
    text = _check_text(key, value)
    problem = None
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError as exc:
        problem = str(exc)
    else:
        if parts.scheme not in ("http", "https"):
            problem = "the scheme must be http or https"
        elif not parts.hostname:
            problem = "it has no host"
        elif parts.username is not None or parts.password is not None:
            problem = "credentials belong in agent.token, not in the URL"
        elif parts.query or parts.fragment or " " in text:
            problem = "it must not hold a query, a fragment or spaces"
        elif port == 0:
            problem = "port 0 is not a port"
    if problem is not None:
        raise ConfigError(
            f"{key} {text!r} is not a server URL like https://ota.example:8443: {problem}",
            key=key,
            value=text,
        )


# --- the tables --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """``[timing]``: when the agent checks and how long it waits (protocols.md §8).

    Seconds are ints or floats; the original's macro is named with each field.

    After a failed attempt the agent waits ``retry_interval``, then ``retry_backoff`` times
    longer after each further failure in a row (at most ``retries`` retries before it falls back
    to ``next_check``), never longer than ``retry_backoff_cap`` (or ``retry_interval`` when that
    is longer) nor ``next_check``, each wait spread by ``+- retry_jitter`` of itself. An artifact
    (the exact update offered) that failed ``give_up_after`` times is neither downloaded nor
    reported again until a different one is offered (0: never give up). ``retry_backoff = 1``
    with ``retry_jitter = 0`` is the original's constant interval. :attr:`retry_policy` gives
    these as a :class:`RetryPolicy`.

    Raises:
        ConfigError: a value of the wrong type or outside its range: intervals and the backoff
            cap from 5 s to 1 year, timeouts greater than 0 and at most 1 year, retries and
            give_up_after from 0 to 100 (download tries from 1, a download needs one try),
            retry_backoff from 1 to 100, retry_jitter from 0 to below 1, chunk size from 512 B
            to 16 MiB.
    """

    initial_check: float = 60  # CY_OTA_INITIAL_CHECK_SECS (§8's devices use 10)
    next_check: float = 86400  # CY_OTA_NEXT_CHECK_INTERVAL_SECS
    retry_interval: float = 5  # CY_OTA_RETRY_INTERVAL_SECS
    check_timeout: float = 600  # CY_OTA_CHECK_TIME_SECS
    job_timeout: float = 30  # CY_OTA_JOB_CHECK_TIME_SECS
    data_timeout: float = 1200  # CY_OTA_DATA_CHECK_TIME_SECS
    retries: int = 3  # CY_OTA_RETRIES: whole update attempts
    connect_retries: int = 3  # CY_OTA_CONNECT_RETRIES
    download_tries: int = 3  # CY_OTA_MAX_DOWNLOAD_TRIES: tries of one range
    chunk_size: int = 4096  # CY_OTA_CHUNK_SIZE: bytes per ranged GET
    http_timeout_ms: int = 3000  # CY_OTA_HTTP_TIMEOUT_SEND / _RECEIVE
    retry_backoff: float = 2  # each wait after a failure this many times the one before
    retry_backoff_cap: float = 3600  # the longest wait after a failure
    retry_jitter: float = 0.2  # +- this fraction of each wait, so a fleet does not retry at once
    give_up_after: int = 5  # failed attempts of one artifact before it is skipped; 0: never

    INTERVALS: ClassVar[tuple[str, ...]] = (
        "initial_check",
        "next_check",
        "retry_interval",
        "retry_backoff_cap",
    )
    TIMEOUTS: ClassVar[tuple[str, ...]] = ("check_timeout", "job_timeout", "data_timeout")

    def __post_init__(self) -> None:
        for name in self.INTERVALS:
            _check_seconds(
                f"timing.{name}", getattr(self, name), MIN_INTERVAL_S, MAX_INTERVAL_S, above=False
            )
        for name in self.TIMEOUTS:
            _check_seconds(f"timing.{name}", getattr(self, name), 0, MAX_TIMEOUT_S, above=True)
        _check_int("timing.retries", self.retries, 0, MAX_RETRIES)
        _check_int("timing.connect_retries", self.connect_retries, 0, MAX_RETRIES)
        _check_int("timing.download_tries", self.download_tries, 1, MAX_RETRIES)
        _check_int(
            "timing.chunk_size",
            self.chunk_size,
            MIN_CHUNK_SIZE,
            MAX_CHUNK_SIZE,
            " bytes (512 B to 16 MiB)",
        )
        _check_int("timing.http_timeout_ms", self.http_timeout_ms, 1, MAX_TIMEOUT_S * 1000, " ms")
        _check_number("timing.retry_backoff", self.retry_backoff, 1, MAX_BACKOFF, upto=True)
        _check_number("timing.retry_jitter", self.retry_jitter, 0, 1, upto=False)
        _check_int("timing.give_up_after", self.give_up_after, 0, MAX_RETRIES)

    @property
    def retry_policy(self) -> RetryPolicy:
        """The waits after failures and the give-up count, for :class:`Backoff`; its cap is
        ``retry_backoff_cap`` or ``retry_interval``, whichever is longer."""
        return RetryPolicy(
            first=self.retry_interval,
            factor=self.retry_backoff,
            cap=max(self.retry_backoff_cap, self.retry_interval),
            jitter=self.retry_jitter,
            give_up_after=self.give_up_after,
        )

    @property
    def http_timeout(self) -> float:
        """The HTTP send/receive timeout in seconds, as httpx takes it."""
        return self.http_timeout_ms / 1000


@dataclass(frozen=True, kw_only=True)
class Identity:
    """``[identity]``: what the device reports, with the job document's field limits (§1).

    ``version`` is the running firmware version, in any :meth:`FirmwareVersion.parse` form.

    Raises:
        ConfigError: a value that is not a one-line string, too long for its job document
            field, an empty ``serial``, ``board`` or ``version``, or a malformed ``version``.
    """

    serial: str
    board: str
    version: str
    manufacturer: str = ""
    manufacturer_id: str = ""
    product: str = ""

    # field -> job document key, whose byte limit applies; in the order to_toml writes them.
    JOB_KEYS: ClassVar[Mapping[str, str]] = MappingProxyType(
        {
            "manufacturer": "Manufacturer",
            "manufacturer_id": "ManufacturerId",
            "product": "Product",
            "serial": "SerialNumber",
            "board": "Board",
            "version": "Version",
        }
    )
    REQUIRED: ClassVar[tuple[str, ...]] = ("serial", "board", "version")

    def __post_init__(self) -> None:
        for name, job_key in self.JOB_KEYS.items():
            _check_text(
                f"identity.{name}",
                getattr(self, name),
                limit=MAX_VALUE_BYTES[job_key],
                empty=name not in self.REQUIRED,
            )
        try:
            FirmwareVersion.parse(self.version)
        except VersionFormatError as exc:
            raise ConfigError(
                f"identity.version: {exc.message}", key="identity.version", value=self.version
            ) from None

    @property
    def firmware_version(self) -> FirmwareVersion:
        """``version`` as a comparable version."""
        return FirmwareVersion.parse(self.version)


@dataclass(frozen=True)
class Behaviour:
    """``[behaviour]``: the original's agent parameters (``cy_ota_agent_params_t``).

    The defaults are the original's zero-initialised parameters: all off.

    Raises:
        ConfigError: a value that is not a boolean.
    """

    reboot_upon_completion: bool = False  # reboot into the new image once it is verified
    validate_after_reboot: bool = False  # mark the image TEST (revertible), not PERM
    do_not_send_result: bool = False  # skip the result POST/publish

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_bool(f"behaviour.{f.name}", getattr(self, f.name))


@dataclass(frozen=True)
class LogConfig:
    """``[logging]``: a level for the whole agent and, optionally, one per facility.

    Levels are :data:`LOG_LEVELS` names; facilities are :data:`LOG_FACILITIES`.

    Raises:
        ConfigError: an unknown level or facility.
    """

    level: str = "info"
    facilities: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    def __post_init__(self) -> None:
        _check_level("logging.level", self.level)
        if not isinstance(self.facilities, Mapping):
            raise ConfigError(
                f"logging.facilities must be a table, not {_show(self.facilities)}",
                key="logging.facilities",
                value=self.facilities,
            )
        for name, level in self.facilities.items():
            _check_known(name, LOG_FACILITIES, "logging.facilities.")
            _check_level(f"logging.facilities.{name}", level)
        # A read-only copy: the dataclass is frozen, its mapping must be too.
        object.__setattr__(self, "facilities", MappingProxyType(dict(self.facilities)))

    def level_for(self, facility: str) -> int:
        """The :mod:`logging` level number of ``facility`` (its own level, else the global one)."""
        return LOG_LEVELS[self.facilities.get(facility, self.level)]


def _check_level(key: str, value: object) -> None:
    if type(value) is not str or value not in LOG_LEVELS:
        raise ConfigError(
            f"{key} is {_show(value)} but must be one of {', '.join(LOG_LEVELS)}",
            key=key,
            value=value,
        )


def _check_known(key: object, allowed: tuple[str, ...], prefix: str) -> str:
    """Return ``key`` if it is one of ``allowed``; else a ConfigError naming it (and a close match)."""
    if type(key) is not str:
        raise ConfigError(f"key {_show(key)} in {prefix[:-1] or 'the file'} is not a string")
    if key not in allowed:
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean {close[0]}?" if close else f"expected one of {', '.join(allowed)}"
        shown = key if key.isprintable() and len(key) <= 60 else _show(key)
        raise ConfigError(f"unknown key {prefix}{shown}; {hint}", key=prefix + key, value=key)
    return key


STORAGE_KINDS = ("sim-device", "gateway")
MIN_FS_SECTORS = 16


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """``[storage]``: where the agent writes the image (``otakit agent run`` needs it).

    - ``kind = "sim-device"``: ``path`` is a simulated device folder (``otakit sim create``):
      the image goes to its secondary slot; after a reboot the agent confirms the new image
      when ``confirm`` is true, as a healthy application would.
    - ``kind = "gateway"`` (protocols.md §7): ``path`` is the gateway's external flash, a file
      of ``fs_size`` bytes holding a littlefs file system (created on first use); the MCU is
      programmed by ``program`` (a command, ``{file}`` and ``{version}`` replaced) or, for a
      simulated MCU, into the device folder ``mcu``. Exactly one of them.

    Raises:
        ConfigError: an unknown kind, a missing or misplaced key, or a bad size.
    """

    path: Path
    kind: str = "sim-device"
    confirm: bool = True
    fs_size: int = 4 * 1024 * 1024
    sector_size: int = 4096
    mcu: Path | None = None
    program: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if type(self.kind) is not str or self.kind not in STORAGE_KINDS:
            raise ConfigError(
                f"storage.kind is {_show(self.kind)} but must be one of {', '.join(STORAGE_KINDS)}",
                key="storage.kind",
                value=self.kind,
            )
        _check_path("storage.path", self.path)
        _check_bool("storage.confirm", self.confirm)
        _check_int("storage.sector_size", self.sector_size, 128, 1024 * 1024, " bytes")
        _check_int(
            "storage.fs_size",
            self.fs_size,
            MIN_FS_SECTORS * self.sector_size,
            1 << 40,
            f" bytes ({MIN_FS_SECTORS} sectors or more)",
        )
        if self.fs_size % self.sector_size:
            raise ConfigError(
                f"storage.fs_size {self.fs_size} is not a multiple of storage.sector_size "
                f"{self.sector_size}",
                key="storage.fs_size",
                value=self.fs_size,
            )
        if not isinstance(self.program, tuple) or not all(
            type(arg) is str and arg for arg in self.program
        ):
            raise ConfigError(
                f"storage.program must be a list of non-empty strings, not {_show(self.program)}",
                key="storage.program",
                value=self.program,
            )
        if self.mcu is not None:
            _check_path("storage.mcu", self.mcu)
        if self.kind == "gateway" and (self.mcu is None) == (not self.program):
            raise ConfigError(
                "a gateway needs exactly one of storage.program (a command) and storage.mcu "
                "(a simulated MCU folder)",
                key="storage.program",
            )
        if self.kind != "gateway" and (self.mcu is not None or self.program):
            raise ConfigError(
                'storage.mcu and storage.program are for kind = "gateway"', key="storage.kind"
            )


MAX_TOPIC_BYTES = 256  # the original device's topic buffer (protocols.md §1)


@dataclass(frozen=True, kw_only=True)
class MqttConfig:
    """``[mqtt]``: the broker of the MQTT transport and its patience (protocols.md §3).

    TLS is used when ``tls`` is true or ``ca_file``/``client_cert`` is given (ports 8883 and
    8884 by convention); ``ca_file`` replaces the system CAs. ``company`` is the first topic
    level; ``app_prefix`` names the board ``APP_<board>`` on topics, as the original devices
    do. ``chunk_timeout`` is how long to wait for a new chunk before asking again for what is
    missing, ``request_tries`` how many times in a row, ``result_timeout`` how long to wait for
    "Result Received". The job and data timeouts are ``[timing]``'s.

    Raises:
        ConfigError: a value of the wrong type or out of range, a broker that is not a host
            name, a company that is not one topic level, ``client_key`` without ``client_cert``.
    """

    broker: str
    port: int = 1883
    tls: bool = False
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    company: str = "OTAUpdate"
    app_prefix: bool = True
    keepalive: int = 60
    chunk_timeout: float = 10
    request_tries: int = 3
    result_timeout: float = 5

    PATHS: ClassVar[tuple[str, ...]] = ("ca_file", "client_cert", "client_key")

    def __post_init__(self) -> None:
        broker = _check_text("mqtt.broker", self.broker, limit=MAX_VALUE_BYTES["Broker"])
        if any(c.isspace() or c in "/[]@" for c in broker):
            raise ConfigError(
                f"mqtt.broker {broker!r} must be a host name or address, not a URL",
                key="mqtt.broker",
                value=broker,
            )
        _check_int("mqtt.port", self.port, 1, 65535)
        _check_bool("mqtt.tls", self.tls)
        for name in self.PATHS:
            if getattr(self, name) is not None:
                _check_path(f"mqtt.{name}", getattr(self, name))
        if self.client_key is not None and self.client_cert is None:
            raise ConfigError(
                "mqtt.client_key is given without mqtt.client_cert", key="mqtt.client_key"
            )
        company = _check_text("mqtt.company", self.company, limit=MAX_TOPIC_BYTES // 2)
        if any(c in "/+#" for c in company):
            raise ConfigError(
                f"mqtt.company {company!r} must be one topic level (no /, + or #)",
                key="mqtt.company",
                value=company,
            )
        _check_bool("mqtt.app_prefix", self.app_prefix)
        _check_int("mqtt.keepalive", self.keepalive, 1, 65535, " s")
        for name in ("chunk_timeout", "result_timeout"):
            _check_seconds(f"mqtt.{name}", getattr(self, name), 0, MAX_TIMEOUT_S, above=True)
        _check_int("mqtt.request_tries", self.request_tries, 0, MAX_RETRIES)

    @property
    def secure(self) -> bool:
        """Whether the connection uses TLS."""
        return self.tls or self.ca_file is not None or self.client_cert is not None


# --- the whole file ----------------------------------------------------------------------------

_AGENT_PATHS = ("token_file", "ca_file", "client_cert", "client_key")
_AGENT_KEYS = (
    "server",
    "token",
    *_AGENT_PATHS,
    "flow",
    "job_path",
    "file_path",
    "transport",
    "trusted_origins",
    "allow_insecure_redirects",
)
_SECTIONS = ("agent", "identity", "timing", "behaviour", "logging", "storage", "mqtt")
TRANSPORTS = ("http", "mqtt", "checkin")


@dataclass(frozen=True, kw_only=True)
class AgentConfig:
    """The agent's whole configuration: ``[agent]`` as fields, the other tables as dataclasses.

    ``server`` is the base URL (``http`` or ``https``, optional port and path prefix); the job
    is at ``server + job_path`` (job flow), the image at ``server + file_path`` (direct flow).
    ``token`` or ``token_file`` (not both) authenticates to an otakit server; ``ca_file``
    replaces the system CAs and ``client_cert``/``client_key`` present a client certificate
    (HTTPS only). The token and the client certificate go only to ``server``'s origin and to
    ``trusted_origins``; other hosts a job names are asked without them, and a plain-HTTP one
    for an HTTPS ``server`` is refused unless ``allow_insecure_redirects``. ``transport`` says
    which transport asks for the job: ``"http"`` (the server's job document), ``"checkin"``
    (the otakit server's JSON check-in API, which offers delta updates; a simulated device) or
    ``"mqtt"`` (the ``[mqtt]`` broker; ``server`` is then optional). Jobs for the other
    transport are followed when it is configured (HTTP(S) jobs always are).

    Raises:
        ConfigError: a field is invalid (see each table's class), both ``token`` and
            ``token_file`` are given, ``client_key`` is given without ``client_cert``, TLS
            files are given for an ``http://`` server, ``server`` is missing for the HTTP
            transport or ``[mqtt]`` for the MQTT one.
    """

    identity: Identity
    server: str | None = None
    transport: str = "http"
    token: str | None = None
    token_file: Path | None = None
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    flow: str = "job"
    job_path: str = "/ota_update.json"
    file_path: str = "/ota-update.bin"
    trusted_origins: tuple[str, ...] = ()
    allow_insecure_redirects: bool = False
    timing: Timing = field(default_factory=Timing)
    behaviour: Behaviour = field(default_factory=Behaviour)
    logging: LogConfig = field(default_factory=LogConfig)
    storage: StorageConfig | None = None
    mqtt: MqttConfig | None = None

    def __post_init__(self) -> None:
        if type(self.transport) is not str or self.transport not in TRANSPORTS:
            raise ConfigError(
                f"agent.transport is {_show(self.transport)} but must be one of "
                f"{', '.join(TRANSPORTS)}",
                key="agent.transport",
                value=self.transport,
            )
        if self.mqtt is not None and not isinstance(self.mqtt, MqttConfig):
            raise ConfigError(f"mqtt must be an MqttConfig, not {_show(self.mqtt)}", key="mqtt")
        if self.transport == "mqtt" and self.mqtt is None:
            raise ConfigError(
                'agent.transport is "mqtt" but there is no [mqtt] table (mqtt.broker ...)',
                key="agent.transport",
            )
        if self.server is not None:
            _check_server("agent.server", self.server)
        elif self.transport in ("http", "checkin"):
            raise ConfigError("missing required key agent.server", key="agent.server")
        if self.token is not None:
            _check_text("agent.token", self.token)
        for name in _AGENT_PATHS:
            if getattr(self, name) is not None:
                _check_path(f"agent.{name}", getattr(self, name))
        if type(self.flow) is not str or self.flow not in FLOWS:
            raise ConfigError(
                f"agent.flow is {_show(self.flow)} but must be one of {', '.join(FLOWS)}",
                key="agent.flow",
                value=self.flow,
            )
        _check_url_path("agent.job_path", self.job_path)
        _check_url_path("agent.file_path", self.file_path)
        _check_bool("agent.allow_insecure_redirects", self.allow_insecure_redirects)
        _check_origins(
            "agent.trusted_origins",
            self.trusted_origins,
            self.server,
            self.allow_insecure_redirects,
        )
        object.__setattr__(self, "trusted_origins", tuple(self.trusted_origins))  # a TOML list
        for name, kind in (
            ("identity", Identity),
            ("timing", Timing),
            ("behaviour", Behaviour),
            ("logging", LogConfig),
        ):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(
                    f"{name} must be of type {kind.__name__}, not {_show(getattr(self, name))}",
                    key=name,
                )
        if self.storage is not None and not isinstance(self.storage, StorageConfig):
            raise ConfigError(f"storage must be a StorageConfig, not {_show(self.storage)}")
        if self.storage is not None and self.storage.kind == "gateway" and self.flow != "job":
            raise ConfigError(
                'a gateway takes its jobs from check-ins: agent.flow must be "job"',
                key="agent.flow",
            )
        if self.storage is not None and self.storage.kind == "gateway" and self.transport != "http":
            raise ConfigError(
                'a gateway takes its jobs from check-ins: agent.transport must be "http"',
                key="agent.transport",
            )
        if self.token is not None and self.token_file is not None:
            raise ConfigError(
                "agent.token and agent.token_file are both given; keep one", key="agent.token"
            )
        if self.client_key is not None and self.client_cert is None:
            raise ConfigError(
                "agent.client_key is given without agent.client_cert", key="agent.client_key"
            )
        if self.server is not None and self.server.startswith("http:"):
            for name in ("ca_file", "client_cert"):
                if getattr(self, name) is not None:
                    raise ConfigError(
                        f"agent.{name} is only used with an https:// server, "
                        f"and agent.server is {self.server!r}",
                        key=f"agent.{name}",
                    )

    # --- reading and writing ---

    @classmethod
    def from_dict(
        cls, data: Mapping[str, Any], *, base_dir: str | os.PathLike[str] | None = None
    ) -> AgentConfig:
        """Build a config from the parsed TOML tables (the :meth:`to_dict` form).

        Relative file paths (``token_file``, ``ca_file``, ``client_cert``, ``client_key``) are
        resolved against ``base_dir`` when it is given.

        Raises:
            ConfigError: an unknown or missing required key, or any invalid value.
        """
        tables = _table(data, "")
        agent = _table(tables.get("agent", {}), "agent.")
        identity = _table(tables.get("identity", {}), "identity.")
        logging = _table(tables.get("logging", {}), "logging.")
        for name in tables:
            _check_known(name, _SECTIONS, "")
        for name in agent:
            _check_known(name, _AGENT_KEYS, "agent.")
        if "server" not in agent and agent.get("transport", "http") == "http":
            raise ConfigError("missing required key agent.server", key="agent.server")
        for name in identity:
            _check_known(name, tuple(Identity.JOB_KEYS), "identity.")
        for name in Identity.REQUIRED:
            if name not in identity:
                raise ConfigError(f"missing required key identity.{name}", key=f"identity.{name}")
        timing = _known_table(tables, "timing", Timing)
        behaviour = _known_table(tables, "behaviour", Behaviour)
        for name in logging:
            _check_known(name, ("level", "facilities"), "logging.")
        if "facilities" in logging:
            _table(logging["facilities"], "logging.facilities.")

        storage = None
        if "storage" in tables:
            table = dict(_known_table(tables, "storage", StorageConfig))
            if "path" not in table:
                raise ConfigError("missing required key storage.path", key="storage.path")
            table |= _paths(table, ("path", "mcu"), "storage", base_dir)
            if isinstance(table.get("program"), list):
                table["program"] = tuple(table["program"])
            storage = StorageConfig(**table)
        mqtt = None
        if "mqtt" in tables:
            table = dict(_known_table(tables, "mqtt", MqttConfig))
            if "broker" not in table:
                raise ConfigError("missing required key mqtt.broker", key="mqtt.broker")
            table |= _paths(table, MqttConfig.PATHS, "mqtt", base_dir)
            mqtt = MqttConfig(**table)
        return cls(
            **{**agent, **_paths(agent, _AGENT_PATHS, "agent", base_dir)},
            identity=Identity(**identity),
            timing=Timing(**timing),
            behaviour=Behaviour(**behaviour),
            logging=LogConfig(**logging),
            storage=storage,
            mqtt=mqtt,
        )

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str]) -> AgentConfig:
        """Read a TOML config file; relative file paths in it count from the file's folder.

        Raises:
            InputFileError: the file is missing or unreadable.
            ConfigError: the file is not UTF-8 TOML or the config in it is invalid; the
                message starts with the file's path.
        """
        raw = read_input(path, what="agent config")
        try:
            data = tomllib.loads(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not a UTF-8 text file", value=str(path)) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}", value=str(path)) from None
        try:
            return cls.from_dict(data, base_dir=Path(path).absolute().parent)
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc.message}", key=exc.key, value=exc.value) from None

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """The TOML tables of this config; :meth:`from_dict` of it gives an equal config.

        Keys that are not set (``token``...), empty ``logging.facilities`` and the default
        ``agent.transport`` are left out.
        """
        agent: dict[str, Any] = {} if self.server is None else {"server": self.server}
        if self.transport != "http":
            agent["transport"] = self.transport
        if self.token is not None:
            agent["token"] = self.token
        for name in _AGENT_PATHS:
            if getattr(self, name) is not None:
                agent[name] = str(getattr(self, name))
        agent |= {"flow": self.flow, "job_path": self.job_path, "file_path": self.file_path}
        if self.trusted_origins:
            agent["trusted_origins"] = list(self.trusted_origins)
        if self.allow_insecure_redirects:
            agent["allow_insecure_redirects"] = True
        identity = {name: getattr(self.identity, name) for name in Identity.JOB_KEYS}
        logging: dict[str, Any] = {"level": self.logging.level}
        if self.logging.facilities:
            logging["facilities"] = dict(self.logging.facilities)
        tables: dict[str, dict[str, Any]] = {
            "agent": agent,
            "identity": identity,
            "timing": {f.name: getattr(self.timing, f.name) for f in fields(self.timing)},
            "behaviour": {f.name: getattr(self.behaviour, f.name) for f in fields(self.behaviour)},
            "logging": logging,
        }
        if self.storage is not None:
            storage = {f.name: getattr(self.storage, f.name) for f in fields(self.storage)}
            tables["storage"] = {
                key: str(value)
                if isinstance(value, Path)
                else list(value)
                if isinstance(value, tuple)
                else value
                for key, value in storage.items()
                if value is not None and value != ()
            }
        if self.mqtt is not None:
            mqtt = {f.name: getattr(self.mqtt, f.name) for f in fields(self.mqtt)}
            tables["mqtt"] = {
                key: str(value) if isinstance(value, Path) else value
                for key, value in mqtt.items()
                if value is not None
            }
        return tables

    def to_toml(self) -> str:
        """This config as a TOML file that :meth:`from_toml` reads back equal.

        Relative paths are written as they are, so they count from the folder the file is
        written to.
        """
        lines: list[str] = []
        for section, table in self.to_dict().items():
            _emit_table(lines, section, table)
        return "\n".join(lines) + "\n"

    # --- derived values ---

    def url(self, path: str) -> str:
        """The URL of ``path`` (``/...``) on the configured server.

        Raises:
            ConfigError: no ``agent.server`` is configured (an MQTT-only agent).
        """
        if self.server is None:
            raise ConfigError("agent.server is not set", key="agent.server")
        return self.server.rstrip("/") + path

    @property
    def job_url(self) -> str:
        return self.url(self.job_path)

    @property
    def file_url(self) -> str:
        return self.url(self.file_path)

    def load_token(self) -> str | None:
        """The bearer token: ``token``, else ``token_file``'s stripped contents, else None.

        Raises:
            InputFileError: the token file is missing or unreadable.
            ConfigError: the token file is empty or not a one-line UTF-8 token.
        """
        if self.token_file is None:
            return self.token
        raw = read_input(self.token_file, what="token file")
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError:
            raise ConfigError(
                f"token file {self.token_file} is not UTF-8 text", key="agent.token_file"
            ) from None
        try:
            return _check_text(f"token file {self.token_file}", text)
        except ConfigError as exc:
            raise ConfigError(exc.message, key="agent.token_file") from None


def _paths(
    table: Mapping[str, Any],
    names: tuple[str, ...],
    section: str,
    base_dir: str | os.PathLike[str] | None,
) -> dict[str, Path]:
    """The file paths among ``names`` in ``table``, relative ones resolved against ``base_dir``."""
    paths: dict[str, Path] = {}
    for name in names:
        if name in table:
            value = table[name]
            if type(value) is not str or not value:
                _check_text(f"{section}.{name}", value)  # raises: wrong type or empty
            path = Path(value)
            paths[name] = Path(base_dir, path) if base_dir is not None else path
    return paths


def _table(value: object, prefix: str) -> Mapping[str, Any]:
    """``value`` as a table of string keys; ConfigError if it is not one."""
    if not isinstance(value, Mapping):
        where = f"[{prefix[:-1]}]" if prefix else "the configuration"
        raise ConfigError(
            f"{where} must be a table, not {_type_name(value)} ({_show(value)})",
            key=prefix[:-1] or None,
            value=value,
        )
    for key in value:
        if type(key) is not str:
            raise ConfigError(
                f"key {_show(key)} in {prefix[:-1] or 'the file'} is not a string", value=key
            )
    return value


def _known_table(tables: Mapping[str, Any], name: str, kind: type[Any]) -> Mapping[str, Any]:
    """Table ``name`` (empty if absent) checked to hold only the fields of dataclass ``kind``."""
    table = _table(tables.get(name, {}), f"{name}.")
    allowed = tuple(f.name for f in fields(kind))
    for key in table:
        _check_known(key, allowed, f"{name}.")
    return table


# --- TOML output -------------------------------------------------------------------------------


def _emit_table(lines: list[str], name: str, table: Mapping[str, Any]) -> None:
    if lines:
        lines.append("")
    lines.append(f"[{name}]")
    nested = []
    for key, value in table.items():
        if isinstance(value, Mapping):
            nested.append((key, value))
        else:
            lines.append(f"{key} = {_toml_value(value)}")
    for key, value in nested:
        _emit_table(lines, f"{name}.{key}", value)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # finite (checked); repr is valid TOML and reads back exact
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    raise TypeError(f"no TOML form for {value!r}")  # pragma: no cover - to_dict gives none


def _toml_string(text: str) -> str:
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif (char < " " and char != "\t") or char == "\x7f":
            out.append(f"\\u{ord(char):04x}")
        else:
            out.append(char)
    return '"' + "".join(out) + '"'
