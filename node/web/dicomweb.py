"""``/dicom-web``: STOW-RS in (:mod:`node.web.stow`) and QIDO-RS (:mod:`node.web.qido`), PS3.18.

Who may call (:mod:`node.web.access`, :mod:`node.web.auth`):

- **STOW-RS** stores data, so it needs what the API's mutations need — an API token
  (``Authorization: Bearer``), HTTP Basic with the admin login, or a dashboard session with its
  CSRF header — wherever a login is configured or the node listens beyond loopback: 401
  otherwise. An open loopback node without any login accepts it as it accepts C-STORE.
- **QIDO-RS** answers carry study dates and descriptions: they need what patient-derived views
  need (401 otherwise); the patient's identity (name, ID, birth date, sex, accession number) is
  returned, and may be matched on, only for a logged-in caller.

Each STOW-RS request leaves one ``stored`` audit row per study, each QIDO-RS answer with rows a
``viewed`` row (grouped as other views are) — by UIDs and counts, never values.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from pydicom import Dataset, dcmread
from starlette.concurrency import run_in_threadpool

from node import audit
from node.completion import late_series_check
from node.ingest import Ingestor
from node.web import qido, stow
from node.web.access import Access, AccessDep, PatientDataDep
from node.web.auth import require_admin
from node.web.deps import ContextDep, SettingsDep

log = logging.getLogger(__name__)

router = APIRouter(prefix="/dicom-web", tags=["dicomweb"])

DICOM_JSON = "application/dicom+json"
#: the calling AE title the index records for studies received by STOW-RS (rules may match it)
STOW_CALLING_AE_TITLE = "DICOMWEB"


async def require_writer(request: Request, access: AccessDep) -> Access:
    """STOW-RS callers: a login (with CSRF for a browser session), or anyone on an open loopback
    node without any login (see the module docstring)."""
    if access.principal.is_admin:
        await require_admin(request, access.principal)
        return access
    if request.app.state.patient_data_gated:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED,
                            "STOW-RS stores patient data: send Authorization: Bearer <token> (or HTTP Basic "
                            "with the admin login)", headers={"WWW-Authenticate": "Bearer"})
    return access


WriterDep = Annotated[Access, Depends(require_writer)]


def _ingestor(request: Request, ctx: ContextDep, settings: SettingsDep) -> Ingestor:
    """The node's :class:`Ingestor` (the listener's, under ``mednode serve``: one index lock)."""
    ingestor: Ingestor | None = getattr(request.app.state, "ingestor", None)
    if ingestor is None:
        ingestor = Ingestor(ctx.store, ctx.sessions, late_series_check(settings.effective_rules))
        request.app.state.ingestor = ingestor
    return ingestor


def _dicom_json(content: Any, status_code: int = 200, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(content, status_code=status_code, media_type=DICOM_JSON, headers=headers)


async def _body(request: Request, max_bytes: int) -> bytes:
    """The request body, refused with 413 once it passes ``max_bytes`` (declared or streamed)."""
    declared = request.headers.get("content-length", "")
    too_large = HTTPException(status.HTTP_413_CONTENT_TOO_LARGE,
                              f"a STOW-RS request may hold at most {max_bytes // 2**20} MB "
                              "(stow_max_request_mb): send the study in several requests")
    if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise too_large
    return bytes(body)


async def _stow(request: Request, ctx: ContextDep, settings: SettingsDep, access: Access,
                study_uid: str | None) -> Response:
    body = await _body(request, settings.stow_max_request_mb * 2**20)
    try:
        parts = stow.parse_multipart_related(request.headers.get("content-type"), body)
    except stow.UnsupportedMediaTypeError as exc:
        raise HTTPException(status.HTTP_415_UNSUPPORTED_MEDIA_TYPE, str(exc)) from None
    except stow.StowRequestError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None
    if not parts:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "the request has no parts: nothing to store")
    ingestor = _ingestor(request, ctx, settings)
    entries = await run_in_threadpool(stow.store_parts, ingestor, parts, called_ae_title=settings.ae_title,
                                      calling_ae_title=STOW_CALLING_AE_TITLE, study_instance_uid=study_uid)
    stored = Counter(e.study_instance_uid for e in entries if e.stored)
    refused = sum(1 for e in entries if not e.stored)
    for uid, count in stored.items():
        audit.record(ctx.sessions, access.actor, audit.STORED, uid,
                     f"{access.channel}: STOW-RS, {count} instance(s) stored")
    if refused:
        audit.record(ctx.sessions, access.actor, audit.STORED, study_uid,
                     f"{access.channel}: STOW-RS, {refused} instance(s) refused")
    log.info("STOW-RS: %d instance(s) stored, %d refused", sum(stored.values()), refused)
    code, response = stow.stow_response(entries)  # no Retrieve URL: mednode serves no WADO-RS
    return _dicom_json(response.to_json_dict(), code)


@router.post("/studies", response_class=JSONResponse, status_code=200,
             responses={202: {"description": "some instances stored, some refused"},
                        409: {"description": "no instance stored"}, 415: {"description": "not application/dicom"}})
async def stow_studies(request: Request, ctx: ContextDep, settings: SettingsDep, access: WriterDep) -> Response:
    """STOW-RS: store the instances of a ``multipart/related; type="application/dicom"`` body.

    Each instance goes through the checks, durable write and index of a C-STORE before the answer:
    a DICOM JSON Store Instances Response with a Referenced SOP Sequence (stored) and a Failed SOP
    Sequence (refused, each with its Failure Reason).
    """
    return await _stow(request, ctx, settings, access, None)


@router.post("/studies/{study_uid}", response_class=JSONResponse, status_code=200)
async def stow_study(request: Request, ctx: ContextDep, settings: SettingsDep, access: WriterDep,
                     study_uid: str) -> Response:
    """STOW-RS into one study: instances of another study are refused (Failure Reason 0xA900)."""
    return await _stow(request, ctx, settings, access, study_uid)


# -- QIDO-RS --------------------------------------------------------------------------------------
def _qido(request: Request, ctx: ContextDep, access: Access, level: qido.Level,
          study_uid: str | None = None, series_uid: str | None = None) -> Response:
    try:
        query = qido.parse_query(level, list(request.query_params.multi_items()), identity=access.identity,
                                 study_uid=study_uid, series_uid=series_uid)
    except qido.IdentityQueryError as exc:
        raise HTTPException(status.HTTP_401_UNAUTHORIZED, f"{exc}: send Authorization: Bearer <token>",
                            headers={"WWW-Authenticate": "Bearer"}) from None
    except qido.QidoRequestError as exc:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, str(exc)) from None

    def read_header(path: str) -> Dataset:
        return dcmread(ctx.store.absolute(path), stop_before_pixels=True)

    with ctx.sessions() as session:
        answers = qido.search(session, query, read_header, identity=access.identity)
        content = qido.to_json(answers)
    headers = {}
    if query.ignored:
        headers["Warning"] = (f'299 mednode "not supported for matching, ignored: {", ".join(query.ignored)}"')
    if not content:
        return Response(status_code=204, headers=headers)
    key = "StudyInstanceUID" if level == "study" else "SeriesInstanceUID"
    access.audit_view(ctx, study_uid, f"QIDO-RS {level} search ({len(content)} from {query.offset})",
                      list(dict.fromkeys(str(a.get(key, "")) for a in answers))[:20])
    return _dicom_json(content, headers=headers)


@router.get("/studies", response_class=JSONResponse)
def search_studies(request: Request, ctx: ContextDep, access: PatientDataDep) -> Response:
    """QIDO-RS: studies the node holds (200 with DICOM JSON, 204 when none match)."""
    return _qido(request, ctx, access, "study")


@router.get("/series", response_class=JSONResponse)
def search_series(request: Request, ctx: ContextDep, access: PatientDataDep) -> Response:
    """QIDO-RS: series the node holds or wrote."""
    return _qido(request, ctx, access, "series")


@router.get("/instances", response_class=JSONResponse)
def search_instances(request: Request, ctx: ContextDep, access: PatientDataDep) -> Response:
    """QIDO-RS: instances the node holds or wrote."""
    return _qido(request, ctx, access, "instance")


@router.get("/studies/{study_uid}/series", response_class=JSONResponse)
def search_study_series(request: Request, ctx: ContextDep, access: PatientDataDep, study_uid: str) -> Response:
    """QIDO-RS: the series of one study."""
    return _qido(request, ctx, access, "series", study_uid)


@router.get("/studies/{study_uid}/instances", response_class=JSONResponse)
def search_study_instances(request: Request, ctx: ContextDep, access: PatientDataDep, study_uid: str) -> Response:
    """QIDO-RS: the instances of one study."""
    return _qido(request, ctx, access, "instance", study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances", response_class=JSONResponse)
def search_series_instances(request: Request, ctx: ContextDep, access: PatientDataDep, study_uid: str,
                            series_uid: str) -> Response:
    """QIDO-RS: the instances of one series."""
    return _qido(request, ctx, access, "instance", study_uid, series_uid)
