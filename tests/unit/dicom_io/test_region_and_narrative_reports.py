from __future__ import annotations

from io import BytesIO

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_io.narrative_report import build_narrative_report
from dicom_io.regions import ImageLabel, ImageRegion, build_region_report
from dicom_io.uids import derived_uid
from dicom_io.volume import read_dataset

from .conftest import requires_shared, sample, to_bytes

pytestmark = requires_shared

SERIES = derived_uid("vlm-job", "sr-series")
SOP = derived_uid("vlm-job", "sr")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")


def header(relative: str) -> Dataset:
    return read_dataset(sample(relative), stop_before_pixels=True)


def region_report(sources, regions, labels, algorithm, language="en"):
    return build_region_report(
        sources,
        regions,
        labels,
        series_instance_uid=SERIES,
        sop_instance_uid=SOP,
        series_number=77,
        algorithm=algorithm,
        language=language,
    )


@pytest.mark.parametrize("relative", ["xr/highdicom_dx_thorax.dcm", "xr/RG1_J2KI_chest_PA.dcm"])
def test_region_report_on_non_square_radiograph(relative, algorithm, validate) -> None:
    source = header(relative)
    rows, columns = int(source.Rows), int(source.Columns)
    assert rows != columns
    # one box touching the bottom-right corner: x runs over columns, y over rows
    corner = (columns - 40.0, rows - 30.0, float(columns), float(rows))
    regions = [
        ImageRegion(
            source.SOPInstanceUID,
            None,
            (10.5, 20.0, 60.0, 90.25),
            "nodule",
            "right lung",
            0.87,
            "Small nodule.",
        ),
        ImageRegion(source.SOPInstanceUID, None, corner, "pleural effusion", None, None, None),
    ]
    labels = [
        ImageLabel("pneumothorax", "absent", 0.05),
        ImageLabel("cardiomegaly", "uncertain", None),
    ]
    data = to_bytes(region_report([source], regions, labels, algorithm))
    validate(data)
    sr = hd.sr.srread(BytesIO(data))

    assert isinstance(sr, hd.sr.ComprehensiveSR)
    assert (sr.SOPInstanceUID, sr.SeriesInstanceUID, sr.SeriesNumber) == (SOP, SERIES, 77)
    assert sr.StudyInstanceUID == source.StudyInstanceUID and sr.PatientID == source.PatientID
    assert sr.VerificationFlag == "UNVERIFIED"
    report = sr.content
    groups = report.get_planar_roi_measurement_groups()
    assert len(groups) == 2
    first, second = groups
    assert first.reference_type == hd.sr.CodedConcept("111030", "DCM", "Image Region")
    assert first.roi.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
    np.testing.assert_allclose(
        first.roi.value, [[10.5, 20.0], [60.0, 20.0], [60.0, 90.25], [10.5, 90.25], [10.5, 20.0]]
    )
    assert (
        first.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        == source.SOPInstanceUID
    )
    assert first.finding_type == hd.sr.CodedConcept("27925004", "SCT", "Nodule")
    assert [site.value for site in first.finding_sites] == [
        hd.sr.CodedConcept("3341006", "SCT", "Right lung")
    ]
    assert first.get_measurements(name=PROBABILITY)[0].value == pytest.approx(0.87)
    comments = first[0].ContentSequence.find(COMMENT)
    assert [c.value for c in comments] == ["Small nodule."]
    np.testing.assert_allclose(second.roi.value[2], [columns, rows])
    assert second.finding_type == hd.sr.CodedConcept("60046008", "SCT", "Pleural effusion")
    assert second.finding_sites == [] and second.get_measurements() == []
    assert first.tracking_uid == derived_uid(SOP, "region", "1")

    label_groups = report.get_image_measurement_groups()
    evaluations = [g.get_qualitative_evaluations()[0] for g in label_groups]
    assert [(e.name.meaning, e.value.meaning) for e in evaluations] == [
        ("Pneumothorax", "Absent"),
        ("Cardiomegaly", "Uncertain"),
    ]
    assert label_groups[0].get_measurements(name=PROBABILITY)[0].value == pytest.approx(0.05)
    assert label_groups[1].get_measurements() == []


def test_region_report_rejects_bad_boxes(algorithm) -> None:
    source = header("xr/highdicom_dx_thorax.dcm")  # 169 rows x 211 columns
    uid = source.SOPInstanceUID
    with pytest.raises(ValueError, match="clip boxes"):
        region_report(
            [source],
            [ImageRegion(uid, None, (0, 0, 212, 10), "nodule", None, None, None)],
            [],
            algorithm,
        )
    with pytest.raises(ValueError, match="clip boxes"):
        region_report(
            [source],
            [ImageRegion(uid, None, (0, 0, 10, 170), "nodule", None, None, None)],
            [],
            algorithm,
        )
    with pytest.raises(ValueError, match="clip boxes"):
        region_report(
            [source],
            [ImageRegion(uid, None, (5, 5, 5, 10), "nodule", None, None, None)],
            [],
            algorithm,
        )
    with pytest.raises(ValueError, match="not among the sources"):
        region_report(
            [source],
            [ImageRegion("1.2.3", None, (0, 0, 5, 5), "nodule", None, None, None)],
            [],
            algorithm,
        )
    with pytest.raises(ValueError, match="probability"):
        region_report([source], [], [ImageLabel("pneumothorax", "present", 1.5)], algorithm)
    with pytest.raises(ValueError, match="single-frame"):
        region_report(
            [source], [ImageRegion(uid, 2, (0, 0, 5, 5), "nodule", None, None, None)], [], algorithm
        )
    with pytest.raises(ValueError, match="at least one region or label"):
        region_report([source], [], [], algorithm)


