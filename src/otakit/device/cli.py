"""``otakit agent``: the OTA agent of a Linux device or gateway."""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

if TYPE_CHECKING:
    from otakit.device.service import Simulator

err = Console(stderr=True, highlight=False, soft_wrap=True)


def agent_app(simulator: Simulator | None = None) -> typer.Typer:
    """The ``otakit agent`` commands. ``simulator`` gives the simulated parts a configuration
    may name (``otakit.sim.agent.SIMULATOR``); the command line passes it in, since the device
    layer never imports the simulator."""
    app = typer.Typer(help="The OTA agent of a Linux device or gateway.", no_args_is_help=True)

    @app.command("run")
    def run(
        config_file: Annotated[
            Path,
            typer.Option("--config", "-c", help="Agent configuration (TOML).", show_default=False),
        ],
        once: Annotated[bool, typer.Option("--once", help="One check now, then exit.")] = False,
    ) -> None:
        """Check for updates and install them, as the configuration says (see docs/device.md).

        Runs until SIGINT or SIGTERM; with --once, makes one attempt at once and exits with
        status 1 if it failed.
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
            return
        finally:
            signal.signal(signal.SIGTERM, previous)
        if result is None:
            return
        if result.outcome is Outcome.UPDATED:
            err.print(f"updated to {result.version}")
        elif result.outcome is Outcome.NO_UPDATE:
            err.print("no update")
        else:
            err.print(f"otakit: error [{result.error}]: {result.message}", markup=False)
            if once:
                raise typer.Exit(1)

    return app
