"""The retention cleaner: remove old source instances and results once nothing needs them.

A study's files are removed only when every job of the study is finished — delivered, or terminal
(failed, cancelled, superseded), or succeeded without destinations — and the study is not receiving
(a study still receiving, or a job queued, running or delivering, keeps everything). Then each
instance received and each result created more than ``max_age`` ago is deleted from disk and from
the index (its deliveries with it). Study, job and patient rows stay: they are the record of what
was received and what was done, and the dashboard still lists them.

Order of removal (see :func:`purge_study`): the files are deleted inside the index transaction,
before its commit. A crash in between leaves rows without files, which the next round removes; the
other order could leave files without rows, which :func:`storage.reconcile.reindex_orphans` would
index again at the next start — bringing a purged study back and running its job again.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, select
from sqlalchemy.orm import Session, sessionmaker

from storage.models import (
    TERMINAL_JOB_STATES,
    Delivery,
    Instance,
    Job,
    JobState,
    Result,
    Series,
    Study,
    StudyState,
    utcnow,
)
from storage.store import InstanceStore

log = logging.getLogger(__name__)

#: Job states after which a job needs neither its source instances nor its results any more.
FINISHED_JOB_STATES = TERMINAL_JOB_STATES | {JobState.SUCCEEDED}


@dataclass(frozen=True)
class RetentionReport:
    """What one cleaning round removed."""

    studies: int = 0
    instances: int = 0
    results: int = 0

    def __add__(self, other: RetentionReport) -> RetentionReport:
        return RetentionReport(
            self.studies + other.studies, self.instances + other.instances, self.results + other.results
        )


def expired_studies(session: Session, cutoff: datetime, limit: int) -> list[int]:
    """Ids of studies with something to remove: not receiving, nothing received since ``cutoff``,
    every job finished, and instances or results still stored."""
    return list(
        session.scalars(
            select(Study.id)
            .where(Study.state != StudyState.RECEIVING, Study.last_received_at < cutoff)
            .where(~Study.id.in_(select(Job.study_pk).where(Job.state.not_in(FINISHED_JOB_STATES))))
            .where(
                Study.id.in_(select(Series.study_pk).join(Instance, Instance.series_pk == Series.id))
                | Study.id.in_(select(Job.study_pk).join(Result, Result.job_pk == Job.id))
            )
            .order_by(Study.last_received_at)
            .limit(limit)
        )
    )


def purge_study(
    sessions: sessionmaker[Session], store: InstanceStore, study_id: int, cutoff: datetime
) -> RetentionReport:
    """Remove the study's instances received and results created before ``cutoff``, if all its
    jobs are finished; return what was removed (nothing when the study is still in use)."""
    with sessions() as session, session.begin():
        # the row lock makes a concurrent C-STORE into this study wait for the decision
        study = session.get(Study, study_id, with_for_update=True)
        if study is None or study.state == StudyState.RECEIVING or study.last_received_at >= cutoff:
            return RetentionReport()
        busy = [j.id for j in study.jobs if j.state not in FINISHED_JOB_STATES]
        if busy:
            log.debug("study %s kept: job(s) %s not finished", study.study_instance_uid, busy)
            return RetentionReport()
        instances = session.execute(
            select(Instance.id, Instance.path)
            .join(Series, Instance.series_pk == Series.id)
            .where(Series.study_pk == study.id, Instance.received_at < cutoff)
        ).all()
        results = session.execute(
            select(Result.id, Result.path)
            .join(Job, Result.job_pk == Job.id)
            .where(Job.study_pk == study.id, Result.created_at < cutoff)
        ).all()
        if not instances and not results:
            return RetentionReport()
        for _, path in [*instances, *results]:
            store.delete(path)  # before the commit: see the module docstring
        result_ids = [r.id for r in results]
        if result_ids:
            session.execute(delete(Delivery).where(Delivery.result_pk.in_(result_ids)))
            session.execute(delete(Result).where(Result.id.in_(result_ids)))
        if instances:
            session.execute(delete(Instance).where(Instance.id.in_([i.id for i in instances])))
            session.execute(
                delete(Series).where(
                    Series.study_pk == study.id,
                    ~Series.id.in_(select(Instance.series_pk)),
                )
            )
        uid = study.study_instance_uid
    log.info("retention: study %s: removed %d instance(s) and %d result(s)", uid, len(instances), len(results))
    return RetentionReport(1, len(instances), len(results))


def purge_expired(
    sessions: sessionmaker[Session],
    store: InstanceStore,
    *,
    max_age: timedelta,
    now: datetime | None = None,
    max_studies: int = 100,
) -> RetentionReport:
    """One cleaning round: purge up to ``max_studies`` studies older than ``max_age``.

    A bounded round keeps the scheduler loop (completion, sweep) responsive; the next round goes on
    where this one stopped.
    """
    cutoff = (now or utcnow()) - max_age
    with sessions() as session:
        candidates = expired_studies(session, cutoff, max_studies)
    report = RetentionReport()
    for study_id in candidates:
        report += purge_study(sessions, store, study_id, cutoff)
    if report.studies:
        log.info(
            "retention: removed %d instance(s) and %d result(s) of %d study(ies) older than %s",
            report.instances, report.results, report.studies, max_age,
        )
    return report
