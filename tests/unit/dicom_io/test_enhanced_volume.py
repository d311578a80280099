"""Enhanced (multi-frame) CT/MR series as volumes, and the SEG and TID 1500 SR made on them.

The strong check: a classic CT series converted by highdicom into Legacy Converted Enhanced CT
instances (one, or several of one series) loads to the classic series' volume, voxel for voxel
and in geometry; and the SEG on it references, for each plane, the source frame at its position.
"""

from __future__ import annotations

import copy
import random
import tracemalloc
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from dicom_io.equipment import AlgorithmInfo
from dicom_io.errors import InconsistentSeriesError, InvalidInstanceError
from dicom_io.measurement_report import StructureMeasurement, build_volume_report
from dicom_io.seg import build_segmentation
from dicom_io.uids import derived_uid
from dicom_io.volume import Volume, load_volume, read_dataset
from tests.phantom import PhantomGeometry, make_ct_phantom

from .conftest import requires_shared, sample, to_bytes

LEGACY_CT = "multiframe/dcmqi_legacy_converted_ct.dcm"  # 38 rows × 24 columns, 3 frames
SIEMENS_MR = "multiframe/siemens_enhanced_mr.dcm"  # 256², 8 frames, per-frame groups only
EMRI_SMALL = "multiframe/emri_small.dcm"  # 64², 10 frames, no plane geometry at all

#: 40 slices of 160² with noise, so voxel equality means something (4 MB of int16 HU)
GEOMETRY = PhantomGeometry(rows=160, columns=160, pixel_spacing_mm=(2.0, 2.0), slice_spacing_mm=5.0,
                           num_slices=40)


def _classic(**kwargs: object) -> list[Dataset]:
    return make_ct_phantom(geometry=GEOMETRY, noise_hu_sd=20.0, seed=3, **kwargs)  # type: ignore[arg-type]


def _convert(classic: list[Dataset], number: int = 1, series_uid: str | None = None) -> Dataset:
    """``classic`` (shuffled: the converter's frame order is its own) as one Legacy Converted
    Enhanced CT instance, written and read back as a node would receive it."""
    shuffled = list(classic)
    random.Random(number).shuffle(shuffled)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        shuffled,
        series_instance_uid=series_uid or derived_uid("enhanced", "series"),
        series_number=2,
        sop_instance_uid=derived_uid("enhanced", str(number)),
        instance_number=number,
    )
    return pydicom.dcmread(BytesIO(to_bytes(enhanced)))


def _write(ds: Dataset, path: Path) -> Path:
    path.write_bytes(to_bytes(ds))
    return path


def _assert_same_volume(enhanced: Volume, classic: Volume) -> None:
    assert enhanced.pixels.dtype == classic.pixels.dtype
    np.testing.assert_array_equal(enhanced.pixels, classic.pixels)
    assert enhanced.spacing_mm == pytest.approx(classic.spacing_mm)
    assert enhanced.origin_mm == pytest.approx(classic.origin_mm)
    assert enhanced.image_orientation == pytest.approx(classic.image_orientation)
    assert enhanced.slice_positions_mm == pytest.approx(classic.slice_positions_mm)
    np.testing.assert_allclose(enhanced.affine, classic.affine)


def test_legacy_converted_ct_equals_its_classic_series_voxel_for_voxel(tmp_path: Path) -> None:
    classic = _classic()
    enhanced = _convert(classic)
    stored_z = [float(f.PlanePositionSequence[0].ImagePositionPatient[2])
                for f in enhanced.PerFrameFunctionalGroupsSequence]
    assert stored_z != sorted(stored_z)  # not stored along the normal: load_volume sorts them
    expected = load_volume(classic)
    # as the node reads it: header now, Pixel Data deferred, read frame by frame from the file
    ds = read_dataset(_write(enhanced, tmp_path / "enhanced.dcm"), defer_size=64 * 1024)
    volume = load_volume([ds])
    _assert_same_volume(volume, expected)
    assert volume.pixels.dtype == np.int16
    assert volume.is_multi_frame and volume.datasets == [ds]
    # each slice's frame is the one stored at its position
    for index in range(volume.shape[0]):
        source, frame_number = volume.slice_source(index)
        assert source is ds and frame_number is not None
        assert stored_z[frame_number - 1] == pytest.approx(volume.slice_positions_mm[index])
    # the encoded frames were read from the file, never loaded into the dataset
    assert ds.get_item("PixelData", keep_deferred=True).value is None


