"""Read queries of the dashboard and the API: study list and search, study timeline, jobs with results.

Pure reads over the index (no state changes; those live in :mod:`node.jobs`). Every function takes
an open :class:`~sqlalchemy.orm.Session` and returns ORM rows or plain dataclasses; the web layer
turns them into response schemas, which decide what a caller may see.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Select, func, or_, select
from sqlalchemy.orm import Session, selectinload

from storage.models import (
    Delivery,
    DeliveryState,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    SeriesOrigin,
    Study,
    StudyState,
)


@dataclass(frozen=True)
class StudyFilter:
    """Search criteria of the study list; every given criterion must hold.

    ``date_from`` / ``date_to`` are DICOM dates (``YYYYMMDD``, inclusive); ``modality`` matches
    any series of the study; ``ae_title`` matches the calling or the called AE title; ``state`` is a
    :class:`StudyState` value. ``patient`` (name or ID, a substring) may only be passed for an
    authorised caller: the web layer enforces that.
    """

    date_from: str | None = None
    date_to: str | None = None
    modality: str | None = None
    ae_title: str | None = None
    state: StudyState | None = None
    study_instance_uid: str | None = None
    patient: str | None = None


@dataclass(frozen=True)
class StudyRow:
    """One line of the study list."""

    study: Study
    modalities: tuple[str, ...]
    series_count: int
    instance_count: int
    latest_job_state: JobState | None


def _apply_filter(query: Select[Any], flt: StudyFilter) -> Select[Any]:
    if flt.date_from:
        query = query.where(Study.study_date >= flt.date_from)
    if flt.date_to:
        query = query.where(Study.study_date <= flt.date_to)
    if flt.state is not None:
        query = query.where(Study.state == flt.state)
    if flt.ae_title:
        query = query.where(
            or_(Study.calling_ae_title == flt.ae_title, Study.called_ae_title == flt.ae_title)
        )
    if flt.study_instance_uid:
        query = query.where(Study.study_instance_uid == flt.study_instance_uid)
    if flt.modality:
        query = query.where(
            Study.id.in_(select(Series.study_pk).where(func.upper(Series.modality) == flt.modality.upper()))
        )
    if flt.patient:
        from storage.models import Patient

        pattern = f"%{flt.patient}%"
        query = query.where(
            Study.patient_pk.in_(
                select(Patient.id).where(
                    or_(Patient.patient_name.ilike(pattern), Patient.patient_id.ilike(pattern))
                )
            )
        )
    return query


def list_studies(
    session: Session, flt: StudyFilter = StudyFilter(), *, limit: int = 100, offset: int = 0
) -> tuple[list[StudyRow], int]:
    """Studies matching ``flt``, most recently received first, and the total count."""
    base = _apply_filter(select(Study), flt)
    total = session.scalar(select(func.count()).select_from(base.subquery())) or 0
    studies: Sequence[Study] = session.scalars(
        base.options(selectinload(Study.patient), selectinload(Study.series))
        .order_by(Study.last_received_at.desc(), Study.id.desc())
        .limit(limit)
        .offset(offset)
    ).all()
    ids = [s.id for s in studies]
    counts: dict[int, int] = {}
    latest: dict[int, JobState] = {}
    if ids:
        counts = dict(
            session.execute(
                select(Series.study_pk, func.count(Instance.id))
                .join(Instance, Instance.series_pk == Series.id)
                .where(Series.study_pk.in_(ids))
                .group_by(Series.study_pk)
            ).all()
        )
        for study_pk, state in session.execute(
            select(Job.study_pk, Job.state).where(Job.study_pk.in_(ids)).order_by(Job.id)
        ):
            latest[study_pk] = state
    rows = [
        StudyRow(
            study=s,
            modalities=tuple(sorted({m for m in (x.modality for x in s.series) if m})),
            series_count=len(s.series),
            instance_count=counts.get(s.id, 0),
            latest_job_state=latest.get(s.id),
        )
        for s in studies
    ]
    return rows, total


def get_study(session: Session, study_instance_uid: str) -> Study | None:
    """The study with its patient, series, jobs, results and deliveries loaded."""
    return session.scalar(
        select(Study)
        .where(Study.study_instance_uid == study_instance_uid)
        .options(
            selectinload(Study.patient),
            selectinload(Study.series),
            selectinload(Study.jobs).selectinload(Job.results).selectinload(Result.deliveries),
        )
    )


def series_instance_counts(session: Session, study: Study) -> dict[str, int]:
    """Instance count per series UID of ``study``."""
    rows = session.execute(
        select(Series.series_instance_uid, func.count(Instance.id))
        .join(Instance, Instance.series_pk == Series.id, isouter=True)
        .where(Series.study_pk == study.id)
        .group_by(Series.series_instance_uid)
    ).all()
    return {uid: count for uid, count in rows}


@dataclass(frozen=True)
class TimelineEvent:
    """One moment in a study's life, with the time since the previous event and since the first."""

    at: datetime
    event: str
    detail: str | None
    since_previous_s: float | None
    since_start_s: float
    job_id: int | None = None


