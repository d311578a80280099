"""``/api/v1/results``: one result object, its summary and deliveries; the DICOM file for admins."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from node import queries
from node.web.access import AccessDep, IdentityDep
from node.web.deps import ContextDep, SessionDep
from node.web.schemas import ResultOut

router = APIRouter(prefix="/results", tags=["results"])


@router.get("/{result_id}", response_model=ResultOut)
def get_result(session: SessionDep, ctx: ContextDep, access: AccessDep, result_id: int) -> ResultOut:
    """The result; its summary (report, answer, findings) only for a caller who may see it."""
    result = queries.get_result(session, result_id)
    if result is None:
        raise HTTPException(404, f"result {result_id} does not exist")
    if access.patient_data:
        access.audit_view(ctx, result.job.study.study_instance_uid, f"result {result_id}",
                          [result.sop_instance_uid])
    return ResultOut.of(result, patient_data=access.patient_data)


@router.get("/{result_id}/dicom", response_class=FileResponse)
def get_result_file(session: SessionDep, ctx: ContextDep, result_id: int, access: IdentityDep) -> FileResponse:
    """The stored DICOM object (it carries the patient module, hence the login); each download audited."""
    result = queries.get_result(session, result_id)
    if result is None:
        raise HTTPException(404, f"result {result_id} does not exist")
    path = ctx.store.absolute(result.path)
    if not path.is_file():
        raise HTTPException(410, f"the file of result {result_id} is no longer in the store")
    access.audit_download(ctx, result.job.study.study_instance_uid,
                          f"DICOM of result {result_id} [{result.sop_instance_uid}]")
    return FileResponse(path, media_type="application/dicom", filename=f"{result.sop_instance_uid}.dcm")
