"""The node's VLM stage hands CT/MR volumes to the model as the family was trained on them.

Series are read as the pipeline reads them (headers only, from the store's files); only the slices
the family samples are decoded; MedGemma gets up to 85 slices in its recipe, other families their
own few slices and layout; enhanced multi-frame MR goes in frame by frame; the SR refers to the
sampled instances and frames.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicom_io import slice_stack
from dicom_io.source_header import check_copied_attributes, conform_copied_attributes
from dicom_io.volume import read_dataset
from inference.tasks import TaskSpec
from inference.vlm import VLMConfig, clear_vlm_cache, get_vlm
from node.config import VLMSettings
from node.vlm_stage import prepare_images, read_series, run_vlm_tasks
from tests.deidentified import variant
from tests.models import tiny_vlm_dirs  # noqa: F401  (session fixture)
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series
from tests.shared_data import SHARED_DICOM

ENHANCED_MR = SHARED_DICOM / "multiframe" / "siemens_enhanced_mr.dcm"


def ct_files(tmp_path: Path, num_slices: int) -> list[str]:
    geometry = PhantomGeometry(rows=32, columns=32, pixel_spacing_mm=(0.7, 0.7), slice_spacing_mm=1.0,
                               num_slices=num_slices)
    hu = np.random.default_rng(7).integers(-1024, 1500, size=geometry.shape).astype(np.int16)
    paths = [str(p) for p in write_series(make_ct_phantom(geometry=geometry, hu=hu), tmp_path / "ct")]
    random.Random(1).shuffle(paths)  # the store's order says nothing
    return paths


def read_headers(paths: list[str]) -> dict[str, list[pydicom.Dataset]]:
    return read_series({"s": paths}, lambda p: p)


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    calls: list[object] = []
    real = slice_stack.pixel_array

    def counted(src, **kwargs):  # type: ignore[no-untyped-def]
        calls.append((src if isinstance(src, str) else "dataset", kwargs.get("index")))
        return real(src, **kwargs)

    monkeypatch.setattr(slice_stack, "pixel_array", counted)
    return calls


def vlm(dirs, family: str):  # type: ignore[no-untyped-def]
    return get_vlm(VLMConfig(path=str(dirs[family]), family=family, device="cpu", max_new_tokens=4))


def test_medgemma_gets_85_slices_in_order_and_only_those_are_decoded(tmp_path, tiny_vlm_dirs, decodes) -> None:  # noqa: F811
    series = read_headers(ct_files(tmp_path, 150))
    assert all("PixelData" not in ds for ds in series["s"]), "the stage reads headers only"
    images, sources = prepare_images(vlm(tiny_vlm_dirs, "gemma3"), series)
    assert len(images) == 85 and len(decodes) == 85
    assert all(image.volume_modality == "CT" for image in images)
    z = [float(s.dataset.ImagePositionPatient[2]) for s in sources]
    assert z == sorted(z) and len(set(z)) == 85 and all(s.frame_number is None for s in sources)
    assert z[-1] == max(float(ds.ImagePositionPatient[2]) for ds in series["s"]), "the last slice is kept"


def test_other_families_keep_their_few_slices_and_layout(tmp_path, tiny_vlm_dirs, decodes) -> None:  # noqa: F811
    llava = vlm(tiny_vlm_dirs, "llava")
    images, _ = prepare_images(llava, read_headers(ct_files(tmp_path, 40)))
    assert len(images) == llava.family.max_slices == 8 and len(decodes) == 8
    (unit,) = llava._units(0, images, TaskSpec(kind="report"))
    content = llava._messages(unit)[0]["content"]
    assert [c["type"] for c in content] == ["image"] * 8 + ["text"]
    assert not any("SLICE" in str(c.get("text")) for c in content)
    custom, _ = prepare_images(vlm(tiny_vlm_dirs, "gemma3"), read_headers(ct_files(tmp_path / "b", 40)),
                               slices_per_series=5)
    assert len(custom) == 5, "the config's slices_per_series wins over the family's number"


@pytest.mark.skipif(not ENHANCED_MR.is_file(), reason=f"sample {ENHANCED_MR} is missing")
def test_enhanced_mr_goes_in_frame_by_frame(tiny_vlm_dirs, decodes) -> None:  # noqa: F811
    series = read_headers([str(ENHANCED_MR)])
    images, sources = prepare_images(vlm(tiny_vlm_dirs, "gemma3"), series)
    assert len(images) == 8 and all(image.volume_modality == "MR" for image in images)
    assert sorted(s.frame_number for s in sources) == list(range(1, 9))
    assert decodes == [(str(ENHANCED_MR), s.frame_number - 1) for s in sources], "one frame per decode"
    full = pydicom.dcmread(ENHANCED_MR)
    z = [float(full.PerFrameFunctionalGroupsSequence[s.frame_number - 1].PlanePositionSequence[0]
               .ImagePositionPatient[2]) for s in sources]
    assert z == sorted(z)


def test_a_conformed_header_still_finds_its_pixels(tmp_path) -> None:
    source = SHARED_DICOM / "mr" / "MR_small.dcm"
    if not source.is_file():
        pytest.skip(f"sample {source} is missing")
    path = tmp_path / "bad.dcm"
    variant(read_dataset(source), "missing-type2").save_as(path, enforce_file_format=True)
    header = read_dataset(path, stop_before_pixels=True)
    assert check_copied_attributes(header), "the variant needs a repair"
    (conformed,) = conform_copied_attributes([header], purpose="test")
    assert conformed is not header
    assert np.array_equal(slice_stack.read_frame(conformed, None), pydicom.dcmread(source).pixel_array)


def test_a_ct_report_job_through_the_stage(tmp_path, tiny_vlm_dirs) -> None:  # noqa: F811
    clear_vlm_cache()
    settings = VLMSettings(path=tiny_vlm_dirs["gemma3"], family="medgemma", max_new_tokens=4, device="cpu")
    headers = read_headers(ct_files(tmp_path, 100))
    series = {uid: conform_copied_attributes(datasets, purpose="test") for uid, datasets in headers.items()}
    (report,) = run_vlm_tasks(settings, series, [TaskSpec(kind="report", max_new_tokens=4)], job_key="1.2.3/1/ct")
    assert report.kind == "report"
    evidence = report.dataset.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
    referenced = {item.ReferencedSOPInstanceUID for item in evidence.ReferencedSOPSequence}
    assert len(referenced) == 85, "the SR names the 85 sampled slices"
