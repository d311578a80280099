"""Disk pressure and retention.

* Above the free-space watermark (``MEDNODE_MIN_FREE_DISK_MB``) every C-STORE is answered 0xA700
  and no file at all is written; the node keeps answering C-ECHO; restarted with a normal
  watermark it takes the same instances.
* The retention cleaner (:mod:`node.retention`) removes old source instances and results only
  once every job of their study is finished; a study whose delivery is still pending keeps
  everything, however old.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from node.ingest import Ingestor
from node.retention import purge_expired
from storage.db import make_engine, make_session_factory, upgrade
from storage.models import (
    Delivery,
    DeliveryState,
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
from tests.peers import LOOPBACK, StoreSCP, echoscu, free_port, storescu
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series
from tests.reliability.conftest import NodeRunFactory, poll

pytestmark = pytest.mark.integration

SMALL = PhantomGeometry(rows=80, columns=80, pixel_spacing_mm=(4.0, 4.0), slice_spacing_mm=10.0, num_slices=18)


# -- disk pressure --------------------------------------------------------------------------------
def test_above_watermark_refuses_with_a700_writes_nothing_and_recovers(
    node_run: NodeRunFactory, tmp_path: Path, dcmtk
) -> None:  # type: ignore[no-untyped-def]
    files = write_series(make_ct_phantom(geometry=SMALL), tmp_path / "ct")
    node = node_run(quiet_period_s=1.0, extra_env={"MEDNODE_MIN_FREE_DISK_MB": str(10**9)})
    node.start_serve()

    sent = storescu(LOOPBACK, node.dicom_port, files, called=node.ae_title, extra=["--no-halt"])
    refused = [s for s in sent.statuses if s.status == "Refused: OutOfResources"]
    assert len(refused) == len(files), sent.describe()  # each one refused, association kept
    written = [p for p in node.store_root.rglob("*") if p.is_file()] if node.store_root.exists() else []
    assert written == [], written[:3]  # no instance file, no partial, nothing
    assert node.instance_count() == 0
    assert echoscu(LOOPBACK, node.dicom_port, called=node.ae_title).returncode == 0
    assert "storage full" in node.serve.log_text() or "watermark" in node.serve.log_text()

    # space returns (here: the watermark is lowered again) and the node is restarted
    node.serve.stop()
    node.start_serve(extra_env={"MEDNODE_MIN_FREE_DISK_MB": "1"})
    again = storescu(LOOPBACK, node.dicom_port, files, called=node.ae_title)
    assert again.all_ok, again.describe()
    assert node.instance_count() == len(files)
    poll(lambda: [j.state for j in node.jobs()] == [JobState.SUCCEEDED], 120, 0.3, "the job succeeded",
         on_timeout=lambda: node.serve.log_tail())
    print(f"\nRELIABILITY disk-pressure: sent={len(files)} refused_0xA700={len(refused)} files_written=0 "
          f"after_recovery_acknowledged={len(again.statuses)}")


# -- retention: the cleaner alone, on an index with studies in every situation ------------------------
@pytest.fixture
def index(tmp_path: Path):  # type: ignore[no-untyped-def]
    engine = make_engine(f"sqlite:///{tmp_path / 'mednode.db'}")
    upgrade(engine)
    yield make_session_factory(engine), InstanceStore(tmp_path / "store")
    engine.dispose()


def _study(ingestor: Ingestor, tmp_path: Path, name: str) -> str:
    datasets = make_ct_phantom(geometry=SMALL, patient_id=f"RET-{name}")
    for path in write_series(datasets, tmp_path / name):
        ingestor.ingest(path.read_bytes(), calling_ae_title="PACS", called_ae_title="MEDNODE")
    return str(datasets[0].StudyInstanceUID)


def _job(sessions, store: InstanceStore, study_uid: str, state: JobState,
         delivery: DeliveryState | None) -> None:  # type: ignore[no-untyped-def]
    with sessions() as session, session.begin():
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        study.state, study.version = StudyState.ROUTED, 1
        job = Job(study_pk=study.id, study_version=1, rule_name="ct-analysis", tasks=["ct_analysis"],
                  series_uids=[], destinations=["PACS@127.0.0.1:1"], state=state)
        session.add(job)
        session.flush()
        sop = f"2.25.{abs(hash(study_uid)) % 10**30}"
        written = store.write(store.result_path(job.id, sop), b"result bytes")
        result = Result(job_pk=job.id, kind="sr", sop_class_uid="1.2.840.10008.5.1.4.1.1.88.34",
                        sop_instance_uid=sop, series_instance_uid=sop + ".1", path=written.relative_path,
                        size_bytes=written.size_bytes)
        session.add(result)
        session.flush()
        if delivery is not None:
            session.add(Delivery(result_pk=result.id, destination="PACS@127.0.0.1:1", state=delivery))


def _stored(sessions, store: InstanceStore, study_uid: str) -> tuple[int, int, int]:  # type: ignore[no-untyped-def]
    """(instance rows, result rows, files on disk) of one study."""
    with sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()
        instances = list(session.scalars(select(Instance.path).join(Series).where(Series.study_pk == study.id)))
        results = list(session.scalars(select(Result.path).join(Job).where(Job.study_pk == study.id)))
    files = list((store.root / "instances" / study_uid).rglob("*.dcm")) if (store.root / "instances" / study_uid).exists() else []
    files += [store.absolute(p) for p in results if store.absolute(p).exists()]
    return len(instances), len(results), len(files)


def test_retention_removes_only_studies_whose_jobs_are_finished(index, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sessions, store = index
    ingestor = Ingestor(store, sessions)
    n = SMALL.num_slices
    delivered = _study(ingestor, tmp_path, "delivered")
    failed = _study(ingestor, tmp_path, "failed")
    pending = _study(ingestor, tmp_path, "pending")
    running = _study(ingestor, tmp_path, "running")
    no_rule = _study(ingestor, tmp_path, "norule")
    receiving = _study(ingestor, tmp_path, "receiving")
    _job(sessions, store, delivered, JobState.DELIVERED, DeliveryState.DELIVERED)
    _job(sessions, store, failed, JobState.FAILED, DeliveryState.FAILED)
    _job(sessions, store, pending, JobState.DELIVERING, DeliveryState.PENDING)
    _job(sessions, store, running, JobState.RUNNING, None)
    with sessions() as session, session.begin():
        session.scalars(select(Study).where(Study.study_instance_uid == no_rule)).one().state = StudyState.NO_RULE

    # young data is never touched, whatever its state
    assert purge_expired(sessions, store, max_age=timedelta(days=1)).studies == 0
    assert _stored(sessions, store, delivered) == (n, 1, n + 1)

    report = purge_expired(sessions, store, max_age=timedelta(days=1), now=utcnow() + timedelta(days=2))

    assert (report.studies, report.instances, report.results) == (3, 3 * n, 2)
    for gone in (delivered, failed, no_rule):
        assert _stored(sessions, store, gone) == (0, 0, 0), gone
    assert _stored(sessions, store, pending) == (n, 1, n + 1)
    assert _stored(sessions, store, running) == (n, 1, n + 1)
    assert _stored(sessions, store, receiving) == (n, 0, n)
    with sessions() as session:
        # the record stays: studies and jobs, no orphan series or deliveries
        assert session.scalar(select(func.count(Study.id))) == 6
        assert session.scalar(select(func.count(Job.id))) == 4
        assert session.scalar(select(func.count(Series.id))) == 3
        assert session.scalar(select(func.count(Delivery.id))) == 1
    # a second round finds nothing more
    assert purge_expired(sessions, store, max_age=timedelta(days=1), now=utcnow() + timedelta(days=2)).studies == 0


# -- retention in the running node: nothing goes while a delivery is pending -------------------------
def test_retention_in_the_node_waits_for_delivery(node_run: NodeRunFactory, tmp_path: Path, dcmtk) -> None:  # type: ignore[no-untyped-def]
    files = write_series(make_ct_phantom(geometry=SMALL), tmp_path / "ct")
    port = free_port()
    max_age_s = 2.0
    node = node_run(destination=f"STORESCP@{LOOPBACK}:{port}", quiet_period_s=1.0, extra_env={
        "MEDNODE_RETENTION__MAX_AGE_DAYS": repr(max_age_s / 86400),
        "MEDNODE_RETENTION__CHECK_EVERY_S": "0.5",
        "MEDNODE_DELIVERY__RETRY_MAX_S": "1",
    })
    node.start_serve()
    sent = storescu(LOOPBACK, node.dicom_port, files, called=node.ae_title)
    assert sent.all_ok, sent.describe()

    # the destination is down: the job stays delivering, well past the retention age
    def retried() -> bool:
        deliveries = node.deliveries()
        return len(deliveries) == 2 and all(d.attempts >= 3 for d in deliveries)

    poll(retried, 120, 0.3, "three delivery attempts", on_timeout=lambda: node.serve.log_tail())
    assert [j.state for j in node.jobs()] == [JobState.DELIVERING]
    assert node.instance_count() == len(files) and len(node.instance_files()) == len(files)
    results_dir = node.store_root / "results"
    assert len([p for p in results_dir.rglob("*.dcm")]) == 2

    receiver = StoreSCP(tmp_path / "received", port=port).start()
    try:
        poll(lambda: [j.state for j in node.jobs()] == [JobState.DELIVERED], 60, 0.3, "delivered")
        poll(lambda: node.instance_count() == 0 and not node.instance_files(), 30, 0.3, "sources removed",
             on_timeout=lambda: node.serve.log_tail())
        assert [p for p in results_dir.rglob("*.dcm")] == []
        assert len(receiver.received()) == 2  # what was delivered is at the destination, not lost
        assert "retention: study" in node.serve.log_text()
        counts = json.loads(node.cli("status", "--json").stdout)
        assert counts["jobs"]["delivered"] == 1 and counts["instances"] == 0
    finally:
        receiver.stop()