def test_non_integral_rescale_of_an_enhanced_ct_gives_float32_equal_to_classic() -> None:
    classic = _classic(rescale_slope=0.5, rescale_intercept=-1024.0)
    volume = load_volume([_convert(classic)])
    assert volume.pixels.dtype == np.float32
    _assert_same_volume(volume, load_volume(classic))


def test_series_of_several_enhanced_instances_equals_the_classic_series(tmp_path: Path) -> None:
    classic = _classic()
    series_uid = derived_uid("enhanced", "two", "series")
    upper, lower = _convert(classic[20:], 1, series_uid), _convert(classic[:20], 2, series_uid)
    datasets = [read_dataset(_write(ds, tmp_path / f"{i}.dcm"), defer_size=64 * 1024)
                for i, ds in enumerate((upper, lower))]
    volume = load_volume(datasets, release_pixel_data=True)
    _assert_same_volume(volume, load_volume(classic))
    # instances in the order of their first slice; slices 0-19 from the lower half
    assert [str(ds.SOPInstanceUID) for ds in volume.datasets] == [lower.SOPInstanceUID, upper.SOPInstanceUID]
    assert {volume.source_frames[i][0] for i in range(20)} == {0}
    assert {volume.source_frames[i][0] for i in range(20, 40)} == {1}
    assert all("PixelData" not in ds for ds in datasets)


def test_loading_an_enhanced_ct_holds_one_volume_and_a_frame(tmp_path: Path) -> None:
    """Frames are decoded one at a time from the file: the peak of Python allocations while
    loading stays near the volume's own bytes (decoding the whole Pixel Data at once, as
    ``ds.pixel_array`` does, would add the encoded and the decoded instance: 3x)."""
    path = _write(_convert(_classic()), tmp_path / "enhanced.dcm")
    ds = read_dataset(path, defer_size=64 * 1024)
    tracemalloc.start()
    try:
        volume = load_volume([ds], release_pixel_data=True)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1.3 * volume.pixels.nbytes, (peak, volume.pixels.nbytes)


@requires_shared
def test_dcmqi_legacy_converted_ct_in_hu() -> None:
    ds = read_dataset(sample(LEGACY_CT))
    volume = load_volume([copy.deepcopy(ds)])
    assert volume.shape == (3, 38, 24)
    assert volume.pixels.dtype == np.int16
    assert volume.spacing_mm == pytest.approx((2.5, 0.7, 0.7))
    assert volume.slice_positions_mm == pytest.approx((-177.75, -175.25, -172.75))
    transform = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    hu = ds.pixel_array.astype(np.int32) * int(transform.RescaleSlope) + int(transform.RescaleIntercept)
    np.testing.assert_array_equal(volume.pixels, hu)  # stored ascending: frames 1, 2, 3


@requires_shared
def test_a_frame_beyond_int16_switches_the_enhanced_volume_to_float32() -> None:
    ds = read_dataset(sample(LEGACY_CT))
    # frame 3 only: its own Pixel Value Transformation, whose values leave int16
    transform = copy.deepcopy(ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence)
    transform[0].RescaleIntercept = "40000"
    ds.PerFrameFunctionalGroupsSequence[2].PixelValueTransformationSequence = transform
    volume = load_volume([ds])
    assert volume.pixels.dtype == np.float32
    shared = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    raw = ds.pixel_array.astype(np.float64)
    np.testing.assert_array_equal(volume.pixels[:2], raw[:2] * float(shared.RescaleSlope) + float(shared.RescaleIntercept))
    np.testing.assert_array_equal(volume.pixels[2], raw[2] * float(shared.RescaleSlope) + 40000)


@requires_shared
def test_siemens_enhanced_mr_with_per_frame_geometry_only() -> None:
    # no Shared Functional Groups: orientation, spacing and rescale come from each frame's groups
    ds = read_dataset(sample(SIEMENS_MR))
    volume = load_volume([ds])
    assert volume.shape == (8, 256, 256)
    assert volume.spacing_mm == pytest.approx((0.9, 0.9375, 0.9375), abs=1e-3)
    assert volume.is_uniformly_spaced
    assert volume.source_frames == tuple((0, n) for n in range(1, 9))
    np.testing.assert_array_equal(volume.pixels, ds.pixel_array)  # rescale 1, 0
    assert volume.modality == "MR"


@requires_shared
def test_frames_without_plane_geometry_are_refused() -> None:
    with pytest.raises(InvalidInstanceError, match="no Plane Orientation, Plane Position"):
        load_volume([read_dataset(sample(EMRI_SMALL))])


