"""Eclipse hawkBit's Direct Device Integration (DDI) API for hawkBit clients (SWUpdate's
suricatta, Zephyr's hawkBit subsystem, RAUC's hawkBit updater):
``/{tenant}/controller/v1/{controllerId}``.

The tenant is any name (hawkBit's default is ``DEFAULT``); the action id is the otakit
deployment id, and so is the software module id of its artifact. Authorization is hawkBit's:
``TargetToken`` (the device's token), ``GatewayToken`` (an enrollment token) or none where the
product allows anonymous devices. The rules live in service/ddi.py; these routes parse, call and
format. Bodies are JSON of at most body_limits.DEVICE_BODY bytes; a body that does not validate
is 422 with one line, except a feedback whose execution can still be read (SWUpdate does not
escape its failure details: service/ddi.salvage_feedback); downloads honour Range, If-Range and
HEAD like the signed downloads (server/downloads.py). Writes answer 200 with an empty body (SWUpdate
takes any other 2xx for a failure).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, BeforeValidator, Field, StringConstraints

from otakit.server import downloads
from otakit.server.context import Db, Rollouts, State, error_responses
from otakit.server.service import ddi

log = logging.getLogger("otakit.server")

router = APIRouter(
    prefix="/{tenant}/controller/v1/{controller_id}",
    tags=["hawkBit DDI"],
    responses=error_responses(401, 403, 404, 422),
)

Tenant = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._-]+$")]
ControllerId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9._:-]+$")]
ActionId = Annotated[int, Path(ge=1, le=2**31 - 1, description="The otakit deployment id.")]
FileName = Annotated[str, Path(min_length=1, max_length=160)]


def _lower(value: object) -> object:
    return value.strip().lower() if isinstance(value, str) else value


Detail = Annotated[str, StringConstraints(max_length=ddi.MAX_DETAIL_CHARS)]
AttributeKey = Annotated[str, StringConstraints(min_length=1, max_length=128)]
AttributeValue = Annotated[str, StringConstraints(max_length=128)]


class Progress(BaseModel):
    cnt: int = Field(ge=0, le=2**31 - 1)
    of: int | None = Field(default=None, ge=0, le=2**31 - 1)


class Result(BaseModel):
    finished: Annotated[ddi.Finished, BeforeValidator(_lower)] = ddi.Finished.NONE
    progress: Progress | None = None


class Status(BaseModel):
    execution: Annotated[ddi.Execution, BeforeValidator(_lower)]
    result: Result = Field(default_factory=Result)
    details: Annotated[
        list[Detail],
        BeforeValidator(ddi.bounded_details),
        Field(
            max_length=ddi.MAX_DETAILS,
            description=f"At most {ddi.MAX_DETAILS} of at most {ddi.MAX_DETAIL_CHARS} characters "
            "are kept (the rest is dropped).",
        ),
    ] = Field(default_factory=list)
    code: int | None = Field(default=None, ge=-(2**31), le=2**31 - 1)


class Feedback(BaseModel):
    """A feedback: ``status`` is what counts; ``id`` (a string or a number, as clients send
    it), ``time`` and any other field are accepted and ignored (the action is the path's)."""

    id: int | Annotated[str, StringConstraints(max_length=32)] | None = None
    time: str | None = Field(default=None, max_length=64)
    status: Status


class ConfigData(BaseModel):
    """Attributes: they become the device's tags. The legacy ``id``, ``time`` and ``status``
    are accepted and ignored."""

    mode: Annotated[Literal["merge", "replace", "remove"], BeforeValidator(_lower)] = "merge"
    data: dict[AttributeKey, AttributeValue] = Field(max_length=ddi.MAX_ATTRIBUTES)


class _FeedbackRequest(Request):
    """A feedback request whose body, when it is not JSON but its execution can be read (SWUpdate
    does not escape its failure details), is read as the JSON it meant (ddi.salvage_feedback)."""

    async def body(self) -> bytes:
        if not hasattr(self, "_salvaged"):
            raw = await super().body()
            fixed = ddi.salvage_feedback(raw)
            if fixed is not None:
                shown = fixed[:200].decode("utf-8", "replace")
                log.warning("%s: feedback that is not JSON, read as %s", self.url.path, shown)
            self._salvaged = fixed if fixed is not None else raw
        return self._salvaged


class _FeedbackRoute(APIRoute):
    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def lenient(request: Request) -> Response:
            return await handler(_FeedbackRequest(request.scope, request.receive))

        return lenient


async def _credential(request: Request, db: Db, engine: Rollouts) -> ddi.Credential:
    return await ddi.credential(db, request.headers.get("authorization"), engine.now())


Who = Annotated[ddi.Credential, Depends(_credential)]


def _base(request: Request, tenant: str, controller_id: str) -> str:
    return f"{str(request.base_url).rstrip('/')}/{tenant}/controller/v1/{controller_id}"


def _ok() -> Response:
    return Response(status_code=200)


@router.get("", summary="Base poll")
async def base_poll(
    tenant: Tenant,
    controller_id: ControllerId,
    request: Request,
    db: Db,
    st: State,
    who: Who,
    engine: Rollouts,
) -> JSONResponse:
    """The device's polling interval and the links to what it is to do (a check-in; an
    unknown controller polling with a GatewayToken, or anonymously where allowed, is
    registered)."""
    now = engine.now()
    ctl = await ddi.controller(db, tenant, controller_id, who, now, register=True)
    answer = await ddi.poll(db, ctl, now)
    await db.commit()
    await engine.changed(answer.changed)
    base = _base(request, tenant, controller_id)
    return JSONResponse(ddi.poll_document(answer, base, st.settings.ddi_poll))


@router.put("/configData", summary="Attributes")
async def config_data(
    tenant: Tenant,
    controller_id: ControllerId,
    body: ConfigData,
    db: Db,
    who: Who,
    engine: Rollouts,
) -> Response:
    """The device's attributes: they become its tags (``mode`` merge, replace or remove); the
    server's own tags (product, group) are not changed."""
    now = engine.now()
    ctl = await ddi.controller(db, tenant, controller_id, who, now, register=True)
    ddi.configure(ctl.device, body.mode, body.data, now)
    await db.commit()
    return _ok()


async def _document(
    request: Request,
    db: Db,
    st: State,
    tenant: str,
    controller_id: str,
    found: ddi.Action,
) -> JSONResponse:
    if await ddi.with_hashes(db, st.blobs, found.artifact):
        await db.commit()
    document = ddi.deployment_document(
        found.deployment.id,
        found.artifact,
        _base(request, tenant, controller_id),
        https=request.url.scheme == "https",
    )
    return JSONResponse(document)


@router.get("/deploymentBase/{action_id}", summary="An action: what to download and install")
async def deployment_base(
    tenant: Tenant,
    controller_id: ControllerId,
    action_id: ActionId,
    request: Request,
    db: Db,
    st: State,
    who: Who,
    engine: Rollouts,
    c: str | None = Query(default=None, max_length=64, description="Ignored."),
) -> JSONResponse:
    """The deployment offered to the device as a hawkBit action: one chunk (part ``bApp`` for
    an MCUboot image, ``os`` otherwise) with its artifact, hashes and download links."""
    now = engine.now()
    ctl = await ddi.controller(db, tenant, controller_id, who, now)
    found = await ddi.action(db, ctl.device, action_id, now)
    return await _document(request, db, st, tenant, controller_id, found)


async def deployment_feedback(
    tenant: Tenant,
    controller_id: ControllerId,
    action_id: ActionId,
    body: Feedback,
    db: Db,
    st: State,
    who: Who,
    engine: Rollouts,
) -> Response:
    """A status report about the action: proceeding, scheduled, resumed → downloading;
    downloaded → applying; closed with success → applied (the device runs its version),
    with failure → error (the first detail); rejected → error; closed with none → unknown."""
    now = engine.now()
    ctl = await ddi.controller(db, tenant, controller_id, who, now)
    changed = await ddi.feedback(
        db,
        ctl.device,
        action_id,
        now,
        execution=body.status.execution,
        finished=body.status.result.finished,
        details=body.status.details,
        keep=st.settings.history_per_device,
    )
    await db.commit()
    await engine.changed([changed])
    return _ok()


@router.get("/cancelAction/{action_id}", summary="A cancel the device is to confirm")
async def cancel_action(
    tenant: Tenant,
    controller_id: ControllerId,
    action_id: ActionId,
    db: Db,
    who: Who,
    engine: Rollouts,
) -> JSONResponse:
    """The action's rollout was aborted: stop it (404 when no cancel is pending)."""
    now = engine.now()
    ctl = await ddi.controller(db, tenant, controller_id, who, now)
    row = await ddi.cancel(db, ctl.device, action_id)
    action = str(row.deployment_id)
    return JSONResponse({"id": action, "cancelAction": {"stopId": action}})


async def cancel_feedback(
    tenant: Tenant,
    controller_id: ControllerId,
    action_id: ActionId,
    body: Feedback,
    db: Db,
    st: State,
    who: Who,
    engine: Rollouts,
) -> Response:
    """closed (success) or canceled confirms the cancel; rejected (or closed with failure)
    refuses it; either way it is not asked again."""
    now = engine.now()
    ctl = await ddi.controller(db, tenant, controller_id, who, now)
    changed = await ddi.cancel_feedback(
        db,
        ctl.device,
        action_id,
        now,
        execution=body.status.execution,
        finished=body.status.result.finished,
        keep=st.settings.history_per_device,
    )
    await db.commit()
    await engine.changed([changed])
    return _ok()


router.add_api_route(
    "/deploymentBase/{action_id}/feedback",
    deployment_feedback,
    methods=["POST"],
    summary="Progress and result of an action",
    route_class_override=_FeedbackRoute,
)
router.add_api_route(
    "/cancelAction/{action_id}/feedback",
    cancel_feedback,
    methods=["POST"],
    summary="The answer to a cancel",
    route_class_override=_FeedbackRoute,
)


@router.get("/installedBase/{action_id}", summary="The action installed last")
async def installed_base(
    tenant: Tenant,
    controller_id: ControllerId,
    action_id: ActionId,
    request: Request,
    db: Db,
    st: State,
    who: Who,
    engine: Rollouts,
) -> JSONResponse:
    """An action the device applied, in deploymentBase's shape (404 otherwise)."""
    now = engine.now()
    ctl = await ddi.controller(db, tenant, controller_id, who, now)
    found = await ddi.installed(db, ctl.device, action_id, now)
    return await _document(request, db, st, tenant, controller_id, found)


FILE_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The whole file, or its MD5SUM line"},
    206: {"description": "A range of the file"},
    416: {"description": "Range not satisfiable"},
}


