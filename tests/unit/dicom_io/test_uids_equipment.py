from __future__ import annotations

import re

import pytest
from pydicom.dataset import Dataset

from dicom_io.equipment import (
    AlgorithmInfo,
    add_contributing_equipment,
    contributing_equipment_item,
)
from dicom_io.errors import (
    DicomIOError,
    InconsistentSeriesError,
    InvalidInstanceError,
    ValidatorUnavailableError,
)
from dicom_io.uids import derived_uid

UID_PATTERN = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def test_derived_uid_is_reproducible_and_valid() -> None:
    uid = derived_uid("job-42", "seg")
    assert uid == derived_uid("job-42", "seg")
    assert uid.startswith("2.25.")
    assert len(uid) <= 64
    assert UID_PATTERN.match(uid)


def test_derived_uid_differs_per_parts() -> None:
    assert derived_uid("job-42", "seg") != derived_uid("job-42", "sr")


def test_derived_uid_needs_parts() -> None:
    with pytest.raises(ValueError, match="at least one part"):
        derived_uid()


def test_errors_inherit_builtins() -> None:
    assert issubclass(InvalidInstanceError, ValueError) and issubclass(
        InvalidInstanceError, DicomIOError
    )
    assert issubclass(InconsistentSeriesError, ValueError)
    assert issubclass(ValidatorUnavailableError, RuntimeError)


def test_contributing_equipment_item_follows_ihe_air() -> None:
    algorithm = AlgorithmInfo("model", "2.0")
    item = contributing_equipment_item(algorithm)
    purpose = item.PurposeOfReferenceCodeSequence[0]
    assert (purpose.CodeValue, purpose.CodingSchemeDesignator, purpose.CodeMeaning) == (
        "Newcode1",
        "99IHE",
        "Processing Algorithm",
    )
    assert item.Manufacturer == "mednode"
    assert item.ManufacturerModelName == "model"
    assert item.SoftwareVersions == "2.0"
    assert item.DeviceUID == algorithm.device_uid == AlgorithmInfo("model", "2.0").device_uid
    assert AlgorithmInfo("model", "2.1").device_uid != algorithm.device_uid

    ds = Dataset()
    add_contributing_equipment(ds, algorithm)
    add_contributing_equipment(ds, AlgorithmInfo("other", "1"))
    assert [i.ManufacturerModelName for i in ds.ContributingEquipmentSequence] == ["model", "other"]
