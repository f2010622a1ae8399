"""``otakit sim serve-smp``: a simulated device that answers SMP (mcumgr) requests.

The device folder's flash is opened for as long as the server runs; a reset request runs the
simulated bootloader (as ``otakit sim boot`` does), so the next image state read shows the
swapped image, active and not yet confirmed. The upload's resume journal is the one the OTA
agent keeps for the same slot (``agent-journal.json`` for image 0, ``agent-journal-N.json``
for image N): one record of what the secondary slot holds, whoever writes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console

from otakit.errors import UsageError
from otakit.extras import require

if TYPE_CHECKING:
    from otakit.device.journal import Journal
    from otakit.device.transports.smp import SmpServer

err = Console(stderr=True, highlight=False, soft_wrap=True)


def _port(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise UsageError(f"--port {text!r} is not a whole number", value=text) from None
    if not 0 <= value <= 65535:
        raise UsageError(f"--port {value} is not from 0 to 65535", value=value)
    return value


def journal_for(directory: Path, image: int) -> Journal:
    """The resume journal of image ``image``'s secondary slot, shared with the OTA agent."""
    from otakit.device.journal import Journal
    from otakit.sim.agent import JOURNAL_FILE

    name = Path(JOURNAL_FILE)
    return Journal(directory / (str(name) if image == 0 else f"{name.stem}-{image}{name.suffix}"))


@contextmanager
def sim_smp_server(directory: Path) -> Iterator[SmpServer]:
    """An SMP server for the simulated device in ``directory``, its flash open for the block.

    Raises DeviceError when the folder is not a simulated device, MissingExtraError without the
    ``sim`` extra (smp).
    """
    require("sim", "otakit sim serve-smp")
    from otakit.device.transports.smp import SmpConfig, SmpServer
    from otakit.sim.device import SimDevice

    device = SimDevice(directory)

    def reset() -> None:
        report = device.boot()
        for image in report.result.images if report.result else ():
            running = "nothing" if image.version is None else str(image.version)
            reason = f" ({image.error}: {image.reason})" if image.reason else ""
            err.print(f"reset: image {image.image} {image.action}, running {running}{reason}")

    identity = device.state.identity
    config = SmpConfig(node_name=identity.serial, board=identity.board)
    with device.bootloader() as boot:
        yield SmpServer(
            boot, journal=lambda image: journal_for(device.dir, image), reset=reset, config=config
        )


def serve_smp(
    directory: Annotated[Path, typer.Argument(help="Device folder.", show_default=False)],
    port: Annotated[
        str, typer.Option("--port", help="UDP port; 0 picks a free one (printed).")
    ] = "1337",
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    pty: Annotated[
        bool,
        typer.Option(
            "--pty", help="Also answer SMP console framing on a new pseudo-terminal (printed)."
        ),
    ] = False,
) -> None:
    """Answer SMP (mcumgr) over UDP: image state, upload, test, confirm, erase, reset.

    Prints "listening on udp://HOST:PORT" once ready; stops on Ctrl-C or SIGTERM.
    """
    import asyncio
    import logging
    import signal
    import sys

    number = _port(port)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    for name in ("otakit.smp", "otakit.storage"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False

    async def main(server: SmpServer) -> None:
        from otakit.device.transports.smp import PtyConsole, open_udp

        try:
            transport = await open_udp(server, host, number)
        except OSError as exc:
            raise UsageError(
                f"cannot listen on udp://{host}:{number}: {exc.strerror or exc}", value=number
            ) from None
        console = None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            bound_host, bound_port = transport.get_extra_info("sockname")[:2]
            shown = f"[{bound_host}]" if ":" in bound_host else bound_host
            if pty:
                try:
                    console = PtyConsole(server)
                except (ImportError, OSError) as exc:
                    raise UsageError(f"--pty: cannot open a pseudo-terminal: {exc}") from None
                err.print(f"listening on serial:{console.path}")
            err.print(f"listening on udp://{shown}:{bound_port}")
            await stop.wait()
        finally:
            if console is not None:
                console.close()
            transport.close()

    with sim_smp_server(directory) as server:
        asyncio.run(main(server))
    err.print("stopped")
