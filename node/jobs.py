"""Job and delivery state transitions: the only code that changes ``Job.state``.

The database is the source of truth. A Celery message carries a job or delivery id and may be
delivered twice or lost; every function here is written so a duplicate is harmless (conditional
updates) and a loss is repaired by :func:`sweep`.
"""

from __future__ import annotations

import logging
import os
import socket
from collections import Counter
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from node.celery_app import DELIVERY_QUEUE, INFERENCE_QUEUE, app
from storage.models import (
    TERMINAL_JOB_STATES,
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    SeriesOrigin,
    Study,
    StudyState,
    utcnow,
)

log = logging.getLogger(__name__)

#: How long a running job may go without its worker renewing the lease before it counts as lost.
LEASE_S = 120.0


class JobNotFoundError(LookupError):
    pass


class InvalidTransitionError(ValueError):
    """The requested action does not apply to the job's current state."""


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


# -- enqueueing (always after the commit that created the row) -----------------------------------
def _priority_kwargs(priority: int) -> dict[str, Any]:
    broker = str(app.conf.broker_url or "")
    if broker.startswith(("amqp", "pyamqp")):
        return {"priority": priority}
    if broker.startswith("redis"):
        return {"priority": 9 - priority}  # redis: lower number first
    return {}


def enqueue_job(sessions: sessionmaker[Session], job_id: int, priority: int = 5) -> None:
    """Send ``mednode.run_job`` for ``job_id`` and note when; a failure leaves it for the sweep."""
    try:
        app.send_task("mednode.run_job", args=[job_id], queue=INFERENCE_QUEUE, **_priority_kwargs(priority))
    except Exception as exc:  # noqa: BLE001 (broker down, any transport error: the job stays queued, the sweep enqueues it again)
        log.warning("could not enqueue job %d (%s); the sweep will retry", job_id, type(exc).__name__)
        return
    with sessions() as session, session.begin():
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=utcnow()))


def enqueue_delivery(sessions: sessionmaker[Session], delivery_id: int, countdown_s: float = 0) -> None:
    try:
        app.send_task(
            "mednode.deliver", args=[delivery_id], queue=DELIVERY_QUEUE, countdown=countdown_s or None
        )
    except Exception as exc:  # noqa: BLE001 (any transport error: the sweep sends it again)
        log.warning("could not enqueue delivery %d (%s); the sweep will retry", delivery_id, type(exc).__name__)


# -- worker side -------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClaimedJob:
    id: int
    study_instance_uid: str
    study_version: int
    rule_name: str
    tasks: list[Any]
    series_uids: list[str]
    destinations: list[str]
    attempt: int
    instance_paths: dict[str, list[str]]  #: series UID -> stored paths

    @property
    def key(self) -> str:
        """Identity of this job's output: the same study version and rule give the same UIDs."""
        return f"{self.study_instance_uid}/{self.study_version}/{self.rule_name}"


def claim(sessions: sessionmaker[Session], job_id: int, *, lease_s: float = LEASE_S) -> ClaimedJob | None:
    """Move a queued job (or a running one whose worker's lease expired) to running.

    Returns ``None`` when the job is not there to run: another worker holds it, it already
    finished, or its study has changed since it was routed (then it is marked superseded).
    """
    now = utcnow()
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist")
        study = job.study
        if job.state in TERMINAL_JOB_STATES or job.state in (JobState.SUCCEEDED, JobState.DELIVERING):
            return None
        if study.state == StudyState.RECEIVING or study.version != job.study_version:
            job.state = JobState.SUPERSEDED
            job.reason = "the study received more instances; a newer version will run"
            job.finished_at = now
            return None
        # the lease test lives in the WHERE clause: of two workers re-claiming an expired job,
        # the database lets exactly one UPDATE match
        expired = Job.lease_expires_at.is_(None) | (Job.lease_expires_at < now)
        taken = session.execute(
            update(Job)
            .where(Job.id == job_id)
            .where((Job.state == JobState.QUEUED) | ((Job.state == JobState.RUNNING) & expired))
            .values(
                state=JobState.RUNNING,
                attempts=Job.attempts + 1,
                started_at=now,
                lease_expires_at=now + timedelta(seconds=lease_s),
                worker=worker_name(),
                reason=None,
            )
        ).rowcount
        if not taken:
            return None
        session.refresh(job)
        paths: dict[str, list[str]] = {}
        for series in study.series:
            # mednode's own results returned by a PACS are never a job's input
            if series.series_instance_uid in job.series_uids and series.origin != SeriesOrigin.MEDNODE_RESULT:
                rows = session.scalars(
                    select(Instance.path).where(Instance.series_pk == series.id).order_by(Instance.id)
                )
                paths[series.series_instance_uid] = list(rows)
        return ClaimedJob(
            id=job.id,
            study_instance_uid=study.study_instance_uid,
            study_version=job.study_version,
            rule_name=job.rule_name,
            tasks=list(job.tasks),
            series_uids=list(job.series_uids),
            destinations=list(job.destinations),
            attempt=job.attempts,
            instance_paths=paths,
        )


