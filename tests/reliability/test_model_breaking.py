"""Studies that break the model fail their job with a clear reason and do not block the queue.

* one slice, and the wrong modality (an MR series routed to the CT analyzer by a catch-all rule):
  the job fails with the analyzer's or the pipeline's reason, and the good CT study sent after
  them is processed;
* a study whose job kills its worker every time (what an out-of-memory kill of a huge image looks
  like; here the worker is SIGKILLed by PID while it runs the job): after ``job_max_attempts`` the
  job fails with that reason instead of coming back forever, and a good study sent meanwhile
  completes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pydicom
import pytest

from storage.models import Job, JobState, Study
from tests.peers import LOOPBACK, storescu
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series
from tests.reliability.conftest import NodeRun, NodeRunFactory, poll

pytestmark = pytest.mark.integration

CATCH_ALL = json.dumps([{"name": "everything", "tasks": ["ct_analysis"], "destinations": []}])
GOOD = PhantomGeometry(rows=80, columns=80, pixel_spacing_mm=(4.0, 4.0), slice_spacing_mm=10.0, num_slices=18)
BIG = PhantomGeometry(rows=256, columns=256, pixel_spacing_mm=(1.2, 1.2), slice_spacing_mm=2.0, num_slices=120)


def _job_of(node: NodeRun, study_uid: str) -> Job | None:
    with node.sessions() as session:
        from sqlalchemy import select

        return session.scalars(
            select(Job).join(Study).where(Study.study_instance_uid == study_uid).order_by(Job.id.desc())
        ).first()


def _finished(node: NodeRun, study_uid: str) -> Job | None:
    job = _job_of(node, study_uid)
    return job if job is not None and job.state in (JobState.SUCCEEDED, JobState.FAILED) else None


def test_one_slice_and_wrong_modality_fail_with_reasons_and_the_next_study_completes(
    node_run: NodeRunFactory, shared_dicom: Path, tmp_path: Path, dcmtk
) -> None:  # type: ignore[no-untyped-def]
    node = node_run(quiet_period_s=1.0, extra_env={"MEDNODE_RULES": CATCH_ALL})
    node.start_serve()
    one_slice = write_series(make_ct_phantom(geometry=GOOD, patient_id="ONE-SLICE")[9:10], tmp_path / "one")
    mr = sorted(p for p in (shared_dicom / "mr").rglob("*") if p.is_file())[:1]
    assert mr and pydicom.dcmread(mr[0], stop_before_pixels=True).Modality == "MR"
    good = write_series(make_ct_phantom(geometry=GOOD, patient_id="GOOD"), tmp_path / "good")
    uids = {}
    for name, files in (("one-slice", one_slice), ("mr", mr), ("good", good)):
        sent = storescu(LOOPBACK, node.dicom_port, files, called=node.ae_title)
        assert sent.all_ok, f"{name}: {sent.describe()}"
        uids[name] = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    jobs = {name: poll(lambda uid=uid: _finished(node, uid), 180, 0.3, f"the {name} job finished",
                       on_timeout=lambda: node.serve.log_tail())
            for name, uid in uids.items()}
    assert jobs["one-slice"].state is JobState.FAILED
    assert "at least 2 slices" in jobs["one-slice"].reason, jobs["one-slice"].reason
    assert jobs["mr"].state is JobState.FAILED
    assert "no CT series" in jobs["mr"].reason, jobs["mr"].reason
    assert jobs["good"].state is JobState.SUCCEEDED, jobs["good"].reason
    print("\nRELIABILITY model-breaking: " + "; ".join(f"{n}: {j.state.value} ({j.reason})" for n, j in jobs.items()))


def test_a_study_that_kills_its_worker_fails_after_max_attempts_and_does_not_block(
    node_run: NodeRunFactory, tmp_path: Path, dcmtk
) -> None:  # type: ignore[no-untyped-def]
    max_attempts = 2
    node = node_run(quiet_period_s=1.0, separate_worker=True, extra_env={
        "MEDNODE_RULES": CATCH_ALL, "MEDNODE_JOB_LEASE_S": "3", "MEDNODE_JOB_MAX_ATTEMPTS": str(max_attempts),
    })
    node.start_serve()
    node.start_worker()
    poison = write_series(make_ct_phantom(geometry=BIG, patient_id="POISON"), tmp_path / "poison")
    good = write_series(make_ct_phantom(geometry=GOOD, patient_id="GOOD"), tmp_path / "good")
    poison_uid = str(pydicom.dcmread(poison[0], stop_before_pixels=True).StudyInstanceUID)
    good_uid = str(pydicom.dcmread(good[0], stop_before_pixels=True).StudyInstanceUID)
    sent = storescu(LOOPBACK, node.dicom_port, poison, called=node.ae_title)
    assert sent.all_ok, sent.describe()

    kills = 0
    started = time.monotonic()
    while kills < max_attempts:
        poll(lambda attempt=kills + 1: (j := _job_of(node, poison_uid)) is not None
             and j.state is JobState.RUNNING and j.attempts == attempt, 120, 0.05, f"attempt {kills + 1} running",
             on_timeout=lambda: node.worker.log_tail() + node.serve.log_tail())
        time.sleep(0.2)
        node.kill_worker()  # what the kernel's OOM killer does to a worker that loads a huge image
        kills += 1
        if kills == 1:  # a good study arrives while the poison one keeps failing
            sent = storescu(LOOPBACK, node.dicom_port, good, called=node.ae_title)
            assert sent.all_ok, sent.describe()
        node.start_worker()

    failed = poll(lambda: _finished(node, poison_uid), 120, 0.3, "the poison job failed",
                  on_timeout=lambda: node.worker.log_tail() + node.serve.log_tail())
    assert failed.state is JobState.FAILED
    assert f"gave up after {max_attempts} attempts: the worker died" in failed.reason, failed.reason
    ok = poll(lambda: _finished(node, good_uid), 120, 0.3, "the good job finished")
    assert ok.state is JobState.SUCCEEDED, ok.reason
    print(f"\nRELIABILITY poison-study: worker_kills={kills} poison_job={failed.state.value} "
          f"({failed.reason}) good_job={ok.state.value} total_s={time.monotonic() - started:.0f}")
