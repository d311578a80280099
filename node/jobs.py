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
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.sr_common import InstanceReference
from dicom_io.uids import derived_uid
from node import clock
from node.celery_app import DELIVERY_QUEUE, URGENT_PRIORITY, app, inference_queue, job_models
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
def priority_kwargs(priority: int) -> dict[str, Any]:
    broker = str(app.conf.broker_url or "")
    if broker.startswith(("amqp", "pyamqp")):
        return {"priority": priority}
    if broker.startswith("redis"):
        return {"priority": 9 - priority}  # redis: lower number first
    return {}


def enqueue_job(sessions: sessionmaker[Session], job_id: int, priority: int = 5) -> None:
    """Send ``mednode.run_job`` for ``job_id`` and note when; a failure leaves it for the sweep.

    A job goes to the queue of the models its tasks need, and jobs at
    :data:`~node.celery_app.URGENT_PRIORITY` or above to that queue's urgent twin, which a worker
    of its own consumes (:func:`~node.celery_app.inference_queue`).
    """
    # noted before the send: a free worker may claim the job before send_task returns, and the
    # clock's queued → started must see when it was queued; a failed send puts it back
    sent_at = utcnow()
    with sessions() as session, session.begin():
        row = session.execute(select(Job.created_at, Job.enqueued_at, Job.attempts, Job.on_demand)
                              .where(Job.id == job_id)).one_or_none()
        session.execute(update(Job).where(Job.id == job_id).values(enqueued_at=sent_at))
    try:
        with sessions() as session:
            tasks = session.scalar(select(Job.tasks).where(Job.id == job_id)) or []
        queue = inference_queue(priority, job_models(tasks))
        app.send_task("mednode.run_job", args=[job_id], queue=queue, **priority_kwargs(priority))
    except Exception as exc:  # noqa: BLE001 (broker down, any transport error: the job stays queued, the sweep enqueues it again)
        log.warning("could not enqueue job %d (%s); the sweep will retry", job_id, type(exc).__name__)
        with sessions() as session, session.begin():
            session.execute(update(Job).where(Job.id == job_id, Job.enqueued_at == sent_at)
                            .values(enqueued_at=row.enqueued_at if row is not None else None))
        return
    if row is not None and row.enqueued_at is None and row.attempts == 0 and not row.on_demand:
        clock.observe(clock.COMPLETE_TO_QUEUED, clock.span_s(row.created_at, sent_at))


def enqueue_delivery(sessions: sessionmaker[Session], delivery_id: int, countdown_s: float = 0,
                     attempts: int | None = None) -> None:
    """Send ``mednode.deliver`` for ``delivery_id``; ``attempts`` (the delivery's attempt count when
    sent) lets the worker skip a message that a batch of the same job has served meanwhile."""
    try:
        app.send_task(
            "mednode.deliver", args=[delivery_id] if attempts is None else [delivery_id, attempts],
            queue=DELIVERY_QUEUE, countdown=countdown_s or None,
        )
    except Exception as exc:  # noqa: BLE001 (any transport error: the sweep sends it again)
        log.warning("could not enqueue delivery %d (%s); the sweep will retry", delivery_id, type(exc).__name__)


# -- worker side -------------------------------------------------------------------------------
def lowered_below_urgent(sessions: sessionmaker[Session], job_id: int) -> bool:
    """True when a queued job's priority is now below the urgent threshold.

    A message on the urgent queue for such a job is stale: :func:`set_priority` sent another to
    the inference queue, which runs it, so the urgent worker stays free for urgent work.
    """
    with sessions() as session:
        row = session.execute(select(Job.state, Job.priority).where(Job.id == job_id)).one_or_none()
    return row is not None and row.state == JobState.QUEUED and row.priority < URGENT_PRIORITY


@dataclass(frozen=True)
class PreviousResult:
    """An object the previous version of the same study and rule wrote (what a new job amends)."""

    study_version: int
    job_id: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    path: str
    #: destinations that hold it (delivery succeeded)
    delivered_to: tuple[str, ...] = ()


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
    #: the results this job amends: those of the latest earlier version of the study whose job
    #: for the same rule published results (see :func:`previous_results`); empty for a first version
    previous_results: tuple[PreviousResult, ...] = ()
    #: 0-9 as claimed: the job's prompts go before those of lower-priority jobs in a shared model
    priority: int = 5

    @property
    def key(self) -> str:
        """Identity of this job's output: the same study version and rule give the same UIDs."""
        return f"{self.study_instance_uid}/{self.study_version}/{self.rule_name}"

    @property
    def amendment(self) -> Amendment | None:
        """What this job's results amend, or None for first results."""
        if not self.previous_results:
            return None
        return Amendment(
            version=self.study_version,
            previous_version=self.previous_results[0].study_version,
            previous_key=f"{self.study_instance_uid}/{self.previous_results[0].study_version}/{self.rule_name}",
            study_instance_uid=self.study_instance_uid,
            previous_results=self.previous_results,
        )

    @property
    def previous_key(self) -> str | None:
        """:attr:`key` of the job whose results this one amends, or None for a first version."""
        amendment = self.amendment
        return amendment.previous_key if amendment else None

    @property
    def result_version(self) -> int | None:
        """Version written in the results' Series Descriptions ("… v2"): the study version when
        this job amends earlier results, None for first results (which keep today's descriptions)."""
        return self.study_version if self.previous_results else None

    def predecessors(self, *slot: str) -> list[InstanceReference]:
        """See :meth:`Amendment.predecessors`; empty for a first version."""
        amendment = self.amendment
        return amendment.predecessors(*slot) if amendment else []


