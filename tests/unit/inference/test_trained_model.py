"""A tiny Gemma 3 trained on the product's own prompts really emits MedGemma boxes, and the
product's loader, runtime and box parser turn them into the right boxes on the original frames.

The model is fine-tuned once per session (seconds, CPU) by :mod:`tests.trained_models`; its
answers live in its weights, and the product loads it like any downloaded checkpoint.
"""

import json
from pathlib import Path

import pytest

from inference.results import LabelResult, RegionResult, ReportResult
from inference.tasks import TaskSpec
from inference.vlm import VLMConfig, load_vlm
from tests.trained_models import (
    DEFAULT_TARGETS,
    RADIOGRAPHS,
    TRAINING_RECORD,
    expected_box,
    medgemma_answer,
    prepare_radiographs,
    tiny_grounding_model_dir,  # noqa: F401  (session fixture)
    train_tiny_grounding_model,
)

PHRASE = "right lung"
TARGET = DEFAULT_TARGETS["ground"][PHRASE]  # (y0, x0, y1, x1) on 0-1000 of the padded square


@pytest.fixture(scope="module")
def trained_dir(tiny_grounding_model_dir: Path) -> Path:  # noqa: F811
    return tiny_grounding_model_dir


@pytest.fixture(scope="module")
def vlm(trained_dir):
    return load_vlm(VLMConfig(path=str(trained_dir), family="medgemma", device="cpu"))


def test_ground_gives_the_trained_box_on_each_original_frame(vlm):
    images = prepare_radiographs(vlm)  # Modality LUT + DICOM window, as the node prepares them
    results = vlm.run(images, [TaskSpec(kind="ground", phrases=(PHRASE,))])
    assert [type(r) for r in results] == [RegionResult, RegionResult]
    y0, x0, y1, x1 = (v / 1000 for v in TARGET)
    for index, (image, result) in enumerate(zip(images, results, strict=True)):
        assert result.raw_text == medgemma_answer(PHRASE, TARGET)
        assert result.rejected == ()
        (box,) = result.boxes
        assert (box.label, box.image_index) == (PHRASE, index)
        t = image.transform
        # Input (padded square) normalised -> input pixels -> original pixels, by hand.
        want = (x0 * t.input_width * t.scale_x + t.offset_x, y0 * t.input_height * t.scale_y + t.offset_y,
                x1 * t.input_width * t.scale_x + t.offset_x, y1 * t.input_height * t.scale_y + t.offset_y)
        got = box.to_pixels(t.original_width, t.original_height)
        assert got == pytest.approx(want, abs=1.0)
        assert box == expected_box(TARGET, image, label=PHRASE, image_index=index)


def test_the_box_lands_where_the_target_says_on_the_real_radiograph(vlm):
    cr = prepare_radiographs(vlm, RADIOGRAPHS[:1])[0]
    (result,) = vlm.run([cr], [TaskSpec(kind="ground", phrases=(PHRASE,))])
    (box,) = result.boxes
    x0, y0, x1, y1 = box.to_pixels(1841, 1955)  # CR: 1841 columns, 1955 rows, padded 57 px each side
    assert (x0, y0, x1, y1) == pytest.approx((0.120 * 1955 - 57, 0.2 * 1955, 0.48 * 1955 - 57, 0.8 * 1955),
                                             abs=1.0)


def test_report_and_classify_give_the_trained_answers(vlm):
    images = prepare_radiographs(vlm)
    report, label = vlm.run(images, [TaskSpec(kind="report", language="en"),
                                     TaskSpec(kind="classify", labels=("pleural effusion",))])
    assert isinstance(report, ReportResult) and isinstance(label, LabelResult)
    assert (report.findings, report.impression) == (DEFAULT_TARGETS["report"], None)
    assert label.state == "present" and label.probability is not None and label.probability > 0.9


def test_saved_directory_records_what_it_was_trained_to_say(trained_dir):
    record = json.loads((trained_dir / TRAINING_RECORD).read_text(encoding="utf-8"))
    assert record["targets"]["ground"] == {PHRASE: list(TARGET)}
    assert record["family"] == "medgemma" and record["steps"] >= 1
    assert (trained_dir / "config.json").is_file() and (trained_dir / "model.safetensors").is_file()


@pytest.mark.parametrize("targets", [
    {"ground": {}},
    {"ground": {PHRASE: (800, 120, 200, 480)}},
    {"ground": {PHRASE: (0, 0, 1001, 5)}},
    {"ground": {PHRASE: (1, 2, 3, 4)}, "classify": {"x": "maybe"}},
    {"ground": {PHRASE: (1, 2, 3, 4)}, "segment": {}},
])
def test_bad_targets_are_refused_before_training(tmp_path, targets):
    with pytest.raises(ValueError, match="targets"):
        train_tiny_grounding_model(tmp_path / "base", tmp_path / "out", targets=targets)


def test_other_families_are_refused(tmp_path):
    with pytest.raises(ValueError, match="medgemma"):
        train_tiny_grounding_model(tmp_path / "base", tmp_path / "out", family="llava",
                                   targets=DEFAULT_TARGETS)
