"""``/dicom-web``: STOW-RS in (:mod:`node.web.stow`), QIDO-RS (:mod:`node.web.qido`) and WADO-RS
(:mod:`node.web.wado`) out, PS3.18.

Who may call (:mod:`node.web.access`, :mod:`node.web.auth`):

- **STOW-RS** stores data, so it needs what the API's mutations need — an API token
  (``Authorization: Bearer``), HTTP Basic with the admin login, or a dashboard session with its
  CSRF header — wherever a login is configured or the node listens beyond loopback: 401
  otherwise. An open loopback node without any login accepts it as it accepts C-STORE.
- **QIDO-RS** answers carry study dates and descriptions: they need what patient-derived views
  need (401 otherwise); the patient's identity (name, ID, birth date, sex, accession number) is
  returned, and may be matched on, only for a logged-in caller.
- **WADO-RS** sends whole objects, the patient's identity with them: a login, always (401
  otherwise), as other DICOM downloads.

Each STOW-RS request leaves one ``stored`` audit row per study, each QIDO-RS answer with rows a
``viewed`` row (grouped as other views are), each WADO-RS request a ``downloaded`` row — by UIDs
and counts, never values.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse, StreamingResponse
from pydicom import Dataset, dcmread
from starlette.concurrency import run_in_threadpool

from node import audit
from node.completion import late_series_check
from node.config import Settings
from node.ingest import Ingestor
from node.web import qido, stow, wado
from node.web.access import Access, AccessDep, IdentityDep, PatientDataDep
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


def _base_url(request: Request, settings: Settings) -> str:
    """The ``/dicom-web`` URL the node writes into answers: ``web_public_url``'s, else the request's."""
    root = settings.web_public_url or str(request.base_url).rstrip("/")
    return f"{root}{router.prefix}"


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
    # the study's WADO-RS URL, where the request stored into one study
    retrieve = f"{_base_url(request, settings)}/studies/{next(iter(stored))}" if len(stored) == 1 else None
    code, response = stow.stow_response(entries, retrieve)
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
def _retrieve_url(base: str, answer: Dataset, level: qido.Level) -> str:
    """The WADO-RS URL of a QIDO-RS answer's study, series or instance (PS3.18 10.6.3.3)."""
    url = f"{base}/studies/{answer.get('StudyInstanceUID', '')}"
    if level != "study":
        url += f"/series/{answer.get('SeriesInstanceUID', '')}"
    if level == "instance":
        url += f"/instances/{answer.get('SOPInstanceUID', '')}"
    return url


