"""``otakit sim``: simulated devices you can point at your own images."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Column, Table

from otakit.device.bootloader import Strategy
from otakit.device.flashmap import PRESETS, load_layout
from otakit.errors import UsageError
from otakit.files import read_input
from otakit.host.client import SERVER_ENV, TOKEN_ENV
from otakit.image.keys import PublicKey
from otakit.sim.device import DEFAULT_LAYOUT, Identity, SimDevice
from otakit.sim.fleet_cli import fleet
from otakit.sim.push_cli import serve_push
from otakit.sim.smp_cli import serve_smp

app = typer.Typer(
    help="Simulated devices: flash, flash map and an MCUboot-compatible bootloader in a folder.",
    no_args_is_help=True,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DeviceDir = Annotated[Path, typer.Argument(help="Device folder.", show_default=False)]


def _strategy(value: str | None) -> Strategy | None:
    if value is None:
        return None
    try:
        return Strategy(value)
    except ValueError:
        choices = ", ".join(s.value for s in Strategy)
        raise UsageError(f"unknown strategy {value!r}; choose {choices}", value=value) from None


@app.command()
def create(
    directory: DeviceDir,
    image: Annotated[Path, typer.Option("--image", help="Signed image for the primary slot.")],
    key: Annotated[
        list[Path],
        typer.Option("-k", "--key", help="Trusted key (PEM, public or private); repeatable."),
    ],
    layout: Annotated[
        str,
        typer.Option("--layout", help=f"Preset ({', '.join(PRESETS)}) or a flash map JSON file."),
    ] = DEFAULT_LAYOUT,
    strategy: Annotated[
        str | None,
        typer.Option(
            "--strategy",
            help="MCUboot mode: overwrite, swap-scratch, swap-move, swap-offset or swap-status "
            "(default: the layout's).",
        ),
    ] = None,
    allow_downgrade: Annotated[
        bool, typer.Option("--allow-downgrade", help="Let the bootloader accept older images.")
    ] = False,
    secure_image: Annotated[
        Path | None,
        typer.Option(
            "--secure-image",
            help="Signed image for image 1's primary slot (the secure image of the two-image "
            "layout; MCUboot upgrades no image of a multi-image device while one has none).",
        ),
    ] = None,
    board: Annotated[str, typer.Option("--board")] = Identity.board,
    product: Annotated[str, typer.Option("--product")] = Identity.product,
    serial: Annotated[str, typer.Option("--serial")] = Identity.serial,
    manufacturer: Annotated[str, typer.Option("--manufacturer")] = Identity.manufacturer,
) -> None:
    """Make a device folder with IMAGE in the primary slot (only public keys are kept)."""
    device = SimDevice.create(
        directory,
        read_input(image, what="image"),
        [PublicKey.load(k) for k in key],
        layout=load_layout(layout),
        identity=Identity(board, product, serial, manufacturer),
        strategy=_strategy(strategy),
        allow_downgrade=allow_downgrade,
        images=(
            {1: read_input(secure_image, what="secure image")} if secure_image is not None else None
        ),
    )
    err.print(
        f"created {directory}: layout {device.map.name}, {device.state.strategy} bootloader, "
        f"{len(device.keys)} trusted key(s)"
    )


@app.command()
def install(
    directory: DeviceDir,
    image: Annotated[Path, typer.Argument(help="Signed image.", show_default=False)],
    permanent: Annotated[
        bool, typer.Option("--permanent", help="Request a permanent upgrade (no test run).")
    ] = False,
    image_index: Annotated[int, typer.Option("--image-index", help="Image pair.")] = 0,
) -> None:
    """Verify IMAGE, write it to the secondary slot and mark it pending."""
    device = SimDevice(directory)
    verified = device.install(
        read_input(image, what="image"), image_index=image_index, permanent=permanent
    )
    kind = "permanent" if permanent else "test"
    err.print(f"installed {verified.version} in the secondary slot; {kind} upgrade at next boot")


@app.command()
def boot(
    directory: DeviceDir,
    power_cut_after: Annotated[
        int | None,
        typer.Option("--power-cut-after", help="Cut the power after N flash operations."),
    ] = None,
    tear: Annotated[
        bool, typer.Option("--tear", help="The interrupted write or erase is partly done.")
    ] = False,
) -> None:
    """Run the bootloader and print a JSON status. Exit 1 when no image can run."""
    if power_cut_after is not None and power_cut_after < 0:
        raise UsageError("--power-cut-after must be 0 or more", value=power_cut_after)
    report = SimDevice(directory).boot(power_cut_after=power_cut_after, tear=tear)
    out.print_json(json.dumps(report.to_dict()))
    if report.result is not None and not report.result.bootable:
        raise typer.Exit(1)


@app.command()
def confirm(
    directory: DeviceDir,
    image_index: Annotated[int, typer.Option("--image-index", help="Image pair.")] = 0,
) -> None:
    """Confirm the running image (what the application does once it is happy)."""
    written = SimDevice(directory).confirm(image_index)
    err.print("confirmed the running image" if written else "nothing to confirm")


@app.command()
def status(
    directory: DeviceDir,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show identity, versions in both slots, pending/testing state and the last failure."""
    data = SimDevice(directory).status()
    if as_json:
        out.print_json(json.dumps(data))
        return
    ident = data["identity"]
    out.print(
        f"[bold]{directory}[/bold]: {ident['manufacturer']} {ident['product']} "
        f"{ident['board']} serial {ident['serial']}; {data['layout']}, "
        f"{data['bootloader']['strategy']}, {data['boots']} boot(s)"
    )
    headers = ("image", "running", "state", "next boot", "secondary", "request")
    table = Table(*(Column(h, overflow="fold") for h in headers))  # wrap, never "…"
    notes: list[str] = []
    for slot in data["slots"]:
        table.add_row(*_status_row(slot))
        notes.extend(_status_notes(slot))
    out.print(table)
    for note in notes:
        out.print(note, markup=False)
    failure = data["last_failure"]
    if failure:
        out.print(
            f"last failure (boot {failure['boot']}, image {failure['image']}): "
            f"[{failure['error']}] {failure['reason']}",
            markup=False,
        )


