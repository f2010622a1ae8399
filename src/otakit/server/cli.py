"""``otakit serve`` and ``otakit publisher``, and the server data a local command opens (``--data``)."""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console

from otakit.errors import ListenError, UsageError
from otakit.extras import require

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from otakit.server.publisher import ImageSource, PublisherConfig
    from otakit.server.settings import ServerSettings

# The server stack (FastAPI, SQLAlchemy, Alembic, uvicorn) is imported inside the commands, so
# that every other `otakit` command starts fast.

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

DEFAULT_DATA = Path("otakit-data")
DEFAULT_KIT = "CY8CPROTO_062_4343W"  # the original publisher's default board (for --help)
DataOption = Annotated[
    Path, typer.Option("--data", help="Data folder (SQLite database and blobs by default).")
]
DatabaseOption = Annotated[
    str | None,
    typer.Option("--database-url", help="postgresql://user@host/db (default: SQLite in --data)."),
]


MAX_DELTA_WORKERS = 16


def check_delta_options(compression: str, min_ratio: float, workers: int, max_image: int) -> None:
    """UsageError (one line) for a --delta-* value ``otakit serve`` cannot use."""
    from otakit.image.delta import COMPRESSIONS

    if compression not in COMPRESSIONS:
        raise UsageError(
            f"--delta-compression must be one of {', '.join(COMPRESSIONS)}",
            value=compression,
        )
    if not 1.0 <= min_ratio <= 1000.0:  # NaN fails this too
        raise UsageError("--delta-min-ratio must be 1 to 1000", value=min_ratio)
    if not 0 <= workers <= MAX_DELTA_WORKERS:
        raise UsageError(
            f"--delta-workers must be 0 (no deltas made) to {MAX_DELTA_WORKERS}", value=workers
        )
    if not 1024 <= max_image <= 1024**3:
        raise UsageError("--delta-max-image must be 1024 bytes to 1 GiB", value=max_image)