def test_region_on_multiframe_references_frame(algorithm, validate) -> None:
    source = header("multiframe/emri_small.dcm")
    region = ImageRegion(source.SOPInstanceUID, 3, (4, 5, 30, 40), "lesion", "brain", 0.5, None)
    data = to_bytes(region_report([source], [region], [], algorithm))
    validate(data)
    group = hd.sr.srread(BytesIO(data)).content.get_planar_roi_measurement_groups()[0]
    assert group.roi.ContentSequence[0].ReferencedSOPSequence[0].ReferencedFrameNumber == 3
    with pytest.raises(ValueError, match="frame_number"):
        region_report(
            [source],
            [ImageRegion(source.SOPInstanceUID, None, (4, 5, 30, 40), "lesion", None, None, None)],
            [],
            algorithm,
        )


def test_region_report_unknown_terms_use_private_scheme(algorithm, validate) -> None:
    source = header("ct/highdicom_ct_image.dcm")
    region = ImageRegion(
        source.SOPInstanceUID,
        None,
        (1, 2, 30, 40),
        "ground-glass opacity with halo sign",
        None,
        None,
        "文本",
    )
    data = to_bytes(region_report([source], [region], [], algorithm, language="zh"))
    validate(data)
    sr = hd.sr.srread(BytesIO(data))
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    designators = [item.CodingSchemeDesignator for item in sr.CodingSchemeIdentificationSequence]
    assert "99MEDNODE" in designators
    group = sr.content.get_planar_roi_measurement_groups()[0]
    assert group.finding_type.scheme_designator == "99MEDNODE"
    assert group.finding_type.meaning == "ground-glass opacity with halo sign"
    assert group[0].ContentSequence.find(COMMENT)[0].value == "文本"
    language = sr.ContentSequence[0]
    assert language.ConceptNameCodeSequence[0].CodeValue == "121049"
    assert language.ConceptCodeSequence[0].CodeValue == "zh"


def narrative(sources, algorithm, **kwargs):
    return build_narrative_report(
        sources,
        series_instance_uid=SERIES,
        sop_instance_uid=SOP,
        series_number=78,
        algorithm=algorithm,
        **kwargs,
    )


def _tree(sr) -> dict[str, list]:
    """Map each root child's concept meaning to its item(s)."""
    out: dict[str, list] = {}
    for item in sr.ContentSequence:
        out.setdefault(item.ConceptNameCodeSequence[0].CodeMeaning, []).append(item)
    return out


def test_narrative_report_english(algorithm, validate) -> None:
    source = header("xr/highdicom_dx_thorax.dcm")
    data = to_bytes(
        narrative(
            [source],
            algorithm,
            findings="Clear lungs. No effusion.",
            impression="Normal chest.",
            language="en",
            questions_answers=[("Is there a pneumothorax?", "No.")],
        )
    )
    validate(data)
    sr = hd.sr.srread(BytesIO(data))
    assert sr.ConceptNameCodeSequence[0].CodeValue == "18748-4"
    assert sr.VerificationFlag == "UNVERIFIED" and sr.StudyInstanceUID == source.StudyInstanceUID
    tree = _tree(sr)
    (findings,) = tree["Findings"]
    assert findings.ConceptNameCodeSequence[0].CodeValue == "59776-5"
    assert findings.ContentSequence[0].ConceptNameCodeSequence[0].CodeValue == "121071"
    assert findings.ContentSequence[0].TextValue == "Clear lungs. No effusion."
    (impressions,) = tree["Impressions"]
    assert impressions.ConceptNameCodeSequence[0].CodeValue == "19005-8"
    assert impressions.ContentSequence[0].TextValue == "Normal chest."
    (qa,) = tree["Questions and answers"]
    pair = qa.ContentSequence[0].ContentSequence
    assert [i.TextValue for i in pair] == ["Is there a pneumothorax?", "No."]
    assert "99MEDNODE" in [i.CodingSchemeDesignator for i in sr.CodingSchemeIdentificationSequence]
    assert sr.ContributingEquipmentSequence[-1].DeviceUID == algorithm.device_uid
    assert tree["Device Observer UID"][0].UID == algorithm.device_uid


def test_narrative_report_chinese_is_utf8(algorithm, validate) -> None:
    # a Japanese (ISO 2022) source: the output is re-encoded in UTF-8 as a whole
    source = header("charset/chrH31_japanese.dcm")
    data = to_bytes(
        narrative(
            [source],
            algorithm,
            findings="双肺纹理清晰，未见明显实变。",
            impression=None,
            language="zh-CN",
            questions_answers=[("有气胸吗？", "没有。")],
        )
    )
    validate(data)
    sr = hd.sr.srread(BytesIO(data))
    assert sr.SpecificCharacterSet == "ISO_IR 192"
    assert str(sr.PatientName) == str(source.PatientName)
    tree = _tree(sr)
    assert "Impressions" not in tree
    assert tree["Findings"][0].ContentSequence[0].TextValue == "双肺纹理清晰，未见明显实变。"
    language = tree["Language of Content Item and Descendants"][0]
    assert language.ConceptCodeSequence[0].CodeValue == "zh-CN"


def test_narrative_report_rejects_bad_input(algorithm) -> None:
    source = header("xr/highdicom_dx_thorax.dcm")
    with pytest.raises(ValueError, match="findings"):
        narrative([source], algorithm, findings="  ", impression=None, language="en")
    with pytest.raises(ValueError, match="RFC 5646"):
        narrative([source], algorithm, findings="x", impression=None, language="english!")
    with pytest.raises(ValueError, match="question"):
        narrative(
            [source],
            algorithm,
            findings="x",
            impression=None,
            language="en",
            questions_answers=[("", "a")],
        )
