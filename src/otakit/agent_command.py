"""``otakit-agent``: the device agent alone, for a gateway's service manager.

``otakit-agent --config FILE [--once]`` does what ``otakit agent run`` does (the same
configuration, logs and exit statuses: :func:`otakit.device.run.run` is the code of both)
without loading the rest of the ``otakit`` command line: no Typer command tree, no image, server
or host commands. It idles in less memory (bench/agent_idle.py measures both), so the systemd
unit packaging/otakit-agent.service starts it.

Exit status: 0 (an update installed, none offered, or stopped by SIGTERM/SIGINT), 1 (``--once``
and the attempt failed), 2 (bad arguments or configuration), each error one line on stderr.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from otakit import __version__
from otakit.errors import EXIT_USAGE, OtakitError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """A usage error as one line, like every otakit error."""
        self.exit(EXIT_USAGE, f"otakit: error [BADARG]: {message} (otakit-agent --help)\n")


def parser() -> argparse.ArgumentParser:
    """The command line of ``otakit-agent``."""
    p = _Parser(
        prog="otakit-agent",
        description="The OTA agent of a Linux device or gateway (what `otakit agent run` does, "
        "without the rest of the otakit command line). See docs/device.md.",
    )
    p.add_argument(
        "-c",
        "--config",
        type=Path,
        required=True,
        metavar="FILE",
        help="agent configuration (TOML)",
    )
    p.add_argument("--once", action="store_true", help="one check now, then exit (1 if it failed)")
    p.add_argument("--version", action="version", version=f"otakit-agent {__version__}")
    return p


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    """The ``otakit-agent`` console script."""
    args = parser().parse_args(argv)
    # the simulated parts a configuration may name (a sim-device, a simulated MCU); the device
    # layer never imports the simulator itself
    from otakit.device.run import run
    from otakit.sim.agent import SIMULATOR

    try:
        return run(args.config, once=args.once, simulator=SIMULATOR, say=_say)
    except OtakitError as exc:
        _say(f"otakit: error [{exc.code}]: {exc.message}")
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
