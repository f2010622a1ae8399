"""``otakit rollout ...``: phased deployments from the command line (the management API's
``/api/v1/rollouts``).

    otakit rollout create 7 --phase 10% --phase 50% --phase 100% --success 95% \\
        --max-errors 2% --on-error abort --window "mon-fri 02:00-05:00 Europe/Berlin"
    otakit rollout create --artifact SHA256 --product sensor --group field --phase group:canary \\
        --phase 100%                      # a new deployment, phased from its first second
    otakit rollout show 3                 # state, current phase, per-phase counts
    otakit rollout list [--state running]
    otakit rollout pause|resume|abort 3 [--reason TEXT]
    otakit rollout approve 3 [--phase N]  # advance the current phase now

A ``--phase`` is ``N%`` (cumulative share of the targeted devices) or ``group:NAME``, optionally
followed by per-phase settings: ``50%,manual``, ``10%,success=100%,max-errors=1,on-error=abort``.
The server and admin token come from ``--server``/``--token`` or ``$OTAKIT_SERVER``/
``$OTAKIT_TOKEN``, as for ``otakit deploy``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.console import Console

from otakit.errors import UsageError
from otakit.host.client import SERVER_ENV, TOKEN_ENV, Column, ManagementClient, show_table

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

app = typer.Typer(
    help="Phased deployments: create, show, pause, resume, abort, approve.",
    no_args_is_help=True,
)

STATES = ("scheduled", "running", "paused", "aborted", "completed")
COUNTS = ("Downloading", "Interrupted", "Applying", "Applied", "Error", "Reverted")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d)?$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}

ServerOption = Annotated[
    str | None, typer.Option("--server", help=f"Server URL (default ${SERVER_ENV}).")
]
TokenOption = Annotated[
    str | None, typer.Option("--token", help=f"Admin token (default ${TOKEN_ENV}).")
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the server's JSON.")]
ReasonOption = Annotated[
    str | None, typer.Option("--reason", help="Why (kept in the rollout's events).")
]


# --- parsing -----------------------------------------------------------------------------------


def percent(text: str, option: str) -> float:
    """``90%`` or ``90`` -> 90.0 (0..100)."""
    value = text.strip().removesuffix("%")
    try:
        number = float(value)
    except ValueError:
        raise UsageError(f"{option} {text!r} is not a percentage like 90%", value=text) from None
    if not 0 <= number <= 100:
        raise UsageError(f"{option} {text!r} is not between 0% and 100%", value=text)
    return number


def errors_allowed(text: str, option: str = "--max-errors") -> dict[str, Any]:
    """``5%`` -> a share of the phase's devices; ``3`` -> a number of devices."""
    text = text.strip()
    if text.endswith("%"):
        return {"max_errors_percent": percent(text, option)}
    if not text.isdigit():
        raise UsageError(
            f"{option} {text!r}: give a number of devices (3) or a percentage (5%)", value=text
        )
    return {"max_errors": int(text)}


def duration(text: str, option: str) -> int:
    """``90s``, ``30m``, ``1h``, ``2d`` or plain seconds -> seconds."""
    found = _DURATION.match(text.strip().lower())
    if found is None:
        raise UsageError(f"{option} {text!r} is not a duration like 90s, 30m, 1h or 2d", value=text)
    return round(float(found.group(1)) * _UNITS[found.group(2)])


def phase_spec(text: str, defaults: dict[str, Any]) -> dict[str, Any]:
    """One ``--phase``: ``N%`` or ``group:NAME``, then ``,manual``, ``,success=N%``,
    ``,max-errors=N|N%``, ``,on-error=pause|abort``."""
    first, *options = [part.strip() for part in text.split(",")]
    spec = dict(defaults)
    if first.lower().startswith(("group:", "group=")):
        name = first[6:].strip()
        if not name:
            raise UsageError(f"--phase {text!r}: the group has no name", value=text)
        spec["group"] = name
    elif first.endswith("%"):
        spec["percent"] = percent(first, "--phase")
        if spec["percent"] == 0:
            raise UsageError(f"--phase {text!r}: a phase needs more than 0%", value=text)
    else:
        raise UsageError(
            f"--phase {text!r}: expected N% (e.g. 10%) or group:NAME, then options", value=text
        )
    for option in options:
        key, _, value = option.partition("=")
        key = key.strip().lower().replace("_", "-")
        if key == "manual" and not value:
            spec["manual"] = True
        elif key == "success" and value:
            spec["success"] = percent(value, "--phase success")
        elif key == "max-errors" and value:
            spec.pop("max_errors", None)
            spec.pop("max_errors_percent", None)
            spec.update(errors_allowed(value, "--phase max-errors"))
        elif key == "on-error" and value in ("pause", "abort"):
            spec["on_error"] = value
        else:
            raise UsageError(
                f"--phase {text!r}: unknown setting {option!r} (manual, success=N%, "
                "max-errors=N|N%, on-error=pause|abort)",
                value=text,
            )
    return spec