def serve(
    data: DataOption = DEFAULT_DATA,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free port).")
    ] = 8080,
    workers: Annotated[int, typer.Option("--workers", help="Worker processes.")] = 1,
    database: DatabaseOption = None,
    blob_url: Annotated[
        str | None,
        typer.Option("--blob-url", help="s3://bucket?endpoint=URL (default: files in --data)."),
    ] = None,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="TLS certificate (PEM).")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="TLS private key (PEM).")
    ] = None,
    url_days: Annotated[
        float, typer.Option("--url-days", help="Lifetime of signed download URLs, in days.")
    ] = 1.0,
    direct_downloads: Annotated[
        bool,
        typer.Option(
            "--direct-downloads", help="With S3 blobs, devices download straight from the bucket."
        ),
    ] = False,
    access_log: Annotated[
        bool, typer.Option("--access-log", help="Log every request (URLs carry signatures).")
    ] = False,
    rollout_interval: Annotated[
        float,
        typer.Option("--rollout-interval", help="Seconds between rollout evaluations; 0: off."),
    ] = 5.0,
    history_per_device: Annotated[
        int, typer.Option("--history-per-device", help="Status reports kept per device.")
    ] = 200,
    history_days: Annotated[
        float, typer.Option("--history-days", help="Status reports older than this are deleted.")
    ] = 90,
    anonymous_history: Annotated[
        int,
        typer.Option(
            "--anonymous-history", metavar="N", help="Results kept from devices without a token."
        ),
    ] = 1000,
    api_docs: Annotated[
        bool,
        typer.Option(
            "--api-docs", help="Serve interactive API pages at /docs (they load a public CDN)."
        ),
    ] = False,
    pool_size: Annotated[
        int,
        typer.Option(
            "--pool-size", help="Database connections per worker (as many again for bursts)."
        ),
    ] = 10,
    pool_timeout: Annotated[
        float,
        typer.Option(
            "--pool-timeout", help="Seconds a request waits for a database connection (then 503)."
        ),
    ] = 10.0,
    statement_timeout: Annotated[
        float,
        typer.Option(
            "--statement-timeout",
            help="PostgreSQL: seconds before a statement is cancelled (then 503); 0: no limit.",
        ),
    ] = 30.0,
    keep_alive: Annotated[
        int,
        typer.Option(
            "--keep-alive",
            help="Seconds an idle HTTP connection is kept open (longer than a load balancer's).",
        ),
    ] = 5,
    ddi_poll: Annotated[
        int,
        typer.Option(
            "--ddi-poll",
            metavar="SECONDS",
            help="Seconds hawkBit (DDI) clients wait between polls (config.polling.sleep).",
        ),
    ] = 300,
    delta_compression: Annotated[
        str,
        typer.Option(
            "--delta-compression",
            metavar="NAME",
            help="Compression of the binary deltas the server makes: lzma, heatshrink or none.",
        ),
    ] = "lzma",
    delta_min_ratio: Annotated[
        float,
        typer.Option(
            "--delta-min-ratio",
            metavar="RATIO",
            help="Offer a delta only when the image is at least this many times its size.",
        ),
    ] = 2.0,
    delta_workers: Annotated[
        int,
        typer.Option(
            "--delta-workers",
            metavar="N",
            help="Deltas made at once per worker process, in the background; 0: none made.",
        ),
    ] = 1,
    delta_max_image: Annotated[
        int,
        typer.Option(
            "--delta-max-image",
            metavar="BYTES",
            help="No delta for an image (new or base) larger than this (memory while made).",
        ),
    ] = 16 * 1024 * 1024,
) -> None:
    """Run the update server (device API, management API, hawkBit DDI API)."""
    require("server", "otakit serve")
    import uvicorn

    from otakit.server.app import initialise
    from otakit.server.database import database_url, redacted
    from otakit.server.settings import SETTINGS_ENV, ServerSettings

    if workers < 1:
        raise UsageError("--workers must be at least 1", value=workers)
    if (tls_cert is None) != (tls_key is None):
        raise UsageError("--tls-cert and --tls-key go together")
    if direct_downloads and not (blob_url or "").startswith("s3://"):
        raise UsageError("--direct-downloads needs an S3 blob store (--blob-url s3://...)")
    if url_days <= 0:
        raise UsageError("--url-days must be positive", value=url_days)
    if rollout_interval < 0:
        raise UsageError("--rollout-interval must be 0 (off) or more", value=rollout_interval)
    if history_per_device < 1 or history_days <= 0 or anonymous_history < 1:
        raise UsageError(
            "--history-per-device, --history-days and --anonymous-history must be positive"
        )
    if pool_size < 1:
        raise UsageError("--pool-size must be at least 1", value=pool_size)
    if pool_timeout <= 0:
        raise UsageError("--pool-timeout must be positive", value=pool_timeout)
    if keep_alive < 1:
        raise UsageError("--keep-alive must be at least 1 (second)", value=keep_alive)
    if statement_timeout < 0:
        raise UsageError(
            "--statement-timeout must be 0 (no limit) or more", value=statement_timeout
        )
    if not 1 <= ddi_poll <= 86399:  # HH:MM:SS below 24 hours (SWUpdate reads it so)
        raise UsageError("--ddi-poll must be 1 to 86399 seconds", value=ddi_poll)
    check_delta_options(delta_compression, delta_min_ratio, delta_workers, delta_max_image)
    # listen first: a port in use (or an address not of this machine) stops here, before the
    # data folder, the database or the first admin token exist
    listener = listen(host, port)
    port = listener.getsockname()[1]
    if workers > 1:
        # uvicorn's worker processes cannot share a socket handed in by fd: it binds the same
        # (now known) port itself, a moment after this check
        listener.close()
    data = data.resolve()
    os.umask(0o077)  # every file the server writes (blobs, uploads, counters) is private
    settings = ServerSettings(
        data_dir=data,
        database_url=database_url(database, data),
        blob_url=blob_url,
        url_days=url_days,
        direct_downloads=direct_downloads,
        rollout_interval=rollout_interval,
        history_per_device=history_per_device,
        history_days=history_days,
        anonymous_history=anonymous_history,
        api_docs=api_docs,
        pool_size=pool_size,
        pool_timeout=pool_timeout,
        statement_timeout=statement_timeout,
        ddi_poll=ddi_poll,
        delta_compression=delta_compression,
        delta_min_ratio=delta_min_ratio,
        delta_workers=delta_workers,
        delta_max_image=delta_max_image,
    )
    first = initialise(settings)
    if first.admin_token:
        out.print("First start: this admin token is shown once; keep it safe:", style="bold")
        out.print(first.admin_token, markup=False)
    shown = f"[{host}]" if ":" in host else host
    err.print(
        f"otakit server on {'https' if tls_cert else 'http'}://{shown}:{port}, "
        f"database {redacted(settings.database_url)}, blobs {blob_url or data / 'blobs'}"
    )
    os.environ[SETTINGS_ENV] = settings.to_env()
    uvicorn.run(
        "otakit.server.app:app_from_env",
        factory=True,
        **({"host": host, "port": port} if workers > 1 else {"fd": listener.fileno()}),
        workers=workers,
        ssl_certfile=str(tls_cert) if tls_cert else None,
        ssl_keyfile=str(tls_key) if tls_key else None,
        access_log=access_log,
        log_level="info",
        log_config=_log_config(),
        server_header=False,
        timeout_keep_alive=keep_alive,
    )


