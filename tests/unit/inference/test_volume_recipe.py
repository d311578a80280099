"""CT and MR volumes as MedGemma 1.5 was trained on them (Google Health's notebook
``high_dimensional_ct_hugging_face.ipynb``, see :mod:`inference.vlm.volume_recipe`).

The structure of the user turn, the sampling and the windows are held against the notebook's own
literals; the tiny Gemma 3 (MedGemma's architecture) then renders the turn with its real
processor and chat template; slice decoding is counted on synthetic series written to files.
"""

from __future__ import annotations

import random
import re
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from dicom_io import slice_stack
from dicom_io.slice_stack import read_slice, stack_slices
from inference.geometry import ImageTransform, PreparedImage
from inference.tasks import TaskSpec
from inference.vlm import VLMConfig, get_vlm
from inference.vlm.volume_recipe import (
    MEDGEMMA_MAX_SLICES,
    medgemma_ct_rgb,
    prepare_volume,
    recipe_sample,
    user_content,
)
from tests.models import tiny_vlm_dirs  # noqa: F401  (session fixture)
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series
from tests.shared_data import SHARED_DICOM

#: The notebook's instruction structure, less its persona and its "from the center of the abdomen".
CT_INSTRUCTION = ("You are analyzing a contiguous block of CT slices. "
                  "Please review the slices provided below carefully.")
#: The notebook's query opening: "\n\nBased on the visual evidence in the slices provided above, ".
REPORT_QUESTION = ("\n\nBased on the visual evidence in the slices provided above, write the radiology "
                   "report for this study with two sections, 'FINDINGS:' and 'IMPRESSION:'.")


def small_ct(num_slices: int, *, rows: int = 48) -> list[pydicom.Dataset]:
    """A synthetic CT series (ascending z) whose slices differ: HU from -1024 to 1500, seeded."""
    geometry = PhantomGeometry(rows=rows, columns=rows, pixel_spacing_mm=(0.7, 0.7), slice_spacing_mm=2.0,
                               num_slices=num_slices)
    hu = np.random.default_rng(num_slices).integers(-1024, 1500, size=geometry.shape).astype(np.int16)
    return make_ct_phantom(geometry=geometry, hu=hu)


def headers(paths: list[Path]) -> list[pydicom.Dataset]:
    return [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]


def image(modality: str | None) -> PreparedImage:
    transform = ImageTransform(8, 8, 8, 8, 1.0, 1.0, 0.0, 0.0)
    return PreparedImage(Image.new("RGB", (8, 8)), transform, volume_modality=modality)


