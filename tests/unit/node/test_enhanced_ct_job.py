"""A CT analysis job on an enhanced (multi-frame) CT: the node reads it as it reads the classic
series it was converted from, and its SEG and SR reference the enhanced instance's frames."""

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
from dicom_io.volume import load_volume
from node import pipeline
from node.config import load_settings
from node.context import NodeContext
from storage.db import upgrade
from storage.models import Job, JobState, Result, utcnow
from tests.phantom import PhantomGeometry, make_ct_phantom
from tests.received import receive_and_complete

GEOMETRY = PhantomGeometry(rows=80, columns=80, pixel_spacing_mm=(4.0, 4.0), slice_spacing_mm=10.0, num_slices=18)


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[NodeContext]:
    settings = load_settings(data_dir=tmp_path / "var", quiet_period_s=1,
                             rules=[{"name": "ct", "match": {"modality": "CT"}, "tasks": ["ct_analysis"],
                                     "destinations": []}])
    context = NodeContext.create(settings)
    upgrade(context.engine)
    yield context
    context.close()


def _bytes(ds: pydicom.Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_ct_analysis_of_an_enhanced_ct_equals_that_of_its_classic_series(ctx: NodeContext, tmp_path: Path) -> None:
    classic = make_ct_phantom(geometry=GEOMETRY, noise_hu_sd=10.0, seed=5)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        classic, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1)
    job_id = receive_and_complete(ctx, [_bytes(enhanced)], utcnow() - timedelta(hours=1))

    pipeline.run_job(ctx, job_id)

    with ctx.sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.state in (JobState.SUCCEEDED, JobState.DELIVERED), job.reason if job else None
        results = {r.kind: r for r in session.scalars(select(Result).where(Result.job_pk == job_id))}
    assert set(results) == {"seg", "sr"}
    # the same structures, volumes and mean HU as the classic series gives
    expected = pipeline.ct_analysis(load_volume(classic), "classic/job")[0].summary
    assert results["seg"].summary == expected
    for kind, result in results.items():
        path = ctx.store.absolute(result.path)
        report = run_dciodvfy(path)
        assert report.errors == [], (kind, report.errors)
    seg = pydicom.dcmread(ctx.store.absolute(results["seg"].path))
    sources = {(str(s.ReferencedSOPInstanceUID), int(s.ReferencedFrameNumber))
               for item in seg.PerFrameFunctionalGroupsSequence
               for s in item.DerivationImageSequence[0].SourceImageSequence}
    assert {uid for uid, _ in sources} == {enhanced.SOPInstanceUID}
    assert {frame for _, frame in sources} <= set(range(1, GEOMETRY.num_slices + 1))
    sr = hd.sr.srread(ctx.store.absolute(results["sr"].path))
    for group in sr.content.get_volumetric_roi_measurement_groups():
        [image] = group.referenced_segment.source_images_for_segmentation
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
