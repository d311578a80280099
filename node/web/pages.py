"""Dashboard pages (server-rendered Jinja2) and their form actions.

Every page reads through the same queries and views as the JSON API; every form posts to a
``/ui/...`` action that calls the same service function as the API endpoint, then redirects back
(post/redirect/get) with a short message. Forms carry the CSRF token (:mod:`node.web.auth`).
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, get_args
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Form, HTTPException, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.templating import Jinja2Templates
from starlette.concurrency import run_in_threadpool

from node import audit, jobs, queries
from node.web import actions, system, views
from node.web.access import AccessDep
from node.web.auth import (
    AdminDep,
    PrincipalDep,
    auth_config,
    check_lockout,
    clear_session,
    ensure_csrf_cookie,
    login_failed,
    login_succeeded,
    session_principal,
    set_session,
)
from node.web.deps import ContextDep, SessionDep, SettingsDep
from node.web.imaging import KeyImageError
from node.web.schemas import AskIn, AskKind, JobOut
from node.web.versions import result_versions
from storage.models import TERMINAL_JOB_STATES, Job, JobState, StudyState, utcnow

log = logging.getLogger(__name__)

templates = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")
router = APIRouter(include_in_schema=False)

#: Seconds between self-refreshes of live parts of a page.
REFRESH_S = 3


# -- template helpers ---------------------------------------------------------------------------
def _fmt_dt(value: datetime | None) -> str:
    if value is None:
        return "—"
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def _fmt_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _fmt_date(value: str | None) -> str:
    if value and len(value) == 8 and value.isdigit():
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return value or "—"


def _tasks_text(tasks: list[Any]) -> str:
    parts = []
    for item in tasks:
        if isinstance(item, str):
            parts.append(item)
        else:
            name, options = next(iter(item.items()))
            parts.append(f"{name} {json.dumps(options, ensure_ascii=False)}" if options else name)
    return "; ".join(parts)


def _is_table(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _columns(rows: list[dict[str, Any]]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for key in row:
            seen[key] = None
    return list(seen)


templates.env.filters.update(dt=_fmt_dt, dur=_fmt_duration, dicomdate=_fmt_date, tasks=_tasks_text,
                             tojson_pretty=lambda v: json.dumps(v, indent=2, ensure_ascii=False))
templates.env.tests.update(table=_is_table)
templates.env.globals.update(columns=_columns, REFRESH_S=REFRESH_S)


def render(request: Request, name: str, status_code: int = 200, headers: dict[str, str] | None = None,
           **values: Any) -> HTMLResponse:
    """Render a page with the caller, the CSRF token and a message from the redirect."""
    principal = values.pop("principal", None)
    if principal is None:
        # the caller as already authenticated for this request, else by its session cookie only:
        # re-checking a wrong password here would count it twice towards the lockout
        principal = getattr(request.state, "principal", None) or session_principal(request)
    probe = Response()
    token = ensure_csrf_cookie(request, probe)
    response = templates.TemplateResponse(
        request, name,
        {"principal": principal, "csrf_token": token, "message": request.query_params.get("msg"),
         "login_enabled": auth_config(request).login_enabled, "path": request.url.path, **values},
        status_code=status_code, headers=headers,
    )
    for key, value in probe.headers.items():
        if key == "set-cookie":
            response.headers.append(key, value)
    return response


def error_page(request: Request, status_code: int, detail: str,
               headers: dict[str, str] | None = None) -> HTMLResponse:
    safe_headers = {k: v for k, v in (headers or {}).items() if k.lower() != "www-authenticate"}
    return render(request, "error.html", status_code=status_code, headers=safe_headers,
                  status_code_value=status_code, detail=detail)


def _local(next_url: str | None, default: str) -> str:
    """Only same-site paths are followed after a form (no open redirect)."""
    if next_url and next_url.startswith("/") and not next_url.startswith("//") and "\\" not in next_url:
        return next_url
    return default


def _back(next_url: str | None, default: str, message: str) -> RedirectResponse:
    target = _local(next_url, default)
    sep = "&" if "?" in target else "?"
    return RedirectResponse(f"{target}{sep}{urlencode({'msg': message})}", status_code=303)


# -- pages -------------------------------------------------------------------------------------
@router.get("/")
def home() -> RedirectResponse:
    return RedirectResponse("/queue", status_code=307)


@router.get("/queue", response_class=HTMLResponse)
def queue_page(request: Request, session: SessionDep, ctx: ContextDep, access: AccessDep) -> HTMLResponse:
    now = utcnow()
    counts = jobs.status_counts(session)
    running = queries.list_jobs(session, states=[JobState.RUNNING, JobState.DELIVERING], limit=50)
    queued = queries.list_jobs(session, states=[JobState.QUEUED], limit=50)
    failed = queries.list_jobs(session, states=[JobState.FAILED], limit=50)
    recent = queries.list_jobs(session, limit=20)
    if failed and access.patient_data:  # failure reasons can quote attribute values
        access.audit_view(ctx, None, "queue: failure reasons", [f"job {j.id}" for j in failed])

    def out(job: Job) -> JobOut:
        return JobOut.of(job, now, with_results=False, patient_data=access.patient_data)

    return render(
        request, "queue.html", principal=access.principal, counts=counts,
        depth=queries.queue_depth(session), oldest=queries.oldest_queued_age_s(session, now),
        running=[out(j) for j in running],
        queued=sorted((out(j) for j in queued), key=lambda j: (-j.priority, j.id)),
        failed=[out(j) for j in failed],
        recent=[out(j) for j in recent],
        terminal={s.value for s in TERMINAL_JOB_STATES},
    )


@router.get("/studies", response_class=HTMLResponse)
def studies_page(
    request: Request, session: SessionDep, ctx: ContextDep, access: AccessDep,
    date_from: str | None = None, date_to: str | None = None, modality: str | None = None,
    ae_title: str | None = None, state: str | None = None, patient: str | None = None,
    page: int = 0,
) -> HTMLResponse:
    def clean_date(value: str | None) -> str | None:
        digits = (value or "").replace("-", "").strip()
        return digits if len(digits) == 8 and digits.isdigit() else None

    principal = access.principal
    study_state = StudyState(state) if state in {s.value for s in StudyState} else None
    dates = access.patient_data  # filtering by date would reveal dates
    flt = queries.StudyFilter(
        date_from=clean_date(date_from) if dates else None, date_to=clean_date(date_to) if dates else None,
        modality=(modality or "").strip() or None, ae_title=(ae_title or "").strip() or None,
        state=study_state, patient=(patient or "").strip() or None if access.identity else None,
    )
    limit = 50
    rows, total = queries.list_studies(session, flt, limit=limit, offset=max(0, page) * limit)
    if rows and access.patient_data:
        access.audit_view(ctx, None, f"study list ({len(rows)} studies from {max(0, page) * limit})")
    return render(
        request, "studies.html", principal=principal, total=total, page=max(0, page), limit=limit,
        studies=[views.study_summary(r, access) for r in rows], dates_shown=dates,
        filters={"date_from": date_from or "", "date_to": date_to or "", "modality": modality or "",
                 "ae_title": ae_title or "", "state": state or "", "patient": patient or ""},
        states=[s.value for s in StudyState],
    )


def _summaries(job: JobOut) -> list[dict[str, Any]]:
    """Distinct result summaries of a job (its SEG and SR often share one)."""
    out: list[dict[str, Any]] = []
    for result in job.results:
        if result.summary and result.summary not in out:
            out.append(result.summary)
    return out


@router.get("/studies/{study_uid}", response_class=HTMLResponse)
def study_page(request: Request, session: SessionDep, ctx: ContextDep, settings: SettingsDep,
               access: AccessDep, study_uid: str) -> HTMLResponse:
    """The study; patient-derived parts (and key images) only for a caller who may see them.

    Audited as one grouped row per look (the page refreshes itself while jobs run); the key
    images the browser then fetches add one grouped row per job (:mod:`node.web.api.jobs`).
    """
    principal = access.principal
    study = queries.get_study(session, study_uid)
    if study is None:
        raise HTTPException(404, f"study {study_uid} is not stored on this node")
    if access.patient_data:  # the page shows patient-derived fields: an audited access
        access.audit_view(ctx, study_uid, "study and results",
                          [uid for job in study.jobs for uid in views.result_uids(job)])
    detail = views.study_detail(session, study, access, utcnow())
    images: dict[int, list[Any]] = {}
    image_errors: dict[int, str] = {}
    by_id = {j.id: j for j in study.jobs}
    for job in detail.jobs:
        if access.patient_data and (job.results or job.on_demand):
            try:
                images[job.id] = views.key_images_out(session, ctx, by_id[job.id])
            except KeyImageError as exc:
                image_errors[job.id] = str(exc)
    unfinished = any(j.state not in {s.value for s in TERMINAL_JOB_STATES} for j in detail.jobs) or (
        detail.state == StudyState.RECEIVING.value)
    return render(
        request, "study.html", principal=principal, study=detail, images=images,
        image_errors=image_errors, summaries={j.id: _summaries(j) for j in detail.jobs},
        unfinished=unfinished, rules=[r.name for r in settings.effective_rules],
        has_destination=settings.destination is not None, ask_kinds=list(get_args(AskKind)),
        terminal={s.value for s in TERMINAL_JOB_STATES},
        versions=result_versions(detail.jobs),
    )


@router.get("/rules", response_class=HTMLResponse)
def rules_page(request: Request, session: SessionDep, ctx: ContextDep, settings: SettingsDep,
               access: AccessDep, study: str | None = None) -> HTMLResponse:
    dry_run = None
    error = None
    if study and not access.patient_data:  # the reasons quote the study's attribute values
        error = "a dry run shows the study's attribute values: log in first"
    elif study:
        dry_run = system.dry_run_stored(session, settings, study.strip())
        if dry_run is None:
            error = f"study {study} is not stored on this node"
        else:
            access.audit_view(ctx, study.strip(), "rule dry run")
    recent, _ = queries.list_studies(session, limit=20)
    if recent and access.patient_data:
        access.audit_view(ctx, None, f"study list ({len(recent)} studies from 0)")
    return render(request, "rules.html", principal=access.principal, rules=system.rules_out(settings),
                  dry_run=dry_run, error=error, study=study or "",
                  recent=[views.study_summary(r, access) for r in recent])


@router.get("/destinations", response_class=HTMLResponse)
def destinations_page(request: Request, settings: SettingsDep, principal: PrincipalDep) -> HTMLResponse:
    return render(request, "destinations.html", principal=principal,
                  destinations=system.destinations_out(settings), echo=None)


@router.get("/workers", response_class=HTMLResponse)
async def workers_page(request: Request, session: SessionDep, access: AccessDep,
                       settings: SettingsDep) -> HTMLResponse:
    workers = await run_in_threadpool(system.inspect_workers, settings)
    now = utcnow()
    running = queries.list_jobs(session, states=[JobState.RUNNING], limit=50)
    return render(request, "workers.html", principal=access.principal, workers=workers,
                  running=[JobOut.of(j, now, with_results=False, patient_data=access.patient_data)
                           for j in running])


@router.get("/audit", response_class=HTMLResponse)
def audit_page(request: Request, session: SessionDep, principal: PrincipalDep, action: str | None = None,
               actor: str | None = None, study_uid: str | None = None, page: int = 0) -> Response:
    """The audit trail (administrators only; others are sent to the login page)."""
    if not principal.is_admin:
        return RedirectResponse(f"/login?{urlencode({'next': '/audit'})}", status_code=303)
    limit = 100
    flt = audit.AuditFilter(action=(action or "").strip() or None, actor=(actor or "").strip() or None,
                            study_uid=(study_uid or "").strip() or None)
    events, total = audit.list_events(session, flt, limit=limit, offset=max(0, page) * limit)
    return render(request, "audit.html", principal=principal, events=events, total=total,
                  page=max(0, page), limit=limit, actions=audit.actions_seen(session),
                  filters={"action": action or "", "actor": actor or "", "study_uid": study_uid or ""})


# -- login ------------------------------------------------------------------------------------
@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str | None = None) -> HTMLResponse:
    return render(request, "login.html", next=_local(next, "/queue"), error=None)


@router.post("/login", response_class=HTMLResponse)
def login(request: Request, username: Annotated[str, Form()], password: Annotated[str, Form()],
          csrf_token: Annotated[str, Form()] = "", next: Annotated[str, Form()] = "/queue") -> Response:
    config = auth_config(request)
    from node.web.auth import CSRF_COOKIE

    if not config.check_csrf(request.cookies.get(CSRF_COOKIE), csrf_token):
        return render(request, "login.html", status_code=403, next=_local(next, "/queue"),
                      error="the form expired: try again")
    try:
        check_lockout(request, username)
    except HTTPException as exc:
        return render(request, "login.html", status_code=exc.status_code, headers=dict(exc.headers or {}),
                      next=_local(next, "/queue"), error=str(exc.detail))
    if not config.check_password(username, password):
        log.warning("failed dashboard login")
        login_failed(request, username)
        return render(request, "login.html", status_code=401, next=_local(next, "/queue"),
                      error="wrong user name or password" if config.login_enabled
                      else "no admin is configured (set web_admin_user and web_admin_password)")
    login_succeeded(request, username)
    response = RedirectResponse(_local(next, "/queue"), status_code=303)
    set_session(request, response, username)
    return response


@router.post("/logout")
def logout(principal: AdminDep) -> RedirectResponse:
    response = RedirectResponse("/queue", status_code=303)
    clear_session(response)
    return response


# -- form actions -----------------------------------------------------------------------------
NextField = Annotated[str, Form()]


@router.post("/ui/jobs/{job_id}/retry")
def ui_retry(ctx: ContextDep, job_id: int, principal: AdminDep, next: NextField = "/queue") -> Response:
    actions.retry(ctx.sessions, job_id, principal.user or "?")
    return _back(next, "/queue", f"job {job_id} queued again")


@router.post("/ui/jobs/{job_id}/cancel")
def ui_cancel(ctx: ContextDep, job_id: int, principal: AdminDep, next: NextField = "/queue") -> Response:
    actions.cancel(ctx.sessions, job_id, principal.user or "?")
    return _back(next, "/queue", f"job {job_id} cancelled")


@router.post("/ui/jobs/{job_id}/priority")
def ui_priority(ctx: ContextDep, job_id: int, principal: AdminDep,
                priority: Annotated[int, Form(ge=0, le=9)] = 9, next: NextField = "/queue") -> Response:
    actions.set_priority(ctx.sessions, job_id, priority, principal.user or "?")
    return _back(next, "/queue", f"job {job_id} now has priority {priority}")


@router.post("/ui/jobs/{job_id}/send")
def ui_send(ctx: ContextDep, settings: SettingsDep, job_id: int, principal: AdminDep,
            next: NextField = "/queue") -> Response:
    count = actions.send_results(ctx.sessions, settings, job_id, principal.user or "?")
    return _back(next, "/queue", f"job {job_id}: {count} object(s) queued for {settings.destination}")


@router.post("/ui/studies/{study_uid}/rerun")
def ui_rerun(ctx: ContextDep, settings: SettingsDep, study_uid: str, principal: AdminDep,
             rule: Annotated[str, Form()]) -> Response:
    job_id = actions.rerun_with_rule(ctx.sessions, settings, study_uid, rule, principal.user or "?")
    return _back(None, f"/studies/{quote(study_uid)}", f"job {job_id} queued with rule {rule}")


@router.post("/ui/studies/{study_uid}/complete")
def ui_complete(ctx: ContextDep, settings: SettingsDep, study_uid: str, principal: AdminDep) -> Response:
    job_ids = actions.complete_now(ctx.sessions, settings, study_uid, principal.user or "?")
    return _back(None, f"/studies/{quote(study_uid)}",
                 f"study completed: {len(job_ids)} job(s) queued" if job_ids else "study completed: no rule matched")


@router.post("/ui/studies/{study_uid}/ask")
def ui_ask(ctx: ContextDep, settings: SettingsDep, study_uid: str, principal: AdminDep,
           kind: Annotated[str, Form()] = "vqa", text: Annotated[str, Form()] = "",
           language: Annotated[str, Form()] = "en", send_to_pacs: Annotated[bool, Form()] = False) -> Response:
    body = AskIn(kind=kind, text=text, language=language, send_to_pacs=send_to_pacs)  # type: ignore[arg-type]
    job_id = actions.ask(ctx.sessions, settings, study_uid, body.kind, body.text, body.language,
                         send_to_pacs=body.send_to_pacs, actor=principal.user or "?")
    return RedirectResponse(
        f"/studies/{quote(study_uid)}?{urlencode({'msg': f'asked: job {job_id} queued'})}#job-{job_id}",
        status_code=303)


@router.post("/ui/destinations/{name}/echo", response_class=HTMLResponse)
async def ui_echo(request: Request, ctx: ContextDep, settings: SettingsDep, name: str,
                  principal: AdminDep) -> HTMLResponse:
    out = await run_in_threadpool(system.echo_destination, settings, name)
    if out is None:
        raise HTTPException(404, f"no destination named {name!r}")
    actions.audit(ctx.sessions, principal.user or "?", "echo", None,
                  f"{name}: {'ok' if out.ok else 'failed'} {out.latency_ms} ms")
    return render(request, "destinations.html", principal=principal,
                  destinations=system.destinations_out(settings), echo=out)
