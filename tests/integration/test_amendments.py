"""Late images amend delivered results, with real peers: dcmtk storescu sends 2 slices of a CT,
mednode delivers v1 to Orthanc, then the 3rd slice arrives. Orthanc ends with v1 and v2; the v2 SR
names v1's SR in its Predecessor Documents; an IOCM rejection note (KOS) withdraws v1's objects;
v1's deliveries to an unreachable destination end cancelled, never sent."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import yaml
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import make_engine, make_session_factory
from storage.models import Delivery, DeliveryState, Job, JobState
from tests.integration.conftest import MednodeFactory
from tests.integration.e2e import SEG_CLASS, SR_CLASSES, assert_valid, poll
from tests.peers import LOOPBACK, free_port, storescu

KO_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"


def _sessions(data_dir: Path) -> sessionmaker[Session]:
    return make_session_factory(make_engine(f"sqlite:///{data_dir / 'var' / 'mednode.db'}"))


def _by_class(orthanc, study_uid: str) -> dict[str, list[dict]]:  # type: ignore[no-untyped-def]
    found: dict[str, list[dict]] = {"seg": [], "sr": [], "ko": []}
    for row in orthanc.study_instances(study_uid):
        sop_class = row.get("SOPClassUID")
        if sop_class == SEG_CLASS:
            found["seg"].append(row)
        elif sop_class in SR_CLASSES:
            found["sr"].append(row)
        elif sop_class == KO_CLASS:
            found["ko"].append(row)
    return found


def test_late_slice_amends_delivered_results(tmp_path, orthanc_factory, mednode_factory: MednodeFactory,
                                             shared_dicom) -> None:
    files = sorted((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm"))
    assert len(files) == 3
    orthanc = orthanc_factory()
    dead = f"DEAD@{LOOPBACK}:{free_port()}"  # nothing listens there: its deliveries stay pending
    config = tmp_path / "mednode.yaml"
    config.write_text(yaml.safe_dump({
        "destination": {"ae_title": "ORTHANC", "host": LOOPBACK, "port": orthanc.dicom_port,
                        "rejection_notes": True},
        "destinations": {"dead": dead},
        "rules": [{"name": "ct", "match": {"modality": "CT"}, "tasks": ["ct_analysis"],
                   "destinations": ["default", "dead"]}],
    }))
    node = mednode_factory(config=config)
    sessions = _sessions(node.data_dir)
    pacs = f"ORTHANC@{LOOPBACK}:{orthanc.dicom_port}"
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)

    # v1: two slices, complete, delivered to Orthanc (the dead destination keeps retrying)
    sent = storescu(LOOPBACK, node.dicom_port, files[:2], called=node.ae_title)
    assert sent.all_ok, sent.describe()

    def v1_delivered() -> list[Delivery] | None:
        with sessions() as session:
            rows = list(session.scalars(select(Delivery).where(Delivery.destination == pacs)))
        return rows if len(rows) == 2 and all(d.state is DeliveryState.DELIVERED for d in rows) else None

    poll(v1_delivered, 180, 0.5, "v1 delivered to Orthanc")
    v1 = _by_class(orthanc, study_uid)
    assert (len(v1["seg"]), len(v1["sr"]), len(v1["ko"])) == (1, 1, 0)
    v1_sr = pydicom.dcmread(BytesIO(orthanc.instance_file(v1["sr"][0]["ID"])))
    v1_seg_uid = v1["seg"][0]["SOPInstanceUID"]
    assert v1_sr.SeriesDescription == "mednode measurements"

    # v2: the third slice arrives late
    sent = storescu(LOOPBACK, node.dicom_port, files[2:], called=node.ae_title)
    assert sent.all_ok, sent.describe()
    def v2_arrived() -> dict[str, list[dict]] | None:
        found = _by_class(orthanc, study_uid)
        return found if (len(found["seg"]), len(found["sr"]), len(found["ko"])) == (2, 2, 1) else None

    both = orthanc.wait_for(v2_arrived, timeout_s=180, interval_s=0.5,
                            what="v2 SEG, SR and rejection note in Orthanc")

    # the PACS holds v1 and v2; v2 names v1's SR and says it is v2
    v2_sr_row = next(r for r in both["sr"] if r["SOPInstanceUID"] != v1_sr.SOPInstanceUID)
    v2_seg_row = next(r for r in both["seg"] if r["SOPInstanceUID"] != v1_seg_uid)
    sr_bytes = orthanc.instance_file(v2_sr_row["ID"])
    seg_bytes = orthanc.instance_file(v2_seg_row["ID"])
    note_bytes = orthanc.instance_file(both["ko"][0]["ID"])
    for name, data in (("v2-sr", sr_bytes), ("v2-seg", seg_bytes), ("rejection-note", note_bytes)):
        assert_valid(tmp_path, name, data)
    v2_sr = hd.sr.srread(BytesIO(sr_bytes))
    assert v2_sr.SeriesDescription == "mednode measurements v2"
    predecessors = [
        (study.StudyInstanceUID, series.SeriesInstanceUID, sop.ReferencedSOPInstanceUID)
        for study in v2_sr.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]
    assert predecessors == [(study_uid, v1_sr.SeriesInstanceUID, v1_sr.SOPInstanceUID)]
    v2_seg = hd.seg.segread(BytesIO(seg_bytes))
    assert v2_seg.SeriesDescription == "mednode CT structures v2"
    assert v2_seg.SeriesInstanceUID != v1["seg"][0]["SeriesInstanceUID"]

    # the rejection note withdraws exactly v1's SEG and SR
    note = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(BytesIO(note_bytes)))
    title = note.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator) == ("113001", "DCM")
    referenced = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                  for item in note.ContentSequence if item.ValueType in ("IMAGE", "COMPOSITE")}
    assert referenced == {v1_seg_uid, v1_sr.SOPInstanceUID}
    assert note.StudyInstanceUID == study_uid

    # v1's deliveries to the unreachable destination were cancelled, v1 is superseded
    def settled() -> tuple[list[Job], list[Delivery]] | None:
        with sessions() as session:
            all_jobs = list(session.scalars(select(Job).order_by(Job.id)))
            deliveries = list(session.scalars(select(Delivery).order_by(Delivery.id)))
            for d in deliveries:
                _ = d.result.job_pk
        return (all_jobs, deliveries) if len(all_jobs) == 2 and all_jobs[0].state is JobState.SUPERSEDED else None

    all_jobs, deliveries = poll(settled, 30, 0.5, "v1 superseded")
    v1_job, v2_job = all_jobs
    assert (v1_job.study_version, v2_job.study_version) == (1, 2)
    v1_dead = [d for d in deliveries if d.result.job_pk == v1_job.id and d.destination == dead]
    assert len(v1_dead) == 2
    for delivery in v1_dead:
        assert delivery.state is DeliveryState.CANCELLED
        assert delivery.last_error is not None and delivery.last_error.startswith("cancelled: version 2")
    # the note went to Orthanc only; v2's SEG and SR also to the dead destination, still retrying
    v2_targets = sorted((d.result.kind, d.destination, d.state.value) for d in deliveries
                        if d.result.job_pk == v2_job.id)
    assert v2_targets == sorted([
        ("rejection", pacs, "delivered"), ("seg", pacs, "delivered"), ("sr", pacs, "delivered"),
        ("seg", dead, "pending"), ("sr", dead, "pending"),
    ])
    assert "cancelled" in node.status()["deliveries"] and node.status()["deliveries"]["cancelled"] == 2
