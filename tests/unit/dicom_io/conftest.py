"""Shared fixtures: sample DICOM from the team's shared folder, written outputs checked."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_io.equipment import AlgorithmInfo
from dicom_io.validation import ValidationReport, run_dciodvfy
from dicom_io.volume import Volume, load_volume, read_dataset
from tests.shared_data import SHARED_DICOM

requires_shared = pytest.mark.skipif(
    not SHARED_DICOM.is_dir(), reason=f"sample DICOM folder {SHARED_DICOM} is missing"
)
requires_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy (Debian dicom3tools) is not installed"
)


def sample(relative: str) -> Path:
    path = SHARED_DICOM / relative
    if not path.exists():
        pytest.skip(f"sample {path} is missing")
    return path


def series_datasets(relative: str) -> list[Dataset]:
    return [read_dataset(p) for p in sorted(sample(relative).glob("*.dcm"))]


def to_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def algorithm() -> AlgorithmInfo:
    return AlgorithmInfo(name="mednode-test-model", version="1.2.3", family="UNet")


@pytest.fixture(scope="module")
def ct3() -> Volume:
    return load_volume(series_datasets("ct/dcmqi_ct3slice"))


@pytest.fixture
def validate(tmp_path: Path) -> Callable[[bytes], ValidationReport]:
    """Write bytes to a file, run dciodvfy, print its warnings and assert zero errors."""

    def _validate(data: bytes) -> ValidationReport:
        if shutil.which("dciodvfy") is None:
            pytest.skip("dciodvfy (Debian dicom3tools) is not installed")
        path = tmp_path / "out.dcm"
        path.write_bytes(data)
        report = run_dciodvfy(path)
        for warning in report.warnings:
            print("dciodvfy:", warning)
        assert report.errors == [], report.errors
        return report

    return _validate


def read_back(data: bytes) -> Dataset:
    return pydicom.dcmread(BytesIO(data))