def listen(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` (0: a free port), to hand to uvicorn; a port in
    use, an address that is not this machine's or a port that needs privileges is a
    :class:`ListenError`."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except (socket.gaierror, UnicodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ListenError(f"--host {host}: no such address ({why})", value=host) from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # uvicorn's backlog
    except OSError as exc:
        sock.close()
        why = {
            errno.EADDRINUSE: "the port is in use (another server?): choose another --port",
            errno.EACCES: "permission denied (ports below 1024 need privileges): choose "
            "another --port",
            errno.EADDRNOTAVAIL: "the address is not one of this machine's: check --host",
        }.get(exc.errno or 0, exc.strerror or str(exc))
        raise ListenError(f"cannot listen on {host}:{port}: {why}", value=port) from None
    sock.set_inheritable(True)  # uvicorn's worker processes serve it too
    return sock


def _log_config() -> dict[str, Any]:
    """uvicorn's logging, with otakit's own lines (one per failed request) in the same form."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config: dict[str, Any] = copy.deepcopy(LOGGING_CONFIG)
    config["loggers"]["otakit"] = {"handlers": ["default"], "level": "INFO", "propagate": False}
    return config


def local_url(data: Path | None, database: str | None) -> str:
    require("server", "otakit token --data")
    from otakit.server.database import database_url, migrate

    folder = (data or DEFAULT_DATA).resolve()
    url = database_url(database, folder)
    if not database and not (folder / "otakit.db").exists():
        raise UsageError(
            f"no server data in {data}; start `otakit serve --data {data}` first or give --database-url",
            value=str(data),
        )
    migrate(url)
    return url


@asynccontextmanager
async def local_session(url: str) -> AsyncIterator[AsyncSession]:
    """A session on the server's database at ``url`` (for the commands run with ``--data``)."""
    from otakit.server.database import create_engine, sessionmaker

    engine = create_engine(url)
    try:
        async with sessionmaker(engine)() as db:
            yield db
    finally:
        await engine.dispose()


# The original publisher's -b names (protocols.md §3): host, TLS port and, with `tls`, the CA,
# client certificate and key files it looks for in the current folder. "amazon" is an AWS IoT
# endpoint of one account, so it needs --host; "local" is a broker on this machine.
_BROKERS: dict[str, tuple[str | None, int, tuple[str, str, str] | None]] = {
    "mosquitto": ("test.mosquitto.org", 8884, ("mosquitto.org.crt", "mosquitto_client.crt", "mosquitto_client.key")),
    "eclipse": ("mqtt.eclipseprojects.io", 8883, ("eclipse_ca.crt", "eclipse_client.crt", "eclipse_client.pem")),
    "amazon": (None, 8883, ("amazon_ca.crt", "amazon_client.crt", "amazon_private_key.pem")),
    "local": ("127.0.0.1", 8883, None),
}  # fmt: skip

_BROKER_ALIASES = {
    "m": "mosquitto",
    "e": "eclipse",
    "a": "amazon",
    "l": "local",
    "localhost": "local",
}


def _number(text: str, option: str, low: int, high: int) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a whole number", value=text) from None
    if not low <= value <= high:
        raise UsageError(f"{option} {value} is not from {low} to {high}", value=value)
    return value


def publisher(
    tls: Annotated[
        str | None,
        typer.Argument(
            help="'tls': connect with TLS (port 8883, 8884 with --cert).", show_default=False
        ),
    ] = None,
    debug: Annotated[bool, typer.Option("-l", "--log", help="Debug logging.")] = False,
    broker: Annotated[
        str | None,
        typer.Option(
            "-b",
            "--broker",
            help="The original's broker names: m|mosquitto, e|eclipse, a|amazon (with --host), "
            "or l|local (default: a broker on this machine).",
        ),
    ] = None,
    kit: Annotated[
        str | None,
        typer.Option(
            "-k",
            "--kit",
            help=f"Board to serve (BOARD or APP_BOARD). Default: {DEFAULT_KIT} with -f, every board with --data.",
        ),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "-f",
            "--file",
            help="Image to serve (default: ota-update.bin, unless --data).",
            show_default=False,
        ),
    ] = None,
    company: Annotated[
        str,
        typer.Option("-c", "--company", help="First topic level: COMPANY/BOARD/publish_notify."),
    ] = "OTAUpdate",
    host: Annotated[str | None, typer.Option("--host", help="Broker host (overrides -b).")] = None,
    port: Annotated[
        str | None,
        typer.Option("--port", help="Broker port (default 1883; TLS 8883, 8884 with --cert)."),
    ] = None,
    cafile: Annotated[
        Path | None, typer.Option("--cafile", help="CA certificates (PEM); implies TLS.")
    ] = None,
    cert: Annotated[
        Path | None, typer.Option("--cert", help="Client certificate (PEM); implies TLS.")
    ] = None,
    key: Annotated[Path | None, typer.Option("--key", help="Client private key (PEM).")] = None,
    version: Annotated[
        str | None,
        typer.Option("--version", help="Version of the -f file (default: its MCUboot header's)."),
    ] = None,
    window: Annotated[
        str, typer.Option("--window", help="Chunks per transfer sent and not yet acknowledged.")
    ] = "16",
    chunk_size: Annotated[
        str, typer.Option("--chunk-size", help="Image bytes per chunk.")
    ] = "4096",
    app_prefix: Annotated[
        bool | None,
        typer.Option(
            "--app-prefix/--no-app-prefix",
            help="Only APP_BOARD / only BOARD topics, and that spelling in jobs (default: both, "
            "answering as each device spells its board).",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        Path | None, typer.Option("--data", help="Serve deployments: the server's data folder.")
    ] = None,
    database: Annotated[
        str | None,
        typer.Option(
            "--database",
            "--database-url",
            help="Serve deployments: postgresql://... (as `otakit serve`).",
        ),
    ] = None,
    blob_url: Annotated[
        str | None,
        typer.Option("--blob-url", help="The server's blob store, if not files in --data."),
    ] = None,
    shared: Annotated[
        str | None,
        typer.Option(
            "--shared",
            help="Shared subscription group: publishers of one group split the requests.",
        ),
    ] = None,
    history_per_device: Annotated[
        int,
        typer.Option(
            "--history-per-device",
            help="Status reports kept per device (with deployments; as `otakit serve`).",
        ),
    ] = 200,
) -> None:
    """Serve MQTT devices (protocols.md §3): job documents, images, chunks, results.

    Images come from one file (-f, like the original publisher.py) or from the update server's deployments (--data / --database, with the same targeting as its HTTP device API).
    """
    from otakit.protocol.version import FirmwareVersion
    from otakit.server.publisher import MAX_IN_FLIGHT, Broker, PublisherConfig

    if tls is not None and tls.lower() != "tls":
        raise UsageError(f"unexpected argument {tls!r}; the only one is 'tls'", value=tls)
    deployments = data is not None or database is not None
    if deployments:
        require("server", "otakit publisher --data")
    if deployments and (file is not None or version is not None):
        raise UsageError("serve either a file (-f, --version) or deployments (--data/--database)")
    if blob_url is not None and not deployments:
        raise UsageError("--blob-url goes with --data or --database")

    use_tls = tls is not None or cafile is not None or cert is not None
    named = None
    if broker is not None:
        name = _BROKER_ALIASES.get(broker.lower(), broker.lower())
        if name not in _BROKERS:
            raise UsageError(
                f"unknown broker {broker!r}; choose mosquitto, eclipse, amazon or local "
                "(or give --host)",
                value=broker,
            )
        named = _BROKERS[name]
        if named[0] is None and host is None:
            raise UsageError(
                "-b amazon needs your AWS IoT endpoint: --host NAME-ats.iot.REGION.amazonaws.com"
            )
    broker_host = host or (named[0] if named and named[0] else "127.0.0.1")
    if use_tls and named is not None and named[2] is not None and cafile is None and cert is None:
        ca_name, cert_name, key_name = named[2]  # the original's file names, in this folder
        cafile, cert, key = Path(ca_name), Path(cert_name), Path(key_name)
    if port is not None:
        broker_port = _number(port, "--port", 1, 65535)
    elif not use_tls:
        broker_port = 1883
    elif named is not None and named[0] != "127.0.0.1":
        broker_port = named[1]
    else:
        broker_port = 8884 if cert is not None else 8883

    settings = Broker(broker_host, broker_port, use_tls, cafile, cert, key)
    config = PublisherConfig(
        broker=settings,
        company=company,
        boards=(kit,) if kit else (() if deployments else (DEFAULT_KIT,)),
        app_prefix=app_prefix,
        window=_number(window, "--window", 1, MAX_IN_FLIGHT),
        chunk_size=_number(chunk_size, "--chunk-size", 1, 0xFFFF),
        shared_group=shared,
    )
    settings.tls_context()  # unreadable or unusable TLS files: an error now, not at connect

    if deployments:
        from otakit.server.settings import ServerSettings

        folder = (data or DEFAULT_DATA).resolve()
        # the server's own database (checked and migrated as for `otakit token`)
        if history_per_device < 1:
            raise UsageError("--history-per-device must be 1 or more", value=history_per_device)
        server = ServerSettings(
            data_dir=folder,
            database_url=local_url(folder, database),
            blob_url=blob_url,
            history_per_device=history_per_device,
        )
        _publisher_logging(debug)
        _run_publisher(config, lambda: _deployment_source(server))
    else:
        from otakit.server.publisher import FileSource

        image = file if file is not None else Path("ota-update.bin")
        fixed = FirmwareVersion.parse(version) if version is not None else None
        board = kit or DEFAULT_KIT
        source = FileSource(image, board=board, version=fixed, chunk_size=config.chunk_size)
        _publisher_logging(debug)
        _run_publisher(config, lambda: source)


def _publisher_logging(debug: bool) -> None:
    """otakit's lines on stderr (INFO; -l: DEBUG, with the MQTT client's packet trace)."""
    import logging
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    for name in ("otakit", "mqtt") if debug else ("otakit",):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.propagate = False
        logger.setLevel(logging.DEBUG if debug else logging.INFO)


def _deployment_source(settings: ServerSettings) -> ImageSource:
    from otakit.server.publisher import DeploymentSource

    return DeploymentSource.open(settings)


def _run_publisher(config: PublisherConfig, make_source: Callable[[], ImageSource]) -> None:
    """Run until SIGINT/SIGTERM."""
    import signal

    from otakit.server.publisher import Publisher

    async def _main() -> None:
        source = make_source()
        try:
            service = Publisher(config, source)
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(signum, service.stop)
            await service.run()
        finally:
            await source.close()

    asyncio.run(_main())
