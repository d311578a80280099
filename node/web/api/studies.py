"""``/api/v1/studies``: search, the study with its timeline, series, jobs and results; ask; re-run."""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Query

from node import queries
from node.web import actions, views
from node.web.access import AccessDep
from node.web.auth import AdminDep
from node.web.deps import ContextDep, SessionDep, SettingsDep
from node.web.schemas import ActionOut, AskIn, CompletedOut, JobOut, RerunIn, StudyListOut, StudyOut
from storage.models import StudyState, utcnow

router = APIRouter(prefix="/studies", tags=["studies"])

_DATE = r"^\d{8}$"


@router.get("", response_model=StudyListOut)
def list_studies(
    session: SessionDep,
    ctx: ContextDep,
    access: AccessDep,
    date_from: str | None = Query(default=None, pattern=_DATE,
                                  description="StudyDate from, YYYYMMDD; needs a login where dates do"),
    date_to: str | None = Query(default=None, pattern=_DATE,
                                description="StudyDate to, YYYYMMDD; needs a login where dates do"),
    modality: str | None = Query(default=None, max_length=16),
    ae_title: str | None = Query(default=None, max_length=16, description="calling or called AE title"),
    state: StudyState | None = None,
    patient: str | None = Query(default=None, max_length=64,
                                description="name or ID substring; needs a login"),
    limit: int = Query(default=50, ge=1, le=500),
    offset: int = Query(default=0, ge=0),
) -> StudyListOut:
    if patient and not access.identity:
        raise HTTPException(401, "searching by patient needs a login",
                            headers={"WWW-Authenticate": "Bearer"})
    if (date_from or date_to) and not access.patient_data:  # a date filter would reveal dates
        raise HTTPException(401, "searching by study date needs a login on this node",
                            headers={"WWW-Authenticate": "Bearer"})
    flt = queries.StudyFilter(date_from=date_from, date_to=date_to, modality=modality,
                              ae_title=ae_title, state=state, patient=patient)
    rows, total = queries.list_studies(session, flt, limit=limit, offset=offset)
    if rows and access.patient_data:
        access.audit_view(ctx, None, f"study list ({len(rows)} studies from {offset})")
    return StudyListOut(total=total, limit=limit, offset=offset,
                        items=[views.study_summary(r, access) for r in rows])


@router.get("/{study_uid}", response_model=StudyOut)
def get_study(session: SessionDep, ctx: ContextDep, access: AccessDep, study_uid: str) -> StudyOut:
    """The study; patient-derived fields only for a caller who may see them (then audited)."""
    study = queries.get_study(session, study_uid)
    if study is None:
        raise HTTPException(404, f"study {study_uid} is not stored on this node")
    if access.patient_data:  # the answer carries patient-derived fields: an audited access
        access.audit_view(ctx, study_uid, "study and results",
                          [uid for job in study.jobs for uid in views.result_uids(job)])
    return views.study_detail(session, study, access, utcnow())


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
