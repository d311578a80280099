"""Amended results: a v2 SR names the SR it replaces, v2 descriptions say "v2", and an IOCM
rejection note withdraws the v1 objects. Every object round-trips through bytes and dciodvfy."""

from __future__ import annotations

from io import BytesIO

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_io.equipment import AlgorithmInfo
from dicom_io.measurement_report import StructureMeasurement, build_volume_report
from dicom_io.narrative_report import build_narrative_report
from dicom_io.regions import ImageLabel, build_region_report
from dicom_io.rejection_note import REJECTED_FOR_QUALITY_REASONS, build_rejection_note
from dicom_io.seg import build_segmentation
from dicom_io.sr_common import InstanceReference, versioned_description
from dicom_io.uids import derived_uid
from dicom_io.volume import Volume

from .conftest import read_back, requires_shared, to_bytes

pytestmark = requires_shared


def _results(volume: Volume, algorithm: AlgorithmInfo, key: str, *, version: int | None = None,
             previous: tuple[InstanceReference, ...] = ()) -> tuple[hd.seg.Segmentation, hd.sr.ComprehensiveSR]:
    mask = np.zeros(volume.pixels.shape, dtype=bool)
    mask[:, 10:40, 20:50] = True
    seg = build_segmentation(
        volume, {"lungs": mask},
        series_instance_uid=derived_uid(key, "seg", "series"),
        sop_instance_uid=derived_uid(key, "seg", "instance"),
        series_number=9901, algorithm=algorithm,
        series_description=versioned_description("mednode CT structures", version),
    )
    sr = build_volume_report(
        volume, seg, [StructureMeasurement("lungs", 1, 12.5, -800.0)],
        series_instance_uid=derived_uid(key, "sr", "series"),
        sop_instance_uid=derived_uid(key, "sr", "instance"),
        series_number=9902, algorithm=algorithm, previous_versions=previous, version=version,
    )
    return seg, sr


def _reference(ds: Dataset) -> InstanceReference:
    return InstanceReference(str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID),
                             str(ds.SOPInstanceUID))


def _predecessors(ds: Dataset) -> list[tuple[str, str, str, str]]:
    return [
        (str(study.StudyInstanceUID), str(series.SeriesInstanceUID), str(sop.ReferencedSOPClassUID),
         str(sop.ReferencedSOPInstanceUID))
        for study in ds.PredecessorDocumentsSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    ]


def test_first_version_keeps_todays_descriptions_and_names_no_predecessor(ct3, algorithm, validate) -> None:
    seg, sr = _results(ct3, algorithm, "study/1/ct")
    assert seg.SeriesDescription == "mednode CT structures"
    assert sr.SeriesDescription == "mednode measurements"
    assert "PredecessorDocumentsSequence" not in read_back(to_bytes(sr))


def test_second_version_names_the_sr_it_replaces(ct3, algorithm, validate) -> None:
    _seg1, sr1 = _results(ct3, algorithm, "study/1/ct")
    seg2, sr2 = _results(ct3, algorithm, "study/2/ct", version=2, previous=(_reference(sr1),))

    sr_bytes, seg_bytes = to_bytes(sr2), to_bytes(seg2)
    validate(sr_bytes)
    validate(seg_bytes)
    back = hd.sr.srread(BytesIO(sr_bytes))
    assert _predecessors(back) == [
        (sr1.StudyInstanceUID, sr1.SeriesInstanceUID, sr1.SOPClassUID, sr1.SOPInstanceUID)
    ]
    assert back.SeriesDescription == "mednode measurements v2"
    assert hd.seg.segread(BytesIO(seg_bytes)).SeriesDescription == "mednode CT structures v2"
    # a new version is a new object, in a new series
    assert sr2.SOPInstanceUID != sr1.SOPInstanceUID and sr2.SeriesInstanceUID != sr1.SeriesInstanceUID
    # the measurements are still there, read back from the bytes
    [group] = back.content.get_volumetric_roi_measurement_groups()
    assert float(group.get_measurements()[0].value) == pytest.approx(12.5)


