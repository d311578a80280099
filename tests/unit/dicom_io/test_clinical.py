"""The clinical context read from a header: age, sex, the request's reasons; never name or ID."""

from __future__ import annotations

import pytest
from pydicom import Dataset

from dicom_io.clinical import REMOVED, ClinicalContext, age_in_years, read_clinical_context


@pytest.mark.parametrize(("age", "birth", "study", "years"), [
    ("045Y", None, None, 45), ("018M", None, None, 1), ("010W", None, None, 0), ("003D", None, None, 0),
    ("", "19800615", "20240614", 43), ("", "19800615", "20240615", 44),
    ("", "19800615", None, None), ("", "1980", "20240101", None), ("", "20250101", "20240101", None),
    ("999Y", None, None, None), ("45", None, None, None),
])
def test_age_in_years(age: str, birth: str | None, study: str | None, years: int | None) -> None:
    assert age_in_years(age, birth, study) == years


def _header(**attributes: object) -> Dataset:
    ds = Dataset()
    ds.PatientName = "Doe^Jane^Q"
    ds.PatientID = "MRN-123456"
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def test_age_sex_and_reasons_from_the_top_level_and_the_request_attributes() -> None:
    request = Dataset()
    request.ReasonForTheRequestedProcedure = "Fever and cough for 3 days"
    request.RequestedProcedureDescription = "CHEST 2 VIEWS"
    ds = _header(PatientAge="067Y", PatientSex="f", RequestedProcedureDescription="CHEST 2 VIEWS",
                 AdmittingDiagnosesDescription=["Pneumonia", "COPD"], RequestAttributesSequence=[request])
    context = read_clinical_context(ds)
    assert context == ClinicalContext(age_years=67, sex="F", reasons=("Fever and cough for 3 days",),
                                      procedures=("CHEST 2 VIEWS",), diagnoses=("Pneumonia", "COPD"))


def test_a_reason_that_quotes_the_name_or_id_has_it_removed() -> None:
    ds = _header(ReasonForTheRequestedProcedure="jane DOE (MRN-123456) fell, ? rib fracture", PatientSex="X")
    context = read_clinical_context(ds)
    assert context.reasons == (f"{REMOVED} {REMOVED} ({REMOVED}) fell, ? rib fracture",)
    assert context.sex is None and context.age_years is None
    assert read_clinical_context(_header(ReasonForTheRequestedProcedure="Doe")).reasons == ()


def test_no_clinical_attributes_is_an_empty_context() -> None:
    assert read_clinical_context(_header()).empty
    assert len(read_clinical_context(_header(ReasonForTheRequestedProcedure="x" * 500)).reasons[0]) == 200