def start_time(text: str) -> str:
    """An ISO 8601 time; without a zone it is UTC."""
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"--start {text!r} is not an ISO time like 2027-03-01T02:00+01:00", value=text
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.isoformat()


# --- output ------------------------------------------------------------------------------------


def _pct(part: int, whole: int) -> str:
    return f"{100 * part / whole:.0f}%" if whole else "-"


def _when(text: str | None) -> str:
    if not text:
        return "-"
    return datetime.fromisoformat(text).astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _admits(phase: Mapping[str, Any]) -> str:
    if phase.get("group") is not None:
        return f"group {phase['group']}"
    return f"{phase['percent']:g}%"


def _limits(phase: Mapping[str, Any]) -> str:
    rules = []
    if phase.get("manual"):
        rules.append("manual")
    else:
        rules.append(f"≥{phase['success']:g}%")
    if phase.get("max_errors") is not None:
        rules.append(f"errors ≤{phase['max_errors']}")
    if phase.get("max_errors_percent") is not None:
        rules.append(f"errors ≤{phase['max_errors_percent']:g}%")
    if phase.get("max_errors") is not None or phase.get("max_errors_percent") is not None:
        rules.append(f"then {phase['on_error']}")
    return ", ".join(rules)


def _count_column(name: str) -> Column:
    """A phase's devices in state ``name`` (Downloading, Applied...)."""
    return Column(name, lambda p: p["counts"].get(name, 0), justify="right", drop=2)


def print_rollout(rollout: dict[str, Any]) -> None:
    """A rollout as a person reads it: a summary, then one row per phase."""
    state = rollout["state"]
    total = len(rollout["phases"])
    where = f"phase {rollout['phase']} of {total}" if state != "completed" else f"{total} phases"
    out.print(
        f"[bold]rollout {rollout['id']}[/bold]: {state}, {where} — deployment "
        f"{rollout['deployment_id']}, version {rollout['version']}, {rollout['condition']}"
    )
    if rollout.get("reason") and state in ("paused", "aborted"):
        out.print(f"  reason: {rollout['reason']}", markup=False)
    if rollout.get("awaiting_approval"):
        out.print(
            f"  waiting for approval: otakit rollout approve {rollout['id']} "
            f"--phase {rollout['phase']}"
        )
    if rollout.get("start_at"):
        out.print(f"  start: {_when(rollout['start_at'])}")
    if rollout.get("window"):
        status = "open" if rollout["window_open"] else f"opens {_when(rollout['next_window'])}"
        out.print(f"  window: {rollout['window']} ({status})", markup=False)
    health = [f"confirm within {rollout['confirm_timeout']}s" if rollout["confirm_timeout"] else ""]
    if rollout.get("max_boots") is not None:
        health.append(f"at most {rollout['max_boots']} boots")
    if rollout.get("soak"):
        health.append(f"soak {rollout['soak']}s")
    if rollout.get("frozen"):
        health.append("frozen targets")
    if any(health):
        out.print("  " + ", ".join(h for h in health if h))
    # at 80 columns the per-state counts go first (right to left), then the phase's rule
    columns = [
        Column("phase", lambda p: f"{p['number']}{' *' if p['status'] == 'current' else ''}"),
        Column("admits", _admits),
        Column("rule", _limits, drop=1),
        Column("status", "status"),
        Column("devices", "targeted", justify="right"),
        Column("ok", lambda p: f"{p['succeeded']} ({_pct(p['succeeded'], p['targeted'])})"),
        Column(
            "failed",
            lambda p: (
                str(p["failed"]) + (f" ({p['acknowledged']} accepted)" if p["acknowledged"] else "")
            ),
        ),
        *(_count_column(name) for name in COUNTS),
    ]
    show_table(rollout["phases"], columns, console=out)


# --- commands ----------------------------------------------------------------------------------


def _client(server: str | None, token: str | None) -> ManagementClient:
    server = server or os.environ.get(SERVER_ENV) or "http://127.0.0.1:8080"
    token = token or os.environ.get(TOKEN_ENV)
    if not token:
        raise UsageError(f"give an admin token with --token or ${TOKEN_ENV}")
    return ManagementClient(server, token)


