"""Turning model text into reports, label states and grounded sentences (no model needed)."""

import pytest

from inference.boxes import parse_boxes
from inference.geometry import geometry_for
from inference.tasks import TaskSpec
from inference.vlm.classify import answer_state
from inference.vlm.families import FAMILIES, get_family
from inference.vlm.runtime import grounded_sentences, split_report


def test_split_report_english():
    findings, impression = split_report(
        "FINDINGS: The heart is enlarged. No effusion.\nIMPRESSION: Cardiomegaly.", "en")
    assert findings == "The heart is enlarged. No effusion."
    assert impression == "Cardiomegaly."
    assert split_report("**Findings:** clear lungs", "en") == ("clear lungs", None)
    assert split_report("**Findings**: ok **Impression:** normal", "en") == ("ok", "normal")
    assert split_report("just text", "en") == ("just text", None)


def test_split_report_chinese():
    findings, impression = split_report("检查所见：心影增大，双肺清晰。诊断意见：心脏增大。", "zh")
    assert findings == "心影增大，双肺清晰。" and impression == "心脏增大。"


@pytest.mark.parametrize("answer,language,state", [
    ("Yes, there is.", "en", "present"), ("no.", "en", "absent"), ("Maybe", "en", "uncertain"),
    ("", "en", "uncertain"), ("是的", "zh", "present"), ("不是", "zh", "absent"), ("没有积液", "zh", "absent"),
    ("有", "zh", "present"), ("无法判断", "zh", "uncertain"),
])
def test_answer_state(answer, language, state):
    assert answer_state(answer, language) == state


T = geometry_for(211, 169, size=518, mode="crop")[0]


def test_grounded_maira2_sentences_keep_their_boxes():
    text = ("<obj>The heart is enlarged.<box><x20><y30><x80><y90></box></obj> "
            "<obj>There is a small left effusion.<box><x60><y60><x90><y95></box><box><x1><y1><x5><y5></box></obj> "
            "No pneumothorax.")
    parsed = parse_boxes("maira2", text, T)
    sentences = grounded_sentences(text, parsed, json_format=False)
    assert [s.text for s in sentences] == ["The heart is enlarged.", "There is a small left effusion.",
                                           "No pneumothorax."]
    assert [len(s.boxes) for s in sentences] == [1, 2, 0]


def test_grounded_medrega_refs_inside_sentences():
    text = ("The <ref>right lung</ref><box>[[100, 100, 400, 800]]</box> is clear. "
            "A nodule in the <ref>left upper lobe</ref><box>[[600, 200, 700, 300]]</box>.")
    parsed = parse_boxes("medrega", text, T)
    sentences = grounded_sentences(text, parsed, json_format=False)
    assert [s.text for s in sentences] == ["The right lung is clear.", "A nodule in the left upper lobe."]
    assert [[b.label for b in s.boxes] for s in sentences] == [["right lung"], ["left upper lobe"]]


def test_grounded_json_uses_labels_as_sentences():
    text = ('[{"label": "Heart enlarged.", "box_2d": [100, 100, 500, 500]}, '
            '{"label": "Heart enlarged.", "box_2d": [100, 600, 500, 900]}, '
            '{"label": "Left effusion.", "box_2d": [600, 500, 900, 900]}]')
    pad = geometry_for(211, 169, size=896, mode="pad")[0]
    sentences = grounded_sentences(text, parse_boxes("medgemma", text, pad), json_format=True)
    assert [(s.text, len(s.boxes)) for s in sentences] == [("Heart enlarged.", 2), ("Left effusion.", 1)]


def test_every_family_has_prompts_for_every_vlm_task_in_both_languages():
    for family in FAMILIES.values():
        for language in ("en", "zh"):
            for kind in ("report", "vqa", "classify", "ground", "detect", "region_caption", "grounded_report"):
                prompt = family.template(kind, language)
                assert prompt.strip()
    task = TaskSpec(kind="ground", phrases=("heart",))
    assert "heart" in get_family("gemma3").prompt(task, item="heart")
    assert get_family("lingshu").name == "qwen2_5_vl"
    with pytest.raises(KeyError, match="known"):
        get_family("gpt")


def test_each_family_parses_boxes_in_its_own_convention():
    """The family -> box convention table (each Qwen generation answers in its own frame)."""
    table = {name: family.box_format for name, family in FAMILIES.items()}
    assert table == {
        "medgemma": "medgemma", "qwen2_vl": "qwen2_vl", "qwen2_5_vl": "qwen2_5_vl",
        "qwen3_vl": "qwen3_vl", "llava": "llava", "paligemma": "paligemma", "internvl": "medrega", "medrega": "medrega",
        "maira2": "maira2", "chexagent": "chexagent", "minigpt_med": "minigpt",
    }
    assert {get_family(n).box_format for n in ("lingshu", "qwen2.5_vl")} == {"qwen2_5_vl"}
    assert get_family("internvl_chat").name == "medrega"


def test_grounded_qwen2_vl_markup_keeps_its_sentences():
    fit = geometry_for(211, 169, size=448, mode="fit", multiple_of=28)[0]
    text = ("The <|object_ref_start|>heart<|object_ref_end|><|box_start|>(300,300),(700,800)<|box_end|> "
            "is enlarged. No effusion.")
    sentences = grounded_sentences(text, parse_boxes("qwen2_vl", text, fit), json_format=False)
    assert [s.text for s in sentences] == ["The heart is enlarged.", "No effusion."]
    assert [[b.label for b in s.boxes] for s in sentences] == [["heart"], []]
