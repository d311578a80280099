from __future__ import annotations

import shutil

import pytest

from dicom_io import validation
from dicom_io.errors import ValidatorUnavailableError
from dicom_io.validation import run_dciodvfy

from .conftest import requires_dciodvfy, requires_shared, sample


def test_missing_validator_says_how_to_install(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(validation.shutil, "which", lambda name: None)
    with pytest.raises(ValidatorUnavailableError, match="apt-get install dicom3tools"):
        run_dciodvfy(tmp_path / "x.dcm")


@requires_dciodvfy
def test_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError):
        run_dciodvfy(tmp_path / "absent.dcm")


@requires_dciodvfy
@requires_shared
def test_errors_are_reported() -> None:
    # this real CT has an empty SpecificCharacterSet and other IOD violations
    report = run_dciodvfy(sample("ct/dcmqi_ct3slice/01.dcm"))
    assert report.errors and not report.ok
    assert all(line.startswith("Error") for line in report.errors)


@requires_dciodvfy
@requires_shared
def test_crash_of_validator_is_an_error() -> None:
    # dciodvfy aborts on this file (assertion on Bits Allocated): not silently "valid"
    report = run_dciodvfy(sample("malformed/badVR.dcm"))
    assert report.errors


def test_shutil_is_the_lookup() -> None:
    assert validation.shutil is shutil
