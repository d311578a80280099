"""What an administrator or radiologist can do from the dashboard and the API, in one place.

Retry and cancel are :mod:`node.jobs`'s own functions (the CLI calls the same ones). Raising a
queued job's priority, re-running a study with another rule and asking an on-demand question create
or adjust jobs here, always commit before enqueueing, and leave an :class:`AuditEvent` naming the
actor (never a patient).
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from inference.tasks import parse_task
from node import jobs
from node.config import Settings
from node.jobs import JobNotFoundError
from storage.models import TERMINAL_JOB_STATES, Job, JobState, Study, StudyState, utcnow

log = logging.getLogger(__name__)

#: Priority of on-demand jobs: the highest, so a waiting radiologist is served first.
ASK_PRIORITY = 9
#: Series a model never reads as input: mednode's own outputs and other derived objects.
NON_IMAGE_MODALITIES = frozenset({"SR", "SEG", "PR", "KO", "RTSTRUCT", "REG", "DOC"})


class StudyNotFoundError(LookupError):
    pass


class ActionRefusedError(ValueError):
    """The action does not apply now; the message says why and what to do instead."""


def audit(sessions: sessionmaker[Session], actor: str, action: str, study_uid: str | None,
          detail: str | None = None) -> None:
    """Record a manual action (:func:`node.audit.record`)."""
    from node import audit as audit_trail

    audit_trail.record(sessions, actor, action, study_uid, detail)


def _study_uid_of(sessions: sessionmaker[Session], job_id: int) -> str:
    with sessions() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist")
        return job.study.study_instance_uid


def retry(sessions: sessionmaker[Session], job_id: int, actor: str) -> None:
    """Queue a failed or cancelled job again (:func:`node.jobs.retry_job`)."""
    jobs.retry_job(sessions, job_id)
    audit(sessions, actor, "retry", _study_uid_of(sessions, job_id), f"job {job_id}")


def cancel(sessions: sessionmaker[Session], job_id: int, actor: str) -> None:
    """Cancel a job that has not finished (:func:`node.jobs.cancel_job`)."""
    jobs.cancel_job(sessions, job_id)
    audit(sessions, actor, "cancel", _study_uid_of(sessions, job_id), f"job {job_id}")


def set_priority(sessions: sessionmaker[Session], job_id: int, priority: int, actor: str) -> None:
    """Give a queued job another priority (:func:`node.jobs.set_priority`)."""
    jobs.set_priority(sessions, job_id, priority)
    audit(sessions, actor, "priority", _study_uid_of(sessions, job_id), f"job {job_id} -> {priority}")


def send_results(sessions: sessionmaker[Session], settings: Settings, job_id: int, actor: str) -> int:
    """Send a finished job's results (an on-demand answer) to the default destination, as SR.

    Returns the number of deliveries queued.

    Raises
    ------
    ActionRefusedError
        If no default destination is configured.
    """
    if settings.destination is None:
        raise ActionRefusedError("no default destination is configured (set destination: AET@host:port)")
    created = jobs.send_results(sessions, job_id, [str(settings.destination)])
    for delivery_id in created:
        jobs.enqueue_delivery(sessions, delivery_id)
    audit(sessions, actor, "send", _study_uid_of(sessions, job_id), f"job {job_id} -> {settings.destination}")
    return len(created)


def _image_series(study: Study) -> list[str]:
    return [s.series_instance_uid for s in study.series
            if (s.modality or "").upper() not in NON_IMAGE_MODALITIES]


def _completed_study(session: Session, study_uid: str) -> Study:
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None:
        raise StudyNotFoundError(f"study {study_uid} is not stored on this node")
    if study.state == StudyState.RECEIVING or study.version == 0:
        raise ActionRefusedError(
            f"study {study_uid} is still receiving instances; wait until it is complete"
        )
    return study


def rerun_with_rule(sessions: sessionmaker[Session], settings: Settings, study_uid: str,
                    rule_name: str, actor: str) -> int:
    """Run rule ``rule_name`` on the study's current version, whatever routing decided; return
    the job id. The rule's series conditions still select the series it reads.

    Raises
    ------
    StudyNotFoundError, ActionRefusedError
        If the study is unknown or still receiving, the rule is unknown or matches no series,
        or the rule already has a job for this version that is not failed or cancelled.
    """
    from node.completion import study_facts
    from node.routing import check_rule

    rules = {r.name: r for r in settings.effective_rules}
    rule = rules.get(rule_name)
    if rule is None:
        raise ActionRefusedError(f"no rule named {rule_name!r}; configured: {', '.join(rules) or 'none'}")
    retry_id: int | None = None
    with sessions() as session, session.begin():
        study = _completed_study(session, study_uid)
        existing = session.scalar(select(Job).where(
            Job.study_pk == study.id, Job.study_version == study.version, Job.rule_name == rule.name))
        if existing is not None:
            if existing.state not in (JobState.FAILED, JobState.CANCELLED):
                raise ActionRefusedError(
                    f"rule {rule.name} already has job {existing.id} ({existing.state.value}) for this "
                    "version of the study")
            retry_id = existing.id
        else:
            check = check_rule(rule, study_facts(session, study))
            series = list(check.series_uids) or _image_series(study)
            if not series:
                raise ActionRefusedError(f"study {study_uid} has no image series for rule {rule.name}")
            job = Job(
                study_pk=study.id, study_version=study.version, rule_name=rule.name,
                tasks=list(rule.tasks), series_uids=series,
                destinations=[str(settings.resolve_destination(d, rule=rule.name)) for d in rule.destinations],
                priority=rule.priority, state=JobState.QUEUED, created_at=utcnow(),
            )
            session.add(job)
            session.flush()
            job_id, priority = job.id, job.priority
    if retry_id is not None:
        jobs.retry_job(sessions, retry_id)
        job_id = retry_id
    else:
        jobs.enqueue_job(sessions, job_id, priority)
    audit(sessions, actor, "rerun", study_uid, f"job {job_id}, rule {rule.name}")
    return job_id


def complete_now(sessions: sessionmaker[Session], settings: Settings, study_uid: str, actor: str) -> list[int]:
    """Complete a receiving study now, whatever its quiet period or required series (routing it
    as usual); return the ids of the jobs enqueued.

    Raises
    ------
    StudyNotFoundError, ActionRefusedError
        If the study is unknown, or complete already.
    """
    from node.completion import StudyNotReceivingError, force_complete

    try:
        created = force_complete(sessions, settings, study_uid, actor=actor)
    except StudyNotReceivingError as exc:
        raise ActionRefusedError(str(exc)) from None
    except LookupError as exc:
        raise StudyNotFoundError(str(exc)) from None
    for job_id, priority in created:
        jobs.enqueue_job(sessions, job_id, priority)
    audit(sessions, actor, "complete", study_uid, f"{len(created)} job(s)")
    log.info("study %s completed by hand: %d job(s)", study_uid, len(created))
    return [job_id for job_id, _ in created]


def ask_task(kind: str, text: str | None, language: str) -> dict[str, Any]:
    """The task (as data, like a rule's ``tasks:`` item) for one on-demand request.

    Raises
    ------
    ValueError
        If the kind needs text (a question, phrase, labels, findings) and none was given, or the
        task is otherwise invalid (:func:`inference.tasks.parse_task` says what).
    """
    text = (text or "").strip()
    options: dict[str, Any] = {"language": language}
    if kind == "vqa":
        options["questions"] = [text] if text else []
    elif kind == "ground":
        options["phrases"] = [text] if text else []
    elif kind in ("classify", "detect"):
        items = [t.strip() for t in text.replace("，", ",").split(",") if t.strip()]
        options["labels" if kind == "classify" else "findings"] = items
    task = {kind: options}
    parse_task(task)  # validates; raises ValueError naming the problem
    return task


def ask(sessions: sessionmaker[Session], settings: Settings, study_uid: str, kind: str,
        text: str | None, language: str, *, send_to_pacs: bool, actor: str) -> int:
    """Create and enqueue an on-demand, high-priority job on the study's image series.

    The task travels as data in ``Job.tasks``; the worker runs it like any rule's task and its
    answer becomes the job's results (an SR), sent to the default destination only when
    ``send_to_pacs``.

    Raises
    ------
    ValueError
        If the task is invalid (see :func:`ask_task`).
    StudyNotFoundError, ActionRefusedError
        If the study is unknown, still receiving, has no image series, or ``send_to_pacs`` is
        asked with no default destination configured.
    """
    task = ask_task(kind, text, language)
    destinations: list[str] = []
    if send_to_pacs:
        if settings.destination is None:
            raise ActionRefusedError("no default destination is configured (set destination: AET@host:port)")
        destinations = [str(settings.destination)]
    with sessions() as session, session.begin():
        study = _completed_study(session, study_uid)
        series = _image_series(study)
        if not series:
            raise ActionRefusedError(f"study {study_uid} has no image series to ask about")
        job = Job(
            study_pk=study.id, study_version=study.version,
            rule_name=f"ask-{uuid.uuid4().hex[:12]}", tasks=[task], series_uids=series,
            destinations=destinations, priority=ASK_PRIORITY, state=JobState.QUEUED, on_demand=True,
            created_at=utcnow(),
        )
        session.add(job)
        session.flush()
        job.rule_name = f"ask-{job.id}"  # readable, and the job's output UIDs derive from it
        job_id = job.id
    jobs.enqueue_job(sessions, job_id, ASK_PRIORITY)
    audit(sessions, actor, "ask", study_uid, f"job {job_id}: {kind}")
    log.info("on-demand job %d (%s) for study %s", job_id, kind, study_uid)
    return job_id


def is_finished(job: Job) -> bool:
    return job.state in TERMINAL_JOB_STATES or job.state == JobState.SUCCEEDED
