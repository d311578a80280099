"""The VLM stage gives every task the study's clinical context, in the task's language."""

from __future__ import annotations

from pydicom import Dataset

from inference.tasks import parse_tasks
from node.vlm_stage import with_clinical_context


def test_each_task_gets_the_studys_context_without_name_or_id() -> None:
    ds = Dataset()
    ds.PatientName = "Canary^Clinical"
    ds.PatientID = "CANARY-ID-9"
    ds.PatientAge = "052Y"
    ds.PatientSex = "M"
    ds.ReasonForTheRequestedProcedure = "Chest pain, Canary"
    specs = parse_tasks([{"report": {"language": "en"}}, {"report": {"language": "zh"}},
                         {"classify": {"labels": ["effusion"]}}, {"ground": {"phrases": ["heart"]}},
                         {"vqa": {"questions": ["Is the heart enlarged?"]}}])
    en, zh, classify, ground, vqa = with_clinical_context({"1.2.3": [ds]}, specs)
    assert (classify, ground) == (specs[2], specs[3])  # questions about the image alone: no context
    assert vqa.clinical_context == en.clinical_context
    assert en.clinical_context == "Clinical information: 52-year-old male. Reason for the request: Chest pain, [removed]."
    assert zh.clinical_context.startswith("临床信息：52岁男性。")
    assert all("Canary" not in s.clinical_context and "CANARY-ID-9" not in s.clinical_context for s in (en, zh))
    assert with_clinical_context({}, specs) == specs
