"""The study clock: stages from the index's moments and the worker's measured seconds."""

from __future__ import annotations

import time
from datetime import timedelta

from node import clock
from storage.models import Delivery, DeliveryState, Job, JobState, Result, Study, StudyState, utcnow


def _study() -> Study:
    t0 = utcnow()
    at = lambda s: t0 + timedelta(seconds=s)
    study = Study(study_instance_uid="1.2.3", state=StudyState.ROUTED, version=2, first_received_at=at(0),
                  last_received_at=at(10), completed_at=at(12))
    old = Job(id=1, study_version=1, rule_name="ct", created_at=at(5), enqueued_at=at(5.1), started_at=at(5.2),
              state=JobState.SUPERSEDED, on_demand=False)
    job = Job(id=2, study_version=2, rule_name="ct", created_at=at(12), enqueued_at=at(12.25),
              started_at=at(12.5), finished_at=at(20), state=JobState.DELIVERED, on_demand=False,
              stage_s={"load": 1.5, "model": 4.0, "write": 1.0, "store": 0.25})
    seg = Result(kind="seg", deliveries=[Delivery(destination="PACS@h:104", state=DeliveryState.DELIVERED,
                                                  delivered_at=at(20.5))])
    sr = Result(kind="sr", deliveries=[Delivery(destination="PACS@h:104", state=DeliveryState.FAILED)])
    job.results = [seg, sr]
    study.jobs = [old, job]
    return study


def test_study_clock_lists_each_stage_of_the_latest_version_in_order() -> None:
    stages = clock.study_clock(_study())
    assert [(s.stage, s.seconds, s.job_id) for s in stages] == [
        ("last_instance_to_complete", 2.0, None),
        ("complete_to_queued", 0.25, 2),
        ("queued_to_started", 0.25, 2),
        ("load", 1.5, 2), ("model", 4.0, 2), ("write", 1.0, 2), ("store", 0.25, 2),
        ("delivery", 0.5, 2),  # the failed SR delivery has no time to show
    ]
    assert stages[-1].detail == "SEG to PACS@h:104"
    assert [s.stage for s in stages] == [s for s in clock.STAGES]


def test_a_moment_overwritten_by_a_retry_shows_no_negative_span() -> None:
    study = _study()
    job = study.jobs[1]
    job.enqueued_at = job.started_at + timedelta(seconds=3)  # re-enqueued by the sweep after it started
    spans = {s.stage: s.seconds for s in clock.study_clock(study)}
    assert spans["queued_to_started"] is None
    assert spans["complete_to_queued"] == 3.5


def test_timed_stages_add_up_in_the_running_clock_only() -> None:
    started = time.perf_counter() - 0.2
    assert clock.timed("write_seg", started) >= 0.2  # no clock running: measured, kept nowhere
    with clock.measuring() as stages:
        clock.timed("load_volume", time.perf_counter() - 1.0)
        clock.timed("write_seg", time.perf_counter() - 0.5)
        clock.timed("write_sr", time.perf_counter() - 0.25)
        clock.timed("ct_analyzer", time.perf_counter() - 2.0)
    assert list(stages.rounded()) == ["load", "model", "write"]
    assert stages.seconds["write"] >= 0.75 and stages.seconds["load"] >= 1.0
