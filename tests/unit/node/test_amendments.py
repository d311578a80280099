"""Amended results on a real SQLite index: a new version knows what it replaces, and deliveries of
the superseded version that have not gone out are cancelled (never sent, never retried)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.uids import derived_uid
from node import jobs
from node.completion import complete_due_studies
from node.config import Settings
from storage.models import Delivery, DeliveryState, Job, JobState, Result, utcnow
from tests.unit.node.conftest import IndexFn

STUDY = "1.2.826.0.1.3680043.8.498.21"
SERIES = f"{STUDY}.1"
PACS = "PACS@127.0.0.1:104"
ARCHIVE = "ARCHIVE@127.0.0.1:105"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
KO_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


class Study:
    """One CT study driven through versions: instances arrive, completion routes, jobs run."""

    def __init__(self, sessions: sessionmaker[Session], settings: Settings, index: IndexFn) -> None:
        self.sessions, self.settings, self.index = sessions, settings, index
        self.now = utcnow() - timedelta(hours=1)
        self.instances = 0

    def receive(self, count: int = 1) -> int:
        """``count`` more instances, then quiet: return the new version's job id."""
        for _ in range(count):
            self.instances += 1
            self.index(STUDY, SERIES, self.instances, now=self.now)
        self.now += timedelta(seconds=5)
        [(job_id, _)] = complete_due_studies(self.sessions, self.settings, now=self.now)
        return job_id

    def run(self, job_id: int, extra: list[jobs.ResultObject] | None = None) -> tuple[jobs.ClaimedJob, list[int]]:
        claimed = jobs.claim(self.sessions, job_id)
        assert claimed is not None
        return claimed, jobs.record_results(self.sessions, job_id, outputs(claimed) + (extra or []))


def outputs(job: jobs.ClaimedJob) -> list[jobs.ResultObject]:
    """A SEG and an SR with the UIDs the pipeline derives from the job key (slots "seg", "sr")."""
    return [
        jobs.ResultObject(
            kind=slot, sop_class_uid=sop_class, sop_instance_uid=derived_uid(job.key, slot, "instance"),
            series_instance_uid=derived_uid(job.key, slot, "series"),
            path=f"results/{job.id}/{slot}.dcm", size_bytes=100, summary={"kind": slot},
        )
        for slot, sop_class in (("seg", SEG_CLASS), ("sr", SR_CLASS))
    ]


@pytest.fixture
def study(sessions, settings_for: Callable[..., Settings], index: IndexFn) -> Study:
    rules = [{"name": "ct", "match": {"modality": "CT"}, "tasks": ["ct_analysis"],
              "destinations": [PACS, ARCHIVE]}]
    return Study(sessions, settings_for(quiet_period_s=1, rules=rules), index)


def _finish(sessions, delivery_id: int, ok: bool) -> DeliveryState:  # type: ignore[no-untyped-def]
    return jobs.finish_delivery(sessions, delivery_id, ok=ok, error=None if ok else "peer down",
                                give_up_after_s=3600, next_attempt_at=None if ok else utcnow())


def _deliveries(sessions: sessionmaker[Session], job_id: int) -> dict[tuple[str, str], Delivery]:
    with sessions() as session:
        rows = session.scalars(select(Delivery).join(Delivery.result).where(Result.job_pk == job_id)).all()
        return {(d.result.kind, d.destination): d for d in rows}


def _job(sessions: sessionmaker[Session], job_id: int) -> Job:
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None
        return job


def test_a_first_version_amends_nothing(sessions, study: Study) -> None:
    claimed, _ = study.run(study.receive(2))
    assert claimed.previous_results == ()
    assert claimed.previous_key is None and claimed.result_version is None
    assert claimed.predecessors("sr") == []


