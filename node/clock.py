"""The per-stage clock of a study: where the time from its last instance to its results in the
PACS goes (issue 16).

The moments live in the index (``Study.last_received_at``/``completed_at``, ``Job.created_at``/
``enqueued_at``/``started_at``/``finished_at``, ``Delivery.delivered_at``); the seconds a worker
spent in each pipeline stage are measured here (:func:`measuring`, :func:`timed`) and stored with
the job's results (``Job.stage_s``). :func:`study_clock` turns them into one list per study for the
timeline, and :func:`observe` feeds ``mednode_study_clock_seconds``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime

from node import metrics
from storage.models import DeliveryState, Study

LAST_INSTANCE_TO_COMPLETE = "last_instance_to_complete"
COMPLETE_TO_QUEUED = "complete_to_queued"
QUEUED_TO_STARTED = "queued_to_started"
LOAD = "load"  #: reading the series into a volume (or into data sets, for a VLM)
MODEL = "model"  #: the analyzer, bundle or VLM
WRITE = "write"  #: building the SEG and SR objects
STORE = "store"  #: encoding them and writing them to the result store
DELIVERY = "delivery"  #: from the job's end to one object stored at one destination
#: every stage, in the order a study goes through them
STAGES = (LAST_INSTANCE_TO_COMPLETE, COMPLETE_TO_QUEUED, QUEUED_TO_STARTED, LOAD, MODEL, WRITE, STORE, DELIVERY)
#: the stages a worker measures inside a job
WORKER_STAGES = (LOAD, MODEL, WRITE, STORE)
#: the fine-grained pipeline stages (``mednode_stage_duration_seconds``) and the clock stage each counts in
FINE_STAGES = {"load_volume": LOAD, "read_series": LOAD, "priors": LOAD, "ct_analyzer": MODEL, "monai_bundle": MODEL,
               "vlm": MODEL, "write_seg": WRITE, "write_sr": WRITE, "store": STORE}


def observe(stage: str, seconds: float | None) -> None:
    """Record one stage's seconds in ``mednode_study_clock_seconds``; nothing for a missing or
    negative span (a moment overwritten by a later retry)."""
    if seconds is not None and seconds >= 0:
        metrics.STUDY_CLOCK.labels(stage=stage).observe(seconds)


def span_s(start: datetime | None, end: datetime | None) -> float | None:
    """Seconds from ``start`` to ``end``; None if either is missing."""
    if start is None or end is None:
        return None
    return (end - start).total_seconds()


class StageClock:
    """Seconds per worker stage of one job run, summed over its tasks."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float) -> None:
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def rounded(self) -> dict[str, float]:
        """The stages measured, in :data:`WORKER_STAGES` order, to the millisecond."""
        return {s: round(self.seconds[s], 3) for s in WORKER_STAGES if s in self.seconds}


_CURRENT: ContextVar[StageClock | None] = ContextVar("mednode_stage_clock", default=None)


@contextmanager
def measuring() -> Iterator[StageClock]:
    """Collect the stages :func:`timed` reports (in this thread or task) into a new clock."""
    clock = StageClock()
    token = _CURRENT.set(clock)
    try:
        yield clock
    finally:
        _CURRENT.reset(token)


def timed(fine_stage: str, started: float) -> float:
    """Add the seconds since ``started`` (``time.perf_counter()``) to the running job's clock under
    the clock stage of ``fine_stage`` (:data:`FINE_STAGES`); return them."""
    elapsed = time.perf_counter() - started
    clock = _CURRENT.get()
    if clock is not None:
        clock.add(FINE_STAGES.get(fine_stage, fine_stage), elapsed)
    return elapsed


@dataclass(frozen=True)
class StageTime:
    """One stage of a study's clock: its name, its seconds (None when not measured), and which
    job and object it belongs to."""

    stage: str
    seconds: float | None
    job_id: int | None = None
    detail: str | None = None


def study_clock(study: Study) -> list[StageTime]:
    """The stages of ``study``'s latest version, job by job, in the order they happen.

    ``study`` must have its jobs, results and deliveries loaded
    (:func:`node.queries.get_study`). Jobs of earlier versions are left out: their completion is
    not the study's current one. A delivery counts from its job's end to its object stored.
    """
    clock = [StageTime(LAST_INSTANCE_TO_COMPLETE, span_s(study.last_received_at, study.completed_at))]
    for job in study.jobs:
        if job.study_version != study.version or job.on_demand:
            continue
        clock.append(StageTime(COMPLETE_TO_QUEUED, _positive(span_s(job.created_at, job.enqueued_at)), job.id))
        clock.append(StageTime(QUEUED_TO_STARTED, _positive(span_s(job.enqueued_at, job.started_at)), job.id))
        for stage in WORKER_STAGES:
            seconds = (job.stage_s or {}).get(stage)
            clock.append(StageTime(stage, None if seconds is None else float(seconds), job.id))
        for result in job.results:
            for delivery in result.deliveries:
                if delivery.state == DeliveryState.DELIVERED:
                    clock.append(StageTime(DELIVERY, span_s(job.finished_at, delivery.delivered_at), job.id,
                                           f"{result.kind.upper()} to {delivery.destination}"))
    return clock


def _positive(seconds: float | None) -> float | None:
    return seconds if seconds is not None and seconds >= 0 else None