def _qido(request: Request, ctx: ContextDep, settings: Settings, access: Access, level: qido.Level,
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
    base = _base_url(request, settings)
    for answer in answers:
        answer.RetrieveURL = _retrieve_url(base, answer, level)
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
def search_studies(request: Request, ctx: ContextDep, settings: SettingsDep, access: PatientDataDep) -> Response:
    """QIDO-RS: studies the node holds (200 with DICOM JSON, 204 when none match)."""
    return _qido(request, ctx, settings, access, "study")


@router.get("/series", response_class=JSONResponse)
def search_series(request: Request, ctx: ContextDep, settings: SettingsDep, access: PatientDataDep) -> Response:
    """QIDO-RS: series the node holds or wrote."""
    return _qido(request, ctx, settings, access, "series")


@router.get("/instances", response_class=JSONResponse)
def search_instances(request: Request, ctx: ContextDep, settings: SettingsDep, access: PatientDataDep) -> Response:
    """QIDO-RS: instances the node holds or wrote."""
    return _qido(request, ctx, settings, access, "instance")


@router.get("/studies/{study_uid}/series", response_class=JSONResponse)
def search_study_series(request: Request, ctx: ContextDep, settings: SettingsDep, access: PatientDataDep,
                        study_uid: str) -> Response:
    """QIDO-RS: the series of one study."""
    return _qido(request, ctx, settings, access, "series", study_uid)


@router.get("/studies/{study_uid}/instances", response_class=JSONResponse)
def search_study_instances(request: Request, ctx: ContextDep, settings: SettingsDep, access: PatientDataDep,
                           study_uid: str) -> Response:
    """QIDO-RS: the instances of one study."""
    return _qido(request, ctx, settings, access, "instance", study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances", response_class=JSONResponse)
def search_series_instances(request: Request, ctx: ContextDep, settings: SettingsDep, access: PatientDataDep,
                            study_uid: str, series_uid: str) -> Response:
    """QIDO-RS: the instances of one series."""
    return _qido(request, ctx, settings, access, "instance", study_uid, series_uid)


# -- WADO-RS --------------------------------------------------------------------------------------
def _wado_error(exc: Exception) -> HTTPException:
    if isinstance(exc, wado.NotAcceptableError):
        return HTTPException(status.HTTP_406_NOT_ACCEPTABLE, str(exc))
    if isinstance(exc, wado.WadoRequestError):
        return HTTPException(status.HTTP_400_BAD_REQUEST, str(exc))
    return HTTPException(status.HTTP_404_NOT_FOUND, str(exc))


def _level(series_uid: str | None, sop_uid: str | None) -> str:
    return "instance" if sop_uid else "series" if series_uid else "study"


def _located(ctx: ContextDep, study_uid: str, series_uid: str | None = None,
             sop_uid: str | None = None) -> list[tuple[wado.Located, Path]]:
    """The stored objects a retrieve request names, with their files: 400 for a path that holds
    no UID, 404 when none is held, 410 when one's file has left the store."""
    try:
        for uid in (study_uid, series_uid, sop_uid):
            if uid is not None:
                wado.uid_in_path(uid)
    except wado.WadoRequestError as exc:
        raise _wado_error(exc) from None
    with ctx.sessions() as session:
        found = wado.locate(session, study_uid, series_uid, sop_uid)
    if not found:
        what = " ".join(f"{name} {uid}" for name, uid in
                        (("study", study_uid), ("series", series_uid), ("instance", sop_uid)) if uid)
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no {what} is stored on this node")
    files = [(located, ctx.store.absolute(located.path)) for located in found]
    gone = [located.sop_uid for located, path in files if not path.is_file()]
    if gone:
        raise HTTPException(status.HTTP_410_GONE, f"the file of instance {gone[0]} is no longer in the store")
    return files


def _retrieve(request: Request, ctx: ContextDep, access: Access, study_uid: str, series_uid: str | None = None,
              sop_uid: str | None = None) -> Response:
    """WADO-RS instances: ``multipart/related; type="application/dicom"``, streamed."""
    try:
        wanted = wado.negotiate(request.headers.get("accept"), "application/dicom")
        files = _located(ctx, study_uid, series_uid, sop_uid)
        # a 406 before the first byte, not in the middle
        stored = [wado.check_acceptable(path, wanted) for _, path in files]
    except (wado.NotAcceptableError, wado.WadoRequestError) as exc:
        raise _wado_error(exc) from None
    level = _level(series_uid, sop_uid)
    access.audit_download(ctx, study_uid, f"WADO-RS {level}, {len(files)} instance(s)"
                          + (f" [{sop_uid or series_uid}]" if level != "study" else ""))
    log.info("WADO-RS: %d instance(s) of study %s", len(files), study_uid)
    boundary = wado.new_boundary()

    def parts() -> Iterator[wado.Part]:
        for (located, path), syntax in zip(files, stored, strict=True):
            try:
                yield wado.instance_part(path, wanted, syntax)
            except Exception:  # re-raised: the answer ends without its closing boundary
                log.exception("WADO-RS: instance %s could not be sent; the answer ends before it", located.sop_uid)
                raise

    return StreamingResponse(wado.multipart(parts(), boundary),
                             media_type=wado.multipart_type("application/dicom", boundary))


def _metadata(request: Request, ctx: ContextDep, settings: Settings, access: Access, study_uid: str,
              series_uid: str | None = None, sop_uid: str | None = None) -> Response:
    """WADO-RS metadata: one DICOM JSON object per instance, bulk values by reference."""
    try:
        wado.wants_json(request.headers.get("accept"))
    except wado.NotAcceptableError as exc:
        raise _wado_error(exc) from None
    files = _located(ctx, study_uid, series_uid, sop_uid)
    base = _base_url(request, settings)

    def bulk_uri(located: wado.Located) -> Callable[[str], str]:
        instance = f"{base}/studies/{located.study_uid}/series/{located.series_uid}/instances/{located.sop_uid}"
        return lambda tag: f"{instance}/bulkdata/{tag}"

    content = [wado.metadata(path, bulk_uri(located)) for located, path in files]
    level = _level(series_uid, sop_uid)
    access.audit_download(ctx, study_uid, f"WADO-RS {level} metadata, {len(files)} instance(s)")
    return _dicom_json(content)


def _octet_parts(request: Request, ctx: ContextDep, access: Access, study_uid: str, series_uid: str, sop_uid: str,
                 make: Callable[[Path, wado.Wanted], list[wado.Part]], what: str) -> Response:
    try:
        wanted = wado.negotiate(request.headers.get("accept"), "application/octet-stream")
        [(_, path)] = _located(ctx, study_uid, series_uid, sop_uid)
        parts = make(path, wanted)
    except (wado.NotAcceptableError, wado.WadoRequestError, LookupError) as exc:
        raise _wado_error(exc) from None
    access.audit_download(ctx, study_uid, f"WADO-RS {what} [{sop_uid}]")
    boundary = wado.new_boundary()
    return StreamingResponse(wado.multipart(parts, boundary),
                             media_type=wado.multipart_type("application/octet-stream", boundary))


@router.get("/studies/{study_uid}")
def retrieve_study(request: Request, ctx: ContextDep, access: IdentityDep, study_uid: str) -> Response:
    """WADO-RS: every instance of a study, received or written by mednode."""
    return _retrieve(request, ctx, access, study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}")
def retrieve_series(request: Request, ctx: ContextDep, access: IdentityDep, study_uid: str,
                    series_uid: str) -> Response:
    """WADO-RS: the instances of one series."""
    return _retrieve(request, ctx, access, study_uid, series_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}")
def retrieve_instance(request: Request, ctx: ContextDep, access: IdentityDep, study_uid: str, series_uid: str,
                      sop_uid: str) -> Response:
    """WADO-RS: one instance."""
    return _retrieve(request, ctx, access, study_uid, series_uid, sop_uid)


@router.get("/studies/{study_uid}/metadata", response_class=JSONResponse)
def study_metadata(request: Request, ctx: ContextDep, settings: SettingsDep, access: IdentityDep,
                   study_uid: str) -> Response:
    """WADO-RS: the metadata of every instance of a study."""
    return _metadata(request, ctx, settings, access, study_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/metadata", response_class=JSONResponse)
def series_metadata(request: Request, ctx: ContextDep, settings: SettingsDep, access: IdentityDep, study_uid: str,
                    series_uid: str) -> Response:
    """WADO-RS: the metadata of the instances of one series."""
    return _metadata(request, ctx, settings, access, study_uid, series_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata", response_class=JSONResponse)
def instance_metadata(request: Request, ctx: ContextDep, settings: SettingsDep, access: IdentityDep, study_uid: str,
                      series_uid: str, sop_uid: str) -> Response:
    """WADO-RS: the metadata of one instance."""
    return _metadata(request, ctx, settings, access, study_uid, series_uid, sop_uid)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/frames/{frames}")
def retrieve_frames(request: Request, ctx: ContextDep, access: IdentityDep, study_uid: str, series_uid: str,
                    sop_uid: str, frames: str) -> Response:
    """WADO-RS: frames of an image (``1``, ``1,3``), as stored or decoded (see :mod:`node.web.wado`)."""
    try:
        numbers = wado.parse_frames(frames)
    except wado.WadoRequestError as exc:
        raise _wado_error(exc) from None
    return _octet_parts(request, ctx, access, study_uid, series_uid, sop_uid,
                        lambda path, wanted: wado.frame_parts(path, numbers, wanted), f"frames {frames}")


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/bulkdata/{tag}")
def retrieve_bulkdata(request: Request, ctx: ContextDep, access: IdentityDep, study_uid: str, series_uid: str,
                      sop_uid: str, tag: str) -> Response:
    """WADO-RS: a binary value named by a BulkDataURI of the instance's metadata."""
    return _octet_parts(request, ctx, access, study_uid, series_uid, sop_uid,
                        lambda path, wanted: wado.bulk_parts(path, tag, wanted), f"bulk data {tag}")