def test_a_new_version_names_what_it_replaces_and_cancels_what_did_not_go_out(sessions, study: Study) -> None:
    v1, v1_deliveries = study.run(study.receive(2))
    d1 = _deliveries(sessions, v1.id)
    for kind in ("seg", "sr"):  # v1 reached the PACS; the archive is down
        assert _finish(sessions, d1[(kind, PACS)].id, ok=True) is DeliveryState.DELIVERED
        assert _finish(sessions, d1[(kind, ARCHIVE)].id, ok=False) is DeliveryState.PENDING
    assert len(v1_deliveries) == 4

    v2_id = study.receive(1)  # a late slice: version 2
    claimed = jobs.claim(sessions, v2_id)
    assert claimed is not None and claimed.study_version == 2
    assert claimed.previous_key == f"{STUDY}/1/ct" and claimed.result_version == 2
    previous = {r.kind: r for r in claimed.previous_results}
    assert set(previous) == {"seg", "sr"}
    assert previous["sr"].sop_instance_uid == derived_uid(v1.key, "sr", "instance")
    assert previous["sr"].delivered_to == (PACS,) and previous["sr"].job_id == v1.id
    [sr_ref] = claimed.predecessors("sr")
    assert (sr_ref.study_instance_uid, sr_ref.series_instance_uid, sr_ref.sop_class_uid, sr_ref.sop_instance_uid) == (
        STUDY, derived_uid(v1.key, "sr", "series"), SR_CLASS, derived_uid(v1.key, "sr", "instance"))
    assert claimed.predecessors("regions") == []

    # v1's archive deliveries are still pending while v2 runs; they are cancelled when v2 records
    assert _deliveries(sessions, v1.id)[("sr", ARCHIVE)].state is DeliveryState.PENDING
    v2_deliveries = jobs.record_results(sessions, v2_id, outputs(claimed))
    assert len(v2_deliveries) == 4
    after = _deliveries(sessions, v1.id)
    for kind in ("seg", "sr"):
        assert after[(kind, PACS)].state is DeliveryState.DELIVERED
        cancelled = after[(kind, ARCHIVE)]
        assert cancelled.state is DeliveryState.CANCELLED
        assert cancelled.next_attempt_at is None
        assert cancelled.last_error == (f"cancelled: version 2 of the study's results (job {v2_id}) "
                                        "replaces this one")
    job = _job(sessions, v1.id)
    assert job.state is JobState.SUPERSEDED
    assert job.reason is not None and f"job {v2_id}" in job.reason

    # the sweep never brings a cancelled delivery back, and counts show it
    _, overdue = jobs.sweep(sessions, delivery_grace_s=0)
    assert not set(overdue) & {after[("seg", ARCHIVE)].id, after[("sr", ARCHIVE)].id}
    with sessions() as session:
        assert jobs.status_counts(session)["deliveries"]["cancelled"] == 2


def test_a_delivery_cancelled_in_flight_records_what_happened(sessions, study: Study) -> None:
    v1, _ = study.run(study.receive(2))
    d1 = _deliveries(sessions, v1.id)
    study.run(study.receive(1))  # v2 records: every v1 delivery was pending, all are cancelled
    assert {d.state for d in _deliveries(sessions, v1.id).values()} == {DeliveryState.CANCELLED}
    assert _job(sessions, v1.id).state is JobState.SUPERSEDED

    # two sends were already under way: one failed (stays cancelled, keeps its reason) ...
    assert _finish(sessions, d1[("sr", ARCHIVE)].id, ok=False) is DeliveryState.CANCELLED
    failed = _deliveries(sessions, v1.id)[("sr", ARCHIVE)]
    assert failed.last_error is not None and failed.last_error.startswith("cancelled: version 2")
    assert failed.attempts == 1
    # ... one got through: the PACS holds it, so the index says so
    assert _finish(sessions, d1[("sr", PACS)].id, ok=True) is DeliveryState.DELIVERED
    assert _job(sessions, v1.id).state is JobState.SUPERSEDED


def test_a_delivery_that_gave_up_keeps_the_old_job_failed(sessions, study: Study) -> None:
    v1, _ = study.run(study.receive(2))
    d1 = _deliveries(sessions, v1.id)
    with sessions() as session, session.begin():  # the archive gave up on v1's SR before v2 came
        session.execute(update(Delivery).where(Delivery.id == d1[("sr", ARCHIVE)].id)
                        .values(created_at=utcnow() - timedelta(days=2)))
    assert _finish(sessions, d1[("sr", ARCHIVE)].id, ok=False) is DeliveryState.FAILED
    study.run(study.receive(1))
    job = _job(sessions, v1.id)
    assert job.state is JobState.FAILED
    assert job.reason is not None and job.reason.startswith(f"delivery gave up: {ARCHIVE}")


def test_results_superseded_while_running_are_not_amended_nor_cancel_anything(
    sessions, study: Study, index: IndexFn
) -> None:
    v1, _ = study.run(study.receive(2))
    v2_id = study.receive(1)
    claimed = jobs.claim(sessions, v2_id)
    assert claimed is not None
    study.instances += 1
    index(STUDY, SERIES, study.instances, now=study.now)  # more arrive while v2 runs
    assert jobs.record_results(sessions, v2_id, outputs(claimed)) == []
    assert _job(sessions, v2_id).state is JobState.SUPERSEDED
    # v2 sent nothing, so v1's deliveries go on
    assert {d.state for d in _deliveries(sessions, v1.id).values()} == {DeliveryState.PENDING}

    study.now += timedelta(seconds=5)
    [(v3_id, _)] = complete_due_studies(sessions, study.settings, now=study.now)
    v3 = jobs.claim(sessions, v3_id)
    assert v3 is not None and v3.study_version == 3
    # v3 amends v1, the last version whose results went out, not v2 which never did
    assert v3.previous_key == f"{STUDY}/1/ct"
    assert {r.job_id for r in v3.previous_results} == {v1.id}
    assert v3.predecessors("sr")[0].sop_instance_uid == derived_uid(v1.key, "sr", "instance")


