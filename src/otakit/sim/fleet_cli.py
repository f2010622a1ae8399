"""``otakit sim fleet``: thousands of simulated devices updating against one server.

The final report is JSON on stdout; progress goes to stderr (a progress bar on a terminal,
otherwise a line every few seconds); ``--events FILE`` writes every device's events as JSON
lines. Exit status 0 when every device settled (runs ``--until-updated``, or the server offers
it nothing more), 1 when some device did not (no device made progress for ``--timeout``
seconds, or a device gave up on its update after ``--give-up-after`` failed attempts), 2 for
bad arguments.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from otakit.errors import InputFileError, UsageError
from otakit.host.client import SERVER_ENV, TOKEN_ENV
from otakit.protocol.jobdoc import MAX_VALUE_BYTES

if TYPE_CHECKING:
    from otakit.sim.fleet import MqttBroker

err = Console(stderr=True, highlight=False, soft_wrap=True, markup=False, emoji=False)
PROGRESS_LINE_SECONDS = 5.0
# serials are PREFIX-000000 (six digits, up to --devices 1000000): within the job's SerialNumber
MAX_SERIAL_PREFIX = MAX_VALUE_BYTES["SerialNumber"] - len("-000000")


def _number(text: str, option: str, *, low: float, high: float, integer: bool = False) -> float:
    """A number option, parsed here so that a bad value is a one-line usage error."""
    try:
        value = int(text, 10) if integer else float(text)
    except ValueError:
        kind = "a whole number" if integer else "a number"
        raise UsageError(f"{option} {text!r} is not {kind}", value=text) from None
    if not low <= value <= high:  # also refuses nan
        raise UsageError(f"{option} {text} is not from {low:g} to {high:g}", value=text)
    return value


def _size(text: str, option: str, *, low: int, high: int) -> int:
    """Bytes, optionally with a K or M suffix (KiB, MiB)."""
    units = {"k": 1024, "m": 1024 * 1024}
    scale = units.get(text[-1:].lower(), 1)
    digits = text[:-1] if scale > 1 else text
    try:
        value = int(digits, 10) * scale
    except ValueError:
        raise UsageError(
            f"{option} {text!r} is not a size in bytes (e.g. 65536, 64K, 1M)", value=text
        ) from None
    if not low <= value <= high:
        raise UsageError(f"{option} {text} is not from {low} to {high} bytes", value=text)
    return value


def _mqtt(value: str, company: str) -> MqttBroker:
    from otakit.protocol import mqtt as wire
    from otakit.sim.cli import _broker
    from otakit.sim.fleet import MqttBroker

    host, port = _broker(value)
    if not company or any(c in company for c in "/+#\x00"):
        raise UsageError(f"--company {company!r} must be one MQTT topic level", value=company)
    return MqttBroker(host=host, port=port or wire.PORT, company=company)


@contextmanager
def _event_file(path: Path | None) -> Iterator[Callable[[dict[str, Any]], None] | None]:
    if path is None:
        yield None
        return
    try:
        stream: IO[str] = path.open("w", encoding="utf-8")
    except OSError as exc:
        raise InputFileError(
            f"cannot write the event file {path}: {exc.strerror or exc}", value=str(path)
        ) from None
    with stream:

        def write(event: dict[str, Any]) -> None:
            stream.write(json.dumps(event, separators=(",", ":")) + "\n")

        yield write


def _progress(total: int) -> tuple[Callable[[dict[str, int]], None], Callable[[], None]]:
    """A display of the fleet's counts: a rich bar on a terminal, else a line every
    PROGRESS_LINE_SECONDS. Returns (update, close)."""
    started = time.monotonic()
    if err.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

        bar = Progress(
            "{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            "{task.fields[counts]}",
            console=err,
            transient=False,
        )
        task = bar.add_task("settled", total=total, counts="")
        bar.start()

        def update(snap: dict[str, int]) -> None:
            bar.update(task, completed=snap["settled"], counts=_counts(snap))

        return update, bar.stop

    last = [0.0]

    def line(snap: dict[str, int]) -> None:
        now = time.monotonic() - started
        if now - last[0] >= PROGRESS_LINE_SECONDS or snap["settled"] == total:
            last[0] = now
            err.print(f"fleet: {now:.0f} s, {snap['settled']}/{total} settled, {_counts(snap)}")

    return line, lambda: None


def _counts(snap: dict[str, int]) -> str:
    return (
        f"{snap['updated']} updated, {snap['reverted']} reverted, {snap['errors']} errors, "
        f"{snap['bytes'] / 1048576:.1f} MiB"
    )


def fleet(
    devices: Annotated[str, typer.Option("--devices", help="How many devices.", metavar="N")],
    server: Annotated[
        str,
        typer.Option(
            "--server",
            envvar=SERVER_ENV,
            show_envvar=False,
            help=f"Update server URL (default ${SERVER_ENV}).",
            metavar="URL",
        ),
    ],
    product: Annotated[
        str, typer.Option("--product", help="The devices' product.", metavar="PRODUCT")
    ],
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            envvar=TOKEN_ENV,
            show_envvar=False,
            help=f"Enrollment token (default ${TOKEN_ENV}; not needed for a self-registering "
            "product).",
            metavar="TOKEN",
        ),
    ] = None,
    group: Annotated[
        str | None,
        typer.Option("--group", help="Their group (as the token says).", metavar="GROUP"),
    ] = None,
    board: Annotated[
        str, typer.Option("--board", help="Board name.", metavar="BOARD")
    ] = "CY8CPROTO_062_4343W",
    version: Annotated[
        str,
        typer.Option(
            "--version", help="Version every device runs at the start.", metavar="VERSION"
        ),
    ] = "1.0.0",
    keys: Annotated[
        list[Path] | None,
        typer.Option(
            "-k",
            "--key",
            "--keys",
            help="Trusted key (PEM, public or private); repeatable. None: integrity only.",
            metavar="KEY.pem",
        ),
    ] = None,
    poll: Annotated[
        str,
        typer.Option("--poll", help="Seconds between one device's check-ins.", metavar="SECONDS"),
    ] = "5",
    jitter: Annotated[
        str,
        typer.Option(
            "--jitter",
            help="Each interval is poll x uniform(1-J, 1+J); 0 to 1.",
            metavar="FRACTION",
        ),
    ] = "0.1",
    drop_rate: Annotated[
        str,
        typer.Option("--drop-rate", help="Probability that a range (chunk) is lost.", metavar="R"),
    ] = "0",
    power_cut_rate: Annotated[
        str,
        typer.Option(
            "--power-cut-rate", help="Probability of a power cut per download attempt.", metavar="R"
        ),
    ] = "0",
    bandwidth: Annotated[
        str | None,
        typer.Option(
            "--bandwidth",
            help="Each device's link speed, bytes/s (default: unlimited).",
            metavar="BYTES_PER_S",
        ),
    ] = None,
    broken: Annotated[
        str,
        typer.Option(
            "--broken",
            help="Share of devices whose new image never confirms; 0 to 1.",
            metavar="FRACTION",
        ),
    ] = "0",
    concurrency: Annotated[
        str, typer.Option("--concurrency", help="Requests on the wire at once.", metavar="N")
    ] = "64",
    chunk_size: Annotated[
        str, typer.Option("--chunk-size", help="Bytes per range (64K by default).", metavar="BYTES")
    ] = "64K",
    strategy: Annotated[
        str | None,
        typer.Option(
            "--strategy",
            help="MCUboot mode: overwrite, swap-scratch, swap-move, swap-offset or swap-status "
            "(PSoC 6 rows, slots up to about 2M) (default: overwrite; swap-scratch with --broken, "
            "which needs a way back).",
            metavar="NAME",
        ),
    ] = None,
    slot_size: Annotated[
        str,
        typer.Option("--slot-size", help="Size of each slot (512K by default).", metavar="BYTES"),
    ] = "512K",
    until_updated: Annotated[
        str | None,
        typer.Option(
            "--until-updated",
            help="Stop once every device runs VERSION or newer (or went back from it and is offered nothing).",
            metavar="VERSION",
        ),
    ] = None,
    timeout: Annotated[
        str,
        typer.Option(
            "--timeout",
            help="End the run when no device made progress for this many seconds.",
            metavar="SECONDS",
        ),
    ] = "600",
    range_tries: Annotated[
        str,
        typer.Option(
            "--range-tries",
            help="Tries of one range within an attempt (a retried range counts as recovered).",
            metavar="N",
        ),
    ] = "3",
    give_up_after: Annotated[
        str,
        typer.Option(
            "--give-up-after",
            help="Failed attempts of one artifact before a device gives up on it (0: never); "
            "the waits between attempts double from one --poll interval.",
            metavar="N",
        ),
    ] = "5",
    events: Annotated[
        Path | None,
        typer.Option("--events", help="Write every event as a JSON line here.", metavar="FILE"),
    ] = None,
    seed: Annotated[
        str,
        typer.Option(
            "--seed", help="Seed of the fault draws (same seed, same faults).", metavar="N"
        ),
    ] = "0",
    serial_prefix: Annotated[
        str | None,
        typer.Option(
            "--serial-prefix",
            help="Serials are PREFIX-000000... (default: random).",
            metavar="PREFIX",
        ),
    ] = None,
    mqtt: Annotated[
        str | None,
        typer.Option(
            "--mqtt",
            help="HOST[:PORT]: jobs and images from `otakit publisher` over MQTT (small fleets).",
            metavar="HOST[:PORT]",
        ),
    ] = None,
    company: Annotated[
        str, typer.Option("--company", help="MQTT: first topic level.", metavar="NAME")
    ] = "OTAUpdate",
) -> None:
    """Simulate a fleet: every device checks in, downloads, verifies, reboots, confirms.

    Prints progress on stderr and a JSON report on stdout; exit 1 if some device did not
    settle (no progress for --timeout seconds) or gave up.
    """
    import secrets

    from otakit.device.bootloader import Strategy
    from otakit.device.core.retry import RetryPolicy
    from otakit.image.keys import PublicKey
    from otakit.sim.fleet import Fleet, FleetConfig

    chosen = None
    if strategy is not None:
        try:
            chosen = Strategy(strategy)
        except ValueError:
            choices = ", ".join(s.value for s in Strategy)
            raise UsageError(
                f"--strategy {strategy!r} is not one of {choices}", value=strategy
            ) from None
    prefix = serial_prefix or f"FLEET-{secrets.token_hex(3).upper()}"
    if (
        not prefix.replace("-", "").replace("_", "").replace(".", "").isalnum()
        or not prefix.isascii()
        or len(prefix) > MAX_SERIAL_PREFIX
    ):
        raise UsageError(
            f"--serial-prefix {prefix!r} must be up to {MAX_SERIAL_PREFIX} letters, digits, "
            "'-', '_' or '.' (serials PREFIX-000000 fit the device's SerialNumber, "
            f"{MAX_VALUE_BYTES['SerialNumber']} characters)",
            value=prefix,
        )
    every = _number(poll, "--poll", low=0, high=365 * 86400)
    retry = RetryPolicy(
        first=max(every, 0.01),
        jitter=min(_number(jitter, "--jitter", low=0, high=1), 0.5),
        give_up_after=int(
            _number(give_up_after, "--give-up-after", low=0, high=1000, integer=True)
        ),
    )
    config = FleetConfig(
        server=server,
        token=token,
        product=product,
        group=group,
        board=board,
        version=version,
        keys=tuple(PublicKey.load(k) for k in keys or ()),
        devices=int(_number(devices, "--devices", low=1, high=1_000_000, integer=True)),
        poll=_number(poll, "--poll", low=0, high=365 * 86400),
        jitter=_number(jitter, "--jitter", low=0, high=1),
        drop_rate=_number(drop_rate, "--drop-rate", low=0, high=0.99),
        power_cut_rate=_number(power_cut_rate, "--power-cut-rate", low=0, high=0.99),
        bandwidth=None
        if bandwidth is None
        else _number(bandwidth, "--bandwidth", low=1, high=1e12),
        broken=_number(broken, "--broken", low=0, high=1),
        concurrency=int(_number(concurrency, "--concurrency", low=1, high=10_000, integer=True)),
        chunk_size=_size(chunk_size, "--chunk-size", low=512, high=16 * 1024 * 1024),
        strategy=chosen,
        slot_size=_size(slot_size, "--slot-size", low=16 * 1024, high=64 * 1024 * 1024),
        until_updated=until_updated,
        timeout=_number(timeout, "--timeout", low=0.1, high=30 * 86400),
        range_tries=int(_number(range_tries, "--range-tries", low=1, high=100, integer=True)),
        retry=retry,
        seed=int(_number(seed, "--seed", low=0, high=2**63, integer=True)),
        serial_prefix=prefix,
        mqtt=None if mqtt is None else _mqtt(mqtt, company),
    )
    if config.slot_size % 4096:
        raise UsageError(f"--slot-size {slot_size} is not a multiple of 4 KiB", value=slot_size)
    with _event_file(events) as sink:
        simulation = Fleet(config, on_event=sink)
        update, close = _progress(config.devices)
        err.print(
            f"fleet: {config.devices} devices ({prefix}-...), {simulation.strategy} bootloader, "
            f"checking in with {config.server}" + (f", jobs over MQTT {mqtt}" if mqtt else "")
        )
        try:
            report = asyncio.run(simulation.run(on_tick=update, tick=0.5))
        except KeyboardInterrupt:
            close()
            err.print("fleet: interrupted; no report")
            raise typer.Exit(130) from None
        finally:
            close()
    typer.echo(json.dumps(report.to_dict(), indent=2))
    if report.timed_out or report.failed:
        raise typer.Exit(1)