def test_narrative_and_region_reports_name_their_predecessors(ct3, algorithm, validate) -> None:
    sources = ct3.datasets
    old = InstanceReference(str(sources[0].StudyInstanceUID), derived_uid("old", "series"),
                            "1.2.840.10008.5.1.4.1.1.88.33", derived_uid("old", "instance"))
    narrative = build_narrative_report(
        sources, findings="No acute finding.", impression="Normal.", language="en",
        series_instance_uid=derived_uid("n2", "series"), sop_instance_uid=derived_uid("n2", "instance"),
        series_number=9910, algorithm=algorithm, previous_versions=[old], version=3,
    )
    regions = build_region_report(
        sources, [], [ImageLabel("pneumothorax", "absent", 0.1)],
        series_instance_uid=derived_uid("r2", "series"), sop_instance_uid=derived_uid("r2", "instance"),
        series_number=9930, algorithm=algorithm, previous_versions=[old], version=3,
    )
    for sr, description in ((narrative, "mednode report v3"), (regions, "mednode findings v3")):
        data = to_bytes(sr)
        validate(data)
        back = hd.sr.srread(BytesIO(data))
        assert back.SeriesDescription == description
        assert _predecessors(back) == [(old.study_instance_uid, old.series_instance_uid, old.sop_class_uid,
                                        old.sop_instance_uid)]


def test_versioned_description_fits_lo() -> None:
    assert versioned_description("mednode report", None) == "mednode report"
    assert versioned_description("mednode report", 12) == "mednode report v12"
    long = versioned_description("x" * 80, 2)
    assert len(long) == 64 and long.endswith(" v2")
    with pytest.raises(ValueError, match="starts at 1"):
        versioned_description("mednode report", 0)


def test_rejection_note_withdraws_the_superseded_objects(ct3, algorithm, validate) -> None:
    seg1, sr1 = _results(ct3, algorithm, "study/1/ct")
    # the note is built from the stored objects' headers, as the worker reads them
    stored = [pydicom.dcmread(BytesIO(to_bytes(ds)), stop_before_pixels=True) for ds in (seg1, sr1)]
    note = build_rejection_note(
        stored, series_instance_uid=derived_uid("study/2/ct", "rejection", "series"),
        sop_instance_uid=derived_uid("study/2/ct", "rejection", "instance"), series_number=9990,
        description="Superseded by version 2 of mednode's results.",
    )
    data = to_bytes(note)
    validate(data)
    back = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(BytesIO(data)))
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert back.Modality == "KO"
    assert back.StudyInstanceUID == sr1.StudyInstanceUID
    assert back.PatientID == sr1.PatientID
    title = back.ConceptNameCodeSequence[0]
    assert (title.CodeValue, title.CodingSchemeDesignator, title.CodeMeaning) == (
        REJECTED_FOR_QUALITY_REASONS.value, "DCM", "Rejected for Quality Reasons")
    assert title.CodeValue == "113001"
    # every rejected object is in the content and in the evidence
    referenced = {str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
                  for item in back.ContentSequence if item.ValueType in ("IMAGE", "COMPOSITE")}
    assert referenced == {seg1.SOPInstanceUID, sr1.SOPInstanceUID}
    evidence = {
        (str(series.SeriesInstanceUID), str(sop.ReferencedSOPInstanceUID))
        for study in back.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert evidence == {(seg1.SeriesInstanceUID, seg1.SOPInstanceUID), (sr1.SeriesInstanceUID, sr1.SOPInstanceUID)}
    for sop_uid in (seg1.SOPInstanceUID, sr1.SOPInstanceUID):
        assert back.resolve_reference(sop_uid)[0] == sr1.StudyInstanceUID


def test_rejection_note_refuses_what_iocm_does_not_allow(ct3, algorithm) -> None:
    _seg1, sr1 = _results(ct3, algorithm, "study/1/ct")
    ids = {"series_instance_uid": derived_uid("k", "s"), "sop_instance_uid": derived_uid("k", "i"),
           "series_number": 9990}
    with pytest.raises(ValueError, match="at least one"):
        build_rejection_note([], **ids)
    with pytest.raises(ValueError, match="twice"):
        build_rejection_note([sr1, sr1], **ids)
    other = read_back(to_bytes(sr1))
    other.StudyInstanceUID = derived_uid("another study")
    other.SOPInstanceUID = derived_uid("another sr")
    with pytest.raises(ValueError, match="span 2 studies"):
        build_rejection_note([sr1, other], **ids)
