"""``/api/v1/results``: one result object, its summary and deliveries; the DICOM file for admins."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException
from fastapi.responses import FileResponse

from node import queries
from node.web.auth import AdminDep
from node.web.deps import ContextDep, SessionDep
from node.web.schemas import ResultOut

router = APIRouter(prefix="/results", tags=["results"])


@router.get("/{result_id}", response_model=ResultOut)
def get_result(session: SessionDep, result_id: int) -> ResultOut:
    result = queries.get_result(session, result_id)
    if result is None:
        raise HTTPException(404, f"result {result_id} does not exist")
    return ResultOut.of(result)


@router.get("/{result_id}/dicom", response_class=FileResponse)
def get_result_file(session: SessionDep, ctx: ContextDep, result_id: int, principal: AdminDep) -> FileResponse:
    """The stored DICOM object (it carries the patient module, hence the login)."""
    result = queries.get_result(session, result_id)
    if result is None:
        raise HTTPException(404, f"result {result_id} does not exist")
    path = ctx.store.absolute(result.path)
    if not path.is_file():
        raise HTTPException(410, f"the file of result {result_id} is no longer in the store")
    return FileResponse(path, media_type="application/dicom", filename=f"{result.sop_instance_uid}.dcm")