def renew_lease(sessions: sessionmaker[Session], job_id: int, *, lease_s: float = LEASE_S) -> None:
    with sessions() as session, session.begin():
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state == JobState.RUNNING)
            .values(lease_expires_at=utcnow() + timedelta(seconds=lease_s))
        )


@dataclass(frozen=True)
class ResultObject:
    """One DICOM object a job produced, already written to the store."""

    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: str
    size_bytes: int
    summary: dict[str, Any]


def record_results(
    sessions: sessionmaker[Session], job_id: int, results: list[ResultObject]
) -> list[int]:
    """Store the job's results and one pending delivery per destination; return delivery ids.

    If the study changed while the job ran, the results are kept but nothing is sent: the job
    is superseded by the newer version.
    """
    now = utcnow()
    delivery_ids: list[int] = []
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist")
        if job.state != JobState.RUNNING:
            # cancelled or superseded while it ran: keep nothing, send nothing
            log.info("job %d is %s; its results are discarded", job_id, job.state.value)
            return []
        stale = job.study.state == StudyState.RECEIVING or job.study.version != job.study_version
        existing = {r.sop_instance_uid: r for r in job.results}
        rows: list[Result] = []
        for obj in results:
            row = existing.get(obj.sop_instance_uid)
            if row is None:
                row = Result(
                    job_pk=job.id,
                    kind=obj.kind,
                    sop_class_uid=obj.sop_class_uid,
                    sop_instance_uid=obj.sop_instance_uid,
                    series_instance_uid=obj.series_instance_uid,
                    path=obj.path,
                    size_bytes=obj.size_bytes,
                    summary=obj.summary,
                )
                session.add(row)
            else:
                row.path, row.size_bytes, row.summary = obj.path, obj.size_bytes, obj.summary
            rows.append(row)
        session.flush()
        job.finished_at = now
        job.lease_expires_at = None
        if stale:
            job.state = JobState.SUPERSEDED
            job.reason = "the study received more instances while the job ran"
            return []
        if not job.destinations:
            job.state = JobState.SUCCEEDED
            return []
        job.state = JobState.DELIVERING
        for row in rows:
            known = {d.destination: d for d in row.deliveries}
            for destination in job.destinations:
                delivery = known.get(destination)
                if delivery is None:
                    delivery = Delivery(result_pk=row.id, destination=destination, next_attempt_at=now)
                    session.add(delivery)
                    session.flush()
                if delivery.state == DeliveryState.PENDING:
                    delivery_ids.append(delivery.id)
    return delivery_ids


def fail_job(sessions: sessionmaker[Session], job_id: int, reason: str) -> None:
    with sessions() as session, session.begin():
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.state.in_([JobState.RUNNING, JobState.QUEUED]))
            .values(state=JobState.FAILED, reason=reason[:2000], finished_at=utcnow(), lease_expires_at=None)
        )
    log.warning("job %d failed: %s", job_id, reason)


