"""The synthetic CT phantom is valid DICOM with the geometry and values it claims."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

from tests.peers import require_tool
from tests.phantom import (
    PhantomAnatomy,
    PhantomGeometry,
    hu_from_datasets,
    make_ct_phantom,
    make_ct_volume,
    write_series,
)

SMALL = PhantomGeometry(
    rows=64, columns=80, pixel_spacing_mm=(5.0, 4.5), slice_spacing_mm=5.0, num_slices=36
)
SMALL_ANATOMY = PhantomAnatomy().scaled(0.5)


@pytest.mark.parametrize("pixel_representation", [0, 1], ids=["unsigned", "signed"])
def test_phantom_instances_pass_dciodvfy_without_errors_or_warnings(
    pixel_representation: int, tmp_path: Path
) -> None:
    dciodvfy = require_tool("dciodvfy")
    datasets = make_ct_phantom(
        geometry=SMALL,
        anatomy=SMALL_ANATOMY,
        pixel_representation=pixel_representation,
        patient_name="Müller^Jörg",
    )
    paths = write_series(datasets, tmp_path)
    for path in (paths[0], paths[len(paths) // 2], paths[-1]):
        result = subprocess.run([dciodvfy, str(path)], capture_output=True, text=True, check=False)
        report = result.stdout + result.stderr
        assert "Error" not in report, report
        assert "Warning" not in report, report


@pytest.mark.parametrize(
    ("pixel_representation", "intercept", "slope", "dtype"),
    [(0, -1024.0, 1.0, np.uint16), (1, 0.0, 1.0, np.int16), (1, -1000.0, 0.5, np.int16)],
)
def test_stored_values_and_rescale_give_back_the_hu_volume(
    pixel_representation: int, intercept: float, slope: float, dtype: type, tmp_path: Path
) -> None:
    datasets = make_ct_phantom(
        geometry=SMALL,
        anatomy=SMALL_ANATOMY,
        pixel_representation=pixel_representation,
        rescale_intercept=intercept,
        rescale_slope=slope,
    )
    read_back = [pydicom.dcmread(path) for path in write_series(datasets, tmp_path)]
    first = read_back[0]
    assert first.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert first.SOPClassUID == CTImageStorage
    assert first.pixel_array.dtype == dtype
    assert float(first.RescaleIntercept) == intercept
    assert np.array_equal(hu_from_datasets(read_back), make_ct_volume(SMALL, SMALL_ANATOMY))


def test_geometry_identity_and_determinism() -> None:
    datasets = make_ct_phantom(
        geometry=SMALL, anatomy=SMALL_ANATOMY, patient_name="A^B", patient_id="P1"
    )
    again = make_ct_phantom(
        geometry=SMALL, anatomy=SMALL_ANATOMY, patient_name="A^B", patient_id="P1"
    )
    other = make_ct_phantom(
        geometry=SMALL, anatomy=SMALL_ANATOMY, patient_id="P2", series_instance_uid="1.2.3.4"
    )

    assert len(datasets) == SMALL.num_slices
    assert [ds.SOPInstanceUID for ds in datasets] == [ds.SOPInstanceUID for ds in again]
    assert len({ds.SOPInstanceUID for ds in datasets}) == SMALL.num_slices
    assert {ds.StudyInstanceUID for ds in datasets} != {ds.StudyInstanceUID for ds in other}
    assert {ds.SeriesInstanceUID for ds in other} == {"1.2.3.4"}
    assert (
        len(
            {(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) for ds in datasets}
        )
        == 1
    )
    assert str(datasets[0].PatientName) == "A^B"
    z = [float(ds.ImagePositionPatient[2]) for ds in datasets]
    assert np.allclose(np.diff(z), SMALL.slice_spacing_mm)
    assert np.isclose(np.mean(z), SMALL.centre_z_mm)
    assert [float(v) for v in datasets[0].PixelSpacing] == list(SMALL.pixel_spacing_mm)
    assert (datasets[0].Rows, datasets[0].Columns) == (SMALL.rows, SMALL.columns)
    # the field of view is centred on x = y = 0
    x0, y0 = (float(v) for v in datasets[0].ImagePositionPatient[:2])
    assert x0 == pytest.approx(-(SMALL.columns - 1) / 2 * SMALL.pixel_spacing_mm[1])
    assert y0 == pytest.approx(-(SMALL.rows - 1) / 2 * SMALL.pixel_spacing_mm[0])


def test_anatomy_that_does_not_fit_is_refused() -> None:
    with pytest.raises(ValueError, match="field of view"):
        make_ct_volume(PhantomGeometry(rows=128, columns=128, pixel_spacing_mm=(2.0, 2.0)))
    with pytest.raises(ValueError, match="add slices"):
        make_ct_volume(PhantomGeometry(num_slices=20))
