"""``otakit deployment ...``: deployments on a server: list, show, cancel.

A deployment offers one artifact to the devices its target matches (a product and group, or a
tag condition) until it is cancelled or expires; ``otakit deploy`` and ``otakit rollout create``
make them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import typer

from otakit.errors import OtakitError, UsageError
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
from otakit.server.targeting import BOARD_TAG, GROUP_TAG, PRODUCT_TAG, parse_condition

app = typer.Typer(help="Deployments: list, show, cancel.", no_args_is_help=True)

# the count labels of protocol/states.py, in order
COUNTS = ("Downloading", "Interrupted", "Applying", "Applied", "Error", "Reverted", "Unknown")
IN_FLIGHT = ("Downloading", "Interrupted", "Applying")
FAILED = ("Error", "Reverted")

IdArgument = Annotated[str, typer.Argument(metavar="N", help="Deployment id.")]


def _id(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) < 2**31:
        raise UsageError(f"{text!r} is not a deployment id (a positive number)", value=text)
    return int(text)


def state(deployment: Mapping[str, Any]) -> str:
    """active, cancelled or expired."""
    if deployment.get("active"):
        return "active"
    return "cancelled" if deployment.get("cancelled_at") else "expired"


# the tags a product, group and board deploy to (server/targeting.py), by the option's name
_NAMES = {PRODUCT_TAG: "product", GROUP_TAG: "group", BOARD_TAG: "board"}


def target(deployment: Mapping[str, Any]) -> str:
    """Whom it targets, as ``product=P, group=G`` (any other tag as ``NAME=VALUE``)."""
    condition = str(deployment.get("condition") or "")
    try:
        terms = parse_condition(condition)
    except OtakitError:
        return condition
    return ", ".join(f"{_NAMES.get(name, name)}={value}" for name, value in terms.items())


def _sum(deployment: Mapping[str, Any], labels: tuple[str, ...]) -> int:
    counts: dict[str, int] = deployment.get("counts") or {}
    return sum(counts.get(label, 0) for label in labels)


def _targeted(deployment: Mapping[str, Any]) -> object:
    return deployment.get("targeted")


@app.command("list")
def list_deployments(
    active: Annotated[
        bool | None,
        typer.Option("--active/--finished", help="Only active ones, or only finished ones."),
    ] = None,
    artifact: Annotated[
        str | None,
        typer.Option("--artifact", metavar="ID", help="Of this artifact (id or 12+ characters)."),
    ] = None,
    limit: Annotated[int, limit_option("deployments (the newest)")] = 50,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Deployments, newest first, with how many devices are where."""
    params: dict[str, Any] = {}
    if active is not None:
        params["active"] = "true" if active else "false"
    if artifact:
        params["artifact"] = artifact
    with connect(server, token) as client:
        found, more = first(client, "/api/v1/deployments", params, limit)
    if as_json:
        print_json(found)
        return
    show_table(
        found,
        fitting(
            found,
            [
                Column("id", "id", justify="right"),
                Column("version", "version"),
                Column("target", target, min_width=16),
                Column("state", state),
                Column("targeted", _targeted, justify="right", drop=2),
                Column("applied", lambda d: _sum(d, ("Applied",)), justify="right"),
                Column("busy", lambda d: _sum(d, IN_FLIGHT), justify="right", drop=3),
                Column("failed", lambda d: _sum(d, FAILED), justify="right"),
                Column("rollout", "rollout_id", justify="right", drop=4),
                Column("artifact", lambda d: short_id(d["artifact_id"]), drop=5),
                Column("created", lambda d: timestamp(d["created_at"]), drop=6),
            ],
        ),
        empty="no deployments",
    )
    note_more(more, limit, "deployments")


def print_deployment(deployment: dict[str, Any]) -> None:
    """A deployment as a person reads it: what, to whom, its state, then its counts."""
    out.print(
        f"[bold]deployment {deployment['id']}[/bold]: version {deployment['version']} "
        f"(artifact {short_id(deployment['artifact_id'])}), {state(deployment)}",
        highlight=False,
    )
    rows = [("target", f"{target(deployment)}  ({deployment['condition']})")]
    if deployment.get("targeted") is not None:
        rows.append(("targeted", f"{deployment['targeted']} registered devices"))
    if deployment.get("rollout_id"):
        rows.append(("rollout", f"{deployment['rollout_id']} (otakit rollout show)"))
    rows.append(("created", timestamp(deployment["created_at"])))
    if deployment.get("cancelled_at"):
        rows.append(("cancelled", timestamp(deployment["cancelled_at"])))
    else:
        rows.append(("expires", timestamp(deployment["expires_at"])))
    if deployment.get("priority"):
        rows.append(("priority", str(deployment["priority"])))
    if deployment.get("downgrade"):
        rows.append(("downgrade", "allowed"))
    counts: dict[str, int] = deployment.get("counts") or {}
    rows.append(("devices", ", ".join(f"{counts.get(c, 0)} {c.lower()}" for c in COUNTS)))
    anonymous: dict[str, int] = deployment.get("anonymous") or {}
    if any(anonymous.values()):
        rows.append(
            ("without token", ", ".join(f"{n} {k.lower()}" for k, n in anonymous.items() if n))
        )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        out.print(f"  {name:<{width}}  {value}", markup=False)


@app.command()
def show(
    deployment: IdArgument,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """One deployment: artifact, target, state and how many devices are where."""
    number = _id(deployment)
    with connect(server, token) as client:
        found = client.request("GET", f"/api/v1/deployments/{number}").json()
    if as_json:
        print_json(found)
        return
    print_deployment(found)


@app.command()
def cancel(
    deployment: IdArgument,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop offering a deployment (devices that got it keep it)."""
    number = _id(deployment)
    with connect(server, token) as client:
        found = client.request("POST", f"/api/v1/deployments/{number}/cancel").json()
    if as_json:
        print_json(found)
        return
    err.print(
        f"deployment {number} cancelled: no device is offered version {found['version']} by it "
        f"any more ({_sum(found, ('Applied',))} applied it and keep it)",
        markup=False,
    )
