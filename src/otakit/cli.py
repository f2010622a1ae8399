"""The ``otakit`` command.

Flags mirror imgtool's where the two overlap (``-k``, ``-v``, ``-H``, ``-S``, ``--pad-header``,
``--align``, ``--pad``, ``--confirm``, ``-s``, ``-d``...), so firmware engineers keep their habits.

Exit status: 0 success, 1 the answer is "no" (e.g. an invalid image), 2 the command could not run
as asked (bad argument, unreadable file), 130 interrupted (Ctrl-C). Every error, the command line
parser's included, is printed as one line on stderr: ``otakit: error [CODE]: message``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import typer
import typer.main
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from otakit import __version__
from otakit.device.cli import agent_app
from otakit.device.flashmap import FlashMap, Strategy, load_layout
from otakit.errors import (
    EXIT_USAGE,
    HexFileError,
    InputFileError,
    OtakitError,
    StorageFullError,
    UsageError,
)
from otakit.files import disk_full, read_input, write_atomic
from otakit.host.artifacts import app as artifact_app
from otakit.host.audit import app as audit_app
from otakit.host.delta import app as delta_app
from otakit.host.deploy import deploy
from otakit.host.deployments import app as deployment_app
from otakit.host.devices import app as device_app
from otakit.host.keys import app as key_app
from otakit.host.products import app as product_app
from otakit.host.push import push
from otakit.host.rollout import app as rollout_app
from otakit.host.subscriber import subscriber
from otakit.host.tokens import app as token_app
from otakit.image.header import ImageVersion
from otakit.image.hexfile import is_hex_path, read_hex
from otakit.image.info import ImageInfo, inspect, inspect_image
from otakit.image.keys import GENERATED_KEY_TYPES, PublicKey, SigningKey
from otakit.image.package import build_package, unpack_package
from otakit.image.sign import SignOptions, hex_address, sign_image, sign_image_hex
from otakit.image.tlv import Dependency
from otakit.image.verify import verify_image
from otakit.server.cli import publisher, serve
from otakit.sim.agent import SIMULATOR
from otakit.sim.cli import app as sim_app

HELP_OPTIONS = ["-h", "--help"]


class _Interrupted(Exception):
    """Ctrl-C while a command ran (typer would turn it into a silent exit 130)."""


class _Otakit(TyperGroup):
    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            raise _Interrupted from None


app = typer.Typer(
    name="otakit",
    help="Over-the-air firmware updates for MCUboot devices: images, packages and more.",
    cls=_Otakit,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": HELP_OPTIONS},
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)


def _int(text: str, option: str) -> int:
    """Integers as imgtool takes them: decimal or with a 0x/0o/0b prefix."""
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(
            f"{option} {text!r} is not an integer (decimal, 0x.., 0o.. or 0b..)", value=text
        ) from None


def _security_counter(text: str) -> int | Literal["auto"]:
    return "auto" if text.lower() == "auto" else _int(text, "--security-counter")


_DEPENDENCY_RE = re.compile(r"\(\s*(\d+)\s*,\s*([0-9.+]+)\s*\)")


def _dependencies(text: str) -> tuple[Dependency, ...]:
    """imgtool's syntax: ``"(1, 1.2.3+0)"``, several separated by commas or spaces."""
    found = _DEPENDENCY_RE.findall(text)
    leftover = _DEPENDENCY_RE.sub("", text).replace(",", "").strip()
    if not found or leftover:
        raise UsageError(
            f"--dependencies {text!r}: expected '(IMAGE_ID, VERSION)', e.g. '(1, 1.2.3+0)'",
            value=text,
        )
    return tuple(Dependency(int(i), ImageVersion.parse(v)) for i, v in found)


# --- keys --------------------------------------------------------------------------------------


@app.command()
def keygen(
    key_type: Annotated[
        str,
        typer.Option(
            "-t", "--type", help=f"Key type: {' or '.join(t.value for t in GENERATED_KEY_TYPES)}."
        ),
    ],
    output: Annotated[
        Path, typer.Option("-o", "--output", "-k", "--key", help="Where to write the PEM key.")
    ],
    password: Annotated[
        bool, typer.Option("-p", "--password", help="Encrypt the key; prompts for a password.")
    ] = False,
) -> None:
    """Generate a signing key (PKCS#8 PEM, readable by its owner only)."""
    secret = None
    if password:
        secret = typer.prompt("Password", hide_input=True, confirmation_prompt=True).encode()
    key = SigningKey.generate(key_type)
    key.save(output, secret)
    err.print(f"wrote {key.type} key {output} (key hash {key.public_key.fingerprint})")