def release_for_retry(sessions: sessionmaker[Session], job_id: int, reason: str) -> int:
    """Put a running job back to queued after a transient error; return its attempt count."""
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist")
        if job.state != JobState.RUNNING:
            return job.attempts
        job.state = JobState.QUEUED
        job.reason = f"retrying after: {reason}"[:2000]
        job.lease_expires_at = None
        return job.attempts


def finish_delivery(sessions: sessionmaker[Session], delivery_id: int, *, ok: bool, error: str | None,
                    give_up_after_s: float, next_attempt_at: datetime | None) -> DeliveryState:
    """Record one delivery attempt and roll the job's state up from its deliveries."""
    now = utcnow()
    with sessions() as session, session.begin():
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            raise LookupError(f"delivery {delivery_id} does not exist")
        delivery.attempts += 1
        delivery.last_attempt_at = now
        if ok:
            delivery.state = DeliveryState.DELIVERED
            delivery.delivered_at = now
            delivery.last_error = None
            delivery.next_attempt_at = None
        else:
            delivery.last_error = (error or "unknown error")[:2000]
            if (now - delivery.created_at).total_seconds() >= give_up_after_s:
                delivery.state = DeliveryState.FAILED
                delivery.next_attempt_at = None
            else:
                delivery.next_attempt_at = next_attempt_at
        session.flush()
        job = delivery.result.job
        states = [d.state for r in job.results for d in r.deliveries]
        if job.state == JobState.DELIVERING:
            if all(s == DeliveryState.DELIVERED for s in states):
                job.state = JobState.DELIVERED
            elif all(s != DeliveryState.PENDING for s in states):
                job.state = JobState.FAILED
                failed = [d for r in job.results for d in r.deliveries if d.state == DeliveryState.FAILED]
                job.reason = f"delivery gave up: {failed[0].destination}: {failed[0].last_error}"
        return delivery.state


# -- admin actions (CLI and API share these) ----------------------------------------------------
def retry_job(sessions: sessionmaker[Session], job_id: int) -> None:
    """Queue a failed or cancelled job again (its results keep their UIDs)."""
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist")
        if job.state not in (JobState.FAILED, JobState.CANCELLED):
            raise InvalidTransitionError(f"job {job_id} is {job.state.value}; only failed or cancelled jobs can be retried")
        job.state = JobState.QUEUED
        job.reason = None
        job.attempts = 0
        job.finished_at = None
        for result in job.results:
            for delivery in result.deliveries:
                if delivery.state == DeliveryState.FAILED:
                    delivery.state = DeliveryState.PENDING
                    delivery.created_at = utcnow()
        priority = job.priority
    enqueue_job(sessions, job_id, priority)


def set_priority(sessions: sessionmaker[Session], job_id: int, priority: int) -> None:
    """Give a queued job another priority (0–9, 9 first) and enqueue it again with it.

    The earlier message stays in the broker; whichever arrives first claims the job and the
    other finds it taken (claims are conditional), so the duplicate is harmless.

    Raises
    ------
    ValueError
        If ``priority`` is outside 0..9.
    JobNotFoundError
        If there is no such job.
    InvalidTransitionError
        If the job is not queued (a running or finished job has no place in the queue).
    """
    if not 0 <= priority <= 9:
        raise ValueError(f"priority must be 0..9, got {priority}")
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist")
        changed = session.execute(
            update(Job).where(Job.id == job_id, Job.state == JobState.QUEUED).values(priority=priority)
        ).rowcount
        if not changed:
            raise InvalidTransitionError(f"job {job_id} is {job.state.value}; only queued jobs can change priority")
    enqueue_job(sessions, job_id, priority)


