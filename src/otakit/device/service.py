"""``otakit agent run``: the agent of a Linux device or gateway, built from its TOML config.

The ``[storage]`` table says what is updated:

- ``sim-device``: a simulated MCUboot device folder. Each attempt is one run of the simulated
  device's agent (:func:`otakit.sim.agent.run`, handed over as a :class:`Simulator`): job document or direct flow over HTTP(S) or,
  with ``[mqtt]`` and ``agent.transport = "mqtt"``, over MQTT (an MQTT job from the HTTP server
  is followed when ``[mqtt]`` is there, an HTTP(S) job from the MQTT publisher always),
  resumable download into the secondary slot, verify, pending, then, with
  ``reboot_upon_completion``, the simulated bootloader swaps and the agent confirms.
- ``gateway`` (protocols.md §7): the image is downloaded into littlefs on the gateway's flash
  file, checked against its SHA-256 and programmed into the attached MCU (a flasher command, or
  with ``storage.mcu`` a simulated MCU, again from the :class:`Simulator`); jobs come from the
  device JSON API (:class:`CheckinTransport`), reports are §7's ``extFwInfo``.

The device layer never imports the simulator (:mod:`otakit.sim`): whoever builds the service
(``otakit agent run``, tests) passes ``simulator=otakit.sim.agent.SIMULATOR`` when the
configuration names simulated parts.

Attempts follow the ``[timing]`` table (:func:`otakit.device.agent.poll`). Logging goes to
stderr, one level per facility (``[logging]``); URLs are logged without their query (signed
URLs carry a credential) and tokens never, so httpx's own request lines (whole URLs) stay off.
The token and client certificate go only to ``agent.server``'s origin and
``agent.trusted_origins`` (:meth:`HttpSettings.credentials_for`).
"""

from __future__ import annotations

import logging
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Protocol, TextIO

from otakit.device.agent import RETRY_FILE, Flow, Result, RetryState, poll, update_once
from otakit.device.config import (
    LOG_FACILITIES,
    AgentConfig,
    ConfigError,
    LogConfig,
    StorageConfig,
)
from otakit.device.events import Answer, Callback, Event, Reason, State
from otakit.device.flash import Flash
from otakit.device.gateway import (
    CommandProgrammer,
    ExternalProgrammer,
    GatewayStorage,
    LittleFsStore,
    ReadableProgrammer,
)
from otakit.device.transports.checkin import CheckinTransport
from otakit.device.transports.http import HttpSettings
from otakit.device.transports.mqtt import MqttSettings
from otakit.errors import FileOperationError

log = logging.getLogger("otakit.agent")

TOKEN_FILE = "/device-token"  # in the gateway's littlefs, next to the firmware file
GATEWAY_RETRY_FILE = "/retry-state.json"  # the retry policy's failures per artifact, littlefs


def configure_logging(config: LogConfig, stream: TextIO | None = None) -> None:
    """Send otakit's logs to ``stream`` (stderr) with the level of each facility."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger("otakit")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.propagate = False
    root.setLevel(config.level_for(""))
    for facility in LOG_FACILITIES:
        logging.getLogger(f"otakit.{facility}").setLevel(config.level_for(facility))
    # httpx logs one INFO line per request with the whole URL, whose query may be a credential
    # (signed URLs): never; the http facility logs each request's path at debug instead
    library = logging.getLogger("httpx")
    library.setLevel(logging.WARNING)
    for old in list(library.handlers):
        library.removeHandler(old)
    library.addHandler(handler)
    library.propagate = False


def http_settings(config: AgentConfig) -> HttpSettings:
    """The HTTP transport's settings from ``[agent]`` and ``[timing]``."""
    timing = config.timing

    def text(value: object) -> str | None:
        return None if value is None else str(value)

    return HttpSettings(
        server=config.server or "",  # MQTT-only: HTTP(S) jobs name their server
        token=config.load_token(),
        ca_file=text(config.ca_file),
        client_cert=text(config.client_cert),
        client_key=text(config.client_key),
        job_path=config.job_path,
        file_path=config.file_path,
        chunk_size=timing.chunk_size,
        timeout=timing.http_timeout,
        job_timeout=timing.job_timeout,
        data_timeout=timing.data_timeout,
        connect_retries=timing.connect_retries,
        download_tries=timing.download_tries,
        trusted_origins=config.trusted_origins,
        allow_insecure_redirects=config.allow_insecure_redirects,
    )


