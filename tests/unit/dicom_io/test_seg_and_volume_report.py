from __future__ import annotations

import math
from io import BytesIO

import highdicom as hd
import numpy as np
import pytest

from dicom_io.codes import STRUCTURES
from dicom_io.equipment import AlgorithmInfo
from dicom_io.measurement_report import StructureMeasurement, build_volume_report
from dicom_io.seg import build_segmentation
from dicom_io.uids import derived_uid
from dicom_io.volume import Volume, load_volume

from .conftest import requires_shared, series_datasets, to_bytes

pytestmark = requires_shared

SEG_SERIES = derived_uid("test-job", "seg-series")
SEG_SOP = derived_uid("test-job", "seg")
SR_SERIES = derived_uid("test-job", "sr-series")
SR_SOP = derived_uid("test-job", "sr")


@pytest.fixture(scope="module")
def head() -> Volume:
    return load_volume(series_datasets("ct/pydicom_head_ct2"))


def masks_for(volume: Volume) -> dict[str, np.ndarray]:
    """Lungs on slice 1 only (an asymmetric block, to catch flips); bone on slices 0 and 2."""
    lungs = np.zeros(volume.pixels.shape, dtype=bool)
    lungs[1, 2:5, 3:9] = True
    bone = np.zeros(volume.pixels.shape, dtype=bool)
    bone[0, 0:2, 0:3] = True
    bone[2, 10:16, 12:14] = True
    return {"lungs": lungs, "bone": bone}


def build(
    volume: Volume, masks: dict[str, np.ndarray], algorithm: AlgorithmInfo
) -> hd.seg.Segmentation:
    return build_segmentation(
        volume,
        masks,
        series_instance_uid=SEG_SERIES,
        sop_instance_uid=SEG_SOP,
        series_number=901,
        algorithm=algorithm,
    )


def test_segmentation_round_trip(head: Volume, algorithm: AlgorithmInfo, validate) -> None:
    masks = masks_for(head)
    data = to_bytes(build(head, masks, algorithm))
    validate(data)
    seg = hd.seg.segread(BytesIO(data))

    assert seg.SOPInstanceUID == SEG_SOP and seg.SeriesInstanceUID == SEG_SERIES
    assert seg.SeriesNumber == 901 and seg.SeriesDescription == "mednode segmentation"
    source = head.datasets[0]
    for keyword in ("StudyInstanceUID", "PatientID", "PatientName", "StudyDate", "AccessionNumber"):
        assert seg.get(keyword) == source.get(keyword), keyword
    assert seg.FrameOfReferenceUID == source.FrameOfReferenceUID
    assert seg.SegmentationType == "BINARY"

    assert seg.get_segment_numbers() == [1, 2]
    for number, key in enumerate(masks, start=1):
        description = seg.get_segment_description(number)
        structure = STRUCTURES[key]
        assert description.segment_label == structure.label
        assert description.segmented_property_type == structure.type
        assert description.segmented_property_category == structure.category
        assert description.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        identification = description.algorithm_identification
        assert identification[0].AlgorithmName == algorithm.name
        assert identification[0].AlgorithmVersion == algorithm.version
        assert description.tracking_uid == derived_uid(SEG_SOP, "segment", key)

    # empty frames omitted: lungs on 1 slice, bone on 2 slices
    assert seg.NumberOfFrames == 3
    # each frame references the right source image and sits at its position
    by_uid = {ds.SOPInstanceUID: ds for ds in head.datasets}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        source_uid = (
            frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        )
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(
            [float(v) for v in position],
            [float(v) for v in by_uid[source_uid].ImagePositionPatient],
        )
    uids = [ds.SOPInstanceUID for ds in head.datasets]
    pixels = seg.get_pixels_by_source_instance(uids, segment_numbers=[1, 2])
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), masks["lungs"])
    np.testing.assert_array_equal(pixels[..., 1].astype(bool), masks["bone"])

    equipment = seg.ContributingEquipmentSequence[-1]
    assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "Newcode1"
    assert equipment.DeviceUID == algorithm.device_uid


def test_segmentation_is_reproducible(head: Volume, algorithm: AlgorithmInfo) -> None:
    first = build(head, masks_for(head), algorithm)
    second = build(head, masks_for(head), algorithm)
    assert first.PixelData == second.PixelData
    assert first.SOPInstanceUID == second.SOPInstanceUID


