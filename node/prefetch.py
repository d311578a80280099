"""Prefetch: read a quiet study back into the page cache before it completes.

The listener drops each instance from the page cache once it is on disk (for ingest speed), so a
job read its whole study from disk after completion: the largest stage of the node's overhead for
a 300-slice CT (docs/BENCHMARKS.md, "Latency"). Once a receiving study has been quiet for
:func:`prefetch_after_s`, the scheduler asks the kernel, once, to read the instances its rules
would process back (:meth:`storage.store.InstanceStore.prefetch`, asynchronous readahead); the
read then overlaps the rest of the quiet period instead of following it.

:func:`choose` is the decision, pure; :class:`Prefetcher` reads the index and asks the store.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.completion import study_facts
from node.config import Settings
from node.routing import route
from storage.models import Instance, Series, SeriesOrigin, Study, StudyState, utcnow
from storage.store import InstanceStore

log = logging.getLogger(__name__)

#: a study quiet this long (or half its quiet period, if shorter) is read back
PREFETCH_AFTER_S = 0.5
#: studies larger than this are left on disk: the page cache is no place for them
PREFETCH_MAX_BYTES = 2 * 1024**3


@dataclass(frozen=True)
class QuietStudy:
    """A receiving study as the decision sees it."""

    study_pk: int
    last_received_at: datetime
    size_bytes: int


def prefetch_after_s(quiet_period_s: float) -> float:
    """How long a study must be quiet before it is read back: :data:`PREFETCH_AFTER_S`, or half
    the quiet period when that is shorter (the read needs the rest of it)."""
    return min(PREFETCH_AFTER_S, quiet_period_s / 2)


def choose(
    studies: Iterable[QuietStudy], prefetched: Mapping[int, datetime], *, now: datetime,
    after_s: float, max_bytes: int = PREFETCH_MAX_BYTES,
) -> list[int]:
    """The studies to read back now: quiet for ``after_s``, no larger than ``max_bytes``, and not
    read back since their last instance (``prefetched`` maps a study to the last instance it was
    read back after; a study that received more since is read again, once)."""
    quiet_since = now - timedelta(seconds=after_s)
    return [
        s.study_pk for s in studies
        if s.last_received_at <= quiet_since
        and s.size_bytes <= max_bytes
        and prefetched.get(s.study_pk) != s.last_received_at
    ]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


class Prefetcher:
    """Runs :func:`choose` over the index each scheduler round and prefetches what it picks; it
    remembers what it read back for as long as the study is receiving."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, store: InstanceStore) -> None:
        self.sessions = sessions
        self.settings = settings
        self.store = store
        self._prefetched: dict[int, datetime] = {}

    @property
    def after_s(self) -> float:
        rules = self.settings.effective_rules
        shortest = min([self.settings.quiet_period_s] + [r.quiet_period_s for r in rules if r.quiet_period_s])
        return prefetch_after_s(shortest)

    def run(self, now: datetime | None = None) -> int:
        """One round; return how many files the store was asked to read back."""
        now = now or utcnow()
        asked = 0
        with self.sessions() as session:
            rows = session.execute(
                select(Study.id, Study.last_received_at, func.coalesce(func.sum(Instance.size_bytes), 0))
                .join(Series, Series.study_pk == Study.id)
                .join(Instance, Instance.series_pk == Series.id)
                .where(Study.state == StudyState.RECEIVING, Series.origin != SeriesOrigin.MEDNODE_RESULT)
                .group_by(Study.id, Study.last_received_at)
            ).all()
            studies = [QuietStudy(pk, _aware(last), int(size)) for pk, last, size in rows]
            # forget studies that completed (or went): a later version is a new study here
            self._prefetched = {pk: at for pk, at in self._prefetched.items()
                                if pk in {s.study_pk for s in studies}}
            last_of = {s.study_pk: s.last_received_at for s in studies}
            for pk in choose(studies, self._prefetched, now=now, after_s=self.after_s):
                self._prefetched[pk] = last_of[pk]
                asked += self._prefetch_study(session, pk)
        return asked

    def _prefetch_study(self, session: Session, study_pk: int) -> int:
        study = session.get(Study, study_pk)
        if study is None:
            return 0
        series_uids = {uid for check in route(study_facts(session, study), self.settings.effective_rules)
                       for uid in check.series_uids}
        if not series_uids:  # no rule would read it
            return 0
        paths = session.scalars(
            select(Instance.path).join(Series, Instance.series_pk == Series.id)
            .where(Series.study_pk == study_pk, Series.series_instance_uid.in_(series_uids))
        ).all()
        asked = len(self.store.prefetch(paths))
        log.info("study %s quiet: %d instance file(s) of %d series read back into the page cache",
                 study.study_instance_uid, asked, len(series_uids))
        return asked

    def next_at(self, now: datetime | None = None) -> datetime | None:
        """The earliest moment after ``now`` at which a receiving study will have been quiet for
        :attr:`after_s` (the scheduler wakes up then), or None."""
        now = now or utcnow()
        after = timedelta(seconds=self.after_s)
        with self.sessions() as session:
            last = session.scalar(select(func.min(Study.last_received_at)).where(
                Study.state == StudyState.RECEIVING, Study.last_received_at > now - after))
        return _aware(last) + after if last is not None else None