def _status_row(slot: dict[str, Any]) -> tuple[str, ...]:
    """One image's row of ``sim status``: a primary slot without a valid image runs nothing,
    whatever its trailer says (its state is then "no valid image", not "confirmed")."""
    state = slot["state"]
    if slot["running"] is None and state != "upgrading":
        state = "no valid image"
    secondary = slot["secondary"]
    held = secondary["version"] or "empty"
    if secondary["version"] is not None and not secondary["valid"]:
        held += " (invalid)"
    return (
        str(slot["image"]),
        slot["running"] or "none",
        state,
        slot["next_boot"],
        held,
        secondary["request"],
    )


def _status_notes(slot: dict[str, Any]) -> list[str]:
    """Why an image runs nothing, and why a secondary image would be refused."""
    image = slot["image"]
    if slot["state"] == "upgrading":
        return [f"image {image}: {slot['problem']}"] if slot["problem"] else []
    notes = []
    primary, secondary = slot["primary"], slot["secondary"]
    if slot["running"] is None:
        held = f" ({primary['version']})" if primary["version"] is not None else ""
        notes.append(
            f"image {image}: nothing runs, the primary slot{held} holds no valid image: "
            f"{slot['problem'] or primary['problem']}"
        )
    if secondary["version"] is not None and not secondary["valid"]:
        notes.append(
            f"image {image}: the secondary slot's image {secondary['version']} is not valid: "
            f"{secondary['problem']}"
        )
    return notes


def _broker(value: str) -> tuple[str, int | None]:
    """``HOST[:PORT]`` (``[v6]:PORT`` for an IPv6 address); UsageError otherwise."""
    host, port = value, None
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest and not rest.startswith(":"):
            host = ""
        port_text = rest[1:] if rest else None
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    else:
        port_text = None
    if port_text is not None:
        port = int(port_text) if port_text.isdigit() and 0 < int(port_text) < 65536 else 0
    if not host or port == 0 or any(c.isspace() or c in "/@" for c in host):
        raise UsageError(f"--mqtt must be HOST or HOST:PORT, not {value!r}", value=value)
    return host, port


