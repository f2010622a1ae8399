"""Prometheus metrics at ``/metrics``, in the text exposition format 0.0.4 (written here; no
client library needed).

Two kinds of numbers:

- **Counters** of what this host served: device check-ins and status reports (by API),
  downloads (requests by route and status code, and the body bytes sent), and HTTP responses by
  status class. :class:`Metered` counts them in front of everything else, so the signed ``/dl``
  downloads that bypass the web framework are counted too. Each worker process counts in memory
  and writes its counts to ``DATA/metrics/<worker>.json`` about once a second; a scrape, whichever
  worker answers it, adds up every worker's file (its own counts are live, the others' at most a
  second old). The files are cleared when the server starts, so counters start from zero then,
  as Prometheus expects of a restart. A worker that dies leaves its file, so totals never go
  down while the server runs.
- **Gauges** read from the database at scrape time: deployments by state, devices per status in
  each active deployment, devices by last reported status, rollouts by state, artifacts. They
  are fleet-wide: every host answers the same.

Access (read once when the app is built, from the environment): an admin or viewer token by
default;
``OTAKIT_METRICS_TOKEN=SECRET`` also accepts ``Authorization: Bearer SECRET`` (a credential that
only reads metrics, for the scraper); ``OTAKIT_METRICS_OPEN=1`` needs no token at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import math
import os
import secrets
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import anyio
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from otakit import __version__
from otakit.errors import ForbiddenError, UnauthorizedError
from otakit.protocol import states
from otakit.server.context import READERS, Db, caller
from otakit.server.models import Artifact, Deployment, DeploymentDevice, Device, Rollout, utcnow
from otakit.server.service.rollouts import STATES as ROLLOUT_STATES

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FOLDER = "metrics"  # inside the data folder
FLUSH_INTERVAL = 1.0  # seconds between writes of a worker's counts
TOKEN_ENV = "OTAKIT_METRICS_TOKEN"
OPEN_ENV = "OTAKIT_METRICS_OPEN"

DEPLOYMENT_STATES = ("active", "cancelled", "expired")
DEVICE_STATUSES = states.STATES  # the one vocabulary (protocol/states.py)

# Counters: name -> help. Every one is a Prometheus counter (``_total``).
COUNTERS = {
    "otakit_checkins_total": "Device check-ins by API (json: POST /api/v1/device/checkin; "
    "original: job documents) and HTTP status code.",
    "otakit_status_reports_total": "Device status reports by API (json: POST "
    "/api/v1/device/status; original: result POSTs) and HTTP status code.",
    "otakit_download_requests_total": "Image download requests (GET and HEAD) by route "
    "(signed: /dl; device: /devices/S/files; anonymous: /files, /products/P/files; direct: /ota-update.bin) and "
    "HTTP status code.",
    "otakit_download_bytes_total": "Image bytes sent in 200 and 206 download responses, by route.",
    "otakit_http_responses_total": "HTTP responses by status class (1xx..5xx); 4xx and 5xx are "
    "the errors. A request that failed before any response counts as 5xx.",
}

Labels = tuple[tuple[str, str], ...]
Key = tuple[str, Labels]


# --- exposition --------------------------------------------------------------------------------


@dataclass
class Family:
    """One metric family: its name, type, help and samples (labels, value)."""

    name: str
    kind: str  # counter or gauge
    help: str
    samples: list[tuple[Labels, float]] = field(default_factory=list)

    def add(self, value: float, /, **labels: str) -> None:
        self.samples.append((tuple(sorted(labels.items())), value))


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**63:
        return str(int(value))
    return repr(float(value))


def render(families: Iterable[Family]) -> str:
    """The text exposition format 0.0.4: ``# HELP``, ``# TYPE``, then one line per sample."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in sorted(family.samples):
            text = ",".join(f'{k}="{_escape_label(v)}"' for k, v in labels)
            lines.append(
                f"{family.name}{{{text}}} {_number(value)}"
                if text
                else f"{family.name} {_number(value)}"
            )
    return "\n".join(lines) + "\n"