def mqtt_settings(config: AgentConfig) -> MqttSettings | None:
    """The MQTT transport's settings from ``[mqtt]`` and ``[timing]``; None without ``[mqtt]``."""
    mqtt = config.mqtt
    if mqtt is None:
        return None
    timing = config.timing

    def text(value: object) -> str | None:
        return None if value is None else str(value)

    return MqttSettings(
        host=mqtt.broker,
        port=mqtt.port,
        tls=mqtt.tls,
        ca_file=text(mqtt.ca_file),
        client_cert=text(mqtt.client_cert),
        client_key=text(mqtt.client_key),
        company=mqtt.company,
        app_prefix=mqtt.app_prefix,
        keepalive=mqtt.keepalive,
        job_timeout=timing.job_timeout,
        chunk_timeout=mqtt.chunk_timeout,
        request_tries=mqtt.request_tries,
        result_timeout=mqtt.result_timeout,
        data_timeout=timing.data_timeout,
    )


def log_event(event: Event) -> Answer | None:
    """The default callback: every state to the ``agent`` facility, progress by tenths."""
    if event.reason is Reason.FAILURE:
        log.error("%s failed: [%s] %s", event.state, event.error, event.message)
    elif event.state is State.STORAGE_WRITE:
        if event.percentage is not None and event.bytes_done is not None:
            previous = (event.bytes_done - 1) * 100 // event.total if event.total else -1
            if event.percentage // 10 != max(previous, 0) // 10 or event.percentage == 100:
                log.info("downloaded %d%% (%s bytes)", event.percentage, event.bytes_done)
    elif event.reason is Reason.SUCCESS:
        log.info("%s: %s", event.state, event.message or "")
    else:
        log.debug("%s", event.state)
    return None


class Simulator(Protocol):
    """The simulated parts a configuration may name: a simulated device to update
    (``kind = "sim-device"``) and a simulated MCU behind a gateway (``storage.mcu``).

    The simulator provides them (:data:`otakit.sim.agent.SIMULATOR`); the device layer only
    knows this interface.
    """

    def device_attempt(self, service: AgentService) -> Result:
        """One update attempt on the simulated device folder ``service.storage_config.path``,
        with the service's settings and callback."""
        ...

    def mcu_programmer(self, path: Path) -> ReadableProgrammer:
        """The programmer of the simulated MCU in the device folder ``path``."""
        ...


