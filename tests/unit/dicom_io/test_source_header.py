"""SEG and SR from de-identified and non-conformant sources: written anyway, the bad attribute
left empty, one warning naming it (never its value), dciodvfy 0 errors, read back by highdicom."""

from __future__ import annotations

import logging
from io import BytesIO

import highdicom as hd
import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_io.measurement_report import StructureMeasurement, build_volume_report
from dicom_io.narrative_report import build_narrative_report
from dicom_io.regions import ImageRegion, build_region_report
from dicom_io.seg import build_segmentation
from dicom_io.source_header import (
    character_set_of,
    check_copied_attributes,
    conform_copied_attributes,
)
from dicom_io.uids import derived_uid
from dicom_io.volume import load_volume, read_dataset
from tests.deidentified import HASHED_BIRTH_DATE, LONG_ACCESSION, VARIANTS, variant

from .conftest import requires_shared, sample, series_datasets, to_bytes

pytestmark = requires_shared

LOGGER = "dicom_io.source_header"
#: What each variant breaks: these attributes must come out present and empty.
EMPTIED = {
    "hashed": {"PatientBirthDate", "AccessionNumber", "StudyID"},
    "missing-type2": {"AccessionNumber", "PatientBirthDate", "StudyID", "ReferringPhysicianName",
                      "PatientSex", "StudyTime"},
    "garbled": {"PatientBirthDate", "StudyDate", "StudyTime", "PatientName", "PatientAge", "StudyID"},
    "latin1": {"AccessionNumber"},
    "gb18030": {"PatientBirthDate"},
    "iso2022-ir87": {"AccessionNumber"},
}
#: Values a variant wrote that must not reach a log.
CANARIES = (HASHED_BIRTH_DATE, LONG_ACCESSION, "19801341", "2024-1-5", "Canary", "SSSSSSSSSSSSSSSSSSSS")


def ct_variant(name: str) -> list[Dataset]:
    return [variant(ds, name) for ds in series_datasets("ct/dcmqi_ct3slice")]


def dx_variant(name: str) -> Dataset:
    return variant(read_dataset(sample("xr/highdicom_dx_thorax.dcm")), name)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER and r.levelno == logging.WARNING]


def assert_emptied(result: Dataset, keywords: set[str], source: Dataset) -> None:
    for keyword in keywords:
        assert keyword in result, f"{keyword} is Type 2: present, empty"
        assert result[keyword].value in (None, "", []), keyword
    for keyword in ("PatientID", "StudyInstanceUID"):
        assert result.get(keyword) == source.get(keyword), f"{keyword} is copied as it was"


def assert_one_clean_warning(caplog: pytest.LogCaptureFixture, keywords: set[str]) -> None:
    [record] = warnings_of(caplog)
    message = record.getMessage()
    for keyword in keywords:
        assert keyword in message
    for canary in CANARIES:
        assert canary not in message
    for record in caplog.records:  # nothing else logged a value either (pydicom's validation)
        assert not any(canary in record.getMessage() for canary in CANARIES), record.getMessage()


@pytest.mark.parametrize("name", list(VARIANTS))
def test_seg_and_volume_report_from_a_variant_ct(name, algorithm, validate, caplog) -> None:
    sources = ct_variant(name)
    caplog.set_level(logging.INFO)
    conformed = conform_copied_attributes(sources, purpose="job 1")
    assert_one_clean_warning(caplog, EMPTIED[name])
    assert all(check_copied_attributes(ds) == [] for ds in conformed)
    assert sources[0] is not conformed[0] and check_copied_attributes(sources[0]), "sources unchanged"

    volume = load_volume(conformed)
    mask = np.zeros(volume.pixels.shape, dtype=bool)
    mask[:, 10:40, 20:60] = True
    caplog.clear()
    seg = build_segmentation(volume, {"body": mask}, series_instance_uid=derived_uid(name, "seg-series"),
                             sop_instance_uid=derived_uid(name, "seg"), series_number=9901, algorithm=algorithm)
    seg_bytes = to_bytes(seg)
    sr = build_volume_report(volume, seg, [StructureMeasurement("body", 1, 12.5, 30.0)],
                             series_instance_uid=derived_uid(name, "sr-series"),
                             sop_instance_uid=derived_uid(name, "sr"), series_number=9902, algorithm=algorithm)
    sr_bytes = to_bytes(sr)
    assert warnings_of(caplog) == [], "already conformed: the builders find nothing more to say"
    validate(seg_bytes)
    validate(sr_bytes)
    seg_back = hd.seg.segread(BytesIO(seg_bytes))
    sr_back = hd.sr.srread(BytesIO(sr_bytes))
    assert_emptied(seg_back, EMPTIED[name], sources[0])
    assert_emptied(sr_back, EMPTIED[name], sources[0])
    assert seg_back.get_segment_numbers() == [1]
    if name in ("latin1", "gb18030", "iso2022-ir87"):
        for back in (seg_back, sr_back):
            assert back.SpecificCharacterSet == character_set_of(sources[0])
            assert str(back.PatientName) == str(sources[0].PatientName)


