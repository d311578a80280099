"""A prior report's text read from SRs (shared samples, highdicom-built ones), and the Comparison
section a report compared with a prior writes (dciodvfy-valid, prior in Pertinent Other Evidence)."""

from __future__ import annotations

import copy
from datetime import date
from io import BytesIO

import highdicom as hd
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from dicom_io.narrative_report import NO_PRIOR, Comparison, build_narrative_report
from dicom_io.sr_text import report_text

from .conftest import requires_shared, sample, to_bytes


def _prior_of(ds: Dataset, study_date: str = "20240115") -> Dataset:
    prior = copy.deepcopy(ds)
    prior.StudyInstanceUID, prior.SeriesInstanceUID, prior.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    prior.StudyDate = study_date
    return prior


@pytest.fixture
def radiograph() -> Dataset:
    return pydicom.dcmread(sample("xr/highdicom_dx_thorax.dcm"), stop_before_pixels=True)


def _build(sources: list[Dataset], algorithm, comparison: Comparison | None, **extra) -> hd.sr.ComprehensiveSR:
    return build_narrative_report(sources, findings="Heart size normal.", impression="No change.",
                                  language="en", series_instance_uid="2.25.1", sop_instance_uid="2.25.2",
                                  series_number=9910, algorithm=algorithm, comparison=comparison, **extra)


@requires_shared
def test_text_of_shared_srs() -> None:
    dcmtk = report_text(pydicom.dcmread(sample("sr/dcmtk_test_SR.dcm")))
    assert dcmtk is not None and "A mass of" in dcmtk and "Diameter: 3 cm" in dcmtk
    tid1500 = report_text(pydicom.dcmread(sample("sr/highdicom_sr_tid1500.dcm")))
    assert tid1500 is not None and "Finding: Spinal cord" in tid1500 and "Area of defined region: 1.7 cm2" in tid1500
    dcmjs = report_text(pydicom.dcmread(sample("sr/dcmjs_sr_tid1500.dcm")))
    assert dcmjs is not None and "Long Axis: 93.9 mm" in dcmjs
    # observation context (observer, language, procedure) is not report text
    assert "Language" not in (tid1500 or "") and "Person Observer" not in (tid1500 or "")
    assert report_text(pydicom.dcmread(sample("xr/highdicom_dx_thorax.dcm"), stop_before_pixels=True)) is None


@requires_shared
def test_text_of_a_highdicom_built_report_by_section(radiograph: Dataset, algorithm) -> None:
    sr = pydicom.dcmread(BytesIO(to_bytes(_build([radiograph], algorithm, None))))
    assert report_text(sr) == "Findings:\nHeart size normal.\nImpressions:\nNo change."
    cut = report_text(sr, max_chars=30)
    assert cut is not None and cut.endswith(" …") and len(cut) <= 32


@requires_shared
def test_comparison_names_the_prior_and_references_it(radiograph: Dataset, algorithm, validate) -> None:
    prior = _prior_of(radiograph)
    sr = _build([radiograph], algorithm, Comparison((prior,), date(2024, 1, 15)))
    validate(to_bytes(sr))
    back = hd.sr.srread(BytesIO(to_bytes(sr)))
    section = next(i for i in back.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "18834-2")
    assert section.ConceptNameCodeSequence[0].CodingSchemeDesignator == "LN"
    assert section.ContentSequence[0].TextValue == "Compared with the prior study of 2024-01-15 (DX)."
    image = section.ContentSequence[1]
    assert (image.ValueType, image.ConceptNameCodeSequence[0].CodeValue) == ("IMAGE", "121079")
    assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == prior.SOPInstanceUID
    assert [e.StudyInstanceUID for e in back.PertinentOtherEvidenceSequence] == [prior.StudyInstanceUID]
    assert [e.StudyInstanceUID for e in back.CurrentRequestedProcedureEvidenceSequence] == \
        [radiograph.StudyInstanceUID]
    assert back.StudyInstanceUID == radiograph.StudyInstanceUID
    assert "Comparison:\nCompared with the prior study of 2024-01-15 (DX)." in (report_text(back) or "")


@requires_shared
def test_no_prior_is_said_and_no_comparison_no_section(radiograph: Dataset, algorithm, validate) -> None:
    none = _build([radiograph], algorithm, Comparison())
    validate(to_bytes(none))
    assert "Comparison:\n" + NO_PRIOR in (report_text(none) or "")
    assert "PertinentOtherEvidenceSequence" not in none
    down = _build([radiograph], algorithm, Comparison(reason="the PACS PACS did not answer"))
    assert "No prior study available (the PACS PACS did not answer)." in (report_text(down) or "")
    plain = _build([radiograph], algorithm, None)
    assert "Comparison" not in (report_text(plain) or "")


@requires_shared
def test_prior_must_be_another_single_study(radiograph: Dataset, algorithm) -> None:
    with pytest.raises(ValueError, match="one study other than"):
        _build([radiograph], algorithm, Comparison((radiograph,), date(2024, 1, 15)))
    with pytest.raises(ValueError, match="one study other than"):
        _build([radiograph], algorithm, Comparison((_prior_of(radiograph), _prior_of(radiograph)), None))