def send_results(sessions: sessionmaker[Session], job_id: int, destinations: list[str]) -> list[int]:
    """Send a finished job's results to more destinations (e.g. an on-demand answer to the PACS).

    Returns the ids of the new deliveries, which the caller enqueues.

    Raises
    ------
    JobNotFoundError
        If there is no such job.
    InvalidTransitionError
        If the job has not produced its results (not succeeded, delivering or delivered).
    """
    now = utcnow()
    created: list[int] = []
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist")
        if job.state not in (JobState.SUCCEEDED, JobState.DELIVERING, JobState.DELIVERED) or not job.results:
            raise InvalidTransitionError(
                f"job {job_id} is {job.state.value}; only a job that wrote results can send them"
            )
        for result in job.results:
            known = {d.destination for d in result.deliveries}
            for destination in destinations:
                if destination not in known:
                    delivery = Delivery(result_pk=result.id, destination=destination, next_attempt_at=now)
                    session.add(delivery)
                    session.flush()
                    created.append(delivery.id)
        if created:
            job.destinations = list(dict.fromkeys([*job.destinations, *destinations]))
            job.state = JobState.DELIVERING
    return created


def cancel_job(sessions: sessionmaker[Session], job_id: int) -> None:
    with sessions() as session, session.begin():
        job = session.get(Job, job_id)
        if job is None:
            raise JobNotFoundError(f"job {job_id} does not exist")
        if job.state in TERMINAL_JOB_STATES:
            raise InvalidTransitionError(f"job {job_id} is already {job.state.value}")
        job.state = JobState.CANCELLED
        job.reason = "cancelled by an administrator"
        job.finished_at = utcnow()
        job.lease_expires_at = None


# -- recovery ------------------------------------------------------------------------------------
def sweep(
    sessions: sessionmaker[Session], *, requeue_after_s: float = 900.0, delivery_grace_s: float = 60.0
) -> tuple[list[tuple[int, int]], list[int]]:
    """Find work whose message may be lost and return it to enqueue again.

    That is: running jobs whose lease expired (their worker died; back to queued), queued jobs
    never enqueued (broker was down) or enqueued more than ``requeue_after_s`` ago, and pending
    deliveries overdue by ``delivery_grace_s``. Returns (job id, priority) pairs and delivery ids;
    a duplicate message is harmless because every transition is conditional.
    """
    now = utcnow()
    job_grace = now - timedelta(seconds=requeue_after_s)
    grace = now - timedelta(seconds=delivery_grace_s)
    with sessions() as session, session.begin():
        lost_running = session.scalars(
            select(Job).where(Job.state == JobState.RUNNING, Job.lease_expires_at < now)
        ).all()
        for job in lost_running:
            log.warning("job %d lost its worker (lease expired); queueing it again", job.id)
            job.state = JobState.QUEUED
            job.lease_expires_at = None
            job.enqueued_at = None
        jobs = session.execute(
            select(Job.id, Job.priority).where(
                Job.state == JobState.QUEUED,
                (Job.enqueued_at.is_(None)) | (Job.enqueued_at < job_grace),
            )
        ).all()
        deliveries = session.scalars(
            select(Delivery.id).where(
                Delivery.state == DeliveryState.PENDING,
                (Delivery.next_attempt_at.is_(None)) | (Delivery.next_attempt_at < grace),
            )
        ).all()
    return [(j.id, j.priority) for j in jobs], list(deliveries)


def status_counts(session: Session) -> dict[str, Any]:
    """Counts for ``mednode status``, the dashboard and ``/metrics``."""
    instances = session.scalar(select(func.count(Instance.id))) or 0
    studies = Counter({s.value: 0 for s in StudyState})
    for state, count in session.execute(select(Study.state, func.count()).group_by(Study.state)):
        studies[state.value] = count
    jobs = Counter({s.value: 0 for s in JobState})
    for state, count in session.execute(select(Job.state, func.count()).group_by(Job.state)):
        jobs[state.value] = count
    deliveries = Counter({s.value: 0 for s in DeliveryState})
    for state, count in session.execute(select(Delivery.state, func.count()).group_by(Delivery.state)):
        deliveries[state.value] = count
    return {
        "instances": instances,
        "studies": dict(studies),
        "jobs": dict(jobs),
        "deliveries": dict(deliveries),
    }
