"""The scheduler loop of ``mednode serve``: completion, routing, and recovery of lost messages."""

from __future__ import annotations

import logging
import threading
import time
from datetime import timedelta

from node import jobs, retention
from node.completion import complete_due_studies, next_due_at
from node.context import NodeContext
from node.leadership import Leadership
from node.preload import Preloads, next_preload_at
from storage.models import utcnow

log = logging.getLogger(__name__)

SWEEP_EVERY_S = 10.0
#: how long after a study's quiet period ends the scheduler wakes up to complete it
WAKE_LATE_S = 0.005


class Scheduler:
    """Runs :func:`complete_due_studies` every ``completion_poll_s`` (sooner when a study's quiet
    period ends first: :meth:`wait_s`), sends read-ahead hints (:mod:`node.preload`), and :func:`jobs.sweep`
    every :data:`SWEEP_EVERY_S` (and once at start, to pick up what a crash left), and the
    retention cleaner every ``retention.check_every_s`` (studies when ``retention.max_age_days`` is set;
    prior-study copies jobs left always).

    Of several ``serve`` processes on one index, only the leader (:mod:`node.leadership`) runs
    rounds; the others ask again each round and take over when the leader is gone."""

    def __init__(self, ctx: NodeContext, leadership: Leadership | None = None) -> None:
        self.ctx = ctx
        self.leadership = leadership or Leadership(ctx.engine)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._last_sweep = 0.0
        self._last_retention = float("-inf")
        self._preloads = Preloads(ctx.sessions, ctx.settings)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.leadership.release()

    def tick(self) -> None:
        """One round: complete due studies, enqueue their jobs; sweep when due. Nothing unless
        this process leads."""
        if not self.leadership.is_leader():
            return
        created = complete_due_studies(self.ctx.sessions, self.ctx.settings)
        for job_id, priority in created:
            jobs.enqueue_job(self.ctx.sessions, job_id, priority)
        if self.ctx.settings.volume_preload:
            try:
                self._preloads.send()
            except Exception:  # boundary: hints only; the sweep below must still run
                log.exception("could not look for studies to read ahead; their jobs read them")
        if time.monotonic() - self._last_sweep >= SWEEP_EVERY_S:
            self._last_sweep = time.monotonic()
            lost_jobs, due_deliveries = jobs.sweep(self.ctx.sessions)
            for job_id, priority in lost_jobs:
                jobs.enqueue_job(self.ctx.sessions, job_id, priority)
            for delivery_id in due_deliveries:
                jobs.enqueue_delivery(self.ctx.sessions, delivery_id)
        policy = self.ctx.settings.retention
        if time.monotonic() - self._last_retention >= policy.check_every_s:
            self._last_retention = time.monotonic()
            self.ctx.store.purge_priors(policy.priors_max_age_s)
            if policy.max_age_days is not None:
                retention.purge_expired(self.ctx.sessions, self.ctx.store,
                                        max_age=timedelta(days=policy.max_age_days))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.tick()
            except Exception:  # boundary: the loop must survive a database hiccup
                log.exception("scheduler round failed; retrying")
            self._stop.wait(self.wait_s())

    def wait_s(self) -> float:
        """Seconds to the next round: ``completion_poll_s``, or less when a study's quiet period
        ends sooner (:func:`~node.completion.next_due_at`), so it completes on time, or its
        read-ahead is due sooner (:func:`~node.preload.next_preload_at`)."""
        poll_s = self.ctx.settings.completion_poll_s
        try:
            moments = [next_due_at(self.ctx.sessions, self.ctx.settings)]
            if self.ctx.settings.volume_preload:
                moments.append(next_preload_at(self.ctx.sessions, self.ctx.settings))
        except Exception:  # boundary: a database hiccup leaves the regular poll
            log.exception("could not read when the next study is due; polling")
            return poll_s
        due = min((m for m in moments if m is not None), default=None)
        if due is None:
            return poll_s
        # a few milliseconds past the moment: the round's own clock must see it as due
        return min(poll_s, max(0.0, (due - utcnow()).total_seconds() + WAKE_LATE_S))
