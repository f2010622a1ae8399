"""``otakit device ...``: registered devices on a server: list, show, set, history.

Every command is a call of the management API (``/api/v1/devices``); lists are read a page at
a time (``X-Next-Cursor``) up to ``--limit``, and the server filters and sorts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import quote

import typer

from otakit.errors import ApiError, UsageError
from otakit.host.client import (
    Column,
    JsonOption,
    ServerOption,
    TokenOption,
    connect,
    err,
    first,
    fitting,
    limit_option,
    note_more,
    out,
    print_json,
    short_id,
    show_table,
    timestamp,
)
from otakit.protocol.states import DeviceState
from otakit.server.targeting import GROUP_TAG, PRODUCT_TAG

app = typer.Typer(help="Registered devices: list, show, add, set, history.", no_args_is_help=True)

STATUSES = (*(state.value for state in DeviceState), "none")  # "none": never reported
SORTS = ("serial", "-serial", "last_seen", "-last_seen", "created_at", "-created_at")

SerialArgument = Annotated[str, typer.Argument(metavar="SERIAL", help="The device's serial.")]


def _group(device: Mapping[str, Any]) -> str | None:
    tags: dict[str, str] = device.get("tags") or {}
    return tags.get(GROUP_TAG)


def _other_tags(device: Mapping[str, Any]) -> dict[str, str]:
    tags: dict[str, str] = device.get("tags") or {}
    return {k: v for k, v in tags.items() if k not in (GROUP_TAG, PRODUCT_TAG)}


def _status(device: Mapping[str, Any]) -> str:
    status = device.get("status") or "-"
    return f"{status} ({device['error']})" if device.get("error") else status


def _path(serial: str) -> str:
    return f"/api/v1/devices/{quote(serial, safe='')}"


@app.command("list")
def list_devices(
    product: Annotated[
        str | None, typer.Option("--product", metavar="PRODUCT", help="Of this product.")
    ] = None,
    group: Annotated[
        str | None, typer.Option("--group", metavar="GROUP", help="Of this group.")
    ] = None,
    status: Annotated[
        str | None,
        typer.Option(
            "--status",
            metavar="STATUS",
            help="In this state: " + ", ".join(STATUSES) + " (never reported).",
        ),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option("--version", metavar="VERSION", help="Running a version that starts so."),
    ] = None,
    search: Annotated[
        str | None,
        typer.Option("--search", metavar="PREFIX", help="Serials that start with PREFIX."),
    ] = None,
    sort: Annotated[
        str,
        typer.Option(
            "--sort", metavar="FIELD", help="serial, last_seen or created_at; -FIELD: descending."
        ),
    ] = "serial",
    limit: Annotated[int, limit_option("devices")] = 100,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Registered devices matching every filter given (the server filters, sorts and pages)."""
    if status is not None and status not in STATUSES:
        raise UsageError(f"--status must be one of {', '.join(STATUSES)}", value=status)
    if sort not in SORTS:
        raise UsageError(f"--sort must be one of {', '.join(SORTS)}", value=sort)
    params = {
        "product": product,
        "group": group,
        "status": status,
        "version": version,
        "q": search,
        "sort": sort,
    }
    with connect(server, token) as client:
        devices, more = first(
            client, "/api/v1/devices", {k: v for k, v in params.items() if v}, limit
        )
    if as_json:
        print_json(devices)
        return
    show_table(
        devices,
        fitting(
            devices,
            [
                Column("serial", "serial"),
                Column("product", "product"),
                Column("group", _group),
                Column("version", "version"),
                Column("status", "status"),
                Column("last seen", lambda d: timestamp(d.get("last_seen")), drop=1),
                Column("tags", _other_tags, drop=2),
                Column("board", "board", drop=3),
            ],
        ),
        empty="no devices",
    )
    note_more(more, limit, "devices")


