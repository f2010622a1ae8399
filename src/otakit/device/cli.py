"""``otakit agent``: the OTA agent of a Linux device or gateway."""

from __future__ import annotations

from pathlib import Path
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
        from otakit.device.run import run as run_agent

        def say(line: str) -> None:
            err.print(line, markup=False)

        status = run_agent(config_file, once=once, simulator=simulator, say=say)
        if status:
            raise typer.Exit(status)

    return app
