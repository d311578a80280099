"""``/api/v1/jobs``: list, inspect, retry, cancel, reprioritise; key images of a job's results."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Response

from node import audit, queries
from node.context import NodeContext
from node.web import actions, views
from node.web.access import Access, AccessDep, PatientDataDep
from node.web.auth import AdminDep
from node.web.deps import ContextDep, SessionDep, SettingsDep
from node.web.imaging import KeyImageError
from node.web.schemas import ActionOut, JobOut, KeyImageOut, PriorityIn
from storage.models import Job, JobState, utcnow

router = APIRouter(prefix="/jobs", tags=["jobs"])


def _job(session: SessionDep, job_id: int) -> Job:
    job = queries.get_job(session, job_id)
    if job is None:
        raise HTTPException(404, f"job {job_id} does not exist")
    return job


@router.get("", response_model=list[JobOut])
def list_jobs(
    session: SessionDep,
    ctx: ContextDep,
    access: AccessDep,
    state: Annotated[list[JobState] | None, Query(description="repeat for several states")] = None,
    study: Annotated[str | None, Query(description="a StudyInstanceUID")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[JobOut]:
    now = utcnow()
    rows = queries.list_jobs(session, states=state, study_instance_uid=study, limit=limit, offset=offset)
    if rows and access.patient_data:  # reasons, questions and result summaries of these jobs
        access.audit_view(ctx, study, "job list", [f"job {j.id}" for j in rows])
    return [JobOut.of(j, now, patient_data=access.patient_data) for j in rows]


@router.get("/{job_id}", response_model=JobOut)
def get_job(session: SessionDep, ctx: ContextDep, access: AccessDep, job_id: int) -> JobOut:
    """The job; its reason, question and result summaries only for a caller who may see them."""
    job = _job(session, job_id)
    if access.patient_data:
        access.audit_view(ctx, job.study.study_instance_uid, f"job {job_id}", views.result_uids(job))
    return JobOut.of(job, utcnow(), patient_data=access.patient_data)


def _after(session: SessionDep, job_id: int) -> ActionOut:
    session.expire_all()
    return ActionOut(job=JobOut.of(_job(session, job_id), utcnow()))


def audit_key_images(ctx: NodeContext, access: Access, job: Job) -> None:
    """One grouped row per caller and job for its key-image list and all its PNGs."""
    access.audit_view(ctx, job.study.study_instance_uid, f"key images of job {job.id}",
                      views.result_uids(job), action=audit.VIEWED_IMAGES)


@router.post("/{job_id}/retry", response_model=ActionOut)
def retry(session: SessionDep, ctx: ContextDep, job_id: int, principal: AdminDep) -> ActionOut:
    actions.retry(ctx.sessions, job_id, principal.user or "?")
    return _after(session, job_id)


@router.post("/{job_id}/cancel", response_model=ActionOut)
def cancel(session: SessionDep, ctx: ContextDep, job_id: int, principal: AdminDep) -> ActionOut:
    actions.cancel(ctx.sessions, job_id, principal.user or "?")
    return _after(session, job_id)


@router.post("/{job_id}/priority", response_model=ActionOut)
def set_priority(session: SessionDep, ctx: ContextDep, job_id: int, body: PriorityIn,
                 principal: AdminDep) -> ActionOut:
    actions.set_priority(ctx.sessions, job_id, body.priority, principal.user or "?")
    return _after(session, job_id)


@router.post("/{job_id}/send", response_model=ActionOut)
def send(session: SessionDep, ctx: ContextDep, settings: SettingsDep, job_id: int,
         principal: AdminDep) -> ActionOut:
    """Send a finished job's result objects (e.g. an answer asked on demand) to the default destination."""
    actions.send_results(ctx.sessions, settings, job_id, principal.user or "?")
    return _after(session, job_id)


@router.get("/{job_id}/key-images", response_model=list[KeyImageOut])
def key_images(session: SessionDep, ctx: ContextDep, access: PatientDataDep, job_id: int) -> list[KeyImageOut]:
    """The key images of a job and their labels (findings): needs a login where patient data does."""
    job = _job(session, job_id)
    try:
        out = views.key_images_out(session, ctx, job)
    except KeyImageError as exc:
        raise HTTPException(409, str(exc)) from exc
    audit_key_images(ctx, access, job)
    return out


@router.get("/{job_id}/key-images/{index}.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def key_image_png(session: SessionDep, ctx: ContextDep, access: PatientDataDep, job_id: int,
                  index: int) -> Response:
    """A key image as PNG: needs a login where patient data does; audited once per job and look."""
    job = _job(session, job_id)
    try:
        data = views.key_image_png(session, ctx, job, index)
    except KeyImageError as exc:
        raise HTTPException(409, str(exc)) from exc
    if data is None:
        raise HTTPException(404, f"job {job_id} has no key image {index}")
    audit_key_images(ctx, access, job)
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, no-store"})