@pytest.mark.parametrize("name", ["hashed", "missing-type2", "garbled"])
def test_builders_given_raw_sources_conform_them_with_one_warning_each(name, algorithm, validate, caplog) -> None:
    """Straight from the files (no conforming first): each builder conforms its own copy."""
    volume = load_volume(ct_variant(name))
    mask = np.zeros(volume.pixels.shape, dtype=bool)
    mask[1, 5:9, 5:9] = True
    caplog.set_level(logging.INFO)
    seg = build_segmentation(volume, {"bone": mask}, series_instance_uid=derived_uid("raw", "seg-series"),
                             sop_instance_uid=derived_uid("raw", "seg"), series_number=9901, algorithm=algorithm)
    assert_one_clean_warning(caplog, EMPTIED[name])
    assert "SEG " + derived_uid("raw", "seg") in warnings_of(caplog)[0].getMessage()
    data = to_bytes(seg)
    validate(data)
    assert_emptied(hd.seg.segread(BytesIO(data)), EMPTIED[name], volume.datasets[0])
    assert check_copied_attributes(volume.datasets[0]), "the volume's own datasets are not changed"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_narrative_and_region_reports_from_a_variant_dx(name, algorithm, validate, caplog) -> None:
    source = dx_variant(name)
    caplog.set_level(logging.INFO)
    narrative = build_narrative_report([source], findings="Clear lungs.", impression="Normal chest.",
                                       language="en", series_instance_uid=derived_uid(name, "n-series"),
                                       sop_instance_uid=derived_uid(name, "n"), series_number=78,
                                       algorithm=algorithm)
    assert_one_clean_warning(caplog, EMPTIED[name])
    caplog.clear()
    region = ImageRegion(source.SOPInstanceUID, None, (10.0, 20.0, 60.0, 90.0), "nodule", "right lung",
                         0.8, None)
    regions = build_region_report([source], [region], [], series_instance_uid=derived_uid(name, "r-series"),
                                  sop_instance_uid=derived_uid(name, "r"), series_number=77,
                                  algorithm=algorithm, language="en")
    assert_one_clean_warning(caplog, EMPTIED[name])
    for sr in (narrative, regions):
        data = to_bytes(sr)
        validate(data)
        assert_emptied(hd.sr.srread(BytesIO(data)), EMPTIED[name], source)


def test_mr_missing_type2_gets_its_seg(algorithm, validate, caplog) -> None:
    datasets = [variant(read_dataset(sample("mr/MR_small.dcm")), "missing-type2")]
    caplog.set_level(logging.INFO)
    volume = load_volume(conform_copied_attributes(datasets, purpose="job 2"))
    assert_one_clean_warning(caplog, EMPTIED["missing-type2"])
    mask = np.zeros(volume.pixels.shape, dtype=bool)
    mask[:, 20:40, 20:40] = True
    seg = build_segmentation(volume, {"liver": mask}, series_instance_uid=derived_uid("mr", "seg-series"),
                             sop_instance_uid=derived_uid("mr", "seg"), series_number=9940, algorithm=algorithm)
    data = to_bytes(seg)
    validate(data)
    assert_emptied(hd.seg.segread(BytesIO(data)), EMPTIED["missing-type2"], datasets[0])


