"""A separate ``mednode worker`` is SIGKILLed while it runs a job.

The job's lease runs out (``MEDNODE_JOB_LEASE_S`` shortened to a few seconds), the scheduler's
sweep queues it again, a new worker runs it to the end, and the PACS (Orthanc) ends up with exactly
one copy of each result object: the SEG and SR UIDs derive from the job, so the second attempt
produces the same objects rather than new ones.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from dicom_io.uids import derived_uid
from storage.models import DeliveryState, JobState
from tests.integration.e2e import SEG_CLASS, SR_CLASSES
from tests.peers import LOOPBACK, storescu
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series
from tests.reliability.conftest import NodeRunFactory, poll

pytestmark = pytest.mark.integration

#: Big enough that the CT job runs for seconds on a busy 2-core machine.
GEOMETRY = PhantomGeometry(rows=256, columns=256, pixel_spacing_mm=(1.2, 1.2), slice_spacing_mm=2.0,
                           num_slices=120)
LEASE_S = 4.0


def test_worker_killed_mid_job_runs_again_and_delivers_one_copy(
    node_run: NodeRunFactory, orthanc_factory, tmp_path: Path, dcmtk
) -> None:  # type: ignore[no-untyped-def]
    datasets = make_ct_phantom(geometry=GEOMETRY)
    files = write_series(datasets, tmp_path / "ct")
    study_uid = str(datasets[0].StudyInstanceUID)
    orthanc = orthanc_factory()
    node = node_run(destination=f"ORTHANC@{LOOPBACK}:{orthanc.dicom_port}", quiet_period_s=1.0,
                    separate_worker=True, extra_env={"MEDNODE_JOB_LEASE_S": str(LEASE_S)})
    node.start_serve()
    first_worker = node.start_worker()

    sent = storescu(LOOPBACK, node.dicom_port, files, called=node.ae_title)
    assert sent.all_ok, sent.describe()

    def running() -> bool:
        return [j.state for j in node.jobs()] == [JobState.RUNNING]

    poll(running, 120, 0.05, "the job running", on_timeout=first_worker.log_tail)
    time.sleep(0.3)  # into loading the volume and running the analyzer
    node.kill_worker()
    [job] = node.jobs()
    assert (job.state, job.attempts) == (JobState.RUNNING, 1), "the job finished before the kill"
    assert first_worker.returncode is not None
    first_holder = job.worker
    killed_at = time.monotonic()

    second_worker = node.start_worker()

    def finished() -> bool:
        return [j.state for j in node.jobs()] in ([JobState.DELIVERED], [JobState.FAILED])

    poll(finished, 240, 0.5, "the job delivered by the second worker",
         on_timeout=lambda: second_worker.log_tail() + node.serve.log_tail())
    recovered_s = time.monotonic() - killed_at
    [job] = node.jobs()
    assert job.state is JobState.DELIVERED, job.reason
    assert job.attempts == 2
    assert job.worker and job.worker != first_holder  # another worker process ran it
    deliveries = node.deliveries()
    assert [d.state for d in deliveries] == [DeliveryState.DELIVERED] * 2
    assert "lost its worker (lease expired)" in node.serve.log_text()

    # Orthanc holds exactly one SEG and one SR in the study, with the job's reproducible UIDs
    key = f"{study_uid}/{job.study_version}/{job.rule_name}"
    rows = orthanc.study_instances(study_uid)
    segs = [r for r in rows if r.get("SOPClassUID") == SEG_CLASS]
    srs = [r for r in rows if r.get("SOPClassUID") in SR_CLASSES]
    assert len(rows) == 2 and len(segs) == 1 and len(srs) == 1, rows
    assert segs[0]["SOPInstanceUID"] == derived_uid(key, "seg", "instance")
    assert srs[0]["SOPInstanceUID"] == derived_uid(key, "sr", "instance")
    stats = orthanc.get("/statistics")
    assert stats["CountInstances"] == 2, stats
    print(
        f"\nRELIABILITY worker-kill: instances={len(files)} lease_s={LEASE_S} attempts={job.attempts} "
        f"recovered_in_s={recovered_s:.1f} deliveries={len(deliveries)} orthanc_instances={stats['CountInstances']}"
    )
