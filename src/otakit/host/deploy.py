"""``otakit deploy FILE VERSION PRODUCT GROUP``: the one-line deploy of protocols.md §7.

Uploads the file (with a progress bar) to the server's management API, checks that the server
read the version the operator meant, and deploys it to the product and group with an expiry in
days. The reference design uses the version as priority; otakit's server orders deployments by
version itself (server/service/offers.py ``rank``), so the priority is left at 0 unless the operator
overrides it with ``--priority``. The product is created if it does not exist yet (allowing raw
files when FILE is not a signed image or package).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from otakit.errors import ApiError, InputFileError, UsageError
from otakit.host.client import SERVER_ENV, TOKEN_ENV, ManagementClient
from otakit.image.header import IMAGE_MAGIC
from otakit.image.package import is_package
from otakit.protocol.version import FirmwareVersion

CHUNK = 256 * 1024
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1  # the server's range (a 32-bit column)

err = Console(stderr=True, highlight=False, soft_wrap=True)


def _signed_kind(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(512)
    return is_package(head) or (
        len(head) >= 4 and int.from_bytes(head[:4], "little") == IMAGE_MAGIC
    )


def _chunks(path: Path, progress: Progress, task: Any) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            progress.advance(task, len(chunk))
            yield chunk


def deploy_file(
    client: ManagementClient,
    path: Path,
    version: str,
    product: str,
    group: str,
    *,
    container: str = "ota",
    days: float = 365,
    priority: int | None = None,
) -> dict[str, Any]:
    """Upload ``path`` and deploy it; ``priority`` None leaves the server's default (0), so the
    deployment is ordered by its version."""
    wanted = FirmwareVersion.parse(version)
    if not path.is_file():
        raise InputFileError(f"{path} is not a file", value=str(path))
    signed = _signed_kind(path)
    try:
        client.request("GET", f"/api/v1/products/{product}")
    except ApiError as exc:
        if exc.status != 404:
            raise
        client.request("PUT", f"/api/v1/products/{product}", json={"allow_raw": not signed})
    size = path.stat().st_size
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
    ) as progress:
        task = progress.add_task(f"uploading {path.name}", total=size)
        artifact = client.request(
            "POST",
            "/api/v1/artifacts",
            params={
                "name": path.name,
                "version": str(wanted),
                "product": product,
                "container": container,
            },
            content=_chunks(path, progress, task),
            headers={"content-type": "application/octet-stream", "content-length": str(size)},
        ).json()
    if FirmwareVersion.parse(artifact["version"]) != wanted:
        raise UsageError(
            f"{path.name} is version {artifact['version']}, not {version}; nothing deployed",
            value=artifact["version"],
        )
    body: dict[str, Any] = {
        "artifact_id": artifact["id"],
        "product": product,
        "group": group,
        "expiry_days": days,
    }
    if priority is not None:
        body["priority"] = priority
    deployment: dict[str, Any] = client.request("POST", "/api/v1/deployments", json=body).json()
    deployment["artifact"] = artifact
    return deployment


def deploy(
    file: Annotated[Path, typer.Argument(help="Image, package or raw file.", show_default=False)],
    version: Annotated[str, typer.Argument(help="Its version (N or a.b.c).", show_default=False)],
    product: Annotated[str, typer.Argument(help="Target product.", show_default=False)],
    group: Annotated[str, typer.Argument(help="Target device group.", show_default=False)],
    container: Annotated[str, typer.Option("-c", "--container", help="Storage container.")] = "ota",
    days: Annotated[float, typer.Option("-d", "--days", help="Expiry in days.")] = 365,
    priority: Annotated[
        int | None,
        typer.Option(
            "--priority",
            metavar="N",
            help="Override: outranks every deployment of a lower priority, whatever their "
            "versions (default 0: the highest version wins).",
            show_default=False,
        ),
    ] = None,
    server: Annotated[
        str | None, typer.Option("--server", help=f"Server URL (default ${SERVER_ENV}).")
    ] = None,
    token: Annotated[
        str | None, typer.Option("--token", help=f"Admin token (default ${TOKEN_ENV}).")
    ] = None,
) -> None:
    """Upload FILE and deploy it to PRODUCT/GROUP (the reference design's deploy command)."""
    server = server or os.environ.get(SERVER_ENV) or "http://127.0.0.1:8080"
    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        raise UsageError(f"give an admin token with --token or ${TOKEN_ENV}")
    if days <= 0:
        raise UsageError("--days must be positive", value=days)
    if priority is not None and not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise UsageError(
            f"--priority must be from {PRIORITY_MIN} to {PRIORITY_MAX}", value=priority
        )
    client = ManagementClient(server, token)
    try:
        result = deploy_file(
            client,
            file,
            version,
            product,
            group,
            container=container,
            days=days,
            priority=priority,
        )
    finally:
        client.close()
    err.print(
        f"deployed {file.name} {result['version']} to {product}/{group}: deployment "
        f"{result['id']}, priority {result['priority']}, expires {result['expires_at']}"
    )
    print(result["id"])
