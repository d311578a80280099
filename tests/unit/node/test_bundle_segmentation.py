"""A MONAI bundle as a segmentation task: its masks become a SEG (labels coded) and a TID 1500 SR
with volumes, both valid, read back with highdicom to the bundle's own output."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
import pytest

from dicom_io.measurement_report import VOLUME
from dicom_io.validation import run_dciodvfy
from dicom_io.volume import load_volume
from inference.monai_bundle import MonaiBundle
from node.config import load_settings, plan_tasks
from node.pipeline import bundle_segmentation, load_bundle
from tests.phantom import PhantomGeometry, make_ct_phantom
from tests.unit.inference.test_monai_bundle import build_threshold_bundle


def _valid(tmp_path: Path, name: str, dataset) -> bytes:  # type: ignore[no-untyped-def]
    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)
    path = tmp_path / f"{name}.dcm"
    path.write_bytes(buffer.getvalue())
    report = run_dciodvfy(path)
    assert report.errors == [], report.errors
    return buffer.getvalue()


def test_bundle_masks_become_seg_and_sr(tmp_path: Path) -> None:
    bundle_dir = build_threshold_bundle(tmp_path / "bundle", exclusive=False, dictionary=True)
    bundle = load_bundle(bundle_dir, "cpu")
    assert load_bundle(bundle_dir, "cpu") is bundle  # loaded once, kept warm
    geometry = PhantomGeometry(rows=80, columns=80, pixel_spacing_mm=(4.0, 4.0), slice_spacing_mm=10.0,
                               num_slices=18)
    volume = load_volume(make_ct_phantom(geometry=geometry))
    expected = MonaiBundle.load(bundle_dir).segment(volume.pixels, volume.spacing_mm, affine_lps=volume.affine)

    seg_out, sr_out = bundle_segmentation(bundle, volume, "study/1/rule")

    seg = hd.seg.segread(BytesIO(_valid(tmp_path, "seg", seg_out.dataset)))
    labels = [seg.get_segment_description(n).segment_label for n in seg.get_segment_numbers()]
    found = {k: v for k, v in expected.items() if v.any()}
    assert [label.lower() for label in labels] == list(found)
    source_uids = [ds.SOPInstanceUID for ds in volume.datasets]
    pixels = seg.get_pixels_by_source_instance(source_sop_instance_uids=source_uids, combine_segments=False)
    for index, mask in enumerate(found.values()):
        np.testing.assert_array_equal(pixels[..., index].astype(bool), mask)
    sr = hd.sr.srread(BytesIO(_valid(tmp_path, "sr", sr_out.dataset)))
    volumes = [g.get_measurements(name=VOLUME)[0].value
               for g in sr.content.get_volumetric_roi_measurement_groups()]
    assert volumes == pytest.approx([m.sum() * volume.voxel_volume_ml for m in found.values()])
    assert sr.StudyInstanceUID == volume.datasets[0].StudyInstanceUID


def test_segment_tasks_name_a_configured_bundle(tmp_path: Path) -> None:
    assert plan_tasks([{"segment": {"bundle": "spleen"}}, "ct_analysis"]).bundles == ("spleen",)
    rule = {"name": "r", "match": {"modality": ["CT"]}, "tasks": [{"segment": {"bundle": "spleen"}}],
            "destinations": []}
    with pytest.raises(ValueError, match="not in models.bundles"):
        load_settings(rules=[rule])
    settings = load_settings(rules=[rule], models={"bundles": {"spleen": str(tmp_path)}})
    assert settings.models.bundles["spleen"] == tmp_path


def test_bundle_on_an_enhanced_ct_references_its_frames(tmp_path: Path) -> None:
    bundle = load_bundle(build_threshold_bundle(tmp_path / "bundle", exclusive=False, dictionary=True), "cpu")
    geometry = PhantomGeometry(rows=80, columns=80, pixel_spacing_mm=(4.0, 4.0), slice_spacing_mm=10.0,
                               num_slices=18)
    classic = make_ct_phantom(geometry=geometry)
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        classic, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1)
    volume = load_volume([enhanced])
    expected = MonaiBundle.load(bundle.bundle_dir).segment(volume.pixels, volume.spacing_mm, affine_lps=volume.affine)
    found = {k: v for k, v in expected.items() if v.any()}

    seg_out, sr_out = bundle_segmentation(bundle, volume, "study/2/rule")

    seg = hd.seg.segread(BytesIO(_valid(tmp_path, "seg", seg_out.dataset)))
    frames = list(range(1, geometry.num_slices + 1))
    by_frame = seg.get_pixels_by_source_frame(source_sop_instance_uid=enhanced.SOPInstanceUID,
                                              source_frame_numbers=frames, combine_segments=False)
    slice_of = {frame: index for index, (_, frame) in enumerate(volume.source_frames)}
    for index, mask in enumerate(found.values()):
        np.testing.assert_array_equal(by_frame[..., index].astype(bool), mask[[slice_of[f] for f in frames]])
    sr = hd.sr.srread(BytesIO(_valid(tmp_path, "sr", sr_out.dataset)))
    assert [g.referenced_segment.source_images_for_segmentation[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for g in sr.content.get_volumetric_roi_measurement_groups()] == [enhanced.SOPInstanceUID] * len(found)