class AgentService:
    """The configured agent: :meth:`attempt` runs one update attempt, :meth:`run` polls.

    ``simulator`` gives the simulated parts the configuration names (``kind = "sim-device"``,
    ``storage.mcu``). Raises :class:`~otakit.device.config.ConfigError` when there is no
    ``[storage]`` table, or when it names simulated parts and no ``simulator`` is given.
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        callback: Callback | None = None,
        simulator: Simulator | None = None,
    ) -> None:
        if config.storage is None:
            raise ConfigError(
                "the configuration has no [storage] table: say what to update "
                '(kind = "sim-device" or "gateway", path = ...)',
                key="storage",
            )
        simulated = "storage.mcu" if config.storage.mcu is not None else None
        if config.storage.kind == "sim-device":
            simulated = "storage.kind"
        if simulated is not None and simulator is None:
            raise ConfigError(
                f"{simulated} names a simulated part, and this agent was built without the "
                "simulator: run it with `otakit agent run`",
                key=simulated,
            )
        self.simulator = simulator
        self.config = config
        self.storage_config: StorageConfig = config.storage
        self.callback = callback if callback is not None else log_event
        self.settings = http_settings(config)
        self.mqtt = mqtt_settings(config)
        self._gateway: tuple[GatewayStorage, CheckinTransport] | None = None
        self._gateway_retry: RetryState | None = None
        self._device_retry: RetryState | None = None

    # --- attempts ------------------------------------------------------------------------------

    def attempt(self) -> Result:
        """One update attempt on the configured storage."""
        if self.storage_config.kind == "gateway":
            return self._gateway_attempt()
        return self._device_attempt()

    def run(self, stop: threading.Event, *, once: bool = False) -> Result | None:
        """Poll with ``[timing]`` until ``stop`` is set; with ``once``, one attempt now."""
        try:
            if once:
                return self.attempt()
            return poll(self.attempt, timing=self.config.timing, stop=stop)
        finally:
            self.close()

    def close(self) -> None:
        if self._gateway is not None:
            storage, transport = self._gateway
            transport.close()
            storage.store.unmount()
            storage.store.flash.close()
            self._gateway = None

    # --- a simulated MCUboot device ------------------------------------------------------------

    def _device_attempt(self) -> Result:
        assert self.simulator is not None  # __init__ refuses a sim-device without it
        return self.simulator.device_attempt(self)

    @property
    def device_retry(self) -> RetryState:
        """The retry state of the simulated device (``update_once(retry=...)``), kept in its
        folder next to the agent's journal (:data:`otakit.device.agent.RETRY_FILE`)."""
        if self._device_retry is None:
            self._device_retry = RetryState.in_file(
                self.config.timing.retry_policy, Path(self.storage_config.path) / RETRY_FILE
            )
        return self._device_retry

    # --- a gateway and its MCU -----------------------------------------------------------------

    def _gateway_attempt(self) -> Result:
        storage, transport = self._open_gateway()
        behaviour = self.config.behaviour
        result = update_once(
            transport,
            storage,
            board=self.config.identity.board,
            version=storage.current_version,
            flow=Flow.JOB,
            validate_after_reboot=behaviour.validate_after_reboot,
            send_result=not behaviour.do_not_send_result,
            callback=self.callback,
            retry=self._gateway_retry,
        )
        if transport.aborted is not None and storage.progress() is not None:
            log.warning("the server aborted the update under way: %s", transport.aborted)
            storage.abort()  # the partial download will not be resumed
        return result

    def _open_gateway(self) -> tuple[GatewayStorage, CheckinTransport]:
        if self._gateway is not None:
            return self._gateway
        cfg = self.storage_config
        flash = Flash.open_file(cfg.path, cfg.fs_size, cfg.sector_size)
        store = LittleFsStore(flash)
        programmer: ExternalProgrammer
        version = self.config.identity.version
        if cfg.mcu is not None:
            assert self.simulator is not None  # __init__ refuses storage.mcu without it
            sim_mcu = self.simulator.mcu_programmer(cfg.mcu)
            programmer = sim_mcu
            running = sim_mcu.running()
            version = str(running) if running is not None else version
        else:
            programmer = CommandProgrammer(cfg.program)
        storage = GatewayStorage(store, current_version=version, programmer=programmer)
        stored = store.read(TOKEN_FILE).decode().strip() if store.size(TOKEN_FILE) else None
        settings = replace(self.settings, token=stored) if stored else self.settings

        def keep_token(token: str) -> None:
            try:
                store.write_file(TOKEN_FILE, token.encode())
            except FileOperationError as exc:
                log.error("cannot keep the device token: %s", exc.message)

        def load_retry() -> bytes | None:
            return store.read(GATEWAY_RETRY_FILE) if store.size(GATEWAY_RETRY_FILE) else None

        self._gateway_retry = RetryState(
            self.config.timing.retry_policy,
            load=load_retry,
            save=lambda data: store.write_file(GATEWAY_RETRY_FILE, data),
        )
        identity = self.config.identity
        transport = CheckinTransport(
            settings,
            identity={
                name: getattr(identity, name)
                for name in ("serial", "board", "product", "manufacturer", "manufacturer_id")
                if getattr(identity, name)
            },
            version=lambda: storage.current_version,
            reported=storage.status,
            on_token=keep_token,
        )
        self._gateway = (storage, transport)
        return self._gateway
