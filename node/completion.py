"""Completion: a study is complete once no instance arrived for its quiet period; then it is routed.

Completion is a policy over the index, not a guess in the listener: :func:`complete_due_studies`
runs periodically, bumps the study's version, creates one job per matching rule (or records that no
rule matched), supersedes unfinished jobs of earlier versions, commits — and only then are the new
jobs enqueued by the caller.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from node import audit, metrics
from node.config import Settings
from node.routing import SeriesFacts, StudyFacts, quiet_period_for, route
from storage.models import Instance, Job, JobState, Study, StudyState, utcnow

log = logging.getLogger(__name__)


def study_facts(session: Session, study: Study) -> StudyFacts:
    """What routing may see of a study, read from the index."""
    series_facts = []
    for series in study.series:
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


def complete_due_studies(
    sessions: sessionmaker[Session], settings: Settings, now: datetime | None = None
) -> list[tuple[int, int]]:
    """Complete every study quiet for its quiet period; return (job id, priority) to enqueue."""
    now = now or utcnow()
    rules = settings.effective_rules
    shortest = min([settings.quiet_period_s] + [r.quiet_period_s for r in rules if r.quiet_period_s])
    created: list[tuple[int, int]] = []
    with sessions() as session, session.begin():
        candidates = session.scalars(
            select(Study).where(
                Study.state == StudyState.RECEIVING,
                Study.last_received_at <= now - timedelta(seconds=shortest),
            )
        ).all()
        for study in candidates:
            facts = study_facts(session, study)
            quiet = quiet_period_for(facts, rules, settings.quiet_period_s)
            if study.last_received_at > now - timedelta(seconds=quiet):
                continue
            study.version += 1
            study.completed_at = now
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
                continue
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