def test_an_object_for_some_destinations_is_delivered_only_there(sessions, study: Study) -> None:
    study.run(study.receive(2))  # v1
    v2_id = study.receive(1)
    note = jobs.ResultObject(kind="rejection", sop_class_uid=KO_CLASS, sop_instance_uid=derived_uid("ko"),
                             series_instance_uid=derived_uid("ko", "series"), path="results/ko.dcm",
                             size_bytes=10, summary={}, destinations=(PACS,))
    _, ids = study.run(v2_id, extra=[note])
    assert len(ids) == 5
    d2 = _deliveries(sessions, v2_id)
    assert {dest for kind, dest in d2 if kind == "rejection"} == {PACS}
    for delivery_id in ids:
        _finish(sessions, delivery_id, ok=True)
    assert _job(sessions, v2_id).state is JobState.DELIVERED


def test_find_destination_gives_a_stored_destination_its_options(settings_for: Callable[..., Settings]) -> None:
    settings = settings_for(
        destination={"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242, "rejection_notes": True},
        destinations={"archive": "ARCHIVE@127.0.0.1:105"},
    )
    pacs = settings.find_destination("ORTHANC@127.0.0.1:4242")
    assert pacs is not None and pacs.rejection_notes is True
    archive = settings.find_destination(ARCHIVE)
    assert archive is not None and archive.rejection_notes is False  # off unless a destination opts in
    assert settings.find_destination("OTHER@127.0.0.1:4242") is None  # e.g. a peer given to an API call
    assert settings_for().find_destination(PACS) is None


def _give_up(sessions, job_id: int) -> None:  # type: ignore[no-untyped-def]
    """Every delivery of the job gave up; the job failed (as finish_delivery leaves it)."""
    with sessions() as session, session.begin():
        ids = [d.id for d in _deliveries(sessions, job_id).values()]
        session.execute(update(Delivery).where(Delivery.id.in_(ids)).values(state=DeliveryState.FAILED))
        session.execute(update(Job).where(Job.id == job_id).values(state=JobState.FAILED))


def test_a_superseded_version_cannot_be_retried(sessions, study: Study, memory_celery) -> None:
    v1, _ = study.run(study.receive(2))
    _give_up(sessions, v1.id)
    jobs.retry_job(sessions, v1.id)  # before v2: a retry sends v1 again
    assert _job(sessions, v1.id).state is JobState.QUEUED
    _give_up(sessions, v1.id)

    v2_id = study.receive(1)
    study.run(v2_id)
    with pytest.raises(jobs.InvalidTransitionError, match=f"job {v2_id} replaced them with version 2"):
        jobs.retry_job(sessions, v1.id)
    assert _job(sessions, v1.id).state is JobState.FAILED
    assert {d.state for d in _deliveries(sessions, v1.id).values()} == {DeliveryState.FAILED}


def test_a_superseded_version_cannot_be_sent_by_hand(sessions, study: Study) -> None:
    """"Send to PACS" of an old version would put results a newer version replaced in the PACS."""
    other = "OTHER@127.0.0.1:4242"
    v1, _ = study.run(study.receive(2))
    for delivery in _deliveries(sessions, v1.id).values():
        _finish(sessions, delivery.id, ok=True)
    for delivery_id in jobs.send_results(sessions, v1.id, [other]):  # before v2: allowed
        assert _finish(sessions, delivery_id, ok=True) is DeliveryState.DELIVERED
    assert _job(sessions, v1.id).state is JobState.DELIVERED  # all out: nothing for v2 to cancel

    v2_id = study.receive(1)
    study.run(v2_id)
    with pytest.raises(jobs.InvalidTransitionError, match=f"job {v2_id} replaced them with version 2"):
        jobs.send_results(sessions, v1.id, ["THIRD@127.0.0.1:4243"])
    assert {dest for _, dest in _deliveries(sessions, v1.id)} == {PACS, ARCHIVE, other}
    assert len(jobs.send_results(sessions, v2_id, ["THIRD@127.0.0.1:4243"])) == 2
