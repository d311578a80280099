"""Completion: a study is complete once no instance arrived for its quiet period; then it is routed.

Completion is a policy over the index, not a guess in the listener: :func:`complete_due_studies`
runs periodically, bumps the study's version, creates one job per matching rule (or records that no
rule matched), supersedes unfinished jobs of earlier versions, commits — and only then are the new
jobs enqueued by the caller.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.header import InstanceHeader
from node import audit, clock, metrics
from node.config import Rule, Settings
from node.routing import SeriesFacts, StudyFacts, check_completion, late_series_hold, route
from storage.index import LateSeriesCheck
from storage.models import Instance, Job, JobState, SeriesOrigin, Study, StudyState, utcnow

log = logging.getLogger(__name__)


def study_facts(session: Session, study: Study) -> StudyFacts:
    """What routing may see of a study, read from the index: every series but mednode's own
    results returned by a PACS (which are never input)."""
    series_facts = []
    for series in study.series:
        if series.origin == SeriesOrigin.MEDNODE_RESULT:
            continue
        rows = session.execute(
            select(Instance.sop_class_uid, func.count())
            .where(Instance.series_pk == series.id)
            .group_by(Instance.sop_class_uid)
        ).all()
        series_facts.append(
            SeriesFacts(
                series_instance_uid=series.series_instance_uid,
                modality=series.modality,
                body_part_examined=series.body_part_examined,
                series_description=series.series_description,
                sop_class_uids=frozenset(r[0] for r in rows),
                instance_count=sum(r[1] for r in rows),
            )
        )
    return StudyFacts(
        study_instance_uid=study.study_instance_uid,
        study_description=study.study_description,
        calling_ae_title=study.calling_ae_title,
        called_ae_title=study.called_ae_title,
        series=tuple(series_facts),
    )


def _resolve_destinations(settings: Settings, refs: list[str], rule: str) -> list[str]:
    return [str(settings.resolve_destination(ref, rule=rule)) for ref in refs]


def late_series_check(rules: list[Rule]) -> LateSeriesCheck:
    """The index's :data:`~storage.index.LateSeriesCheck` for ``rules``: a late image series
    reopens its study only if routing the study with that series would run a rule on it."""

    def check(session: Session, study_pk: int, header: InstanceHeader) -> str | None:
        study = session.get(Study, study_pk)
        if study is None:  # cannot happen: the index found or created it
            return None
        facts = study_facts(session, study)
        late = SeriesFacts(
            series_instance_uid=header.series_instance_uid,
            modality=header.modality,
            body_part_examined=header.body_part_examined,
            series_description=header.series_description,
            sop_class_uids=frozenset({header.sop_class_uid}),
            instance_count=1,
        )
        reason = late_series_hold(
            StudyFacts(facts.study_instance_uid, facts.study_description, facts.calling_ae_title,
                       facts.called_ae_title, (*facts.series, late)),
            header.series_instance_uid, rules,
        )
        log.info("late series %s in complete study %s: %s", header.series_instance_uid,
                 study.study_instance_uid, reason or "a rule runs on it, the study reopens")
        return reason

    return check


def _complete(session: Session, settings: Settings, study: Study, facts: StudyFacts, now: datetime,
              reason: str) -> list[tuple[int, int]]:
    """Complete ``study`` now (a new version), route it; return (job id, priority) to enqueue."""
    rules = settings.effective_rules
    created: list[tuple[int, int]] = []
    study.version += 1
    clock.observe(clock.LAST_INSTANCE_TO_COMPLETE, clock.span_s(study.last_received_at, now))
    study.completed_at = now
    study.completion_reason = reason
    audit.add(session, audit.dicom_actor(study.calling_ae_title), audit.RECEIVED,
              study.study_instance_uid,
              f"version {study.version}: {sum(f.instance_count for f in facts.series)} instance(s) "
              f"in {len(facts.series)} series", at=now)
    # every unfinished job of an earlier version works on an outdated study
    session.execute(
        update(Job)
        .where(
            Job.study_pk == study.id,
            Job.study_version < study.version,
            Job.state.in_([JobState.QUEUED, JobState.RUNNING]),
        )
        .values(state=JobState.SUPERSEDED, reason="superseded by a newer version of the study",
                finished_at=now)
    )
    metrics.STUDIES_COMPLETED.inc()
    checks = route(facts, rules)
    if not checks:
        study.state = StudyState.NO_RULE
        study.route_reason = "no rule matched"
        log.info("study %s complete (v%d): no rule matched", study.study_instance_uid, study.version)
        return created
    study.state = StudyState.ROUTED
    study.route_reason = ", ".join(c.rule.name for c in checks)
    for check in checks:
        job = Job(
            study_pk=study.id,
            study_version=study.version,
            rule_name=check.rule.name,
            tasks=list(check.rule.tasks),
            series_uids=list(check.series_uids),
            destinations=_resolve_destinations(settings, check.rule.destinations, check.rule.name),
            priority=check.rule.priority,
            state=JobState.QUEUED,
            created_at=now,
        )
        session.add(job)
        session.flush()
        created.append((job.id, job.priority))
        log.info(
            "study %s complete (v%d): job %d for rule %s",
            study.study_instance_uid, study.version, job.id, check.rule.name,
        )
    return created


def completion_spans_s(settings: Settings) -> tuple[float, float | None]:
    """The shortest quiet period of any rule (or the default) and the shortest ``max_wait_s``."""
    rules = settings.effective_rules
    shortest = min([settings.quiet_period_s] + [r.quiet_period_s for r in rules if r.quiet_period_s])
    waits = [r.completion.max_wait_s for r in rules if r.completion is not None and r.completion.max_wait_s]
    return shortest, min(waits) if waits else None


def next_due_at(sessions: sessionmaker[Session], settings: Settings, now: datetime | None = None) -> datetime | None:
    """The earliest moment after ``now`` at which a receiving study becomes due by the shortest
    quiet period (or maximum wait), or None when none will: the scheduler wakes up then, so a
    study completes when its quiet period ends rather than at the next poll.

    Studies already past the shortest quiet period but still waiting (a rule's longer quiet
    period, its required series) are left to the regular poll.
    """
    now = now or utcnow()
    shortest, wait = completion_spans_s(settings)
    with sessions() as session:
        quiet_end = first_quiet_for(session, timedelta(seconds=shortest), now)
        moments = [quiet_end] if quiet_end is not None else []
        if wait is not None:
            max_wait = timedelta(seconds=wait)
            since = func.coalesce(Study.receiving_since, Study.first_received_at)
            first = session.scalar(select(func.min(since)).where(
                Study.state == StudyState.RECEIVING, since > now - max_wait))
            if first is not None:
                moments.append(aware_utc(first) + max_wait)
    return min(moments) if moments else None


def first_quiet_for(session: Session, span: timedelta, now: datetime) -> datetime | None:
    """The earliest moment after ``now`` at which a receiving study will have been quiet for
    ``span``, or None when none will (every receiving study has been quiet that long already)."""
    last = session.scalar(select(func.min(Study.last_received_at)).where(
        Study.state == StudyState.RECEIVING, Study.last_received_at > now - span))
    return aware_utc(last) + span if last is not None else None


def aware_utc(moment: datetime) -> datetime:
    """``moment`` with its time zone: ``func.min`` bypasses the column type on SQLite, whose result
    comes back naive (UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def complete_due_studies(
    sessions: sessionmaker[Session], settings: Settings, now: datetime | None = None
) -> list[tuple[int, int]]:
    """Complete every study that is due (quiet for its quiet period with its rules' required
    series, or receiving for their ``max_wait_s``); return (job id, priority) to enqueue."""
    now = now or utcnow()
    rules = settings.effective_rules
    shortest, wait = completion_spans_s(settings)
    due = Study.last_received_at <= now - timedelta(seconds=shortest)
    if wait is not None:
        since = func.coalesce(Study.receiving_since, Study.first_received_at)
        due = or_(due, since <= now - timedelta(seconds=wait))
    created: list[tuple[int, int]] = []
    with sessions() as session, session.begin():
        # several serve processes may run rounds at once (a new leader while the old one has not
        # noticed it lost the lock): each completes only the studies it locked, and skips those
        # another round holds; the state test is re-checked on the locked, current row
        # (PostgreSQL; SQLite has one writer and no FOR UPDATE)
        candidates = session.scalars(
            select(Study).where(Study.state == StudyState.RECEIVING, due).with_for_update(skip_locked=True)
        ).all()
        for study in candidates:
            facts = study_facts(session, study)
            since_at = study.receiving_since or study.first_received_at
            check = check_completion(
                facts, rules, default_quiet_s=settings.quiet_period_s,
                quiet_for_s=(now - study.last_received_at).total_seconds(),
                receiving_for_s=(now - since_at).total_seconds(),
            )
            if not check.due:
                continue
            created.extend(_complete(session, settings, study, facts, now, check.reason))
    return created


class StudyNotReceivingError(ValueError):
    """A study asked to complete is already complete."""


def force_complete(
    sessions: sessionmaker[Session], settings: Settings, study_uid: str, *, actor: str,
    now: datetime | None = None,
) -> list[tuple[int, int]]:
    """Complete a receiving study now, whatever its quiet period and required series say, and
    route it; return (job id, priority) to enqueue after this commit.

    Raises
    ------
    LookupError
        If the study is not stored on this node.
    StudyNotReceivingError
        If it is complete already (re-run a rule on it instead).
    """
    now = now or utcnow()
    with sessions() as session, session.begin():
        study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid).with_for_update())
        if study is None:
            raise LookupError(f"study {study_uid} is not stored on this node")
        if study.state != StudyState.RECEIVING:
            raise StudyNotReceivingError(
                f"study {study_uid} is complete already ({study.state.value}, version {study.version}); "
                "re-run a rule on it to process it again")
        return _complete(session, settings, study, study_facts(session, study), now, f"completed by {actor}")
