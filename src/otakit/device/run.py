"""Running the agent of a configuration file until stopped: the code of both ``otakit agent run``
(:mod:`otakit.device.cli`) and ``otakit-agent`` (:mod:`otakit.agent_command`)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from otakit.device.service import Simulator


def run(
    config_file: Path,
    *,
    once: bool,
    simulator: Simulator | None,
    say: Callable[[str], None],
) -> int:
    """Run the agent of ``config_file`` until SIGINT or SIGTERM (with ``once``: one attempt now)
    and return the exit status; ``say`` prints the outcome's line (stderr).

    Raises:
        OtakitError: the configuration is invalid or names parts that cannot be opened.
    """
    from otakit.device.agent import Outcome
    from otakit.device.config import AgentConfig
    from otakit.device.service import AgentService, configure_logging

    config = AgentConfig.from_toml(config_file)
    configure_logging(config.logging)
    service = AgentService(config, simulator=simulator)
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = signal.signal(signal.SIGTERM, on_signal)
    try:
        result = service.run(stop, once=once)
    except KeyboardInterrupt:
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
    if result is None:
        return 0
    if result.outcome is Outcome.UPDATED:
        say(f"updated to {result.version}")
    elif result.outcome is Outcome.NO_UPDATE:
        say("no update")
    else:
        say(f"otakit: error [{result.error}]: {result.message}")
        if once:
            return 1
    return 0