def _frame(ds: Dataset, number: int) -> Dataset:
    return ds.PerFrameFunctionalGroupsSequence[number - 1]


@requires_shared
@pytest.mark.parametrize(
    ("spoil", "error", "match"),
    [
        (lambda ds: setattr(_frame(ds, 2).PlanePositionSequence[0], "ImagePositionPatient",
                            _frame(ds, 1).PlanePositionSequence[0].ImagePositionPatient),
         InconsistentSeriesError, "share one slice position"),
        (lambda ds: [setattr(_frame(ds, n).FrameContentSequence[0], "StackID", str(n)) for n in (1, 2, 3)],
         InconsistentSeriesError, "3 stacks"),
        (lambda ds: _frame(ds, 3).PlaneOrientationSequence[0].__setattr__(
            "ImageOrientationPatient", [0, 1, 0, 0, 0, -1]), InconsistentSeriesError, "mixed orientations"),
        (lambda ds: _frame(ds, 2).PixelMeasuresSequence[0].__setattr__("PixelSpacing", [0.5, 0.5]),
         InconsistentSeriesError, "mixed pixel spacing"),
        (lambda ds: setattr(ds, "SamplesPerPixel", 3), InvalidInstanceError, "colour"),
    ],
    ids=["duplicate-position", "several-stacks", "orientation", "spacing", "colour"],
)
def test_what_cannot_be_one_volume_is_refused(
    spoil: Callable[[Dataset], object], error: type[Exception], match: str
) -> None:
    ds = read_dataset(sample(SIEMENS_MR))
    for frame in ds.PerFrameFunctionalGroupsSequence:  # each frame its own items, to spoil one
        for keyword in ("PlanePositionSequence", "PlaneOrientationSequence", "PixelMeasuresSequence",
                        "FrameContentSequence"):
            setattr(frame, keyword, copy.deepcopy(frame[keyword].value))
    spoil(ds)
    with pytest.raises(error, match=match):
        load_volume([ds])


@requires_shared
def test_a_series_mixing_single_and_multi_frame_instances_is_refused() -> None:
    enhanced = read_dataset(sample(LEGACY_CT))
    classic = copy.deepcopy(enhanced)
    del classic.PerFrameFunctionalGroupsSequence
    classic.NumberOfFrames = 1
    with pytest.raises(InconsistentSeriesError, match="mixes 1 multi-frame"):
        load_volume([enhanced, classic])


# -- SEG and SR on an enhanced volume -------------------------------------------------------------
def _masks(volume: Volume) -> dict[str, np.ndarray]:
    lungs = volume.pixels < -500
    lungs[:6] = False  # frames without this segment: the SEG and SR list only the others
    return {"lungs": lungs, "bone": volume.pixels > 500}


def _seg_and_sr(volume: Volume, algorithm: AlgorithmInfo) -> tuple[hd.seg.Segmentation, hd.sr.ComprehensiveSR]:
    masks = _masks(volume)
    seg = build_segmentation(volume, masks, series_instance_uid=derived_uid("t", "seg", "series"),
                             sop_instance_uid=derived_uid("t", "seg"), series_number=90, algorithm=algorithm)
    measurements = [StructureMeasurement(label, number, float(mask.sum()) * volume.voxel_volume_ml, -800.0)
                    for number, (label, mask) in enumerate(masks.items(), start=1)]
    sr = build_volume_report(volume, seg, measurements, series_instance_uid=derived_uid("t", "sr", "series"),
                             sop_instance_uid=derived_uid("t", "sr"), series_number=91, algorithm=algorithm)
    return seg, sr


def _plane_positions(ds: Dataset) -> dict[int, tuple[float, ...]]:
    return {n: tuple(float(v) for v in f.PlanePositionSequence[0].ImagePositionPatient)
            for n, f in enumerate(ds.PerFrameFunctionalGroupsSequence, start=1)}


