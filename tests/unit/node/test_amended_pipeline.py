"""The pipeline in-process on a real CT (no peers): a late slice makes version 2, whose SR names
v1's SR, whose SEG and SR say "v2", and whose IOCM rejection note goes only to the destination that
opted in and received v1. Every v2 object is read back from the store and passes dciodvfy."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import select

from dicom_io.validation import run_dciodvfy
from node import jobs, pipeline
from node.config import Settings, load_settings
from node.context import NodeContext
from storage.db import upgrade
from storage.models import Delivery, DeliveryState, Job, JobState, Result, utcnow
from tests.received import receive_and_complete
from tests.shared_data import SHARED_DICOM

CT3 = SHARED_DICOM / "ct" / "dcmqi_ct3slice"
PACS = "PACS@127.0.0.1:104"
ARCHIVE = "ARCHIVE@127.0.0.1:105"
OTHER = "OTHER@127.0.0.1:106"

pytestmark = pytest.mark.skipif(not CT3.is_dir(), reason=f"sample series {CT3} is missing")


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[NodeContext]:
    settings: Settings = load_settings(
        data_dir=tmp_path / "var", quiet_period_s=1,
        destinations={
            "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104, "rejection_notes": True},
            "other": {"ae_title": "OTHER", "host": "127.0.0.1", "port": 106, "rejection_notes": True},
            "archive": "ARCHIVE@127.0.0.1:105",
        },
        rules=[{"name": "ct", "match": {"modality": "CT"}, "tasks": ["ct_analysis"],
                "destinations": ["pacs", "archive", "other"]}],
    )
    context = NodeContext.create(settings)
    upgrade(context.engine)
    yield context
    context.close()


def _results(ctx: NodeContext, job_id: int) -> dict[str, tuple[Result, dict[str, DeliveryState]]]:
    with ctx.sessions() as session:
        rows = session.scalars(select(Result).where(Result.job_pk == job_id)).all()
        return {r.kind: (r, {d.destination: d.state for d in r.deliveries}) for r in rows}


def _read(ctx: NodeContext, result: Result) -> bytes:
    return ctx.store.absolute(result.path).read_bytes()


def test_a_late_slice_makes_an_amendment(ctx: NodeContext, tmp_path: Path) -> None:
    files = sorted(CT3.glob("*.dcm"))
    t0 = utcnow() - timedelta(hours=1)
    v1_id = receive_and_complete(ctx, (f.read_bytes() for f in files[:2]), t0)
    v1_deliveries = pipeline.run_job(ctx, v1_id)
    assert len(v1_deliveries) == 6
    with ctx.sessions() as session:  # v1 reached the PACS; the archive and OTHER are down
        targets = {d.id: d.destination for d in session.scalars(select(Delivery))}
    for delivery_id in v1_deliveries:
        ok = targets[delivery_id] == PACS
        jobs.finish_delivery(ctx.sessions, delivery_id, ok=ok, error=None if ok else "down",
                             give_up_after_s=3600, next_attempt_at=None if ok else utcnow())
    v1 = _results(ctx, v1_id)
    assert set(v1) == {"seg", "sr"}  # a first version writes no rejection note
    v1_sr = pydicom.dcmread(BytesIO(_read(ctx, v1["sr"][0])))
    assert v1_sr.SeriesDescription == "mednode measurements"
    assert "PredecessorDocumentsSequence" not in v1_sr

    v2_id = receive_and_complete(ctx, (f.read_bytes() for f in files[2:]), t0 + timedelta(minutes=1))
    v2_deliveries = pipeline.run_job(ctx, v2_id)
    v2 = _results(ctx, v2_id)
    assert set(v2) == {"seg", "sr", "rejection"}
    assert len(v2_deliveries) == 7  # SEG and SR to three destinations, the note to the PACS only
    # the note goes where v1 went and the destination opted in: PACS (OTHER opted in but holds nothing)
    assert v2["rejection"][1] == {PACS: DeliveryState.PENDING}

    sr_bytes, seg_bytes, note_bytes = (_read(ctx, v2[k][0]) for k in ("sr", "seg", "rejection"))
    for name, data in (("sr", sr_bytes), ("seg", seg_bytes), ("rejection", note_bytes)):
        path = tmp_path / f"v2-{name}.dcm"
        path.write_bytes(data)
        report = run_dciodvfy(path)
        assert report.errors == [], f"{name}: {report.errors}"

    sr = hd.sr.srread(BytesIO(sr_bytes))
    assert sr.SeriesDescription == "mednode measurements v2"
    [study] = sr.PredecessorDocumentsSequence
    [series] = study.ReferencedSeriesSequence
    [sop] = series.ReferencedSOPSequence
    assert (study.StudyInstanceUID, series.SeriesInstanceUID, sop.ReferencedSOPInstanceUID) == (
        v1_sr.StudyInstanceUID, v1_sr.SeriesInstanceUID, v1_sr.SOPInstanceUID)
    assert hd.seg.segread(BytesIO(seg_bytes)).SeriesDescription == "mednode CT structures v2"
    assert len(hd.seg.segread(BytesIO(seg_bytes)).PerFrameFunctionalGroupsSequence) >= 3  # all 3 slices

    note = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(BytesIO(note_bytes)))
    assert note.ConceptNameCodeSequence[0].CodeValue == "113001"
    referenced = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                  for item in note.ContentSequence if item.ValueType in ("IMAGE", "COMPOSITE")}
    assert referenced == {v1["seg"][0].sop_instance_uid, v1["sr"][0].sop_instance_uid}
    assert v2["rejection"][0].summary == {
        "rejects": sorted(referenced), "superseded_version": 1, "reason": "Rejected for Quality Reasons"}

    # v1's deliveries that had not gone out are cancelled, and v1 is superseded
    after = _results(ctx, v1_id)
    for kind in ("seg", "sr"):
        assert after[kind][1] == {PACS: DeliveryState.DELIVERED, ARCHIVE: DeliveryState.CANCELLED,
                                  OTHER: DeliveryState.CANCELLED}
    with ctx.sessions() as session:
        assert session.get(Job, v1_id).state is JobState.SUPERSEDED  # type: ignore[union-attr]
