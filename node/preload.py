"""Read-ahead hints: the scheduler asks an idle worker to read a quiet study's series into a volume
before the study completes (the worker's side: :mod:`node.preloaded`).

A study whose rule runs a volume task (the built-in CT analyzer, a segmentation bundle) and that
has been quiet for half its quiet period gets one ``mednode.preload_volume`` message on the queue
its job would go to. A study that receives more instances afterwards gets another once it is
quiet again. While instances still arrive (``volume_preload_while_receiving``), it gets one every
:data:`PRELOAD_EVERY_S` in which more arrived: a series of single-frame images is then read as it
is received, each read adding the files that arrived since, and its job reads only the last few
(a 1,000-slice CT takes seconds to read, more than half a short quiet period). The message expires
when the study's quiet period ends (its job is queued by then), and goes out at the lowest
priority, so it never passes a job waiting in the queue.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.celery_app import app, inference_queue, job_models
from node.completion import aware_utc, completion_spans_s, first_quiet_for, study_facts
from node.config import Rule, Settings, plan_tasks
from node.jobs import priority_kwargs
from node.routing import StudyFacts, quiet_period_for, route
from storage.models import Study, StudyState, utcnow

log = logging.getLogger(__name__)

#: the fraction of its quiet period a study has been quiet when its series is read ahead
PRELOAD_AT = 0.5
#: a study still receiving is hinted at most this often (seconds), when more instances arrived
PRELOAD_EVERY_S = 1.0


@dataclass(frozen=True)
class PreloadHint:
    """One read-ahead to ask for: a study's series as its volume job would select them."""

    study_instance_uid: str
    series_uids: tuple[str, ...]
    modalities: tuple[str, ...]
    queue: str
    #: seconds until the study's quiet period ends: the hint is worthless after that
    expires_s: float
    #: sent while instances still arrive (a series of single-frame images is then read as it is)
    while_receiving: bool = False


def volume_hint(facts: StudyFacts, rules: list[Rule], queue_for: Callable[[Rule], str],
                expires_s: float, while_receiving: bool = False) -> PreloadHint | None:
    """The read-ahead a study with ``facts`` should get, if a rule that would run on it now loads
    a volume (the first such rule: a worker holds one volume); ``queue_for`` names a rule's queue."""
    for check in route(facts, rules):
        modalities = plan_tasks(list(check.rule.tasks)).volume_modalities
        if modalities is not None:
            return PreloadHint(study_instance_uid=facts.study_instance_uid, series_uids=tuple(check.series_uids),
                               modalities=modalities, queue=queue_for(check.rule), expires_s=expires_s,
                               while_receiving=while_receiving)
    return None


def job_queue(rule: Rule) -> str:
    """The queue ``rule``'s jobs go to (:func:`node.jobs.enqueue_job` asks the same)."""
    return inference_queue(rule.priority, job_models(list(rule.tasks)))


def next_preload_at(sessions: sessionmaker[Session], settings: Settings, now: datetime | None = None) -> datetime | None:
    """The earliest moment after ``now`` at which a receiving study has been quiet for
    :data:`PRELOAD_AT` of the shortest quiet period, or None: the scheduler wakes up then."""
    now = now or utcnow()
    with sessions() as session:
        return first_quiet_for(session, timedelta(seconds=PRELOAD_AT * completion_spans_s(settings)[0]), now)


class Preloads:
    """The scheduler's read-ahead hints: each quiet spell of a study is hinted once, and a study
    still receiving at most every :data:`PRELOAD_EVERY_S` (in this process; a new leader may hint a
    study again, which costs an idle worker one look at files it has read)."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings) -> None:
        self.sessions = sessions
        self.settings = settings
        #: study id → the last instance's time of the quiet spell it was considered for
        self._considered: dict[int, datetime] = {}
        #: study id → when it was last hinted while receiving, and its last instance's time then
        self._receiving: dict[int, tuple[datetime, datetime]] = {}

    def due(self, now: datetime | None = None) -> list[PreloadHint]:
        """The hints to send now (and remember as sent): for each study quiet for
        :data:`PRELOAD_AT` of its own quiet period (a rule's may be longer than the shortest), not
        yet all of it; and, with ``volume_preload_while_receiving``, for each study still
        receiving that received more since its last hint, :data:`PRELOAD_EVERY_S` ago or more."""
        now = now or utcnow()
        rules = self.settings.effective_rules
        at = timedelta(seconds=PRELOAD_AT * completion_spans_s(self.settings)[0])
        while_receiving = self.settings.volume_preload_while_receiving
        hints: list[PreloadHint] = []
        considered: dict[int, datetime] = {}
        receiving: dict[int, tuple[datetime, datetime]] = {}
        with self.sessions() as session:
            query = select(Study).where(Study.state == StudyState.RECEIVING)
            if not while_receiving:
                query = query.where(Study.last_received_at <= now - at)
            for study in session.scalars(query).all():
                last = aware_utc(study.last_received_at)
                quiet_for_s = (now - last).total_seconds()
                if quiet_for_s < at.total_seconds():  # instances still arrive
                    hinted = self._receiving.get(study.id)
                    if hinted is not None and (hinted[1] == last or (now - hinted[0]).total_seconds() < PRELOAD_EVERY_S):
                        receiving[study.id] = hinted
                        continue
                    receiving[study.id] = (now, last)
                    facts = study_facts(session, study)
                    quiet_s = quiet_period_for(facts, rules, self.settings.quiet_period_s)
                    hint = volume_hint(facts, rules, job_queue, quiet_s - quiet_for_s, while_receiving=True)
                    if hint is not None:
                        hints.append(hint)
                    continue
                if self._considered.get(study.id) == last:
                    considered[study.id] = last
                    continue
                facts = study_facts(session, study)
                quiet_s = quiet_period_for(facts, rules, self.settings.quiet_period_s)
                if quiet_for_s < PRELOAD_AT * quiet_s:
                    continue  # its rule's quiet period is longer: next round
                considered[study.id] = last  # this quiet spell: hinted or not, once
                if quiet_for_s < quiet_s:
                    hint = volume_hint(facts, rules, job_queue, quiet_s - quiet_for_s)
                    if hint is not None:
                        hints.append(hint)
        self._considered = considered
        self._receiving = receiving
        return hints

    def send(self, now: datetime | None = None) -> int:
        """Send the hints due now; return how many went out. A broker error loses them (they are
        only hints: the jobs read their series themselves)."""
        sent = 0
        for hint in self.due(now):
            try:
                app.send_task("mednode.preload_volume",
                              args=[hint.study_instance_uid, list(hint.series_uids), list(hint.modalities),
                                    round(hint.expires_s, 3)],
                              kwargs={"while_receiving": True} if hint.while_receiving else None,
                              queue=hint.queue, expires=max(hint.expires_s, 0.001), **priority_kwargs(0))
            except Exception as exc:  # noqa: BLE001 (broker down, any transport error: only a hint)
                log.warning("could not ask for a read-ahead of study %s (%s)", hint.study_instance_uid,
                            type(exc).__name__)
                continue
            sent += 1
        return sent