def test_seg_of_an_enhanced_ct_references_each_planes_own_frame(
    algorithm: AlgorithmInfo, validate: Callable[[bytes], object]
) -> None:
    classic = _classic()
    enhanced = _convert(classic)
    volume = load_volume([enhanced])
    masks = _masks(volume)
    seg_ds, sr_ds = _seg_and_sr(volume, algorithm)
    seg_bytes = to_bytes(seg_ds)
    validate(seg_bytes)
    seg = hd.seg.segread(BytesIO(seg_bytes))
    source_positions = _plane_positions(enhanced)
    referenced: dict[int, set[int]] = {1: set(), 2: set()}
    for item in seg.PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        assert source.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        frame_number = int(source.ReferencedFrameNumber)
        # the plane is where its source frame is ...
        position = tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        assert position == pytest.approx(source_positions[frame_number])
        referenced[int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)].add(frame_number)
    # ... and holds the mask of the volume's slice at that frame
    frames = sorted(source_positions)
    by_frame = seg.get_pixels_by_source_frame(source_sop_instance_uid=enhanced.SOPInstanceUID,
                                              source_frame_numbers=frames, combine_segments=False)
    slice_of = {frame: index for index, (_, frame) in enumerate(volume.source_frames)}
    for segment, mask in enumerate(masks.values()):
        np.testing.assert_array_equal(by_frame[..., segment].astype(bool),
                                      mask[[slice_of[f] for f in frames]])
        assert referenced[segment + 1] == {volume.source_frames[i][1] for i in np.flatnonzero(mask.any(axis=(1, 2)))}
    # the same SEG pixels, plane for plane, as on the classic series
    classic_seg = hd.seg.segread(BytesIO(to_bytes(_seg_and_sr(load_volume(classic), algorithm)[0])))
    assert classic_seg.NumberOfFrames == seg.NumberOfFrames

    sr_bytes = to_bytes(sr_ds)
    validate(sr_bytes)
    sr = hd.sr.srread(BytesIO(sr_bytes))
    for number, group in enumerate(sr.content.get_volumetric_roi_measurement_groups(), start=1):
        items = group.referenced_segment.source_images_for_segmentation
        assert len(items) == 1
        sop = items[0].ReferencedSOPSequence[0]
        assert sop.ReferencedSOPInstanceUID == enhanced.SOPInstanceUID
        assert sorted(int(n) for n in sop.ReferencedFrameNumber) == sorted(referenced[number])


def test_seg_and_sr_of_a_series_of_two_enhanced_instances(
    algorithm: AlgorithmInfo, validate: Callable[[bytes], object]
) -> None:
    classic = _classic()
    series_uid = derived_uid("enhanced", "two", "series")
    upper, lower = _convert(classic[20:], 1, series_uid), _convert(classic[:20], 2, series_uid)
    volume = load_volume([upper, lower])
    seg_ds, sr_ds = _seg_and_sr(volume, algorithm)
    seg_bytes, sr_bytes = to_bytes(seg_ds), to_bytes(sr_ds)
    validate(seg_bytes)
    validate(sr_bytes)
    positions = {upper.SOPInstanceUID: _plane_positions(upper), lower.SOPInstanceUID: _plane_positions(lower)}
    seen = set()
    for item in hd.seg.segread(BytesIO(seg_bytes)).PerFrameFunctionalGroupsSequence:
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        seen.add(source.ReferencedSOPInstanceUID)
        position = tuple(float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        assert position == pytest.approx(positions[source.ReferencedSOPInstanceUID][int(source.ReferencedFrameNumber)])
    assert seen == {upper.SOPInstanceUID, lower.SOPInstanceUID}
    evidence = {str(r.ReferencedSOPInstanceUID) for s in pydicom.dcmread(BytesIO(sr_bytes)).CurrentRequestedProcedureEvidenceSequence
                for series in s.ReferencedSeriesSequence for r in series.ReferencedSOPSequence}
    assert {upper.SOPInstanceUID, lower.SOPInstanceUID} <= evidence
    sr = hd.sr.srread(BytesIO(sr_bytes))
    for group in sr.content.get_volumetric_roi_measurement_groups():
        # each instance holding frames of the segment, with those frames
        items = group.referenced_segment.source_images_for_segmentation
        assert {i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for i in items} <= evidence
        assert all(len(i.ReferencedSOPSequence[0].ReferencedFrameNumber) >= 1 for i in items)


def test_repaired_copy_of_an_enhanced_ct_still_reads_its_frames_from_the_file(tmp_path: Path) -> None:
    # conform_copied_attributes replaces a source missing a Type 2 attribute by a copy: its Pixel
    # Data stays deferred (not the whole instance loaded at once), read frame by frame from the file
    from dicom_io.source_header import conform_copied_attributes

    classic = _classic()
    enhanced = _convert(classic)
    del enhanced.PatientSex
    ds = read_dataset(_write(enhanced, tmp_path / "enhanced.dcm"), defer_size=64 * 1024)
    [copy_] = conform_copied_attributes([ds], purpose="test")
    assert copy_ is not ds and copy_.get_item("PixelData", keep_deferred=True).value is None
    volume = load_volume([copy_], release_pixel_data=True)
    _assert_same_volume(volume, load_volume(classic))
