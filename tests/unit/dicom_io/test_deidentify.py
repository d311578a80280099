"""Burned-in text and identifiers: what is refused, masked or redacted before a remote model."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_io.deidentify import (
    REDACTED,
    burned_in_text_reason,
    identifying_values,
    mask_outside,
    scrub_text,
    ultrasound_regions,
)

from .conftest import requires_shared, sample


@requires_shared
def test_which_images_may_carry_burned_in_text() -> None:
    us = pydicom.dcmread(sample("compressed/US_multiframe_jpeg_baseline_nobot.dcm"), stop_before_pixels=True)
    assert "US images usually carry burned-in text" in (burned_in_text_reason(us) or "")
    sc = pydicom.dcmread(sample("compressed/SC_rgb_jpeg_dcmtk.dcm"), stop_before_pixels=True)
    assert burned_in_text_reason(sc) is not None
    dx = pydicom.dcmread(sample("xr/highdicom_dx_thorax.dcm"), stop_before_pixels=True)
    assert burned_in_text_reason(dx) is None
    dx.BurnedInAnnotation = "YES"
    assert burned_in_text_reason(dx) == "Burned In Annotation is YES"
    us.BurnedInAnnotation = "NO"
    assert burned_in_text_reason(us) is None


@requires_shared
def test_ultrasound_is_masked_to_its_regions() -> None:
    us = pydicom.dcmread(sample("compressed/US_multiframe_jpeg_baseline_nobot.dcm"))
    regions = ultrasound_regions(us)
    assert regions == [(0, 16, 319, 231), (0, 16, 319, 217)]
    frame = us.pixel_array[0]
    masked = mask_outside(frame, regions)
    assert masked.shape == frame.shape
    assert not masked[:16].any() and not masked[232:].any()
    np.testing.assert_array_equal(masked[16:232], frame[16:232])
    with pytest.raises(ValueError, match="only refused"):
        mask_outside(frame, [])
    assert ultrasound_regions(pydicom.dcmread(sample("encoding/ExplVR_BigEnd_US_RGB.dcm"))) == []


def test_identifiers_are_redacted_from_text_as_whole_words() -> None:
    ds = Dataset()
    ds.PatientName = "Doe^Johnathan^^Dr"
    ds.PatientID = "MRN-4711"
    ds.AccessionNumber = "ACC99"
    ds.PatientBirthDate = "19500102"
    ds.ReferringPhysicianName = "Welby^Marcus"
    ds.InstitutionName = "St Elsewhere"
    values = identifying_values([ds])
    assert "Johnathan" in values and "MRN-4711" in values and "1950-01-02" in values and "Dr" in values
    text = ("Johnathan Doe (MRN-4711, acc99), born 1950-01-02 / 02.01.1950, seen at St Elsewhere by Dr Welby. "
            "Doesn't matter: no doe-eyed Doering.")
    scrubbed, count = scrub_text(text, values)
    for value in ("Johnathan", "MRN-4711", "acc99", "1950-01-02", "02.01.1950", "St Elsewhere", "Welby"):
        assert value not in scrubbed
    assert "Doesn't" in scrubbed and "Doering" in scrubbed and "doe-eyed" not in scrubbed
    assert count == scrubbed.count(REDACTED) >= 9
    assert scrub_text("No identifiers here.", values) == ("No identifiers here.", 0)