def _call(server: str | None, token: str | None, method: str, path: str, **kwargs: Any) -> Any:
    """The JSON answer of one management API call."""
    client = _client(server, token)
    try:
        return client.request(method, path, **kwargs).json()
    finally:
        client.close()


def _rollout_id(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise UsageError(f"{text!r} is not a rollout id (a positive number)", value=text)
    return int(text)


@app.command()
def create(
    deployment: Annotated[
        str | None, typer.Argument(help="Deployment id to phase.", show_default=False)
    ] = None,
    phase: Annotated[
        list[str] | None,
        typer.Option("--phase", help="N% or group:NAME [,manual,success=N%,...]; repeat."),
    ] = None,
    success: Annotated[
        str, typer.Option("--success", help="Applied and healthy share to advance a phase.")
    ] = "90%",
    max_errors: Annotated[
        str | None,
        typer.Option("--max-errors", help="Failures allowed per phase: N devices or N%."),
    ] = None,
    on_error: Annotated[
        str, typer.Option("--on-error", help="When a phase fails more: pause or abort.")
    ] = "pause",
    manual: Annotated[
        bool, typer.Option("--manual", help="Every phase waits for `otakit rollout approve`.")
    ] = False,
    window: Annotated[
        str | None,
        typer.Option(
            "--window", help="Maintenance window, e.g. 'mon-fri 02:00-05:00 Europe/Berlin'."
        ),
    ] = None,
    start: Annotated[
        str | None, typer.Option("--start", help="No offers before this ISO time (UTC if no zone).")
    ] = None,
    confirm_timeout: Annotated[
        str, typer.Option("--confirm-timeout", help="From applying to running it; 0: no limit.")
    ] = "1h",
    max_boots: Annotated[
        int | None,
        typer.Option("--max-boots", help="More boots within the confirm timeout: a boot loop."),
    ] = None,
    soak: Annotated[
        str, typer.Option("--soak", help="How long a device runs it before it counts.")
    ] = "0",
    frozen: Annotated[
        bool, typer.Option("--frozen", help="Only devices targeted at the start, no late joiners.")
    ] = False,
    artifact: Annotated[
        str | None, typer.Option("--artifact", help="New deployment: the artifact (SHA-256).")
    ] = None,
    product: Annotated[
        str | None, typer.Option("--product", help="New deployment: product.")
    ] = None,
    group: Annotated[str | None, typer.Option("--group", help="New deployment: group.")] = None,
    condition: Annotated[
        str | None, typer.Option("--condition", help="New deployment: tags.NAME='V' AND ...")
    ] = None,
    priority: Annotated[
        int,
        typer.Option(
            "--priority", help="New deployment: override the version order (default 0: none)."
        ),
    ] = 0,
    days: Annotated[float, typer.Option("--days", help="New deployment: expiry in days.")] = 365,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Phase DEPLOYMENT, or create a new deployment phased from the start (--artifact)."""
    if not phase:
        raise UsageError("give the phases: --phase 10% --phase 50% --phase 100% (or group:NAME)")
    if on_error not in ("pause", "abort"):
        raise UsageError(f"--on-error must be pause or abort, not {on_error!r}", value=on_error)
    if max_boots is not None and max_boots < 0:
        raise UsageError("--max-boots cannot be negative", value=max_boots)
    defaults: dict[str, Any] = {
        "success": percent(success, "--success"),
        "manual": manual,
        "on_error": on_error,
    }
    if max_errors is not None:
        defaults.update(errors_allowed(max_errors))
    body: dict[str, Any] = {
        "phases": [phase_spec(p, defaults) for p in phase],
        "frozen": frozen,
        "confirm_timeout": duration(confirm_timeout, "--confirm-timeout"),
        "max_boots": max_boots,
        "soak": duration(soak, "--soak"),
    }
    if window:
        body["window"] = window
    if start:
        body["start_at"] = start_time(start)
    client = _client(server, token)
    try:
        if (deployment is None) == (artifact is None):
            raise UsageError("give a DEPLOYMENT id, or --artifact (with --product or --condition)")
        if deployment is not None:
            if not deployment.isdigit():
                raise UsageError(f"{deployment!r} is not a deployment id", value=deployment)
            body["deployment_id"] = int(deployment)
        else:
            if (product is None) == (condition is None):
                raise UsageError("a new deployment needs --product [--group] or --condition")
            found = client.request("GET", f"/api/v1/artifacts/{artifact}").json()
            body["deployment"] = {
                "artifact_id": found["id"],
                "product": product,
                "group": group,
                "condition": condition,
                "priority": priority,
                "expiry_days": days,
            }
        rollout = client.request("POST", "/api/v1/rollouts", json=body).json()
    finally:
        client.close()
    if as_json:
        out.print_json(json.dumps(rollout))
        return
    plan = ", ".join(_admits(p) for p in rollout["phases"])
    err.print(
        f"rollout {rollout['id']} of deployment {rollout['deployment_id']} "
        f"({rollout['version']}): {rollout['state']}, phases {plan}",
        markup=False,
    )
    print(rollout["id"])


@app.command()
def show(
    rollout: Annotated[str, typer.Argument(help="Rollout id.", show_default=False)],
    events: Annotated[bool, typer.Option("--events", help="Also list what happened.")] = False,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """State, current phase and per-phase device counts."""
    rollout_id = _rollout_id(rollout)
    found = _call(server, token, "GET", f"/api/v1/rollouts/{rollout_id}")
    happened = (
        _call(server, token, "GET", f"/api/v1/rollouts/{rollout_id}/events") if events else []
    )
    if as_json:
        out.print_json(json.dumps({**found, "events": happened} if events else found))
        return
    print_rollout(found)
    for event in happened:
        out.print(
            f"  {_when(event['at'])}  {event['kind']:<9} phase {event['phase']}  "
            f"{event['actor']}  {event['detail'] or ''}",
            markup=False,
        )


@app.command("list")
def list_rollouts(
    state: Annotated[
        str | None, typer.Option("--state", help="Only these: " + ", ".join(STATES) + ".")
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", min=1, help="Show at most this many (the newest).")
    ] = 50,
    server: ServerOption = None,
    token: TokenOption = None,
    as_json: JsonOption = False,
) -> None:
    """Rollouts, newest first (read a page at a time, up to --limit)."""
    if state is not None and state not in STATES:
        raise UsageError(f"--state must be one of {', '.join(STATES)}", value=state)
    found: list[dict[str, Any]] = []
    client = _client(server, token)
    try:
        params = {"state": state} if state else {}
        for page in client.pages("/api/v1/rollouts", params, page_size=min(limit, 100)):
            found += page[: limit - len(found)]
            if len(found) >= limit:
                break
    finally:
        client.close()
    if as_json:
        out.print_json(json.dumps(found))
        return
    show_table(
        found,
        [
            Column("id", "id", justify="right"),
            Column("deployment", "deployment_id", justify="right"),
            Column("version", "version"),
            Column("state", "state"),
            Column("phase", lambda r: f"{r['phase']}/{len(r['phases'])}"),
            Column("devices", "targeted", justify="right"),
            Column("applied", lambda r: sum(p["succeeded"] for p in r["phases"]), drop=1),
            Column("failed", lambda r: sum(p["failed"] for p in r["phases"]), drop=1),
        ],
        empty="no rollouts",
        console=out,
    )


def _act(
    action: str, rollout: str, server: str | None, token: str | None, body: dict[str, Any]
) -> None:
    rollout_id = _rollout_id(rollout)
    found = _call(server, token, "POST", f"/api/v1/rollouts/{rollout_id}/{action}", json=body)
    err.print(
        f"rollout {rollout_id}: {found['state']}, phase {found['phase']} of {len(found['phases'])}",
        markup=False,
    )


@app.command()
def pause(
    rollout: Annotated[str, typer.Argument(help="Rollout id.", show_default=False)],
    reason: ReasonOption = None,
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Stop new offers (downloads under way may finish)."""
    _act("pause", rollout, server, token, {"reason": reason})


@app.command()
def resume(
    rollout: Annotated[str, typer.Argument(help="Rollout id.", show_default=False)],
    reason: ReasonOption = None,
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Offer again; failures so far are accepted (error thresholds count from now)."""
    _act("resume", rollout, server, token, {"reason": reason})


@app.command()
def abort(
    rollout: Annotated[str, typer.Argument(help="Rollout id.", show_default=False)],
    reason: ReasonOption = None,
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Stop for good: cancels the deployment; downloads under way are told to stop."""
    _act("abort", rollout, server, token, {"reason": reason})


@app.command()
def approve(
    rollout: Annotated[str, typer.Argument(help="Rollout id.", show_default=False)],
    phase: Annotated[
        int | None,
        typer.Option("--phase", help="The phase you approve (default: the current one)."),
    ] = None,
    reason: ReasonOption = None,
    server: ServerOption = None,
    token: TokenOption = None,
) -> None:
    """Advance the current phase now (the only way past a manual phase)."""
    rollout_id = _rollout_id(rollout)
    if phase is None:  # approve what was seen: a second approve of it is refused, not applied
        phase = int(_call(server, token, "GET", f"/api/v1/rollouts/{rollout_id}")["phase"])
    _act("approve", rollout, server, token, {"phase": phase, "reason": reason})