@router.api_route(
    "/softwaremodules/{module_id}/artifacts/{filename}",
    methods=["GET", "HEAD"],
    summary="Download an artifact (or its .MD5SUM)",
    responses=FILE_RESPONSES,
    response_class=Response,
)
async def artifact(
    tenant: Tenant,
    controller_id: ControllerId,
    module_id: ActionId,
    filename: FileName,
    request: Request,
    db: Db,
    st: State,
    who: Who,
    engine: Rollouts,
) -> Response:
    """The file of an action offered to the device, with Range, If-Range and HEAD;
    ``<filename>.MD5SUM``: ``<md5>  <filename>``."""
    now = engine.now()
    ctl = await ddi.controller(db, tenant, controller_id, who, now)
    found = await ddi.download(db, ctl.device, module_id, filename, now)
    if found.md5sum:
        if await ddi.with_hashes(db, st.blobs, found.artifact):
            await db.commit()
        text = ddi.md5sum_text(found.artifact).encode()
        if request.method == "HEAD":
            return Response(
                status_code=200,
                media_type="text/plain",
                headers={"content-length": str(len(text))},
            )
        return Response(text, media_type="text/plain")
    blob = await downloads.blob(st.blobs, found.artifact.id)
    if request.method == "GET" and _from_start(request.headers.get("range")):
        changed = await ddi.download_started(
            db, ctl.device, module_id, now, keep=st.settings.history_per_device
        )
        await db.commit()
        await engine.changed([changed])
    return await downloads.send(request, blob)


def _from_start(range_header: str | None) -> bool:
    """A GET of the whole file or of a range from its first byte."""
    return (
        range_header is None or re.fullmatch(r"bytes=0*-[0-9]*", range_header.strip()) is not None
    )
