"""``otakit audit list``: the audit log of operator actions (who, when, what), newest first.

Every action an operator takes through the management API (deploy, rollout
create/pause/resume/abort/approve, cancel, token create/revoke, key trust, ...) is recorded by
the server with the token's label as the actor (server/service/audit.py).
"""

from __future__ import annotations

from typing import Annotated

import typer

from otakit.host.client import (
    Column,
    JsonOption,
    ServerOption,
    TokenOption,
    connect,
    first,
    fitting,
    limit_option,
    note_more,
    print_json,
    show_table,
    timestamp,
)

app = typer.Typer(help="The audit log of operator actions.", no_args_is_help=True)


@app.command("list")
def list_events(
    action: Annotated[
        str | None,
        typer.Option("--action", metavar="ACTION", help="Only this action, e.g. rollout.abort."),
    ] = None,
    actor: Annotated[
        str | None,
        typer.Option("--actor", metavar="WHO", help="Only actions of this actor (token label)."),
    ] = None,
    limit: Annotated[int, limit_option("events (the newest)")] = 50,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Operator actions, newest first: when, who (the token's label), what and on what."""
    params = {k: v for k, v in {"action": action, "actor": actor}.items() if v}
    with connect(server, token) as client:
        events, more = first(client, "/api/v1/audit", params, limit)
    if as_json:
        print_json(events)
        return
    show_table(
        events,
        fitting(
            events,
            [
                # date over time, and the token's label over its id: at 80 columns the four
                # first columns fit whole (no token id folded)
                Column("at", lambda e: timestamp(e["at"]).replace(" ", "\n", 1)),
                Column("actor", lambda e: str(e["actor"]).replace(" (", "\n(", 1)),
                Column("action", "action"),
                Column("target", "target"),
                Column("details", "details", drop=1),
            ],
        ),
        empty="no audit events",
    )
    note_more(more, limit, "events")
