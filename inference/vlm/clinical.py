"""The clinical context as the first lines of a prompt, as MedVersa and MedGemma were prompted.

:func:`context_text` turns a :class:`dicom_io.clinical.ClinicalContext` (age, sex, the request's
reason, procedure and admitting diagnoses; never a name or an ID) into one short paragraph in the
task's language; an empty context gives no text, and the prompt stays as it was. Only the
tasks of :data:`CONTEXT_TASKS` get it.
"""

from __future__ import annotations

from dicom_io.clinical import ClinicalContext

#: Tasks whose prompt carries the context: the ones that write or answer as a radiologist would,
#: with the request in mind. Per-label and per-phrase questions (classify, ground, detect,
#: region_caption) ask about the image alone: an indication such as "? effusion" would pull the
#: yes/no probability and the boxes towards the referrer's question instead of the pixels.
CONTEXT_TASKS = frozenset({"report", "grounded_report", "vqa"})

_SEX = {"en": {"M": "male", "F": "female", "O": "patient"}, "zh": {"M": "男性", "F": "女性", "O": "患者"}}


def context_text(context: ClinicalContext, language: str = "en") -> str:
    """``Clinical information: 45-year-old female. Reason for the request: cough. …``, or ``""``.

    Languages other than ``zh`` get English (a model reads either).
    """
    if context.empty:
        return ""
    if language == "zh":
        who = "".join(part for part in (
            f"{context.age_years}岁" if context.age_years is not None else "",
            _SEX["zh"].get(context.sex or "", "") if context.sex else "") if part)
        lines = [f"临床信息：{who}。" if who else "临床信息："]
        for label, values in (("检查原因", context.reasons), ("申请检查", context.procedures),
                              ("入院诊断", context.diagnoses)):
            if values:
                lines.append(f"{label}：{'；'.join(values)}。")
        return "".join(lines)
    sex = _SEX["en"].get(context.sex or "", "patient") if context.sex else "patient"
    if context.age_years is not None:
        who = f"{context.age_years}-year-old {sex}"
    else:
        who = sex if context.sex else ""
    lines = [f"Clinical information: {who}." if who else "Clinical information:"]
    for label, values in (("Reason for the request", context.reasons), ("Requested procedure", context.procedures),
                          ("Admitting diagnosis", context.diagnoses)):
        if values:
            lines.append(f"{label}: {'; '.join(values)}.")
    return " ".join(lines)


def with_context(prompt: str, context: str) -> str:
    """The prompt with the clinical context before it (unchanged without one)."""
    return f"{context}\n{prompt}" if context else prompt
