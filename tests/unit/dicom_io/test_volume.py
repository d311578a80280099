from __future__ import annotations

import copy

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_io.errors import InconsistentSeriesError, InvalidInstanceError
from dicom_io.volume import _rescale_into, group_by_series, load_volume, read_dataset

from .conftest import requires_shared, sample, series_datasets

pytestmark = requires_shared


def expected_slice(ds: Dataset) -> np.ndarray:
    raw = ds.pixel_array.astype(np.float64)
    return raw * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))


def test_ct_three_slices_sorted_along_normal_with_hu() -> None:
    volume = load_volume(series_datasets("ct/dcmqi_ct3slice"))
    assert volume.pixels.shape == (3, 512, 512)
    # integral rescale (slope 1, intercept -1024): HU exactly, in half the bytes of float32
    assert volume.pixels.dtype == np.int16
    # axial, normal +z: ascending z, so instance 3 (z=-128.69) comes first
    assert [int(ds.InstanceNumber) for ds in volume.datasets] == [3, 2, 1]
    z = [float(ds.ImagePositionPatient[2]) for ds in volume.datasets]
    assert z == sorted(z)
    # slice spacing from positions (1.0 mm), not SliceThickness (1.25 mm)
    assert volume.spacing_mm == pytest.approx((1.0, 0.810547, 0.810547))
    assert volume.is_uniformly_spaced
    assert volume.origin_mm == pytest.approx((-235.199997, -226.800003, -128.690002))
    for index, ds in enumerate(volume.datasets):
        np.testing.assert_allclose(volume.pixels[index], expected_slice(ds))
    # CT in HU: air around the body is about -1000, padding -3024 (intercept -1024)
    assert volume.pixels.min() == pytest.approx(-3024.0)
    assert -1100 < float(np.median(volume.pixels[1, :20, 200:300])) < -900
    assert volume.voxel_volume_ml == pytest.approx(1.0 * 0.810547**2 / 1000)
    affine = volume.affine
    np.testing.assert_allclose(
        affine @ [1, 0, 0, 1], [-235.199997, -226.800003, -127.690002, 1], atol=1e-4
    )


def test_non_integral_rescale_gives_float32_hu() -> None:
    datasets = series_datasets("ct/dcmqi_ct3slice")
    for ds in datasets:
        ds.RescaleSlope = "0.5"
    volume = load_volume(datasets)
    assert volume.pixels.dtype == np.float32
    for index, ds in enumerate(volume.datasets):
        np.testing.assert_allclose(volume.pixels[index], expected_slice(ds))


def test_values_beyond_int16_switch_the_volume_to_float32() -> None:
    datasets = series_datasets("ct/dcmqi_ct3slice")
    # sorted last (highest z) is instance 1: only its values leave int16
    last = next(ds for ds in datasets if int(ds.InstanceNumber) == 1)
    last.RescaleIntercept = "32000"
    volume = load_volume(datasets)
    assert volume.pixels.dtype == np.float32
    assert volume.pixels[2].max() > np.iinfo(np.int16).max
    for index, ds in enumerate(volume.datasets):
        np.testing.assert_allclose(volume.pixels[index], expected_slice(ds))


def test_deferred_pixels_released_after_decoding_give_the_same_volume() -> None:
    paths = sorted(sample("ct/dcmqi_ct3slice").glob("*.dcm"))
    eager = load_volume([read_dataset(p) for p in paths])
    deferred = [read_dataset(p, defer_size=64 * 1024) for p in paths]
    volume = load_volume(deferred, release_pixel_data=True)
    np.testing.assert_array_equal(volume.pixels, eager.pixels)
    assert volume.pixels.dtype == eager.pixels.dtype
    assert all("PixelData" not in ds for ds in deferred)
    assert [ds.SOPInstanceUID for ds in volume.datasets] == [ds.SOPInstanceUID for ds in eager.datasets]


def test_released_pixels_keep_the_shape_and_fail_late_readers() -> None:
    volume = load_volume(series_datasets("ct/dcmqi_ct3slice"))
    volume.release_pixels()
    assert volume.shape == (3, 512, 512)
    assert volume.pixels.shape == (0, 512, 512)
    with pytest.raises(IndexError):
        volume.pixels[1]