def test_segmentation_on_ct_with_empty_character_set(
    ct3: Volume, algorithm: AlgorithmInfo, validate
) -> None:
    assert ct3.datasets[0].SpecificCharacterSet == ""
    mask = np.zeros(ct3.pixels.shape, dtype=bool)
    mask[2, 100:300, 50:120] = True
    data = to_bytes(build(ct3, {"body": mask}, algorithm))
    validate(data)
    seg = hd.seg.segread(BytesIO(data))
    assert seg.NumberOfFrames == 1
    referenced = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert (
        referenced.SourceImageSequence[0].ReferencedSOPInstanceUID == ct3.datasets[2].SOPInstanceUID
    )
    pixels = seg.get_pixels_by_source_instance(
        [ds.SOPInstanceUID for ds in ct3.datasets], segment_numbers=[1]
    )
    np.testing.assert_array_equal(pixels[..., 0].astype(bool), mask)


def test_segmentation_rejects_bad_masks(head: Volume, algorithm: AlgorithmInfo) -> None:
    with pytest.raises(ValueError, match="non-blank"):
        build(head, {" ": np.ones(head.pixels.shape, bool)}, algorithm)
    with pytest.raises(ValueError, match="resample"):
        build(head, {"lungs": np.zeros((2, 16, 16), bool)}, algorithm)
    with pytest.raises(ValueError, match="at least one mask"):
        build(head, {}, algorithm)


def volume_report(volume, seg, measurements, algorithm):
    return build_volume_report(
        volume,
        seg,
        measurements,
        series_instance_uid=SR_SERIES,
        sop_instance_uid=SR_SOP,
        series_number=902,
        algorithm=algorithm,
    )


@pytest.mark.parametrize(
    "keys", [("lungs", "bone"), ("lungs",)], ids=["two-segments", "one-segment"]
)
def test_volume_report_round_trip(head: Volume, algorithm: AlgorithmInfo, validate, keys) -> None:
    all_masks = masks_for(head)
    masks = {key: all_masks[key] for key in keys}
    seg = hd.seg.segread(BytesIO(to_bytes(build(head, masks, algorithm))))
    inputs = [
        StructureMeasurement(label=key, segment_number=n, volume_ml=12.5 * n, mean_hu=-850.25 + n)
        for n, key in enumerate(keys, start=1)
    ]
    data = to_bytes(volume_report(head, seg, inputs, algorithm))
    validate(data)
    sr = hd.sr.srread(BytesIO(data))

    assert isinstance(sr, hd.sr.ComprehensiveSR)
    assert (
        sr.SOPInstanceUID == SR_SOP and sr.SeriesInstanceUID == SR_SERIES and sr.SeriesNumber == 902
    )
    assert sr.StudyInstanceUID == head.datasets[0].StudyInstanceUID
    assert sr.PatientID == head.datasets[0].PatientID
    assert sr.VerificationFlag == "UNVERIFIED"
    assert sr.ContributingEquipmentSequence[-1].DeviceUID == algorithm.device_uid
    referenced_in_evidence = {
        item.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for item in series.ReferencedSOPSequence
    }
    assert SEG_SOP in referenced_in_evidence

    report = sr.content
    assert isinstance(report, hd.sr.MeasurementReport)
    (observer,) = report.get_observer_contexts(
        observer_type=hd.sr.CodedConcept("121007", "DCM", "Device")
    )
    assert observer.observer_identifying_attributes.uid == algorithm.device_uid
    groups = report.get_volumetric_roi_measurement_groups()
    assert len(groups) == len(inputs)
    for group, expected in zip(groups, inputs, strict=True):
        structure = STRUCTURES[expected.label]
        assert group.tracking_identifier == structure.label
        assert group.tracking_uid == derived_uid(SR_SOP, "group", expected.label)
        assert group.finding_type == structure.type
        assert [site.value for site in group.finding_sites] == [structure.type]
        volume_item = group.get_measurements(name=hd.sr.CodedConcept("118565006", "SCT", "Volume"))[
            0
        ]
        assert volume_item.value == pytest.approx(expected.volume_ml)
        assert volume_item.unit.value == "ml"
        hu_item = group.get_measurements(
            name=hd.sr.CodedConcept("112031", "DCM", "Attenuation Coefficient")
        )[0]
        assert hu_item.value == pytest.approx(expected.mean_hu)
        assert hu_item.unit.value == "[hnsf'U]"
        segment = group.referenced_segment
        assert segment.referenced_sop_instance_uid == SEG_SOP
        assert segment.referenced_segment_numbers == [expected.segment_number]
        # source images of the segment = slices where its mask is non-empty
        mask = masks[expected.label]
        expected_sources = {
            head.datasets[i].SOPInstanceUID for i in np.flatnonzero(mask.any(axis=(1, 2)))
        }
        sources = {
            item.referenced_sop_instance_uid for item in segment.source_images_for_segmentation
        }
        assert sources == expected_sources