@dataclass(frozen=True)
class Amendment:
    """A job whose results replace those of an earlier version of the same study and rule."""

    version: int  #: the study version of the new results (shown as "v2" in descriptions)
    previous_version: int
    previous_key: str
    study_instance_uid: str
    previous_results: tuple[PreviousResult, ...]

    def predecessors(self, *slot: str) -> list[InstanceReference]:
        """The objects the previous version wrote in the same output slot.

        Output UIDs derive from ``(job key, *slot, "series"|"instance")`` (e.g. slot ``("sr",)`` or
        ``("report", "0")``), so the previous version's object in a slot is the one in the series
        derived from the previous key and the same slot.
        """
        series_uid = derived_uid(self.previous_key, *slot, "series")
        return [
            InstanceReference(self.study_instance_uid, r.series_instance_uid, r.sop_class_uid, r.sop_instance_uid)
            for r in self.previous_results
            if r.series_instance_uid == series_uid
        ]


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
        if job.attempts == 1 and not job.on_demand:
            clock.observe(clock.QUEUED_TO_STARTED, clock.span_s(job.enqueued_at, now))
        paths = series_paths(session, study, job.series_uids)
        return ClaimedJob(
            previous_results=previous_results(session, job),
            id=job.id,
            study_instance_uid=study.study_instance_uid,
            study_version=job.study_version,
            rule_name=job.rule_name,
            tasks=list(job.tasks),
            series_uids=list(job.series_uids),
            destinations=list(job.destinations),
            attempt=job.attempts,
            instance_paths=paths,
            priority=job.priority,
        )


def series_paths(session: Session, study: Study, series_uids: Iterable[str]) -> dict[str, list[str]]:
    """Series UID → the stored paths of its instances, in the order they were indexed, for those
    of ``series_uids`` in ``study``: a job's input (mednode's own results returned by a PACS are
    never one)."""
    wanted = set(series_uids)
    paths: dict[str, list[str]] = {}
    for series in study.series:
        if series.series_instance_uid in wanted and series.origin != SeriesOrigin.MEDNODE_RESULT:
            rows = session.scalars(
                select(Instance.path).where(Instance.series_pk == series.id).order_by(Instance.id)
            )
            paths[series.series_instance_uid] = list(rows)
    return paths


def receiving_study_paths(session: Session, study_uid: str, series_uids: Iterable[str]) -> dict[str, list[str]]:
    """:func:`series_paths` of a study still receiving (what its job would read if it completed
    now); empty when the study is complete or unknown."""
    study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
    if study is None or study.state != StudyState.RECEIVING:
        return {}
    return series_paths(session, study, series_uids)


def _published(job: Job) -> bool:
    """Whether ``job``'s results were meant to go out: it finished its run and recorded them (not
    superseded or cancelled while it ran, which keeps its results but sends nothing)."""
    if not job.results:
        return False
    if job.state in (JobState.SUCCEEDED, JobState.DELIVERING, JobState.DELIVERED):
        return True
    return any(r.deliveries for r in job.results)


def _newer_published(session: Session, job: Job) -> Job | None:
    """A job of a later study version and the same rule that published results, if any."""
    if job.on_demand:
        return None
    newer = session.scalars(
        select(Job)
        .where(Job.study_pk == job.study_pk, Job.rule_name == job.rule_name,
               Job.study_version > job.study_version, Job.on_demand.is_(False))
        .order_by(Job.study_version.desc())
    )
    return next((j for j in newer if _published(j)), None)


