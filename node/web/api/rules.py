"""``/api/v1/rules``: the active routing rules and a dry run on a stored study or an uploaded file."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query, UploadFile

from node.web import system
from node.web.access import PatientDataDep
from node.web.auth import AdminDep
from node.web.deps import ContextDep, SessionDep, SettingsDep
from node.web.schemas import DryRunOut, RuleOut

router = APIRouter(prefix="/rules", tags=["rules"])

#: Largest file accepted for an upload dry run.
MAX_UPLOAD_BYTES = 64 * 1024 * 1024


@router.get("", response_model=list[RuleOut])
def list_rules(settings: SettingsDep) -> list[RuleOut]:
    return system.rules_out(settings)


@router.get("/dry-run", response_model=DryRunOut)
def dry_run(session: SessionDep, ctx: ContextDep, settings: SettingsDep, access: PatientDataDep,
            study: str = Query(description="StudyInstanceUID of a stored study")) -> DryRunOut:
    """Which rules match the stored study, and why each does or does not.

    The reasons quote the study's attribute values: a login where patient data needs one.
    """
    out = system.dry_run_stored(session, settings, study)
    if out is None:
        raise HTTPException(404, f"study {study} is not stored on this node")
    access.audit_view(ctx, study, "rule dry run")
    return out


@router.post("/dry-run", response_model=DryRunOut)
async def dry_run_upload(settings: SettingsDep, file: UploadFile, principal: AdminDep,
                         calling_ae_title: str | None = None) -> DryRunOut:
    """Dry run on one uploaded DICOM file; nothing is stored."""
    data = await file.read(MAX_UPLOAD_BYTES + 1)
    if len(data) > MAX_UPLOAD_BYTES:
        raise HTTPException(413, f"upload at most {MAX_UPLOAD_BYTES // 2**20} MiB")
    try:
        return system.dry_run_upload(settings, data, calling_ae_title)
    except ValueError as exc:
        raise HTTPException(422, f"not a DICOM instance mednode accepts: {exc}") from exc