class CountingDecoder:
    """Wraps pydicom's ``pixel_array`` as dicom_io calls it, counting each decode."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls: list[tuple[str, int | None]] = []
        real = slice_stack.pixel_array

        def counted(src, **kwargs):  # type: ignore[no-untyped-def]
            self.calls.append((str(src if isinstance(src, str) else "dataset"), kwargs.get("index")))
            return real(src, **kwargs)

        monkeypatch.setattr(slice_stack, "pixel_array", counted)


@pytest.fixture(scope="module")
def gemma(tiny_vlm_dirs):  # noqa: F811
    return get_vlm(VLMConfig(path=str(tiny_vlm_dirs["gemma3"]), family="medgemma", device="cpu",
                             max_new_tokens=4))


# --- sampling and windows, against the notebook's literals ------------------------------------


def test_recipe_sampling_is_the_notebooks() -> None:
    n = 300
    notebook = [int(round(i / (85) * (n - 1))) for i in range(1, 85 + 1)]  # noqa: RUF046 (verbatim)
    picked = recipe_sample(n)
    assert picked == notebook
    assert len(picked) == MEDGEMMA_MAX_SLICES == 85 and len(set(picked)) == 85
    assert picked[-1] == n - 1 and picked == sorted(picked)
    assert recipe_sample(86) == list(range(1, 86))  # the first slice is the one left out
    assert recipe_sample(85) == list(range(85)) and recipe_sample(3) == [0, 1, 2]
    assert recipe_sample(1000, 10) == [100, 200, 300, 400, 500, 599, 699, 799, 899, 999]


def test_three_hu_windows_as_rgb() -> None:
    hu = np.array([[-2000, -1024, -135, 0], [40, 80, 215, 1024], [3000, 512, -500, 100]], dtype=np.float32)
    rgb = medgemma_ct_rgb(hu)
    assert rgb.dtype == np.uint8 and rgb.shape == (3, 4, 3)
    # R: -1024..1024, G: -135..215, B: 0..80; (x - lo) / (hi - lo) * 255, rounded half to even.
    expected = {
        -2000: (0, 0, 0), -1024: (0, 0, 0), -135: (111, 0, 0), 0: (128, 98, 0),
        40: (132, 128, 128), 80: (137, 157, 255), 215: (154, 255, 255), 1024: (255, 255, 255),
        3000: (255, 255, 255), 512: (191, 255, 255), -500: (65, 0, 0), 100: (140, 171, 255),
    }
    for (r, c), value in np.ndenumerate(hu):
        assert tuple(rgb[r, c]) == expected[int(value)], value


# --- the user turn -------------------------------------------------------------------------------


def test_the_turn_is_instruction_slices_then_question() -> None:
    slices = [image("CT") for _ in range(3)]
    prompt = "Write the radiology report for this study with two sections, 'FINDINGS:' and 'IMPRESSION:'."
    content = user_content(slices, prompt, slice_recipe=True, language="en")
    assert content == [
        {"type": "text", "text": CT_INSTRUCTION},
        {"type": "image", "image": slices[0].image}, {"type": "text", "text": "SLICE 1"},
        {"type": "image", "image": slices[1].image}, {"type": "text", "text": "SLICE 2"},
        {"type": "image", "image": slices[2].image}, {"type": "text", "text": "SLICE 3"},
        {"type": "text", "text": REPORT_QUESTION},
    ]


def test_questions_keep_their_words_and_other_families_keep_their_layout() -> None:
    slices = [image("MR"), image("MR")]
    content = user_content(slices, "Is there a CT-visible mass?", slice_recipe=True, language="en")
    assert content[0]["text"] == CT_INSTRUCTION.replace("CT", "MR")
    assert content[-1]["text"] == ("\n\nBased on the visual evidence in the slices provided above, "
                                   "is there a CT-visible mass?")
    assert user_content(slices, "CT report", slice_recipe=True, language="en")[-1]["text"].endswith(", CT report")
    assert user_content(slices, "描述", slice_recipe=True, language="zh")[-1]["text"] == "\n\n根据以上切片中的影像表现，描述"
    # Families without the recipe, projection views and one slice alone: images, then the prompt.
    for images, recipe in ((slices, False), ([image(None), image(None)], True), (slices[:1], True)):
        plain = user_content(images, "Describe.", slice_recipe=recipe, language="en")
        assert plain == [*({"type": "image", "image": i.image} for i in images), {"type": "text", "text": "Describe."}]


# --- ordering along the normal, enhanced multi-frame, bounded decoding --------------------------------


def test_slices_are_ordered_along_the_normal_not_by_file_order(tmp_path: Path) -> None:
    datasets = small_ct(12)
    # Instance Numbers run against the position: the order must follow the position.
    for number, ds in enumerate(reversed(datasets), start=1):
        ds.InstanceNumber = number
    shuffled = headers(write_series(datasets, tmp_path))
    random.Random(3).shuffle(shuffled)
    refs = stack_slices(shuffled)
    z = [float(r.dataset.ImagePositionPatient[2]) for r in refs]
    assert z == sorted(z) and len(refs) == 12 and all(r.frame_index is None for r in refs)
    assert [r.position_mm for r in refs] == pytest.approx(z)
    # A localizer of another orientation in the series is left out.
    scout = pydicom.dcmread(write_series([small_ct(1)[0]], tmp_path / "scout")[0], stop_before_pixels=True)
    scout.ImageOrientationPatient = [1, 0, 0, 0, 0, -1]
    assert len(stack_slices([*shuffled, scout])) == 12


@pytest.mark.parametrize("relative, frames", [("multiframe/siemens_enhanced_mr.dcm", 8),
                                              ("multiframe/dcmqi_legacy_converted_ct.dcm", 3)])
def test_enhanced_multiframe_is_read_by_frame(relative: str, frames: int, monkeypatch) -> None:
    path = SHARED_DICOM / relative
    if not path.is_file():
        pytest.skip(f"shared sample {relative} is missing")
    full = pydicom.dcmread(path)
    refs = stack_slices([pydicom.dcmread(path, stop_before_pixels=True)])
    assert len(refs) == frames
    positions = []
    for ref in refs:
        item = full.PerFrameFunctionalGroupsSequence[ref.frame_index].PlanePositionSequence[0]
        positions.append([float(v) for v in item.ImagePositionPatient])
    normal = np.cross(*np.reshape(_orientation(full, refs[0].frame_index), (2, 3)))
    along = [float(np.dot(p, normal)) for p in positions]
    assert along == sorted(along) and [r.position_mm for r in refs] == pytest.approx(along)
    counter = CountingDecoder(monkeypatch)
    ref = refs[-1]
    values = read_slice(ref)
    assert counter.calls == [(str(path), ref.frame_index)], "one frame read, from the file"
    slope, intercept = _rescale(full, ref.frame_index)
    assert np.array_equal(values, full.pixel_array[ref.frame_index] * slope + intercept)
    assert ref.frame_number == ref.frame_index + 1


def _orientation(ds: pydicom.Dataset, frame: int) -> list[float]:
    for group in (ds.PerFrameFunctionalGroupsSequence[frame], ds.get("SharedFunctionalGroupsSequence", [None])[0]):
        if group is not None and "PlaneOrientationSequence" in group:
            return [float(v) for v in group.PlaneOrientationSequence[0].ImageOrientationPatient]
    raise AssertionError("no orientation")


def _rescale(ds: pydicom.Dataset, frame: int) -> tuple[float, float]:
    for group in (ds.PerFrameFunctionalGroupsSequence[frame], ds.get("SharedFunctionalGroupsSequence", [None])[0]):
        if group is not None and "PixelValueTransformationSequence" in group:
            item = group.PixelValueTransformationSequence[0]
            return float(item.RescaleSlope), float(item.RescaleIntercept)
    return 1.0, 0.0


def test_only_the_sampled_slices_are_decoded(tmp_path: Path, gemma, monkeypatch) -> None:
    n = 200
    series = headers(write_series(small_ct(n, rows=128), tmp_path))
    assert all("PixelData" not in ds for ds in series)
    counter = CountingDecoder(monkeypatch)
    tracemalloc.start()
    prepared = prepare_volume(gemma, series, max_slices=85)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(prepared) == 85 and len(counter.calls) == 85, "each sampled slice decoded once, no other"
    picked_files = [Path(p).name for p, _ in counter.calls]
    z_order = sorted(series, key=lambda ds: float(ds.ImagePositionPatient[2]))
    assert picked_files == [Path(z_order[i].filename).name for i in recipe_sample(n)]
    whole_series_hu = n * 128 * 128 * 4  # float32
    assert peak < whole_series_hu / 4, f"peak {peak} bytes while decoding; the whole series is {whole_series_hu}"
    # What the model sees of each slice is the notebook's three windows of that slice's HU.
    image, ref = prepared[40]
    hu = read_slice(ref)
    assert image.volume_modality == "CT" and ref.dataset.SOPInstanceUID == z_order[recipe_sample(n)[40]].SOPInstanceUID
    expected = Image.fromarray(medgemma_ct_rgb(hu)).resize(image.image.size, Image.Resampling.BICUBIC)
    assert np.array_equal(np.asarray(image.image), np.asarray(expected))


# --- through the real processor and chat template of the tiny Gemma 3 --------------------------------


def test_gemma3_chat_template_renders_the_recipe(tmp_path: Path, gemma) -> None:
    series = headers(write_series(small_ct(120), tmp_path))
    images = [img for img, _ in prepare_volume(gemma, series, max_slices=gemma.family.max_slices)]
    assert len(images) == 85
    task = TaskSpec(kind="report", language="en", max_new_tokens=4)
    (unit,) = gemma._units(0, images, task)
    messages = gemma._messages(unit)
    assert [m["role"] for m in messages] == ["user"], "one user turn"
    rendered = gemma.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    boi, eoi, soft = (gemma.tokenizer.boi_token, gemma.tokenizer.eoi_token, gemma.tokenizer.image_token)
    # The model's own expansion of each image (the processor's full image sequence).
    inputs = gemma.processor(text=rendered, images=[i.image for i in images], return_tensors="pt")
    text = gemma.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=False)
    blocks = re.findall(re.escape(boi) + f"((?:{re.escape(soft)})+)" + re.escape(eoi) + r"\s*SLICE (\d+)", text)
    assert [int(n) for _, n in blocks] == list(range(1, 86)), "85 image blocks, each followed by SLICE n"
    per_image = gemma.processor.image_seq_length
    assert all(block.count(soft) == per_image for block, _ in blocks)
    assert int((inputs["input_ids"] == gemma.tokenizer.image_token_id).sum()) == 85 * per_image
    before, after = text.split(boi, 1)[0], text.rsplit(eoi, 1)[1]
    assert before.rstrip().endswith(CT_INSTRUCTION), "instruction first"
    assert after.strip().startswith("SLICE 85") and REPORT_QUESTION.strip() in after, "question last"
    assert text.index(REPORT_QUESTION.strip()) > text.rindex("SLICE 85")


def test_a_ct_report_runs_through_the_tiny_model(tmp_path: Path, gemma) -> None:
    series = headers(write_series(small_ct(30), tmp_path))
    images = [img for img, _ in prepare_volume(gemma, series, max_slices=12)]
    calls = gemma.generate_calls
    (result,) = gemma.run(images, [TaskSpec(kind="report", language="en", max_new_tokens=4)])
    assert gemma.generate_calls == calls + 1 and result.image_indices == tuple(range(12))