@app.command("run")
def run_agent(
    directory: DeviceDir,
    server: Annotated[
        str | None,
        typer.Option(
            "--server",
            help=f"Update server URL (default ${SERVER_ENV} unless --mqtt is given).",
        ),
    ] = None,
    mqtt: Annotated[
        str | None,
        typer.Option(
            "--mqtt",
            help="MQTT broker HOST:PORT: ask the publisher for the job (or the direct flow's image).",
        ),
    ] = None,
    cafile: Annotated[
        Path | None, typer.Option("--cafile", help="MQTT: CA to trust (turns TLS on).")
    ] = None,
    cert: Annotated[
        Path | None, typer.Option("--cert", help="MQTT: client certificate (turns TLS on).")
    ] = None,
    key: Annotated[
        Path | None, typer.Option("--key", help="MQTT: the client certificate's key.")
    ] = None,
    company: Annotated[str, typer.Option("--company", help="MQTT: first topic level.")] = (
        "OTAUpdate"
    ),
    app_prefix: Annotated[
        bool,
        typer.Option(
            "--app-prefix/--no-app-prefix", help="MQTT: topics name the board APP_<board>."
        ),
    ] = True,
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=TOKEN_ENV,
            help=f"Device token, or an enrollment token on first contact (default ${TOKEN_ENV}).",
            show_envvar=False,
        ),
    ] = None,
    flow: Annotated[str, typer.Option("--flow", help="job or direct.")] = "job",
    once: Annotated[bool, typer.Option("--once", help="One check, then exit.")] = False,
    no_confirm: Annotated[
        bool, typer.Option("--no-confirm", help="Do not confirm the new image (it reverts).")
    ] = False,
    chunk_size: Annotated[int, typer.Option("--chunk-size", help="Bytes per range.")] = 4096,
    interval: Annotated[
        float, typer.Option("--interval", help="Seconds between checks without --once.")
    ] = 60,
    power_cut_after: Annotated[
        int | None,
        typer.Option("--power-cut-after", help="Cut the power after N flash operations."),
    ] = None,
) -> None:
    """Run the OTA agent on a simulated device: check, download, reboot, confirm.

    With --mqtt the device asks an MQTT publisher; --server is then optional.
    """
    import threading

    from otakit.device.agent import Flow, Outcome
    from otakit.device.transports.mqtt import MqttSettings

    try:
        chosen = Flow(flow)
    except ValueError:
        raise UsageError(f"--flow must be job or direct, not {flow!r}", value=flow) from None
    if not 512 <= chunk_size <= 16 * 1024 * 1024:
        raise UsageError("--chunk-size must be between 512 B and 16 MiB", value=chunk_size)
    if server is None and mqtt is None:
        server = os.environ.get(SERVER_ENV) or None
    if server is None and mqtt is None:
        raise UsageError(f"give --server URL or --mqtt HOST:PORT (or set ${SERVER_ENV})")
    if mqtt is None and (cafile or cert or key):
        raise UsageError("--cafile, --cert and --key are for --mqtt")
    if key is not None and cert is None:
        raise UsageError("--key is given without --cert")
    broker = None
    if mqtt is not None:
        host, port = _broker(mqtt)
        secure = cafile is not None or cert is not None
        broker = MqttSettings(
            host=host,
            port=port or (8883 if secure else 1883),
            ca_file=str(cafile) if cafile else None,
            client_cert=str(cert) if cert else None,
            client_key=str(key) if key else None,
            company=company,
            app_prefix=app_prefix,
        )
    stop = threading.Event()
    while True:
        report = _attempt_with_progress(
            directory, server, broker, token, chosen, not no_confirm, chunk_size, power_cut_after
        )
        power_cut_after = None  # one cut per command
        result = report.result
        if result.outcome is Outcome.UPDATED:
            action = (report.boot or {}).get("images", [{}])[0].get("action")
            state = "confirmed" if report.confirmed else "not confirmed: reverts at next boot"
            err.print(
                f"updated to {result.version}; rebooted ({action}); running {report.running}, {state}"
            )
        elif result.outcome is Outcome.NO_UPDATE:
            err.print(f"no update; running {report.running}")
        else:
            err.print(f"otakit: error [{result.error}]: {result.message}", markup=False)
        if once:
            if result.outcome is Outcome.FAILED:
                raise typer.Exit(1)
            return
        token = None  # the device keeps its own token after the first contact
        if stop.wait(interval):
            return


def _attempt_with_progress(
    directory: Path,
    server: str | None,
    mqtt: Any,
    token: str | None,
    flow: Any,
    confirm: bool,
    chunk_size: int,
    power_cut_after: int | None,
) -> Any:
    from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

    from otakit.device.events import Event, Reason, State
    from otakit.sim.agent import run

    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task("checking", total=None)

        def on_event(event: Event) -> None:
            if event.state is State.STORAGE_WRITE and event.total:
                progress.update(
                    task, description="downloading", total=event.total, completed=event.bytes_done
                )
            elif event.reason is Reason.FAILURE:
                progress.update(task, description=f"failed at {event.state}")

        return run(
            directory,
            server,
            mqtt=mqtt,
            token=token,
            flow=flow,
            confirm=confirm,
            chunk_size=chunk_size,
            power_cut_after=power_cut_after,
            callback=on_event,
        )


app.command("serve-smp")(serve_smp)
app.command("serve-push")(serve_push)
app.command("fleet")(fleet)
