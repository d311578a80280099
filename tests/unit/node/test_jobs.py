"""Job and delivery state transitions on a real SQLite index, enqueued on an in-memory broker."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from node import jobs
from node.completion import complete_due_studies
from node.config import Settings
from storage.models import Delivery, DeliveryState, Job, JobState, Result, StudyState, utcnow
from tests.unit.node.conftest import IndexFn, drain

STUDY = "1.2.826.0.1.3680043.8.498.20"
SERIES = f"{STUDY}.1"
PACS = "PACS@127.0.0.1:104"
ARCHIVE = "ARCHIVE@127.0.0.1:105"


@pytest.fixture
def routed_job(sessions, settings_for: Callable[..., Settings], index: IndexFn) -> int:
    """A queued job for a two-instance CT study, made by completion, with two destinations."""
    rules = [{"name": "ct", "match": {"modality": "CT"}, "tasks": ["ct_analysis"], "destinations": [PACS, ARCHIVE],
              "priority": 7}]
    settings = settings_for(quiet_period_s=1, rules=rules)
    t0 = utcnow() - timedelta(minutes=10)
    index(STUDY, SERIES, 1, now=t0)
    index(STUDY, SERIES, 2, now=t0)
    [(job_id, priority)] = complete_due_studies(sessions, settings, now=t0 + timedelta(seconds=2))
    assert priority == 7
    return job_id


def _job(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def _results(job_id: int) -> list[jobs.ResultObject]:
    return [
        jobs.ResultObject(kind=kind, sop_class_uid=f"1.2.840.10008.5.1.4.1.1.{n}", sop_instance_uid=f"2.25.{job_id}{n}",
                          series_instance_uid=f"2.25.9{n}", path=f"results/{job_id}/2.25.{job_id}{n}.dcm",
                          size_bytes=100, summary={"kind": kind})
        for n, kind in ((1, "seg"), (2, "sr"))
    ]


def _set(sessions: sessionmaker[Session], model: Any, row_id: int, **values: Any) -> None:
    with sessions() as session, session.begin():
        session.execute(update(model).where(model.id == row_id).values(**values))


# -- claim ---------------------------------------------------------------------------------------
def test_claim_runs_a_queued_job_once(sessions, routed_job: int) -> None:
    claimed = jobs.claim(sessions, routed_job)

    assert claimed is not None
    assert (claimed.id, claimed.study_instance_uid, claimed.study_version, claimed.attempt) == (routed_job, STUDY, 1, 1)
    assert claimed.key == f"{STUDY}/1/ct"
    assert list(claimed.instance_paths) == [SERIES]
    assert [p.rsplit("/", 1)[-1].rsplit(".", 2)[0] for p in claimed.instance_paths[SERIES]] == [
        f"{SERIES}.1", f"{SERIES}.2"
    ]
    assert claimed.destinations == [PACS, ARCHIVE]
    job = _job(sessions, routed_job)
    assert job.state is JobState.RUNNING
    assert job.lease_expires_at is not None and job.lease_expires_at > utcnow()
    assert job.worker == jobs.worker_name()

    assert jobs.claim(sessions, routed_job) is None  # a duplicate message does nothing
    assert _job(sessions, routed_job).attempts == 1


def test_claim_never_reads_a_returned_result_series(sessions, routed_job: int, index: IndexFn) -> None:
    # mednode's SR, back from the PACS while the job waited; a job that names its series (an
    # older rerun, say) still reads only the images
    returned = f"{STUDY}.77"
    index(STUDY, returned, 1, modality="SR", sop_class="1.2.840.10008.5.1.4.1.1.88.33", Manufacturer="mednode")
    job = _job(sessions, routed_job)
    _set(sessions, Job, routed_job, series_uids=[*job.series_uids, returned])

    claimed = jobs.claim(sessions, routed_job)

    assert claimed is not None and list(claimed.instance_paths) == [SERIES]


def test_running_job_with_an_expired_lease_is_claimed_again(sessions, routed_job: int) -> None:
    jobs.claim(sessions, routed_job, lease_s=60)
    _set(sessions, Job, routed_job, lease_expires_at=utcnow() - timedelta(seconds=1))

    again = jobs.claim(sessions, routed_job)

    assert again is not None and again.attempt == 2
    assert _job(sessions, routed_job).lease_expires_at > utcnow()  # type: ignore[operator]


def test_renewed_lease_keeps_a_second_worker_out(sessions, routed_job: int) -> None:
    jobs.claim(sessions, routed_job, lease_s=1)
    jobs.renew_lease(sessions, routed_job, lease_s=600)
    assert jobs.claim(sessions, routed_job) is None


def test_claim_of_a_job_whose_study_changed_supersedes_it(sessions, routed_job: int, index: IndexFn) -> None:
    index(STUDY, SERIES, 3)  # the study reopens before a worker picks the job up

    assert jobs.claim(sessions, routed_job) is None

    job = _job(sessions, routed_job)
    assert job.state is JobState.SUPERSEDED and job.finished_at is not None


def test_claim_of_a_missing_job_raises(sessions) -> None:
    with pytest.raises(jobs.JobNotFoundError):
        jobs.claim(sessions, 12345)


@pytest.mark.parametrize("state", [JobState.SUCCEEDED, JobState.DELIVERING, JobState.DELIVERED,
                                   JobState.FAILED, JobState.CANCELLED, JobState.SUPERSEDED])
def test_finished_jobs_are_not_claimed(sessions, routed_job: int, state: JobState) -> None:
    _set(sessions, Job, routed_job, state=state)
    assert jobs.claim(sessions, routed_job) is None
    assert _job(sessions, routed_job).state is state


# -- results and deliveries -----------------------------------------------------------------------
def test_record_results_creates_one_pending_delivery_per_object_and_destination(sessions, routed_job: int) -> None:
    jobs.claim(sessions, routed_job)

    delivery_ids = jobs.record_results(sessions, routed_job, _results(routed_job))

    assert len(delivery_ids) == 4
    job = _job(sessions, routed_job)
    assert job.state is JobState.DELIVERING
    assert job.lease_expires_at is None and job.finished_at is not None
    with sessions() as session:
        rows = session.execute(select(Result.kind, Delivery.destination, Delivery.state)
                               .join(Delivery.result).order_by(Delivery.id)).all()
    assert sorted((k, d, s) for k, d, s in rows) == sorted(
        (k, d, DeliveryState.PENDING) for k in ("seg", "sr") for d in (PACS, ARCHIVE)
    )
    # a duplicate call (redelivered message) adds nothing
    assert jobs.record_results(sessions, routed_job, _results(routed_job)) == []
    with sessions() as session:
        assert len(session.scalars(select(Delivery)).all()) == 4


def test_record_results_without_destinations_succeeds(sessions, routed_job: int) -> None:
    _set(sessions, Job, routed_job, destinations=[])
    jobs.claim(sessions, routed_job)
    assert jobs.record_results(sessions, routed_job, _results(routed_job)) == []
    assert _job(sessions, routed_job).state is JobState.SUCCEEDED


def test_results_of_a_study_that_changed_while_running_are_not_sent(
    sessions, routed_job: int, index: IndexFn
) -> None:
    jobs.claim(sessions, routed_job)
    index(STUDY, SERIES, 3)
    assert jobs.record_results(sessions, routed_job, _results(routed_job)) == []
    assert _job(sessions, routed_job).state is JobState.SUPERSEDED


def _deliver_all(sessions, routed_job: int) -> list[int]:  # type: ignore[no-untyped-def]
    jobs.claim(sessions, routed_job)
    return jobs.record_results(sessions, routed_job, _results(routed_job))


def test_job_is_delivered_once_every_delivery_is(sessions, routed_job: int) -> None:
    ids = _deliver_all(sessions, routed_job)
    for delivery_id in ids[:-1]:
        state = jobs.finish_delivery(sessions, delivery_id, ok=True, error=None, give_up_after_s=60,
                                     next_attempt_at=None)
        assert state is DeliveryState.DELIVERED
        assert _job(sessions, routed_job).state is JobState.DELIVERING
    jobs.finish_delivery(sessions, ids[-1], ok=True, error=None, give_up_after_s=60, next_attempt_at=None)

    assert _job(sessions, routed_job).state is JobState.DELIVERED
    with sessions() as session:
        delivered = session.scalars(select(Delivery)).all()
    assert all(d.delivered_at is not None and d.attempts == 1 for d in delivered)


def test_failed_attempt_stays_pending_until_the_give_up_time(sessions, routed_job: int) -> None:
    ids = _deliver_all(sessions, routed_job)
    retry_at = utcnow() + timedelta(seconds=5)

    state = jobs.finish_delivery(sessions, ids[0], ok=False, error="association rejected", give_up_after_s=3600,
                                 next_attempt_at=retry_at)

    assert state is DeliveryState.PENDING
    with sessions() as session:
        delivery = session.get(Delivery, ids[0])
        assert delivery is not None
        assert (delivery.attempts, delivery.last_error, delivery.next_attempt_at) == (1, "association rejected", retry_at)
        assert delivery.delivered_at is None
    assert _job(sessions, routed_job).state is JobState.DELIVERING


def test_job_fails_with_the_reason_once_a_delivery_gives_up(sessions, routed_job: int) -> None:
    ids = _deliver_all(sessions, routed_job)
    for delivery_id in ids[1:]:
        jobs.finish_delivery(sessions, delivery_id, ok=True, error=None, give_up_after_s=60, next_attempt_at=None)
    _set(sessions, Delivery, ids[0], created_at=utcnow() - timedelta(seconds=120))

    state = jobs.finish_delivery(sessions, ids[0], ok=False, error="DeliveryError: connection refused",
                                 give_up_after_s=60, next_attempt_at=utcnow())

    assert state is DeliveryState.FAILED
    job = _job(sessions, routed_job)
    assert job.state is JobState.FAILED
    assert job.reason is not None and "delivery gave up" in job.reason and "connection refused" in job.reason


def test_a_permanent_refusal_fails_the_delivery_and_the_job_at_once(sessions, routed_job: int) -> None:
    ids = _deliver_all(sessions, routed_job)
    for delivery_id in ids[1:]:
        jobs.finish_delivery(sessions, delivery_id, ok=True, error=None, give_up_after_s=60, next_attempt_at=None)
    refusal = "refused by PACS@127.0.0.1:104: status 0xA900 (data set does not match SOP class)"

    state = jobs.finish_delivery(sessions, ids[0], ok=False, error=refusal, give_up_after_s=86400,
                                 next_attempt_at=None, permanent=True)

    assert state is DeliveryState.FAILED
    with sessions() as session:
        delivery = session.get(Delivery, ids[0])
        assert delivery is not None and (delivery.attempts, delivery.next_attempt_at) == (1, None)
    job = _job(sessions, routed_job)
    assert (job.state, job.reason) == (JobState.FAILED, f"delivery failed: {refusal}")
    # a late duplicate of the same attempt changes nothing
    assert jobs.finish_delivery(sessions, ids[0], ok=True, error=None, give_up_after_s=60,
                                next_attempt_at=None) is DeliveryState.FAILED
    assert _job(sessions, routed_job).state is JobState.FAILED


def test_a_delivery_is_claimed_by_one_attempt_at_a_time(sessions, routed_job: int) -> None:
    [first, *_] = _deliver_all(sessions, routed_job)
    assert jobs.claim_delivery(sessions, first, lease_s=300)
    assert not jobs.claim_delivery(sessions, first, lease_s=300), "a second worker must skip it"
    # after a failed attempt it is due again only when its backoff ends
    jobs.finish_delivery(sessions, first, ok=False, error="down", give_up_after_s=3600,
                         next_attempt_at=utcnow() + timedelta(seconds=30))
    assert not jobs.claim_delivery(sessions, first, lease_s=300)
    _set(sessions, Delivery, first, next_attempt_at=utcnow() - timedelta(seconds=1))
    assert jobs.claim_delivery(sessions, first, lease_s=300)
    jobs.finish_delivery(sessions, first, ok=True, error=None, give_up_after_s=60, next_attempt_at=None)
    assert not jobs.claim_delivery(sessions, first, lease_s=300), "a delivered delivery is never tried again"


# -- admin actions and recovery -------------------------------------------------------------------
def test_retry_requeues_a_failed_job_and_its_failed_deliveries(sessions, routed_job: int, memory_celery) -> None:
    ids = _deliver_all(sessions, routed_job)
    jobs.finish_delivery(sessions, ids[0], ok=True, error=None, give_up_after_s=60, next_attempt_at=None)
    for delivery_id in ids[1:]:
        _set(sessions, Delivery, delivery_id, created_at=utcnow() - timedelta(seconds=120))
        jobs.finish_delivery(sessions, delivery_id, ok=False, error="down", give_up_after_s=60, next_attempt_at=None)
    assert _job(sessions, routed_job).state is JobState.FAILED

    jobs.retry_job(sessions, routed_job)

    job = _job(sessions, routed_job)
    assert (job.state, job.attempts, job.reason, job.finished_at) == (JobState.QUEUED, 0, None, None)
    assert job.enqueued_at is not None
    assert drain(memory_celery, "inference") == [("mednode.run_job", [routed_job])]
    with sessions() as session:
        states = [session.get(Delivery, i).state for i in ids]  # type: ignore[union-attr]
    # what was delivered stays delivered; what gave up is tried again
    assert states == [DeliveryState.DELIVERED] + [DeliveryState.PENDING] * 3
    with pytest.raises(jobs.InvalidTransitionError):
        jobs.retry_job(sessions, routed_job)  # it is queued now


def test_cancel_a_queued_job_and_refuse_to_cancel_twice(sessions, routed_job: int) -> None:
    jobs.cancel_job(sessions, routed_job)
    job = _job(sessions, routed_job)
    assert job.state is JobState.CANCELLED and job.reason == "cancelled by an administrator"
    assert jobs.claim(sessions, routed_job) is None
    with pytest.raises(jobs.InvalidTransitionError):
        jobs.cancel_job(sessions, routed_job)
    with pytest.raises(jobs.JobNotFoundError):
        jobs.cancel_job(sessions, 999)


def test_cancelled_while_running_keeps_cancelled(sessions, routed_job: int) -> None:
    jobs.claim(sessions, routed_job)
    jobs.cancel_job(sessions, routed_job)
    assert jobs.record_results(sessions, routed_job, _results(routed_job)) == []
    jobs.fail_job(sessions, routed_job, "late failure")
    assert _job(sessions, routed_job).state is JobState.CANCELLED


def test_enqueue_job_sends_the_id_and_notes_when(sessions, routed_job: int, memory_celery) -> None:
    assert _job(sessions, routed_job).enqueued_at is None
    jobs.enqueue_job(sessions, routed_job, 7)
    assert _job(sessions, routed_job).enqueued_at is not None
    assert drain(memory_celery, "inference") == [("mednode.run_job", [routed_job])]
    jobs.enqueue_delivery(sessions, 42)
    assert drain(memory_celery, "delivery") == [("mednode.deliver", [42])]


@pytest.mark.parametrize("priority, queue", [(0, "inference"), (7, "inference"), (8, "inference.urgent"),
                                             (9, "inference.urgent")])
def test_urgent_jobs_go_to_the_urgent_queue(sessions, routed_job: int, memory_celery, priority: int,
                                            queue: str) -> None:
    jobs.enqueue_job(sessions, routed_job, priority)
    other = "inference" if queue == "inference.urgent" else "inference.urgent"
    assert drain(memory_celery, queue) == [("mednode.run_job", [routed_job])]
    assert drain(memory_celery, other) == []


def test_a_job_raised_to_priority_9_and_its_sweep_use_the_urgent_queue(
    sessions, routed_job: int, memory_celery, settings_for, store
) -> None:
    from node.context import NodeContext
    from node.scheduler import Scheduler

    jobs.set_priority(sessions, routed_job, 9)
    assert drain(memory_celery, "inference.urgent") == [("mednode.run_job", [routed_job])]
    # its message was lost: the sweep (as the scheduler runs it) sends it to the same queue
    _set(sessions, Job, routed_job, enqueued_at=utcnow() - timedelta(hours=1))
    ctx = NodeContext(settings=settings_for(quiet_period_s=1), engine=sessions.kw["bind"], sessions=sessions,
                      store=store)
    Scheduler(ctx).tick()
    assert drain(memory_celery, "inference.urgent") == [("mednode.run_job", [routed_job])]
    assert drain(memory_celery, "inference") == []


def test_the_urgent_message_of_a_job_lowered_since_leaves_it_queued(
    sessions, routed_job: int, memory_celery, settings_for
) -> None:
    from node import context, tasks

    jobs.set_priority(sessions, routed_job, 9)
    jobs.set_priority(sessions, routed_job, 3)  # an administrator changed their mind
    assert drain(memory_celery, "inference.urgent") == [("mednode.run_job", [routed_job])]
    assert drain(memory_celery, "inference") == [("mednode.run_job", [routed_job])]
    assert jobs.lowered_below_urgent(sessions, routed_job)

    context.configure(settings_for(quiet_period_s=1))  # the same index as ``sessions``
    tasks.run_job.push_request(delivery_info={"routing_key": "inference.urgent"}, retries=0)
    try:
        tasks.run_job.run(routed_job)
    finally:
        tasks.run_job.pop_request()
        context.current().close()
    assert _job(sessions, routed_job).state is JobState.QUEUED  # left for the inference worker
    jobs.claim(sessions, routed_job)
    assert not jobs.lowered_below_urgent(sessions, routed_job)  # running: nothing to leave


def test_sweep_finds_lost_jobs_and_overdue_deliveries(sessions, routed_job: int, index: IndexFn,
                                                      settings_for) -> None:
    # a second study whose job is running on a worker that died
    settings = settings_for(quiet_period_s=1, destination=PACS)
    old = utcnow() - timedelta(minutes=10)
    index("1.2.3.30", "1.2.3.30.1", 1, now=old)
    [(lost, _)] = complete_due_studies(sessions, settings, now=old + timedelta(seconds=2))
    jobs.claim(sessions, lost)
    _set(sessions, Job, lost, lease_expires_at=utcnow() - timedelta(seconds=1), enqueued_at=old)

    found_jobs, found_deliveries = jobs.sweep(sessions)

    assert sorted(found_jobs) == sorted([(routed_job, 7), (lost, 5)])  # never enqueued; lost its worker
    assert found_deliveries == []
    assert _job(sessions, lost).state is JobState.QUEUED

    # recently enqueued jobs are left alone; overdue pending deliveries are found
    now = utcnow()
    _set(sessions, Job, routed_job, enqueued_at=now)
    _set(sessions, Job, lost, enqueued_at=now)
    assert jobs.sweep(sessions) == ([], [])
    ids = _deliver_all(sessions, routed_job)
    _set(sessions, Delivery, ids[0], next_attempt_at=now - timedelta(minutes=5))
    _set(sessions, Delivery, ids[1], next_attempt_at=None)
    for delivery_id in ids[2:]:
        _set(sessions, Delivery, delivery_id, next_attempt_at=now + timedelta(minutes=5))
    assert jobs.sweep(sessions) == ([], sorted(ids[:2]))


def test_status_counts(sessions, routed_job: int) -> None:
    _deliver_all(sessions, routed_job)
    with sessions() as session:
        counts = jobs.status_counts(session)
    assert counts["instances"] == 2
    assert counts["studies"][StudyState.ROUTED.value] == 1 and counts["studies"]["receiving"] == 0
    assert counts["jobs"]["delivering"] == 1 and set(counts["jobs"]) == {s.value for s in JobState}
    assert counts["deliveries"]["pending"] == 4


def test_send_results_of_a_finished_job_to_another_destination(sessions, routed_job: int) -> None:
    _set(sessions, Job, routed_job, destinations=[])
    with pytest.raises(jobs.InvalidTransitionError):  # nothing written yet
        jobs.send_results(sessions, routed_job, [PACS])
    jobs.claim(sessions, routed_job)
    jobs.record_results(sessions, routed_job, _results(routed_job))
    assert _job(sessions, routed_job).state is JobState.SUCCEEDED

    created = jobs.send_results(sessions, routed_job, [PACS])

    assert len(created) == 2  # the SEG and the SR, once each
    job = _job(sessions, routed_job)
    assert job.state is JobState.DELIVERING and job.destinations == [PACS]
    assert jobs.send_results(sessions, routed_job, [PACS]) == []  # asking twice sends nothing more


def test_set_priority_only_for_queued_jobs(sessions, routed_job: int, memory_celery) -> None:
    jobs.set_priority(sessions, routed_job, 9)
    assert _job(sessions, routed_job).priority == 9
    with pytest.raises(ValueError):
        jobs.set_priority(sessions, routed_job, 10)
    jobs.claim(sessions, routed_job)
    with pytest.raises(jobs.InvalidTransitionError):
        jobs.set_priority(sessions, routed_job, 1)