def previous_results(session: Session, job: Job) -> tuple[PreviousResult, ...]:
    """The results ``job`` amends: those of the latest earlier study version whose job for the
    same rule published results. On-demand jobs amend nothing (each asks its own question)."""
    if job.on_demand:
        return ()
    older = session.scalars(
        select(Job)
        .where(
            Job.study_pk == job.study_pk,
            Job.rule_name == job.rule_name,
            Job.study_version < job.study_version,
            Job.on_demand.is_(False),
        )
        .order_by(Job.study_version.desc(), Job.id.desc())
    )
    for candidate in older:
        if _published(candidate):
            return tuple(
                PreviousResult(
                    study_version=candidate.study_version,
                    job_id=candidate.id,
                    kind=r.kind,
                    sop_class_uid=r.sop_class_uid,
                    sop_instance_uid=r.sop_instance_uid,
                    series_instance_uid=r.series_instance_uid,
                    path=r.path,
                    delivered_to=tuple(
                        d.destination for d in r.deliveries if d.state == DeliveryState.DELIVERED
                    ),
                )
                for r in candidate.results
            )
    return ()


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
    #: where it goes: None for every destination of the job; a subset for an object meant for some
    #: of them only (an IOCM rejection note goes only to destinations that opted in)
    destinations: tuple[str, ...] | None = None


