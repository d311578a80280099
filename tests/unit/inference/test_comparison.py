"""A prior study in the prompt, per family: the content of the user turn, and what a real
processor (the tiny Gemma 3's) makes of it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from inference.geometry import PreparedImage, prepare_image
from inference.tasks import TaskSpec
from inference.vlm.comparison import PriorStudy, comparison_content
from inference.vlm.families import FAMILIES
from inference.vlm.volume_recipe import user_content
from tests.models import build_tiny_gemma3

PROMPT = "Write the radiology report."


def _image(value: int, volume: str | None = None) -> PreparedImage:
    image = prepare_image(np.full((32, 40), value, dtype=np.uint16), photometric="MONOCHROME2", window=None,
                          size=32, mode="pad")
    return PreparedImage(image.image, image.transform, volume)


def _layout(content: list[dict[str, object]], prior: PriorStudy) -> list[str]:
    ids = {id(i.image) for i in prior.images}
    return [("image:prior" if id(p["image"]) in ids else "image:current") if p["type"] == "image"
            else f"text:{p['text']}" for p in content]


CURRENT = [_image(100), _image(200)]
PRIOR = PriorStudy((_image(50),), "2024-01-15", "Findings:\nStable cardiomegaly.")


def test_medgemma_prior_and_current_images_in_one_turn() -> None:
    assert FAMILIES["medgemma"].comparison == "images"
    content = comparison_content(CURRENT, PROMPT, PRIOR, mode="images")
    assert _layout(content, PRIOR) == [
        "text:Prior study (2024-01-15):", "image:prior", "text:Current study:", "image:current", "image:current",
        "text:Report of the prior study (2024-01-15):\nFindings:\nStable cardiomegaly.\n\n"
        "Compare the current study with the prior study.\n\n" + PROMPT]
    no_report = comparison_content(CURRENT[:1], PROMPT, PriorStudy(PRIOR.images, None, None), mode="images",
                                   language="zh")
    assert _layout(no_report, PRIOR) == ["text:既往检查（日期不详）：", "image:prior", "text:本次检查：", "image:current",
                                         "text:请将本次检查与既往检查进行比较。\n\n" + PROMPT]


def test_maira2_current_image_prior_image_and_prior_report() -> None:
    assert FAMILIES["maira2"].comparison == "image_and_report"
    content = comparison_content(CURRENT, PROMPT, PRIOR, mode="image_and_report")
    assert _layout(content, PRIOR) == [
        "text:Given the current frontal image", "image:current", "text: the current lateral image", "image:current",
        "text: and the prior frontal image", "image:prior",
        "text:. PRIOR_REPORT: Findings:\nStable cardiomegaly.. COMPARISON: 2024-01-15. " + PROMPT]
    alone = comparison_content(CURRENT[:1], PROMPT, PriorStudy(PRIOR.images, "2024-01-15"), mode="image_and_report")
    assert _layout(alone, PRIOR)[2:] == ["text: and the prior frontal image", "image:prior",
                                         "text:. PRIOR_REPORT: N/A. COMPARISON: 2024-01-15. " + PROMPT]


@pytest.mark.parametrize("family", ["qwen2_vl", "llava", "paligemma", "internvl"])
def test_other_families_get_the_prior_report_as_text(family: str) -> None:
    assert FAMILIES[family].comparison == "report"
    content = user_content(CURRENT, PROMPT, slice_recipe=FAMILIES[family].slice_recipe, language="en",
                           prior=PRIOR, comparison=FAMILIES[family].comparison)
    assert _layout(content, PRIOR) == [
        "image:current", "image:current",
        "text:Report of the prior study (2024-01-15):\nFindings:\nStable cardiomegaly.\n\n"
        "Compare the current study with the prior study.\n\n" + PROMPT]
    # no report and no image to show: the prompt is the task alone
    assert _layout(comparison_content(CURRENT, PROMPT, PriorStudy(), mode="report"), PRIOR)[-1] == f"text:{PROMPT}"


def test_a_volume_keeps_its_recipe_and_gets_the_report_as_text() -> None:
    slices = [_image(10, "CT"), _image(20, "CT"), _image(30, "CT")]
    content = user_content(slices, PROMPT, slice_recipe=True, language="en", prior=PRIOR, comparison="images")
    texts = [p["text"] for p in content if p["type"] == "text"]
    assert texts[0].startswith("You are analyzing a contiguous block of CT slices")
    assert texts[1:4] == ["SLICE 1", "SLICE 2", "SLICE 3"]
    assert "Stable cardiomegaly." in texts[-1] and sum(p["type"] == "image" for p in content) == 3


@pytest.fixture(scope="module")
def gemma_processor(tmp_path_factory: pytest.TempPathFactory) -> object:
    from transformers import AutoProcessor

    path: Path = build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3"))
    return AutoProcessor.from_pretrained(path)


def test_gemma_processor_takes_both_studies_in_one_turn(gemma_processor: object) -> None:
    """The processor sees every image (prior + current) and the prior report's words."""
    task = TaskSpec(kind="report", language="en")
    prompt = FAMILIES["medgemma"].prompt(task)
    with_prior = [{"role": "user", "content": user_content(CURRENT[:1], prompt, slice_recipe=True, language="en",
                                                            prior=PRIOR, comparison="images")}]
    without = [{"role": "user", "content": user_content(CURRENT[:1], prompt, slice_recipe=True, language="en")}]
    encode = gemma_processor.apply_chat_template  # type: ignore[attr-defined]
    a = encode(with_prior, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    b = encode(without, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt")
    assert a["pixel_values"].shape[0] == 2 and b["pixel_values"].shape[0] == 1
    text = gemma_processor.decode(a["input_ids"][0])  # type: ignore[attr-defined]
    assert "Prior study (2024-01-15):" in text and "Current study:" in text and "Stable cardiomegaly." in text
    assert text.index("Prior study") < text.index("Current study:") < text.index("Stable cardiomegaly.")