def test_volume_report_skips_non_finite_mean(
    head: Volume, algorithm: AlgorithmInfo, validate
) -> None:
    seg = build(head, {"lungs": masks_for(head)["lungs"]}, algorithm)
    data = to_bytes(
        volume_report(head, seg, [StructureMeasurement("lungs", 1, 3.0, math.nan)], algorithm)
    )
    validate(data)
    group = hd.sr.srread(BytesIO(data)).content.get_volumetric_roi_measurement_groups()[0]
    assert [m.name.value for m in group.get_measurements()] == ["118565006"]


def test_volume_report_rejects_unknown_segment(head: Volume, algorithm: AlgorithmInfo) -> None:
    seg = build(head, {"lungs": masks_for(head)["lungs"]}, algorithm)
    with pytest.raises(ValueError, match="segment 7"):
        volume_report(head, seg, [StructureMeasurement("lungs", 7, 1.0, 0.0)], algorithm)


def test_empty_segment_references_source_series(
    head: Volume, algorithm: AlgorithmInfo, validate
) -> None:
    masks = {"lungs": masks_for(head)["lungs"], "bone": np.zeros(head.pixels.shape, dtype=bool)}
    seg_data = to_bytes(build(head, masks, algorithm))
    validate(seg_data)
    seg = hd.seg.segread(BytesIO(seg_data))
    assert seg.get_segment_numbers() == [1, 2]
    inputs = [
        StructureMeasurement("lungs", 1, 2.0, -700.0),
        StructureMeasurement("bone", 2, 0.0, math.nan),
    ]
    data = to_bytes(volume_report(head, seg, inputs, algorithm))
    validate(data)
    groups = hd.sr.srread(BytesIO(data)).content.get_volumetric_roi_measurement_groups()
    bone_reference = groups[1].referenced_segment
    assert bone_reference.referenced_segment_numbers == [2]
    assert bone_reference.source_series_for_segmentation.value == head.series_instance_uid
    assert groups[1].get_measurements()[0].value == 0.0


def test_volume_report_on_ct_with_empty_character_set(
    ct3: Volume, algorithm: AlgorithmInfo, validate
) -> None:
    mask = np.zeros(ct3.pixels.shape, dtype=bool)
    mask[0:2, 200:260, 100:180] = True
    seg = build(ct3, {"body": mask}, algorithm)
    volume_ml = float(mask.sum()) * ct3.voxel_volume_ml
    mean_hu = float(ct3.pixels[mask].mean())
    data = to_bytes(
        volume_report(ct3, seg, [StructureMeasurement("body", 1, volume_ml, mean_hu)], algorithm)
    )
    validate(data)
    sr = hd.sr.srread(BytesIO(data))
    assert "SpecificCharacterSet" not in sr
    group = sr.content.get_volumetric_roi_measurement_groups()[0]
    values = [m.value for m in group.get_measurements()]
    assert values == pytest.approx([volume_ml, mean_hu], rel=1e-6)
    sources = {
        i.referenced_sop_instance_uid
        for i in group.referenced_segment.source_images_for_segmentation
    }
    assert sources == {ct3.datasets[0].SOPInstanceUID, ct3.datasets[1].SOPInstanceUID}