# --- counters ----------------------------------------------------------------------------------


class Counters:
    """This process's counters, and the sum over every worker of the server.

    ``folder`` holds one JSON file per worker (written by :meth:`flush`); ``None`` keeps the
    counts in this process only.
    """

    def __init__(self, folder: Path | None) -> None:
        self.folder = folder
        self.worker = f"{os.getpid()}-{secrets.token_hex(4)}"
        self._values: dict[Key, float] = {}
        self._dirty = True
        self._warned = False

    def add(self, name: str, value: float = 1, /, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self._values[key] = self._values.get(key, 0) + value
        self._dirty = True

    def local(self) -> dict[Key, float]:
        return dict(self._values)

    @property
    def file(self) -> Path | None:
        return self.folder / f"{self.worker}.json" if self.folder is not None else None

    def flush(self) -> None:
        """Write this worker's counts for the others (a temporary file and a rename)."""
        self._write(self._pending())

    def _pending(self) -> list[list[Any]] | None:
        """What to write, or None. Called on the event loop, where the counters change: the
        writing itself may then happen in a thread."""
        target = self.file
        if target is None or (not self._dirty and target.exists()):
            return None
        self._dirty = False
        return [[name, dict(labels), value] for (name, labels), value in self._values.items()]

    def _write(self, data: list[list[Any]] | None) -> None:
        target = self.file
        if data is None or target is None:
            return
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_suffix(".tmp")
            tmp.write_text(json.dumps({"worker": self.worker, "counters": data}))
            os.replace(tmp, target)
        except OSError as exc:
            self._dirty = True
            if not self._warned:
                self._warned = True
                log.warning("metrics: cannot write %s (%s); counting this worker only", target, exc)

    def others(self) -> dict[Key, float]:
        """The other workers' counts, from their files (blocking: call it in a thread)."""
        result: dict[Key, float] = {}
        if self.folder is None:
            return result
        own = self.file
        try:
            files = [p for p in self.folder.glob("*.json") if p != own]
        except OSError:
            return result
        for path in files:
            try:
                data = json.loads(path.read_text())
                for name, labels, value in data["counters"]:
                    key = (str(name), tuple(sorted((str(k), str(v)) for k, v in labels.items())))
                    result[key] = result.get(key, 0) + float(value)
            except (OSError, ValueError, KeyError, TypeError, AttributeError):
                continue  # a file being replaced, or not ours: skip it this time
        return result

    def total(self, others: Mapping[Key, float] | None = None) -> dict[Key, float]:
        """The counts of every worker: this one live, the others from their files."""
        result = self.local()
        for key, value in (self.others() if others is None else others).items():
            result[key] = result.get(key, 0) + value
        return result

    @contextlib.asynccontextmanager
    async def flushing(self, interval: float = FLUSH_INTERVAL) -> AsyncIterator[None]:
        """Write this worker's counts every ``interval`` seconds while the app runs, and once
        more at the end."""

        async def loop() -> None:
            while True:
                try:
                    await anyio.to_thread.run_sync(self._write, self._pending())
                except Exception:  # never let metrics take the server down
                    log.exception("metrics: writing the counts failed")
                await asyncio.sleep(interval)

        task = asyncio.create_task(loop(), name="otakit-metrics-flush")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            self.flush()


def clear(data_dir: Path) -> None:
    """Forget the counts of an earlier run (call once at start, before any worker runs)."""
    folder = data_dir / FOLDER
    if not folder.is_dir():
        return
    for path in folder.iterdir():
        if path.suffix in (".json", ".tmp"):
            path.unlink(missing_ok=True)


# --- what a request is -------------------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    """What a request is for the counters: a check-in, a report or a download."""

    counter: str  # otakit_checkins_total, otakit_status_reports_total, otakit_download_...
    label: str  # the label's name: api or route
    value: str


CHECKIN_JSON = Kind("otakit_checkins_total", "api", "json")
CHECKIN_ORIGINAL = Kind("otakit_checkins_total", "api", "original")
REPORT_JSON = Kind("otakit_status_reports_total", "api", "json")
REPORT_ORIGINAL = Kind("otakit_status_reports_total", "api", "original")


def _download(route: str) -> Kind:
    return Kind("otakit_download_requests_total", "route", route)


def classify(method: str, path: str) -> Kind | None:
    """Which counted request ``method path`` is (the device API's routes), or None."""
    parts = path.split("/")[1:]
    if len(parts) > 2 and parts[0] == "products":  # a product's anonymous devices
        path, parts = "/" + "/".join(parts[2:]), parts[2:]
    read = method in ("GET", "HEAD")
    if method == "POST" and path == "/api/v1/device/checkin":
        return CHECKIN_JSON
    if method == "POST" and path == "/api/v1/device/status":
        return REPORT_JSON
    if path == "/ota-update.bin":
        return _download("direct") if read else REPORT_ORIGINAL if method == "POST" else None
    if read and (
        path == "/ota_update.json"
        or (len(parts) == 3 and parts[0] == "devices" and parts[2] == "ota_update.json")
    ):
        return CHECKIN_ORIGINAL
    if len(parts) == 3 and parts[0] in ("dl", "files"):
        route = "signed" if parts[0] == "dl" else "anonymous"
        if read:
            return _download(route)
        return REPORT_ORIGINAL if method == "POST" and route == "anonymous" else None
    if len(parts) == 5 and parts[0] == "devices" and parts[2] == "files":
        if read:
            return _download("device")
        return REPORT_ORIGINAL if method == "POST" else None
    return None


class Metered:
    """ASGI layer in front of the whole server that counts requests and bytes sent.

    ``inner`` is what it serves (the signed-download layer and the FastAPI app behind it);
    ``app`` is the FastAPI application itself, for tools and tests that reach its state.
    """

    def __init__(self, inner: ASGIApp, app: FastAPI, counters: Counters) -> None:
        self.inner = inner
        self.app = app
        self.counters = counters

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        kind = classify(scope.get("method", ""), scope.get("path", ""))
        status = 0
        sent = 0

        async def counting(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = int(message["status"])
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        try:
            await self.inner(scope, receive, counting)
        except Exception:
            status = status or 500
            raise
        finally:
            self._count(kind, status, sent)

    def _count(self, kind: Kind | None, status: int, sent: int) -> None:
        if not status:  # cancelled before answering (the client went away)
            return
        add = self.counters.add
        add("otakit_http_responses_total", code_class=f"{status // 100}xx")
        if kind is None:
            return
        add(kind.counter, **{kind.label: kind.value, "code": str(status)})
        if kind.counter == "otakit_download_requests_total" and status in (200, 206) and sent:
            add("otakit_download_bytes_total", sent, route=kind.value)


# --- gauges from the database ------------------------------------------------------------------


async def database_gauges(db: AsyncSession, now: datetime) -> list[Family]:
    """Fleet-wide gauges, read now: a few grouped counts, each over an indexed column
    (migration 0009) -- nothing per device in Python, whatever the size of the fleet."""
    state = case(
        (Deployment.cancelled_at.is_not(None), "cancelled"),
        (Deployment.expires_at <= now, "expired"),
        else_="active",
    )
    by_state = dict.fromkeys(DEPLOYMENT_STATES, 0)
    for name, count in await db.execute(select(state, func.count()).group_by(state)):
        by_state[str(name)] = int(count)
    deployments_family = Family(
        "otakit_deployments",
        "gauge",
        "Deployments by state: active, cancelled (or aborted), expired.",
    )
    for name, count in by_state.items():
        deployments_family.add(count, state=name)

    active = (Deployment.cancelled_at.is_(None)) & (Deployment.expires_at > now)
    active_ids = list(await db.scalars(select(Deployment.id).where(active)))
    per_deployment: dict[int, dict[str, int]] = {i: states.empty_counts() for i in active_ids}
    rows = await db.execute(
        select(DeploymentDevice.deployment_id, DeploymentDevice.status, func.count())
        .join(Deployment, Deployment.id == DeploymentDevice.deployment_id)
        .where(active)
        .group_by(DeploymentDevice.deployment_id, DeploymentDevice.status)
    )
    for deployment_id, status, count in rows:
        counts = per_deployment.setdefault(deployment_id, states.empty_counts())
        counts[states.label_of(status)] += int(count)
    devices_in = Family(
        "otakit_deployment_devices",
        "gauge",
        "Devices per status in each active deployment: Downloading, Interrupted, Applying, "
        "Applied, Error, Reverted, Unknown (disjoint: Error here excludes the reverted devices, which the "
        "API's deployment counts include).",
    )
    for deployment_id, counts in sorted(per_deployment.items()):
        for label, count in counts.items():
            devices_in.add(count, deployment_id=str(deployment_id), status=label)

    by_status = dict.fromkeys((*DEVICE_STATUSES, "none"), 0)
    for reported, count in await db.execute(
        select(Device.status, func.count()).group_by(Device.status)
    ):
        key = reported or "none"
        by_status[key] = by_status.get(key, 0) + int(count)
    devices_family = Family(
        "otakit_devices",
        "gauge",
        "Registered devices by their last reported status (none: never reported).",
    )
    for key, count in by_status.items():
        devices_family.add(count, status=key)

    by_rollout = dict.fromkeys(ROLLOUT_STATES, 0)
    for rollout_state, count in await db.execute(
        select(Rollout.state, func.count()).group_by(Rollout.state)
    ):
        by_rollout[str(rollout_state)] = int(count)
    rollouts_family = Family(
        "otakit_rollouts",
        "gauge",
        "Rollouts by state: scheduled, running, paused, aborted, completed.",
    )
    for rollout_state, count in by_rollout.items():
        rollouts_family.add(count, state=rollout_state)

    artifacts = Family("otakit_artifacts", "gauge", "Uploaded artifacts.")
    artifacts.add(int(await db.scalar(select(func.count()).select_from(Artifact)) or 0))
    return [deployments_family, devices_in, devices_family, rollouts_family, artifacts]


def counter_families(values: Mapping[Key, float]) -> list[Family]:
    families = {name: Family(name, "counter", text) for name, text in COUNTERS.items()}
    for (name, labels), value in values.items():
        family = families.get(name)
        if family is not None:
            family.samples.append((labels, value))
    return list(families.values())


# --- the endpoint ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Access:
    """Who may scrape: admin and viewer tokens always; a scrape-only secret; or anyone."""

    token: str | None = None
    open: bool = False

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Access:
        env = os.environ if env is None else env
        token = env.get(TOKEN_ENV) or None
        return cls(token=token, open=env.get(OPEN_ENV, "").lower() in ("1", "true", "yes"))


def counters_of(request: Request) -> Counters:
    counters: Counters = request.app.state.otakit_metrics
    return counters


async def scraper(request: Request, db: Db) -> None:
    """Admit a scrape: open, the scrape-only secret, or an admin or viewer token (else
    401/403)."""
    access: Access = request.app.state.otakit_metrics_access
    if access.open:
        return
    header = request.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if (
        access.token is not None
        and scheme.lower() == "bearer"
        and hmac.compare_digest(value.strip().encode(), access.token.encode())
    ):
        return
    token = await caller(request, db)
    if token is None:
        raise UnauthorizedError("metrics need an admin or viewer token, or the metrics token")
    if token.role not in READERS:
        raise ForbiddenError("metrics need an admin or viewer token, or the metrics token")


router = APIRouter(include_in_schema=False)


@router.get("/metrics", dependencies=[Depends(scraper)])
async def metrics(request: Request, db: Db) -> Response:
    """Counters of this host (every worker) and gauges of the fleet, for Prometheus."""
    counters = counters_of(request)
    others = await anyio.to_thread.run_sync(counters.others)
    values = counters.total(others)  # this worker's own counts taken here, on the event loop
    build = Family("otakit_build_info", "gauge", "The otakit version serving (always 1).")
    build.add(1, version=__version__)
    families = [build, *counter_families(values), *await database_gauges(db, utcnow())]
    return Response(render(families), media_type=CONTENT_TYPE)