def test_a_conformant_source_is_returned_as_it_is(caplog) -> None:
    sources = series_datasets("ct/dcmqi_ct3slice")
    caplog.set_level(logging.INFO)
    assert all(a is b for a, b in zip(conform_copied_attributes(sources, purpose="job 3"), sources, strict=True))
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("relative", ["charset/chrH31_japanese.dcm", "charset/chrX1_utf8_chinese.dcm"])
def test_character_set_samples_de_identified_keep_their_names(relative, algorithm, validate, caplog) -> None:
    """The shared ISO 2022 IR 87 and UTF-8 samples, de-identified: an ASCII report keeps the
    source's character set (``\\ISO 2022 IR 87`` written as ``ISO 2022 IR 6\\ISO 2022 IR 87``)
    and its names, the bad attributes empty."""
    source = variant(read_dataset(sample(relative)), "hashed")
    caplog.set_level(logging.INFO)
    sr = build_narrative_report([source], findings="Clear lungs.", impression=None, language="en",
                                series_instance_uid=derived_uid(relative, "series"),
                                sop_instance_uid=derived_uid(relative, "sr"), series_number=78, algorithm=algorithm)
    assert_one_clean_warning(caplog, EMPTIED["hashed"])
    data = to_bytes(sr)
    validate(data)
    back = hd.sr.srread(BytesIO(data))
    assert_emptied(back, EMPTIED["hashed"], source)
    assert back.SpecificCharacterSet == character_set_of(source)
    assert str(back.PatientName) == str(source.PatientName) and not str(back.PatientName).isascii()


@pytest.mark.parametrize(("written", "expected"), [
    ("ISO-IR 100", "ISO_IR 100"), ("ISO_IR100", "ISO_IR 100"), ("iso ir 192", "ISO_IR 192"),
    ("ISO_IR 100", "ISO_IR 100"), ("GB18030", "GB18030"), ("ISO-IR 999", "ISO-IR 999"),
])
def test_misspelled_character_sets_are_corrected_for_the_objects_built(written, expected) -> None:
    ds = Dataset()
    ds.SpecificCharacterSet = written
    assert character_set_of(ds) == expected


def test_an_sr_is_written_for_a_source_that_misspells_its_character_set(algorithm, validate) -> None:
    """A real ultrasound file says ``ISO-IR 100``: the SR built for it says ``ISO_IR 100``."""
    source = read_dataset(sample("compressed/US_multiframe_jpeg_baseline_nobot.dcm"))
    assert source.SpecificCharacterSet == "ISO-IR 100"
    report = build_region_report(
        [source], [ImageRegion(source.SOPInstanceUID, 1, (10.0, 20.0, 40.0, 60.0), "nodule")], [],
        series_instance_uid=derived_uid("iso-ir", "series"), sop_instance_uid=derived_uid("iso-ir", "sr"),
        series_number=9902, algorithm=algorithm)
    data = to_bytes(report)
    validate(data)
    assert hd.sr.srread(BytesIO(data)).SpecificCharacterSet == "ISO_IR 100"


def test_conformed_sources_are_not_checked_again(monkeypatch) -> None:
    """What conform returned (fit, or repaired copies) passes through again unchecked: a job's
    sources are conformed at load, then again by the SEG and SR builders."""
    from dicom_io import source_header

    sources = ct_variant(next(iter(VARIANTS)))
    conformed = conform_copied_attributes(sources, purpose="job 1")
    checked: list[Dataset] = []
    real_check = source_header.check_copied_attributes

    def counting(ds: Dataset):
        checked.append(ds)
        return real_check(ds)

    monkeypatch.setattr(source_header, "check_copied_attributes", counting)
    again = conform_copied_attributes(conformed, purpose="SEG x")
    assert all(a is b for a, b in zip(again, conformed, strict=True)) and checked == []
    fresh = conform_copied_attributes(sources, purpose="job 2")  # the originals, still unfit
    assert len(checked) == len(sources) and all(a is not b for a, b in zip(fresh, sources, strict=True))
