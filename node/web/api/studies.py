"""``/api/v1/studies``: search, the study with its timeline, series, jobs and results; ask; re-run."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query

from node import audit, queries
from node.web import actions, views
from node.web.auth import AdminDep, PrincipalDep
from node.web.deps import ContextDep, SessionDep, SettingsDep
from node.web.schemas import ActionOut, AskIn, CompletedOut, JobOut, RerunIn, StudyListOut, StudyOut
from storage.models import StudyState, utcnow

router = APIRouter(prefix="/studies", tags=["studies"])

_DATE = r"^\d{8}$"


@router.get("", response_model=StudyListOut)
def list_studies(
    session: SessionDep,
    principal: PrincipalDep,
    date_from: str | None = Query(default=None, pattern=_DATE, description="StudyDate from, YYYYMMDD"),
    date_to: str | None = Query(default=None, pattern=_DATE, description="StudyDate to, YYYYMMDD"),
    modality: str | None = Query(default=None, max_length=16),
    ae_title: str | None = Query(default=None, max_length=16, description="calling or called AE title"),
    state: StudyState | None = None,
    patient: str | None = Query(default=None, max_length=64,
                                description="name or ID substring; needs a login"),
    limit: int = Query(default=50, ge=1, le=500),
    offset: int = Query(default=0, ge=0),
) -> StudyListOut:
    if patient and not principal.is_admin:
        raise HTTPException(401, "searching by patient needs a login",
                            headers={"WWW-Authenticate": "Bearer"})
    flt = queries.StudyFilter(date_from=date_from, date_to=date_to, modality=modality,
                              ae_title=ae_title, state=state, patient=patient)
    rows, total = queries.list_studies(session, flt, limit=limit, offset=offset)
    return StudyListOut(total=total, limit=limit, offset=offset,
                        items=[views.study_summary(r, principal) for r in rows])


@router.get("/{study_uid}", response_model=StudyOut)
def get_study(session: SessionDep, ctx: ContextDep, principal: PrincipalDep, study_uid: str) -> StudyOut:
    study = queries.get_study(session, study_uid)
    if study is None:
        raise HTTPException(404, f"study {study_uid} is not stored on this node")
    if principal.is_admin:  # the answer carries patient fields: an audited access
        audit.record_view(ctx.sessions, principal.user or "?", study_uid, f"api ({principal.via})")
    return views.study_detail(session, study, principal, utcnow())


def _job_out(session: SessionDep, job_id: int) -> ActionOut:
    job = queries.get_job(session, job_id)
    assert job is not None
    return ActionOut(job=JobOut.of(job, utcnow()))


@router.post("/{study_uid}/ask", response_model=ActionOut, status_code=202)
def ask(session: SessionDep, ctx: ContextDep, settings: SettingsDep, study_uid: str, body: AskIn,
        principal: AdminDep) -> ActionOut:
    """Queue an on-demand, high-priority task (a question, a report, …) on the study; poll
    ``/api/v1/jobs/{id}`` for its state and results."""
    job_id = actions.ask(ctx.sessions, settings, study_uid, body.kind, body.text, body.language,
                         send_to_pacs=body.send_to_pacs, actor=principal.user or "?")
    return _job_out(session, job_id)


@router.post("/{study_uid}/rerun", response_model=ActionOut, status_code=202)
def rerun(session: SessionDep, ctx: ContextDep, settings: SettingsDep, study_uid: str, body: RerunIn,
          principal: AdminDep) -> ActionOut:
    """Run another configured rule on the study's current version."""
    job_id = actions.rerun_with_rule(ctx.sessions, settings, study_uid, body.rule, principal.user or "?")
    return _job_out(session, job_id)


@router.post("/{study_uid}/complete", response_model=CompletedOut)
def complete(session: SessionDep, ctx: ContextDep, settings: SettingsDep, study_uid: str,
             principal: AdminDep) -> CompletedOut:
    """Complete a receiving study now, without waiting for its quiet period, required series or
    maximum wait, and route it; 409 when it is complete already."""
    job_ids = actions.complete_now(ctx.sessions, settings, study_uid, principal.user or "?")
    study = queries.get_study(session, study_uid)
    assert study is not None
    return CompletedOut(study_instance_uid=study_uid, version=study.version, state=study.state.value,
                        completion_reason=study.completion_reason, jobs=job_ids)
