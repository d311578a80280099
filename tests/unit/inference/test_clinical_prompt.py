"""The clinical context as the first line of every VLM prompt of a study."""

from __future__ import annotations

from dataclasses import replace

from dicom_io.clinical import ClinicalContext
from inference.tasks import TaskSpec, parse_tasks
from inference.vlm.clinical import context_text
from inference.vlm.families import get_family

CONTEXT = ClinicalContext(age_years=67, sex="F", reasons=("Fever and cough",), procedures=("CHEST 2 VIEWS",),
                          diagnoses=("Pneumonia", "COPD"))


def test_the_context_in_english_and_chinese() -> None:
    assert context_text(CONTEXT, "en") == (
        "Clinical information: 67-year-old female. Reason for the request: Fever and cough. "
        "Requested procedure: CHEST 2 VIEWS. Admitting diagnosis: Pneumonia; COPD.")
    assert context_text(CONTEXT, "zh") == (
        "临床信息：67岁女性。检查原因：Fever and cough。申请检查：CHEST 2 VIEWS。入院诊断：Pneumonia；COPD。")
    assert context_text(ClinicalContext(sex="M"), "en") == "Clinical information: male."
    assert context_text(ClinicalContext(reasons=("Trauma",)), "en") == \
        "Clinical information: Reason for the request: Trauma."
    assert context_text(ClinicalContext(), "en") == ""


def test_every_prompt_of_a_task_with_context_starts_with_it_and_none_without() -> None:
    family = get_family("medgemma")
    [report, vqa] = parse_tasks([{"report": {"language": "en"}}, {"vqa": {"questions": ["Is there an effusion?"]}}])
    assert family.prompt(report) == family.template("report", "en")  # unchanged without context
    text = context_text(CONTEXT, "en")
    with_context = family.prompt(replace(report, clinical_context=text))
    assert with_context == f"{text}\n{family.template('report', 'en')}"
    asked = family.prompt(replace(vqa, clinical_context=text), item="Is there an effusion?")
    assert asked.startswith(text + "\n") and asked.endswith("Is there an effusion?")


def test_a_rule_cannot_set_the_clinical_context() -> None:
    import pytest

    with pytest.raises(ValueError, match="do not apply"):
        parse_tasks([{"report": {"clinical_context": "anything"}}])
    assert TaskSpec(kind="report").clinical_context == ""