def test_head_ct_with_gap_sorted_and_median_spacing() -> None:
    datasets = series_datasets("ct/pydicom_head_ct2")
    volume = load_volume(list(reversed(datasets)))
    assert volume.pixels.shape == (4, 16, 16)
    assert [int(ds.InstanceNumber) for ds in volume.datasets] == [18, 180, 181, 182]
    assert volume.spacing_mm == pytest.approx((1.25, 0.488281, 0.488281))
    assert volume.slice_positions_mm == pytest.approx((-99.48, 103.02, 104.27, 105.52), abs=1e-4)
    assert not volume.is_uniformly_spaced
    for index, ds in enumerate(volume.datasets):
        np.testing.assert_allclose(volume.pixels[index], expected_slice(ds))


def test_compressed_mr_series_decodes_and_sorts() -> None:
    datasets = series_datasets("compressed/mr_series_j2k")
    assert datasets[0].file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    volume = load_volume(datasets)
    assert volume.pixels.shape == (4, 256, 256)
    # sagittal, normal = row x col = (0,1,0) x (0,0,-1) = (-1,0,0): x descending
    np.testing.assert_allclose(volume.slice_normal, [-1, 0, 0])
    x = [float(ds.ImagePositionPatient[0]) for ds in volume.datasets]
    assert x == sorted(x, reverse=True)
    assert volume.spacing_mm == pytest.approx((1.0, 1.0, 1.0))
    assert volume.pixels.max() > 0
    for index, ds in enumerate(volume.datasets):
        np.testing.assert_allclose(volume.pixels[index], expected_slice(ds))


def test_lossless_j2k_equals_uncompressed() -> None:
    compressed = load_volume([read_dataset(sample("compressed/CT1_J2KR.dcm"))])
    plain = load_volume([read_dataset(sample("compressed/CT1_UNC.explicit_little_endian.dcm"))])
    np.testing.assert_array_equal(compressed.pixels, plain.pixels)
    assert compressed.spacing_mm[0] == pytest.approx(5.0)  # one slice: SliceThickness


def test_group_by_series_splits_series() -> None:
    a = series_datasets("ct/dcmqi_ct3slice")
    b = series_datasets("ct/pydicom_head_ct2")
    groups = group_by_series([*a, *b])
    assert sorted(len(v) for v in groups.values()) == [3, 4]
    assert groups[a[0].SeriesInstanceUID] == a


def test_mixed_series_rejected() -> None:
    with pytest.raises(InconsistentSeriesError, match="2 series"):
        load_volume(
            [*series_datasets("ct/dcmqi_ct3slice"), *series_datasets("ct/pydicom_head_ct2")]
        )


def test_mixed_matrix_sizes_rejected() -> None:
    small = series_datasets("ct/pydicom_head_ct2")
    big = copy.deepcopy(series_datasets("ct/dcmqi_ct3slice")[0])
    big.SeriesInstanceUID = small[0].SeriesInstanceUID
    with pytest.raises(InconsistentSeriesError, match="mixed matrix sizes"):
        load_volume([*small, big])


def test_mixed_orientation_rejected() -> None:
    datasets = series_datasets("ct/pydicom_head_ct2")
    tilted = copy.deepcopy(datasets[1])
    tilted.ImageOrientationPatient = [1, 0, 0, 0, 0.8, -0.6]
    with pytest.raises(InconsistentSeriesError, match="mixed orientations"):
        load_volume([datasets[0], tilted])


def test_duplicate_position_rejected() -> None:
    datasets = series_datasets("ct/pydicom_head_ct2")
    twin = copy.deepcopy(datasets[2])
    twin.SOPInstanceUID = pydicom.uid.generate_uid()
    with pytest.raises(InconsistentSeriesError, match="share one slice position"):
        load_volume([*datasets, twin])


def test_empty_input_rejected() -> None:
    with pytest.raises(InconsistentSeriesError):
        load_volume([])


def test_no_file_meta_is_invalid() -> None:
    with pytest.raises(InvalidInstanceError, match="not a DICOM Part 10 file"):
        read_dataset(sample("malformed/no_meta_CT.dcm"))