def record_results(
    sessions: sessionmaker[Session], job_id: int, results: list[ResultObject],
    stage_s: dict[str, float] | None = None,
) -> list[int]:
    """Store the job's results and one pending delivery per destination; return delivery ids.

    ``stage_s`` (seconds per pipeline stage, :mod:`node.clock`) is kept with the job.

    If the study changed while the job ran, the results are kept but nothing is sent: the job
    is superseded by the newer version. Otherwise these results replace those of earlier versions
    of the same study and rule: their deliveries that have not gone out are cancelled (see
    :func:`cancel_superseded_deliveries`).
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
        rows: list[tuple[Result, ResultObject]] = []
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
            rows.append((row, obj))
        session.flush()
        job.finished_at = now
        job.lease_expires_at = None
        if stage_s is not None:
            job.stage_s = stage_s
        if stale:
            job.state = JobState.SUPERSEDED
            job.reason = "the study received more instances while the job ran"
            return []
        cancel_superseded_deliveries(session, job)
        if not job.destinations:
            job.state = JobState.SUCCEEDED
            return []
        job.state = JobState.DELIVERING
        for row, obj in rows:
            known = {d.destination: d for d in row.deliveries}
            targets = job.destinations if obj.destinations is None else [
                d for d in job.destinations if d in obj.destinations]
            for destination in targets:
                delivery = known.get(destination)
                if delivery is None:
                    delivery = Delivery(result_pk=row.id, destination=destination, next_attempt_at=now)
                    session.add(delivery)
                    session.flush()
                if delivery.state == DeliveryState.PENDING:
                    delivery_ids.append(delivery.id)
    return delivery_ids


def cancel_superseded_deliveries(session: Session, job: Job) -> list[int]:
    """Cancel the pending deliveries of every earlier version of ``job``'s study and rule.

    Called when ``job`` records its results, not when the study reopens: until a newer version
    has results, the older ones are the best the PACS can get (the newer job may fail, or no
    rule may run on the new version), and what went out meanwhile is named by the new SR's
    Predecessor Documents (and withdrawn by a rejection note where a destination opted in).
    A delivery already in flight cannot be called back; :func:`finish_delivery` records it as
    delivered if it got through. Returns the cancelled delivery ids.
    """
    if job.on_demand:
        return []
    older = session.scalars(
        select(Job).where(
            Job.study_pk == job.study_pk,
            Job.rule_name == job.rule_name,
            Job.study_version < job.study_version,
            Job.on_demand.is_(False),
        )
        # the jobs before their deliveries, as finish_delivery takes them: no deadlock between them
        .with_for_update()
    ).all()
    reason = (f"cancelled: version {job.study_version} of the study's results (job {job.id}) "
              "replaces this one")
    cancelled: list[int] = []
    for old in older:
        for result in old.results:
            for delivery in result.deliveries:
                if delivery.state == DeliveryState.PENDING:
                    delivery.state = DeliveryState.CANCELLED
                    delivery.last_error = reason
                    delivery.next_attempt_at = None
                    cancelled.append(delivery.id)
        session.flush()
        _roll_up(old)
    if cancelled:
        log.info("job %d: cancelled %d pending deliveries of earlier versions", job.id, len(cancelled))
    return cancelled


def _roll_up(job: Job) -> None:
    """Set a delivering job's state from its deliveries: delivered when every one went out,
    failed when one gave up, superseded when the rest were cancelled for a newer version."""
    if job.state != JobState.DELIVERING:
        return
    deliveries = [d for r in job.results for d in r.deliveries]
    states = [d.state for d in deliveries]
    if DeliveryState.PENDING in states:
        return
    if all(s == DeliveryState.DELIVERED for s in states):
        job.state = JobState.DELIVERED
    elif DeliveryState.FAILED in states:
        job.state = JobState.FAILED
        failed = [d for d in deliveries if d.state == DeliveryState.FAILED]
        # a refusal ("refused by AET@host:port: …") names its destination and says why
        refused = [d for d in failed if (d.last_error or "").startswith(REFUSED_PREFIX)]
        job.reason = (f"delivery failed: {refused[0].last_error}" if refused else
                      f"delivery gave up: {failed[0].destination}: {failed[0].last_error}")[:2000]
    else:
        job.state = JobState.SUPERSEDED
        cancelled = [d for d in deliveries if d.state == DeliveryState.CANCELLED]
        job.reason = f"{len(cancelled)} deliveries {cancelled[0].last_error}"
        job.finished_at = job.finished_at or utcnow()


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


def claim_delivery(sessions: sessionmaker[Session], delivery_id: int, *, lease_s: float,
                   early_s: float = 1.0) -> bool:
    """Take a pending delivery that is due for one attempt; False when it is not to be tried now.

    The same delivery may reach two workers (a duplicated or swept message): the conditional
    update lets one of them through and moves ``next_attempt_at`` ``lease_s`` ahead, so the other
    skips it and the sweep leaves it alone while it is tried. A message that comes more than
    ``early_s`` before the backoff ends is skipped too. :func:`finish_delivery` sets the real
    ``next_attempt_at``; if the worker dies meanwhile, the sweep re-sends it after the lease.
    """
    now = utcnow()
    with sessions() as session, session.begin():
        claimed = session.execute(
            update(Delivery)
            .where(Delivery.id == delivery_id, Delivery.state == DeliveryState.PENDING,
                   Delivery.next_attempt_at.is_(None)
                   | (Delivery.next_attempt_at <= now + timedelta(seconds=early_s)))
            .values(next_attempt_at=now + timedelta(seconds=lease_s))
        )
        return bool(claimed.rowcount)  # type: ignore[attr-defined]


#: how the reason of a delivery the peer refused for good begins (see :mod:`node.dispatch`)
REFUSED_PREFIX = "refused by "


def finish_delivery(sessions: sessionmaker[Session], delivery_id: int, *, ok: bool, error: str | None,
                    give_up_after_s: float, next_attempt_at: datetime | None,
                    permanent: bool = False) -> DeliveryState:
    """Record one delivery attempt and roll the job's state up from its deliveries.

    A failed attempt leaves the delivery pending for ``next_attempt_at`` unless it was
    ``permanent`` (the peer refused for good) or ``give_up_after_s`` has passed: then it fails.
    """
    now = utcnow()
    with sessions() as session, session.begin():
        # one finisher of a job's deliveries at a time (PostgreSQL: the job's row lock, taken before
        # anything is read; SQLite has one writer): each then rolls the job up from what the others
        # committed. Two workers finishing its last two deliveries at once each saw the other's
        # still pending, and the job stayed delivering with every delivery done.
        session.execute(
            select(Job.id).join(Result, Result.job_pk == Job.id).join(Delivery, Delivery.result_pk == Result.id)
            .where(Delivery.id == delivery_id).with_for_update(of=Job))
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            raise LookupError(f"delivery {delivery_id} does not exist")
        if delivery.state in (DeliveryState.DELIVERED, DeliveryState.FAILED):  # finished meanwhile
            return delivery.state
        delivery.attempts += 1
        delivery.last_attempt_at = now
        if delivery.state == DeliveryState.CANCELLED and not ok:
            pass  # cancelled while this attempt was in flight: it stays cancelled, with its reason
        elif ok:
            delivery.state = DeliveryState.DELIVERED
            delivery.delivered_at = now
            delivery.last_error = None
            delivery.next_attempt_at = None
        else:
            delivery.last_error = (error or "unknown error")[:2000]
            if permanent or (now - delivery.created_at).total_seconds() >= give_up_after_s:
                delivery.state = DeliveryState.FAILED
                delivery.next_attempt_at = None
            else:
                delivery.next_attempt_at = next_attempt_at
        session.flush()
        _roll_up(delivery.result.job)
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
        newer = _newer_published(session, job)
        if newer is not None:
            raise InvalidTransitionError(
                f"job {job_id} wrote version {job.study_version} of the study's results; job {newer.id} "
                f"replaced them with version {newer.study_version}: retry that one instead"
            )
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
        If the job has not produced its results (not succeeded, delivering or delivered), or a
        newer version of the study's results replaced them.
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
        newer = _newer_published(session, job)
        if newer is not None:
            raise InvalidTransitionError(
                f"job {job_id} wrote version {job.study_version} of the study's results; job {newer.id} "
                f"replaced them with version {newer.study_version}: send that one instead"
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