@app.command()
def getpub(
    key: Annotated[Path, typer.Option("-k", "--key", help="Private or public PEM key.")],
    lang: Annotated[
        str, typer.Option("-l", "--lang", "-e", "--encoding", help="pem, c or raw (DER).")
    ] = "pem",
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write here instead of stdout.")
    ] = None,
) -> None:
    """Print the public key: PEM, a C array like ``imgtool getpub -l c``, or raw DER."""
    public = PublicKey.load(key)
    encodings = {
        "pem": public.pem,
        "c": lambda: public.c_array().encode(),
        "raw": public.public_bytes,
    }
    if lang.removeprefix("lang-") not in encodings:
        raise UsageError(f"unknown encoding {lang!r}; choose pem, c or raw", value=lang)
    data = encodings[lang.removeprefix("lang-")]()
    if output is not None:
        write_atomic(output, data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


# --- images ------------------------------------------------------------------------------------


@app.command()
def sign(
    infile: Annotated[
        Path,
        typer.Argument(help="Payload: raw binary, or Intel HEX if named .hex.", show_default=False),
    ],
    outfile: Annotated[
        Path,
        typer.Argument(help="Signed image to write (Intel HEX if named .hex).", show_default=False),
    ],
    version: Annotated[str, typer.Option("-v", "--version", help="major.minor.revision+build")],
    key: Annotated[
        Path | None, typer.Option("-k", "--key", help="Signing key (PEM).", show_default=False)
    ] = None,
    unsigned: Annotated[
        bool, typer.Option("--unsigned", help="Build an image with a hash but no signature.")
    ] = False,
    header_size: Annotated[
        str, typer.Option("-H", "--header-size", help="Header size in bytes.")
    ] = "32",
    pad_header: Annotated[
        bool, typer.Option("--pad-header", help="Prepend the header instead of using zeros.")
    ] = False,
    align: Annotated[
        str | None, typer.Option("--align", help="Flash write alignment (default 1).")
    ] = None,
    max_align: Annotated[
        str | None,
        typer.Option(
            "--max-align", help="Trailer alignment, 8, 16 or 32 (default: 8 or --align if larger)."
        ),
    ] = None,
    slot_size: Annotated[
        str | None, typer.Option("-S", "--slot-size", help="Slot size (needed with --pad).")
    ] = None,
    pad: Annotated[
        bool, typer.Option("--pad", help="Fill the slot and write the trailer (a test request).")
    ] = False,
    confirm: Annotated[
        bool, typer.Option("--confirm", help="Like --pad, and mark the image confirmed.")
    ] = False,
    security_counter: Annotated[
        str | None,
        typer.Option("-s", "--security-counter", help="Integer, or 'auto' (from the version)."),
    ] = None,
    dependencies: Annotated[
        str | None, typer.Option("-d", "--dependencies", help="E.g. '(1, 1.2.3+0)'.")
    ] = None,
    overwrite_only: Annotated[
        bool, typer.Option("--overwrite-only", help="Trailer for overwrite-only bootloaders.")
    ] = False,
    max_sectors: Annotated[
        str | None, typer.Option("-M", "--max-sectors", help="Sectors in the swap status (128).")
    ] = None,
    layout: Annotated[
        str | None,
        typer.Option(
            "--layout",
            help="Flash map (preset or JSON file): slot size, alignment, sectors and the "
            "largest image its MCUboot build accepts.",
        ),
    ] = None,
    erased_val: Annotated[
        str | None,
        typer.Option("-R", "--erased-val", help="Erased value of the flash, 0xff or 0 (0xff)."),
    ] = None,
    load_addr: Annotated[str, typer.Option("-L", "--load-addr", help="RAM load address.")] = "0",
    public_key_format: Annotated[
        str, typer.Option("--public-key-format", help="Put the key 'hash' or the 'full' key.")
    ] = "hash",
    hex_addr: Annotated[
        str | None,
        typer.Option(
            "-x", "--hex-addr", help="Address of a .hex output (default: the .hex input's)."
        ),
    ] = None,
) -> None:
    """Sign a payload into an MCUboot image (passes ``imgtool verify``).

    Like imgtool, a .hex INFILE is read as Intel HEX (gaps filled with 0xFF) and a .hex OUTFILE
    is written as Intel HEX at the input's address (less the header with --pad-header) or at
    --hex-addr.
    """
    if key is None and not unsigned:
        raise UsageError("give the signing key with --key (or --unsigned for a hash-only image)")
    if key is not None and unsigned:
        raise UsageError("--key and --unsigned exclude each other")
    if public_key_format not in ("hash", "full"):
        raise UsageError(
            f"--public-key-format must be 'hash' or 'full', not {public_key_format!r}",
            value=public_key_format,
        )
    fmap = None if layout is None else load_layout(layout)
    geometry = _sign_geometry(fmap)
    options = SignOptions(
        version=ImageVersion.parse(version),
        header_size=_int(header_size, "--header-size"),
        pad_header=pad_header,
        align=geometry["align"] if align is None else _int(align, "--align"),
        slot_size=geometry["slot_size"] if slot_size is None else _int(slot_size, "--slot-size"),
        pad=pad,
        confirm=confirm,
        overwrite_only=overwrite_only or bool(geometry["overwrite_only"]),
        max_sectors=geometry["max_sectors"]
        if max_sectors is None
        else _int(max_sectors, "--max-sectors"),
        security_counter=None if security_counter is None else _security_counter(security_counter),
        dependencies=() if dependencies is None else _dependencies(dependencies),
        load_addr=_int(load_addr, "--load-addr"),
        max_image_size=None if fmap is None else fmap.max_image_size(),
        erased_value=geometry["erased_value"]
        if erased_val is None
        else _int(erased_val, "--erased-val"),
        public_key_format="full" if public_key_format == "full" else "hash",
        max_align=None if max_align is None else _int(max_align, "--max-align"),
    )
    signing_key = SigningKey.load(key) if key is not None else None
    input_address = None
    if is_hex_path(infile):
        hex_input = read_hex(infile)
        payload, input_address = hex_input.data, hex_input.address
    else:
        payload = read_input(infile, what="payload")
    where = ""
    if is_hex_path(outfile):
        address = hex_address(
            input_address, options, None if hex_addr is None else _int(hex_addr, "--hex-addr")
        )
        if address is None:
            raise HexFileError(
                f"{outfile} is Intel HEX, which needs an address: the input is binary, so give "
                "it with --hex-addr",
                value=str(outfile),
            )
        image = sign_image_hex(payload, signing_key, options, address=address)
        where = f" at 0x{address:08x}"
    else:
        image = sign_image(payload, signing_key, options)
    write_atomic(outfile, image)
    signer = (
        f"{signing_key.type} key {signing_key.public_key.fingerprint}" if signing_key else "no key"
    )
    err.print(
        f"wrote {outfile}{where}: version {options.version}, {len(image)} bytes, signed by {signer}"
    )


def _sign_geometry(fmap: FlashMap | None) -> dict[str, int]:
    """imgtool's -S, --align, -M, --overwrite-only and -R for image 0 of ``fmap``'s MCUboot build
    (imgtool's defaults without a map)."""
    if fmap is None:
        return {
            "slot_size": 0,
            "align": 1,
            "max_sectors": 128,
            "overwrite_only": 0,
            "erased_value": 0xFF,
        }
    strategy = Strategy(fmap.strategy)
    # where the image starts in the secondary slot (swap-offset: one sector in) to its end
    slot_size = fmap.secondary().size - fmap.image_offset()
    if strategy is Strategy.SWAP_STATUS:
        # the trailer lives in the status partition: a padded image only carries the magic
        # that MCUboot moves there, so imgtool's smallest trailer is enough
        return {
            "slot_size": slot_size,
            "align": 8,
            "max_sectors": 1,
            "overwrite_only": 0,
            "erased_value": fmap.erased_value,
        }
    return {
        "slot_size": slot_size,
        "align": fmap.write_align,
        "max_sectors": fmap.max_sectors,
        "overwrite_only": int(strategy is Strategy.OVERWRITE),
        "erased_value": fmap.erased_value,
    }


@app.command()
def verify(
    image: Annotated[Path, typer.Argument(help="Image to check.", show_default=False)],
    key: Annotated[
        list[Path] | None,
        typer.Option("-k", "--key", help="Trusted key (PEM); repeat for several."),
    ] = None,
    hash_only: Annotated[
        bool, typer.Option("--hash-only", help="Check integrity only, no signature.")
    ] = False,
    slot_size: Annotated[
        str | None, typer.Option("-S", "--slot-size", help="Fail if the image is larger.")
    ] = None,
    layout: Annotated[
        str | None,
        typer.Option(
            "--layout",
            help="Flash map (preset or JSON file): fail if its MCUboot build would refuse the "
            "image's size.",
        ),
    ] = None,
) -> None:
    """Verify an image's hash and signature. Exit 0 valid, 1 invalid, 2 usage error.

    A .hex image is read as Intel HEX. As with imgtool verify, an image marked encrypted passes
    when its payload is in clear (imgtool sign -E KEY --clear); an encrypted payload does not.
    """
    if not key and not hash_only:
        raise UsageError("give a trusted key with --key (or --hash-only to skip the signature)")
    keys = [PublicKey.load(k) for k in key] if key else None
    if slot_size is not None and layout is not None:
        raise UsageError("give --slot-size or --layout, not both")
    max_size = None if slot_size is None else _int(slot_size, "--slot-size")
    if layout is not None:
        max_size = load_layout(layout).max_image_size()
    result = verify_image(image, None if hash_only else keys, max_size=max_size, accept_clear=True)
    signer = result.signed_by
    by = (
        f", signed by {signer.type} key {signer.fingerprint}"
        if signer
        else ", signature not checked"
    )
    clear = ""
    if result.layout.header.encrypted:
        key_tlv = result.layout.encryption_tlv
        clear = (
            f"; marked encrypted ({key_tlv.name if key_tlv else 'no key TLV'}) with the payload "
            "in clear (imgtool --clear): for the primary slot, not an OTA update"
        )
    out.print(f"{image}: valid, version {result.version}{by}{clear}", markup=False)
    # two different hashes, both called "the hash": say which is which
    out.print(
        f"  image hash ({result.hash_name.upper()} TLV, over header and payload): "
        f"{result.digest.hex()}",
        markup=False,
    )
    out.print(f"  file SHA-256 (the server's artifact id): {_file_sha256(image)}", markup=False)


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    except OSError as exc:
        raise InputFileError(
            f"cannot read {path}: {exc.strerror or exc}", value=str(path)
        ) from None
    return digest.hexdigest()


@app.command()
def info(
    image: Annotated[Path, typer.Argument(help="Image or package.", show_default=False)],
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show an image's header, sizes, TLVs, hash and trailer; or a package and its images.

    A .hex image is read as Intel HEX.
    """
    details = inspect(image)
    if as_json:
        out.print_json(json.dumps(details.to_dict()))
    elif isinstance(details, ImageInfo):
        _print_image(str(image), details)
    else:
        out.print(f"[bold]{image}[/bold]: package version {details.manifest.version}")
        for c in details.components:
            title = f"{c.component.name} ({c.component.file_type}, image {c.component.image_index})"
            if c.image is None:
                out.print(f"{title}: not an MCUboot image: {c.problem}", markup=False)
            else:
                _print_image(title, c.image)


def _print_image(title: str, details: ImageInfo) -> None:
    table = Table(title=title, show_header=False, title_justify="left")
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in details.rows():
        table.add_row(name, value)
    out.print(table)


# --- packages ----------------------------------------------------------------------------------


@app.command()
def package(
    app_image: Annotated[
        Path, typer.Argument(help="Application image (NSPE, image 0).", show_default=False)
    ],
    output: Annotated[Path, typer.Option("-o", "--output", help="Package to write (.tar).")],
    version: Annotated[
        str | None,
        typer.Option("--version", "-v", help="Package version a.b.c (default: the app's)."),
    ] = None,
    spe: Annotated[
        Path | None, typer.Option("--spe", help="Secure image (SPE, image 1).", show_default=False)
    ] = None,
) -> None:
    """Build a multi-image TAR package (components.json + signed images)."""
    components = []
    app_version = None
    for path, file_type in ((app_image, "NSPE"), (spe, "SPE")):
        if path is None:
            continue
        data = read_input(path, what="image")
        try:
            details = inspect_image(data)
        except OtakitError as exc:
            raise UsageError(
                f"{path} is not an MCUboot image ({exc.message}); sign it first with otakit sign",
                value=str(path),
            ) from None
        if details.hash_ok is False:
            raise UsageError(f"{path} is corrupted: {details.hash_problem}", value=str(path))
        if file_type == "NSPE":
            app_version = details.layout.header.version
        components.append((path.name, file_type, data))
    assert app_version is not None
    package_version = version if version is not None else app_version.short
    write_atomic(output, build_package(components, package_version))
    names = ", ".join(f"{name} ({kind})" for name, kind, _ in components)
    err.print(f"wrote {output}: package version {package_version} with {names}")


@app.command()
def unpack(
    package_file: Annotated[Path, typer.Argument(help="Package (.tar).", show_default=False)],
    directory: Annotated[
        Path, typer.Option("-C", "--directory", help="Folder to extract into.")
    ] = Path("."),
) -> None:
    """Check a package and extract its images (nothing is written if any check fails)."""
    manifest = unpack_package(package_file, directory)
    for c in manifest.components:
        out.print(f"{directory / c.name}: {c.file_type} (image {c.image_index}), {c.size} bytes")


@app.command()
def demo(
    devices: Annotated[
        str | None,
        typer.Option(
            "-n",
            "--devices",
            help="Simulated devices, 2 to 500 (default 20).",
        ),
    ] = None,
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave the server (and dashboard) up afterwards.")
    ] = False,
    mqtt: Annotated[
        bool, typer.Option("--mqtt", help="Devices update over MQTT (needs Mosquitto).")
    ] = False,
    package: Annotated[
        bool,
        typer.Option(
            "--package",
            help="A two-image TAR package (application + secure image) on a few two-image "
            "devices instead (-n defaults to 3 then).",
        ),
    ] = False,
) -> None:
    """The whole update path on this machine: server, keys, images, a fleet, a phased rollout."""
    count = 3 if package else 20
    if devices is not None:
        count = _int(devices, "--devices")
    if not 2 <= count <= 500:
        raise UsageError(f"--devices {count} is not from 2 to 500", value=count)
    if package:
        if mqtt:
            raise UsageError("--package runs over HTTP; leave out --mqtt", value="--mqtt")
        from otakit.sim.demo import run_package_demo

        raise typer.Exit(run_package_demo(count, keep=keep))
    from otakit.sim.demo import run_demo

    raise typer.Exit(run_demo(count, keep=keep, mqtt=mqtt))


app.add_typer(agent_app(SIMULATOR), name="agent")
app.add_typer(sim_app, name="sim")
app.add_typer(token_app, name="token")
app.add_typer(rollout_app, name="rollout")
app.add_typer(product_app, name="product")
app.add_typer(key_app, name="key")
app.add_typer(artifact_app, name="artifact")
app.add_typer(device_app, name="device")
app.add_typer(deployment_app, name="deployment")
app.add_typer(audit_app, name="audit")
app.add_typer(delta_app, name="delta")
app.command()(serve)
app.command()(publisher)
app.command()(deploy)
app.command()(push)
app.command()(subscriber)


def _version_callback(value: bool) -> None:
    if value:
        out.print(f"otakit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_version_callback, is_eager=True, help="Show version."),
    ] = False,
) -> None:
    """Over-the-air firmware updates for MCUboot devices: images, packages and more."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; print every error (otakit's, a usage error, Ctrl-C) as one line on stderr and
    return the exit status (0 success, 1 "no", 2 usage, 130 interrupted)."""
    try:
        result = command().main(args=argv, prog_name="otakit", standalone_mode=False)
    except SystemExit as exc:  # --help and --install-completion end this way too
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except OtakitError as exc:
        _error(exc.code, exc.message)
        return exc.exit_status
    except typer.TyperException as exc:  # click's usage errors: unknown option, bad value...
        return _usage_error(exc)
    except (_Interrupted, KeyboardInterrupt, typer.Abort) as exc:
        if isinstance(exc, typer.Abort) and isinstance(exc.__context__, EOFError):
            _error("BADARG", "the input ended before the answer to a prompt")
            return EXIT_USAGE
        _error("INTERRUPTED", "interrupted (Ctrl-C)")
        return EXIT_INTERRUPTED
    except Exception as exc:
        full = _storage_full(exc)
        if full is None:
            raise
        _error(full.code, full.message)
        return full.exit_status
    return result if isinstance(result, int) else 0


@functools.cache
def command() -> Any:
    """The click command of :data:`app`, with otakit's help placeholders (built once: typer
    takes a while to build the tree of every command)."""
    built = typer.main.get_command(app)
    placeholders(built)
    return built


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a command ended by Ctrl-C


def _error(code: str, message: str) -> None:
    err.print(f"otakit: error [{code}]: {message}", markup=False, soft_wrap=True)


def _storage_full(exc: BaseException) -> StorageFullError | None:
    """A full disk (or file size limit) under a write otakit did not name itself: stdout, or
    the server's database (``otakit token create --data``)."""
    from otakit.server.storage import storage_full  # no server stack: errors and files only

    return disk_full(exc) or storage_full(exc)


def _usage_error(exc: typer.TyperException) -> int:
    """A usage error of the command line parser as otakit's one line, with where to get help."""
    status = getattr(exc, "exit_code", EXIT_USAGE)
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":  # a group without a command: help was shown
        return int(status)
    message = " ".join(exc.format_message().split())
    if message[:1].isupper() and not message[1:2].isupper():
        message = message[0].lower() + message[1:]
    message = message.rstrip(".")
    if ctx is not None:
        message += f" (see: {ctx.command_path} --help)"
    code = "FILE" if type(exc).__name__ == "FileError" else "BADARG"
    _error(code, message)
    return EXIT_USAGE


# --- help placeholders ---------------------------------------------------------------------------

# What a value looks like in help when its option gives no metavar of its own, by long name.
PLACEHOLDERS = {
    "--server": "URL",
    "--token": "TOKEN",
    "--data": "DIR",
    "--database-url": "URL",
    "--blob-url": "URL",
    "--directory": "DIR",
    "--device-dir": "DIR",
    "--output": "FILE",
    "--key": "FILE",
    "--keys": "FILE",
    "--tls-cert": "FILE",
    "--tls-key": "FILE",
    "--layout": "LAYOUT",
    "--version": "VERSION",
    "--product": "PRODUCT",
    "--group": "GROUP",
    "--board": "BOARD",
    "--device": "SERIAL",
    "--serial": "SERIAL",
    "--host": "HOST",
    "--port": "PORT",
    "--label": "TEXT",
    "--role": "ROLE",
    "--type": "TYPE",
    "--lang": "pem|c|raw",
    "--slot-size": "SIZE",
    "--header-size": "SIZE",
    "--align": "N",
    "--max-align": "N",
    "--max-sectors": "N",
    "--security-counter": "N|auto",
    "--dependencies": "'(ID, VERSION)'",
    "--erased-val": "VALUE",
    "--load-addr": "ADDR",
    "--hex-addr": "ADDR",
    "--public-key-format": "hash|full",
    "--devices": "N",
    "--chunk-size": "BYTES",
    "--chunk-wait": "SECONDS",
    "--mtu": "N",
    "--max-mtu": "N",
    "--artifact": "ID",
    "--mqtt": "HOST[:PORT]",
    "--to": "URL",
    "--ble": "ADDRESS",
    "--shared": "GROUP",
    "--start": "TIME",
    "--soak": "DURATION",
    "--flow": "job|direct",
}
# ... and by how the long name ends
PLACEHOLDER_ENDINGS = {
    "-days": "DAYS",
    "-timeout": "SECONDS",
    "-interval": "SECONDS",
    "-seconds": "SECONDS",
    "-url": "URL",
    "-dir": "DIR",
    "-file": "FILE",
}


def placeholders(command: Any) -> None:
    """Give every parameter of ``command`` and its subcommands a help placeholder: none for a
    flag, ``FILE``/``DIR``/``URL``/``N``... for a value (the option's own ``metavar=`` wins),
    instead of the type names typer shows (``<bool>``, ``<list[Path]>``)."""
    # -h/--help is made on demand (and kept): make it now, to give it no placeholder either
    help_option = command.get_help_option(typer.Context(command, help_option_names=HELP_OPTIONS))
    for param in [*command.params, *([help_option] if help_option else [])]:
        if param.param_type_name == "argument":
            param.metavar = param.metavar or param.name.upper()
            param.display_type_rich = lambda ctx: None  # the name says it: no "<path>" after it
            continue
        if param.metavar is not None:
            continue
        if param.is_flag or param.count:
            param.metavar = ""
            continue
        longs = [o for o in (*param.opts, *param.secondary_opts) if o.startswith("--")]
        named = [PLACEHOLDERS[o] for o in longs if o in PLACEHOLDERS] + [
            shown for o in longs for end, shown in PLACEHOLDER_ENDINGS.items() if o.endswith(end)
        ]
        param.metavar = named[0] if named else _by_type(param)
    for sub in getattr(command, "commands", {}).values():
        placeholders(sub)


def _by_type(param: Any) -> str:
    annotation = param.type_descriptor.annotation
    inner = typing.get_args(annotation)
    if typing.get_origin(annotation) is list and inner:
        annotation = inner[0]
    if annotation is Path:
        return "FILE"
    if annotation in (int, float):
        return "N"
    return str(param.name).upper()