def test_encapsulated_without_delimiter_is_invalid() -> None:
    # pydicom returns an EMPTY dataset with only a warning for this file
    with pytest.raises(InvalidInstanceError, match="empty dataset"):
        read_dataset(sample("malformed/emri_j2k_too_short.dcm"))


def test_truncated_pixel_data_is_invalid_on_load() -> None:
    ds = read_dataset(sample("malformed/MR_truncated.dcm"))
    with pytest.raises(InvalidInstanceError, match="cannot be decoded"):
        load_volume([ds])


def test_bad_number_of_frames_is_invalid_on_load() -> None:
    ds = read_dataset(sample("malformed/badVR.dcm"))
    with pytest.raises(InvalidInstanceError, match="Number of Frames"):
        load_volume([ds])


def test_garbage_bytes_are_invalid(tmp_path) -> None:
    path = tmp_path / "garbage.dcm"
    path.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 20)
    with pytest.raises(InvalidInstanceError):
        read_dataset(path)


def test_projection_image_has_no_volume_geometry() -> None:
    with pytest.raises(InvalidInstanceError, match="Image Orientation"):
        load_volume([read_dataset(sample("xr/highdicom_dx_thorax.dcm"))])


def test_load_keeps_no_decoded_copy_on_the_datasets() -> None:
    """Native pixels are read as views on each Pixel Data: no copy is made, and none is left
    cached on the datasets (``ds.pixel_array`` would keep one, 2 bytes a voxel for a CT)."""
    datasets = series_datasets("ct/dcmqi_ct3slice")
    volume = load_volume(datasets)
    assert all(getattr(ds, "_pixel_array", None) is None for ds in volume.datasets)
    for index, ds in enumerate(volume.datasets):
        np.testing.assert_array_equal(volume.pixels[index], expected_slice(ds))


def test_deferred_pixels_of_repaired_copies_are_read_from_their_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    # conform_copied_attributes replaces a source with a problem by a copy sharing its elements:
    # the copy's deferred Pixel Data must still be read from the file
    from dicom_io.source_header import conform_copied_attributes

    for path in sorted(sample("ct/dcmqi_ct3slice").glob("*.dcm")):
        ds = pydicom.dcmread(path)
        del ds.PatientSex  # Type 2, missing: repaired
        ds.save_as(tmp_path / path.name)
    paths = sorted(tmp_path.iterdir())
    deferred = [read_dataset(p, defer_size=64 * 1024) for p in paths]
    conformed = conform_copied_attributes(deferred, purpose="test")
    assert all(c is not d for c, d in zip(conformed, deferred, strict=True))
    volume = load_volume(conformed, release_pixel_data=True)
    np.testing.assert_array_equal(volume.pixels, load_volume([read_dataset(p) for p in paths]).pixels)



@pytest.mark.parametrize("dtype", [np.uint16, np.int16, np.uint8, np.int32])
@pytest.mark.parametrize("intercept", [0, -1024, 1024])
def test_integral_shift_into_int16_is_exact(dtype: type, intercept: int) -> None:
    """The int16 path (slope 1) adds the intercept without an int32 copy of the slice, exactly."""
    rescale = Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept = "1", str(intercept)
    info = np.iinfo(dtype)
    raw = np.random.default_rng(3).integers(max(info.min, -30000), min(info.max, 30000), size=(6, 5),
                                            endpoint=True).astype(dtype)
    out = np.zeros(raw.shape, np.int16)
    assert _rescale_into(raw, out, rescale, "slice") is True
    np.testing.assert_array_equal(out, raw.astype(np.int64) + intercept)


@pytest.mark.parametrize(("dtype", "value", "intercept"),
                         [(np.uint16, 40000, -1024), (np.uint16, 33000, 0), (np.int16, -32000, -1024),
                          (np.int32, 70000, -70000 + 32768)])
def test_a_value_beyond_int16_leaves_the_slice_untouched(dtype: type, value: int, intercept: int) -> None:
    rescale = Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept = "1", str(intercept)
    raw = np.full((4, 4), 100, dtype=dtype)
    raw[2, 3] = value
    out = np.full((4, 4), 7, np.int16)
    assert _rescale_into(raw, out, rescale, "slice") is False
    assert (out == 7).all()
