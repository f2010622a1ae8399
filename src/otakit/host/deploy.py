"""``otakit deploy FILE VERSION PRODUCT GROUP``: the one-line deploy of protocols.md §7.

Uploads the file (with a progress bar) to the server's management API, telling the server the
version the operator meant (``expect_version``: a file of another version is refused and nothing
is stored), and deploys it to the product and group (and ``--board``) with an expiry in days.
The same file deployed to the same target again gives the existing deployment ("already
deployed"); another file with a version the product already has is refused by the server
(``VERSION_TAKEN``). The reference design uses the version as priority; otakit's server orders
deployments by version itself (server/service/offers.py ``rank``), so the priority is left at 0
unless the operator overrides it with ``--priority``. The product is created if it does not
exist yet (allowing raw files when FILE is not a signed image or package).

:func:`upload_file` (with its progress bar) is also ``otakit artifact upload``'s.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, DownloadColumn, Progress, TransferSpeedColumn

from otakit.errors import ApiError, InputFileError, UsageError
from otakit.host.client import ManagementClient, ServerOption, TokenOption, connect, err, out
from otakit.image.header import IMAGE_MAGIC
from otakit.image.package import is_package
from otakit.protocol.version import FirmwareVersion

CHUNK = 256 * 1024
PRIORITY_MIN, PRIORITY_MAX = -(2**31), 2**31 - 1  # the server's range (a 32-bit column)


def signed_kind(path: Path) -> bool:
    """Whether the file is an MCUboot image or an otakit package (else: a raw file)."""
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


def upload_file(
    client: ManagementClient,
    path: Path,
    *,
    version: str | None = None,
    product: str | None = None,
    container: str = "ota",
) -> tuple[dict[str, Any], bool]:
    """Upload ``path`` with a progress bar (on stderr); the artifact and whether it is new
    (False: the server already had these bytes). ``version``, when given, is what the file must
    be: the server refuses another version (``VERSION_MISMATCH``) and stores nothing; a raw
    file takes it as its version."""
    if not path.is_file():
        raise InputFileError(f"{path} is not a file", value=str(path))
    params: dict[str, str] = {"name": path.name, "container": container}
    if version is not None:
        params["version"] = params["expect_version"] = version
    if product is not None:
        params["product"] = product
    size = path.stat().st_size
    with Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        console=err,
        transient=True,
        disable=not err.is_terminal,  # a log or a pipe gets no bar (and no blank line)
    ) as progress:
        task = progress.add_task(f"uploading {path.name}", total=size)
        response = client.request(
            "POST",
            "/api/v1/artifacts",
            params=params,
            content=_chunks(path, progress, task),
            headers={"content-type": "application/octet-stream", "content-length": str(size)},
        )
    artifact: dict[str, Any] = response.json()
    return artifact, response.status_code == 201


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
    board: str | None = None,
) -> dict[str, Any]:
    """Upload ``path`` and deploy it; ``priority`` None leaves the server's default (0), so the
    deployment is ordered by its version. The answer is the deployment, with ``artifact`` and
    ``existing`` (True: the same artifact was already deployed to this target)."""
    wanted = FirmwareVersion.parse(version)
    if not path.is_file():
        raise InputFileError(f"{path} is not a file", value=str(path))
    try:
        client.request("GET", f"/api/v1/products/{product}")
    except ApiError as exc:
        if exc.status != 404:
            raise
        client.request(
            "PATCH", f"/api/v1/products/{product}", json={"allow_raw": not signed_kind(path)}
        )
    try:
        artifact, _new = upload_file(
            client, path, version=str(wanted), product=product, container=container
        )
    except ApiError as exc:
        if exc.error != "VERSION_MISMATCH":
            raise
        words = _server_words(exc)
        found = re.search(r"\bversion ([^\s,;:()]+)", words)
        raise UsageError(
            f"{path.name} is version {found.group(1)}, not {version}: nothing uploaded, "
            "nothing deployed"
            if found
            else f"{path.name} is not {version} ({words}): nothing uploaded, nothing deployed",
            value=version,
        ) from None
    if FirmwareVersion.parse(artifact["version"]) != wanted:  # a server without expect_version
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
    if board is not None:
        body["board"] = board
    deployment: dict[str, Any] = client.json("POST", "/api/v1/deployments", json=body)
    deployment["artifact"] = artifact
    return deployment


def _server_words(exc: ApiError) -> str:
    """The server's own sentence in an ApiError's "METHOD PATH: STATUS message"."""
    _method_path, _, rest = exc.message.partition(": ")
    status, _, words = rest.partition(" ")
    return words if status.isdigit() and words else exc.message


def deploy(
    file: Annotated[
        Path,
        typer.Argument(metavar="FILE", help="Image, package or raw file.", show_default=False),
    ],
    version: Annotated[
        str, typer.Argument(metavar="VERSION", help="Its version (N or a.b.c).", show_default=False)
    ],
    product: Annotated[
        str, typer.Argument(metavar="PRODUCT", help="Target product.", show_default=False)
    ],
    group: Annotated[
        str, typer.Argument(metavar="GROUP", help="Target device group.", show_default=False)
    ],
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
    board: Annotated[
        str | None,
        typer.Option(
            "--board",
            metavar="BOARD",
            help="Only devices of this board (default: every board of the group).",
            show_default=False,
        ),
    ] = None,
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Upload FILE and deploy it to PRODUCT/GROUP (the reference design's deploy command).

    Prints the deployment's number on stdout. The same FILE to the same target again gives the
    existing deployment; a FILE of another version than VERSION is refused and nothing is
    uploaded."""
    if days <= 0:
        raise UsageError("--days must be positive", value=days)
    if priority is not None and not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise UsageError(
            f"--priority must be from {PRIORITY_MIN} to {PRIORITY_MAX}", value=priority
        )
    with connect(server, token) as client:
        result = deploy_file(
            client,
            file,
            version,
            product,
            group,
            container=container,
            days=days,
            priority=priority,
            board=board,
        )
    target = f"{product}/{group}" + (f" (board {board})" if board else "")
    if result.get("existing"):
        err.print(
            f"already deployed: deployment {result['id']} ({file.name} {result['version']} to "
            f"{target}, expires {result['expires_at']})",
            markup=False,
        )
    else:
        err.print(
            f"deployed {file.name} {result['version']} to {target}: deployment "
            f"{result['id']}, priority {result['priority']}, expires {result['expires_at']}",
            markup=False,
        )
    out.print(str(result["id"]), markup=False)