@app.command()
def show(
    serial: SerialArgument,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """One device: identity, tags, what it runs and reported, and what it is offered now."""
    with connect(server, token) as client:
        device = client.request("GET", _path(serial)).json()
        twin = client.request("GET", _path(serial) + "/twin").json()
        offer = (twin.get("desired") or {}).get("extFwInfo")
        artifact = None
        if offer:  # the twin names it by SHA-256 (and an integer version, as the gateway wants)
            artifact = client.request("GET", f"/api/v1/artifacts/{offer['sha256'].lower()}").json()
        history, _ = first(client, _path(serial) + "/history", {}, 1)
    if as_json:
        print_json(
            {
                **device,
                "offer": artifact,
                "twin": twin,
                "last_report": history[0] if history else None,
            }
        )
        return
    out.print(f"[bold]device {device['serial']}[/bold]", highlight=False)
    rows = [
        ("product", device.get("product") or "-"),
        ("group", _group(device) or "-"),
        ("board", device.get("board") or "-"),
        ("manufacturer", device.get("manufacturer") or "-"),
        ("version", device.get("version") or "-"),
        ("status", _status(device)),
        ("last seen", timestamp(device.get("last_seen"))),
        ("tags", ", ".join(f"{k}={v}" for k, v in _other_tags(device).items()) or "-"),
        ("offered now", _offer(artifact)),
    ]
    if history:
        last = history[0]
        deployment = f", deployment {last['deployment_id']}" if last.get("deployment_id") else ""
        version = f" {last['version']}" if last.get("version") else ""
        rows.append(
            (
                "last report",
                f"{timestamp(last['at'])} {last['status']}{version}{deployment} ({last['source']})",
            )
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        out.print(f"  {name:<{width}}  {value}", markup=False)


def _offer(artifact: Mapping[str, Any] | None) -> str:
    """What the server offers the device now (its job)."""
    if not artifact:
        return "nothing (up to date, or no deployment targets it)"
    return (
        f"version {artifact['version']}, artifact {short_id(artifact['id'])} "
        f"({artifact['name']}, {artifact['size']} bytes)"
    )


def _tags(pairs: list[str]) -> dict[str, str]:
    tags: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            raise UsageError(f"--tag {pair!r}: expected NAME=VALUE", value=pair)
        tags[name.strip()] = value
    return tags


@app.command("add")
def add_device(
    serial: SerialArgument,
    product: Annotated[
        str, typer.Option("--product", metavar="PRODUCT", help="Its product.", show_default=False)
    ],
    group: Annotated[
        str | None, typer.Option("--group", metavar="GROUP", help="Its group.")
    ] = None,
    board: Annotated[
        str | None, typer.Option("--board", metavar="BOARD", help="Its board (kit name).")
    ] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option("--tag", metavar="NAME=VALUE", help="A tag; repeat for several."),
    ] = None,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Register a device ahead of its first check-in (e.g. an original-middleware device, which
    sends no token); an already registered serial is refused (change it with `device set`)."""
    body: dict[str, Any] = {"product": product, "tags": _tags(tag or [])}
    if group is not None:
        body["group"] = group
    if board is not None:
        body["board"] = board
    with connect(server, token) as client:
        try:
            client.request("GET", _path(serial))
        except ApiError as exc:
            if exc.status != 404:
                raise
        else:
            raise UsageError(
                f"device {serial} is already registered: change it with `otakit device set`",
                value=serial,
            )
        device = client.request("PUT", _path(serial), json=body).json()
    if as_json:
        print_json(device)
        return
    err.print(
        f"registered {device['serial']}: product {device['product']}, group "
        f"{_group(device) or '-'}",
        markup=False,
    )


@app.command("set")
def set_device(
    serial: SerialArgument,
    group: Annotated[
        str | None, typer.Option("--group", metavar="GROUP", help="Move it to this group.")
    ] = None,
    tag: Annotated[
        list[str] | None,
        typer.Option("--tag", metavar="NAME=VALUE", help="Set a tag; repeat for several."),
    ] = None,
    version: Annotated[
        str | None,
        typer.Option(
            "--version",
            metavar="VERSION",
            help="The version it runs, when you know it (counts as a check-in, source admin).",
        ),
    ] = None,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Change a registered device's group, tags or known version (the rest stays as it is)."""
    body: dict[str, Any] = {"tags": _tags(tag or [])}
    if group is not None:
        if not group.strip():
            raise UsageError("--group cannot be empty", value=group)
        body["group"] = group
    if version is not None:
        body["version"] = version
    if group is None and not tag and version is None:
        raise UsageError(
            "nothing to change: give --group GROUP, --tag NAME=VALUE or --version VERSION"
        )
    with connect(server, token) as client:
        client.request("GET", _path(serial))  # a typo is refused, not registered as a device
        device = client.request("PUT", _path(serial), json=body).json()
    if as_json:
        print_json(device)
        return
    tags = ", ".join(f"{k}={v}" for k, v in _other_tags(device).items()) or "no other tags"
    err.print(f"device {device['serial']}: group {_group(device) or '-'}, {tags}", markup=False)


@app.command()
def history(
    serial: SerialArgument,
    limit: Annotated[int, limit_option("reports")] = 20,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """The device's status reports, newest first."""
    with connect(server, token) as client:
        reports, more = first(client, _path(serial) + "/history", {}, limit)
    if as_json:
        print_json(reports)
        return
    show_table(
        reports,
        fitting(
            reports,
            [
                Column("at", lambda r: timestamp(r["at"])),
                Column("status", "status"),
                Column("version", "version"),
                Column("deployment", "deployment_id", justify="right", drop=3),
                Column("from", "source", drop=2),
                Column("boots", "boots", justify="right", drop=4),
                Column("error", "error", drop=1),
            ],
        ),
        empty=f"no reports from {serial}",
    )
    note_more(more, limit, "reports")