def test_segment_over_many_slices_references_its_source_series(algorithm: AlgorithmInfo, validate) -> None:
    """Above MAX_LISTED_SOURCE_IMAGES slices a segment is referenced by series (TID 1411 row 15),
    keeping a large CT's report small and quick to build; a few slices are still listed one by one."""
    from dicom_io.measurement_report import MAX_LISTED_SOURCE_IMAGES
    from tests.phantom import PhantomGeometry, make_ct_phantom

    geometry = PhantomGeometry(rows=64, columns=64, pixel_spacing_mm=(5.0, 5.0),
                               slice_spacing_mm=5.0, num_slices=MAX_LISTED_SOURCE_IMAGES + 8)
    volume = load_volume(make_ct_phantom(geometry=geometry))
    tall = np.zeros(volume.pixels.shape, dtype=bool)
    tall[:, 20:40, 20:40] = True  # every slice
    short = np.zeros(volume.pixels.shape, dtype=bool)
    short[3:6, 10:20, 10:20] = True  # three slices
    seg = hd.seg.segread(BytesIO(to_bytes(build(volume, {"body": tall, "bone": short}, algorithm))))
    inputs = [StructureMeasurement("body", 1, 10.0, 40.0), StructureMeasurement("bone", 2, 1.0, 700.0)]
    data = to_bytes(volume_report(volume, seg, inputs, algorithm))
    validate(data)
    body, bone = hd.sr.srread(BytesIO(data)).content.get_volumetric_roi_measurement_groups()
    assert body.referenced_segment.source_series_for_segmentation.value == volume.series_instance_uid
    listed = {s.referenced_sop_instance_uid for s in bone.referenced_segment.source_images_for_segmentation}
    assert listed == {str(volume.datasets[i].SOPInstanceUID) for i in range(3, 6)}


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapping", "disjoint"])
def test_packed_stack_answers_highdicoms_checks_as_highdicom(overlap: bool) -> None:
    from dicom_io.packed_mask import PackedMask
    from dicom_io.seg import _PackedStack, _Segmentation

    rng = np.random.default_rng(7)
    dense = rng.random((70, 9, 11, 3)) < 0.02  # more frames than one slab, some empty
    dense[5:9] = False
    if not overlap:
        first = dense.argmax(axis=-1)
        dense = (np.arange(3) == first[..., None]) & dense.any(axis=-1, keepdims=True)
    stack = _PackedStack([PackedMask.from_array(np.ascontiguousarray(dense[..., i])) for i in range(3)])
    assert stack.shape == dense.shape and stack.ndim == 4 and stack.dtype == dense.dtype
    for frame in (0, 6, 69):
        np.testing.assert_array_equal(stack[frame], dense[frame])
    numbers = np.array([1, 2, 3])
    binary = hd.seg.SegmentationTypeValues.BINARY
    ours = _Segmentation._check_and_cast_pixel_array(stack, numbers, binary, np.uint8)
    theirs = hd.seg.Segmentation._check_and_cast_pixel_array(dense, numbers, binary, np.uint8)
    assert ours[1] == theirs[1] == (hd.seg.SegmentsOverlapValues.YES if overlap else hd.seg.SegmentsOverlapValues.NO)
    assert _Segmentation._get_nonempty_plane_indices(stack) == hd.seg.Segmentation._get_nonempty_plane_indices(dense)
    empty = _PackedStack([PackedMask.zeros((4, 9, 11))])
    assert _Segmentation._get_nonempty_plane_indices(empty) == ([0, 1, 2, 3], True)


def test_seg_from_packed_masks_equals_highdicoms_own_from_the_dense_array(
    algorithm: AlgorithmInfo, validate, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dicom_io import seg as seg_module
    from dicom_io.packed_mask import PackedMask

    volume = load_volume(series_datasets("ct/pydicom_head_ct2"))
    masks = masks_for(volume)
    masks["body"] = np.ones(volume.shape, dtype=bool)  # overlaps both
    masks["body"][3] = False
    volume.release_pixels()
    packed = build(volume, {key: PackedMask.from_array(mask) for key, mask in masks.items()}, algorithm)
    from_bool = build(volume, masks, algorithm)
    # highdicom's own class on the dense (frames, rows, columns, segments) array
    monkeypatch.setattr(seg_module, "_Segmentation", hd.seg.Segmentation)
    monkeypatch.setattr(seg_module, "_PackedStack",
                        lambda masks: np.stack([m.to_array() for m in masks]).transpose(1, 2, 3, 0))
    plain = build(volume, masks, algorithm)
    validate(to_bytes(packed))
    assert packed.SegmentsOverlap == plain.SegmentsOverlap == "YES"
    assert packed.NumberOfFrames == plain.NumberOfFrames == 2 + 3 + 1
    for built in (packed, from_bool):
        assert built.PixelData == plain.PixelData
        # everything but the moment of creation and the random Dimension Organization UID
        for keyword in ("PerFrameFunctionalGroupsSequence", "SegmentSequence", "ReferencedSeriesSequence",
                        "SharedFunctionalGroupsSequence"):
            assert built.get(keyword) == plain.get(keyword), keyword