def study_timeline(study: Study) -> list[TimelineEvent]:
    """The study's timeline: first/last instance received → complete → routed → each job
    started/finished → each object delivered (or its last failed attempt), in time order.

    ``study`` must have its jobs, results and deliveries loaded (:func:`get_study`).
    """
    raw: list[tuple[datetime, str, str | None, int | None]] = [
        (study.first_received_at, "first instance received", None, None),
        (study.last_received_at, "last instance received", None, None),
    ]
    if study.completed_at is not None:
        raw.append((study.completed_at, f"complete (version {study.version})", None, None))
    for job in study.jobs:
        what = "asked" if job.on_demand else f"routed: rule {job.rule_name}"
        raw.append((job.created_at, what, f"job {job.id}, priority {job.priority}", job.id))
        if job.enqueued_at is not None:
            raw.append((job.enqueued_at, f"job {job.id} queued", None, job.id))
        if job.started_at is not None:
            raw.append((job.started_at, f"job {job.id} started", f"attempt {job.attempts}", job.id))
        if job.finished_at is not None:
            if job.results:  # finished_at marks the end of inference; deliveries follow
                what = f"job {job.id} wrote {len(job.results)} object(s)"
            else:
                what = f"job {job.id} {job.state.value}"
            raw.append((job.finished_at, what, job.reason, job.id))
        for result in job.results:
            for delivery in result.deliveries:
                if delivery.state == DeliveryState.DELIVERED and delivery.delivered_at is not None:
                    raw.append((delivery.delivered_at, f"{result.kind.upper()} delivered",
                                delivery.destination, job.id))
                elif delivery.last_attempt_at is not None:
                    raw.append((delivery.last_attempt_at,
                                f"{result.kind.upper()} delivery {delivery.state.value}",
                                (f"{delivery.destination}: {delivery.last_error or ''} "
                                 f"({delivery.attempts} attempt(s))"), job.id))
    raw.sort(key=lambda item: item[0])
    start = raw[0][0]
    events: list[TimelineEvent] = []
    previous: datetime | None = None
    for at, event, detail, job_id in raw:
        events.append(
            TimelineEvent(
                at=at,
                event=event,
                detail=detail,
                since_previous_s=None if previous is None else (at - previous).total_seconds(),
                since_start_s=(at - start).total_seconds(),
                job_id=job_id,
            )
        )
        previous = at
    return events


def list_jobs(
    session: Session,
    *,
    states: Sequence[JobState] | None = None,
    study_instance_uid: str | None = None,
    limit: int = 100,
    offset: int = 0,
) -> list[Job]:
    """Jobs, newest first, with their study, results and deliveries loaded."""
    query = select(Job).options(
        selectinload(Job.study), selectinload(Job.results).selectinload(Result.deliveries)
    )
    if states:
        query = query.where(Job.state.in_(list(states)))
    if study_instance_uid:
        query = query.join(Study, Study.id == Job.study_pk).where(
            Study.study_instance_uid == study_instance_uid
        )
    return list(session.scalars(query.order_by(Job.id.desc()).limit(limit).offset(offset)).all())


def get_job(session: Session, job_id: int) -> Job | None:
    """One job with its study, results and deliveries loaded."""
    return session.scalar(
        select(Job)
        .where(Job.id == job_id)
        .options(selectinload(Job.study), selectinload(Job.results).selectinload(Result.deliveries))
    )


def get_result(session: Session, result_id: int) -> Result | None:
    """One result row with its job and study loaded."""
    return session.scalar(
        select(Result)
        .where(Result.id == result_id)
        .options(selectinload(Result.job).selectinload(Job.study), selectinload(Result.deliveries))
    )


def instance_paths(session: Session, sop_instance_uids: Sequence[str]) -> dict[str, str]:
    """Stored paths (relative to the store root) of the given received instances."""
    if not sop_instance_uids:
        return {}
    rows = session.execute(
        select(Instance.sop_instance_uid, Instance.path).where(
            Instance.sop_instance_uid.in_(list(sop_instance_uids))
        )
    ).all()
    return {uid: path for uid, path in rows}


def queue_depth(session: Session) -> dict[str, int]:
    """Work waiting: jobs queued, deliveries pending."""
    queued = session.scalar(select(func.count(Job.id)).where(Job.state == JobState.QUEUED)) or 0
    pending = (
        session.scalar(select(func.count(Delivery.id)).where(Delivery.state == DeliveryState.PENDING))
        or 0
    )
    return {"inference": int(queued), "delivery": int(pending)}


def oldest_queued_age_s(session: Session, now: datetime) -> float | None:
    """Seconds the oldest queued job has waited, or None when nothing is queued."""
    oldest = session.scalar(select(func.min(Job.created_at)).where(Job.state == JobState.QUEUED))
    if oldest is None:
        return None
    if oldest.tzinfo is None:  # func.min bypasses the column type on SQLite

        oldest = oldest.replace(tzinfo=UTC)
    return max(0.0, (now - oldest).total_seconds())


@dataclass(frozen=True)
class ArrivalCounts:
    """How studies arrived, for ``/metrics``: split and late studies, held series by origin."""

    #: studies completed more than once: reopened by late instances or a late series a rule ran on
    split_studies: int
    #: studies that received an image series after they were complete (whether it reopened them)
    late_studies: int
    #: series stored without reopening their study, by origin (``mednode_result``, ``derived``,
    #: ``acquired`` for late series no rule runs on)
    held_series: dict[str, int]


def arrival_counts(session: Session) -> ArrivalCounts:
    split = session.scalar(select(func.count(Study.id)).where(Study.version > 1)) or 0
    late = session.scalar(select(func.count(func.distinct(Series.study_pk))).where(Series.late_at.is_not(None))) or 0
    held = {o.value: 0 for o in SeriesOrigin}
    for origin, count in session.execute(
        select(Series.origin, func.count()).where(Series.held_reason.is_not(None)).group_by(Series.origin)
    ):
        held[SeriesOrigin(origin).value] = count
    return ArrivalCounts(split_studies=split, late_studies=late, held_series=held)
