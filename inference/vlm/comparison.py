"""A prior study in the prompt: how each family reads a comparison.

A rule with ``priors`` gives the model the patient's earlier study next to the current one, as
each family was built to read it (``Family.comparison``):

* ``images`` (MedGemma 1.5, trained on longitudinal chest radiographs): one user turn with the
  prior images under ``Prior study (date):`` and the current ones under ``Current study:``, the
  prior report (when there is one) as text, then the task;
* ``image_and_report`` (MAIRA-2, whose processor takes the current frontal image, the prior
  frontal image and the prior report): the current image(s), the prior image, ``PRIOR_REPORT:``
  with the prior's text, then the task; MAIRA-2 is parser-only in mednode, so this is the form a
  server or a later loader uses;
* ``report`` (the other families, not trained on image pairs): the current images and the prior
  report as text context before the task; no prior image.

Only whole-study tasks (report, vqa, classify) see the prior; tasks that answer boxes see one
current image each, so every box still refers to a current image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from inference.geometry import PreparedImage

ComparisonMode = Literal["images", "image_and_report", "report"]
#: Task kinds whose prompt carries the prior study
COMPARED_KINDS = frozenset({"report", "vqa", "classify"})

PRIOR_LABEL = {"en": "Prior study ({date}):", "zh": "既往检查（{date}）："}
CURRENT_LABEL = {"en": "Current study:", "zh": "本次检查："}
PRIOR_REPORT = {"en": "Report of the prior study ({date}):\n{report}",
                "zh": "既往检查（{date}）的报告：\n{report}"}
COMPARE = {"en": "Compare the current study with the prior study.", "zh": "请将本次检查与既往检查进行比较。"}
UNKNOWN_DATE = {"en": "date unknown", "zh": "日期不详"}


@dataclass(frozen=True)
class PriorStudy:
    """The prior study as the prompt shows it.

    Attributes
    ----------
    images
        The prior's prepared images (may be empty when only its report is known).
    study_date
        ISO date (``2024-01-15``) or None.
    report
        The prior report's text, or None when the PACS holds none.
    """

    images: tuple[PreparedImage, ...] = ()
    study_date: str | None = None
    report: str | None = None


def _lang(table: dict[str, str], language: str) -> str:
    return table.get(language, table["en"])


def comparison_content(images: Sequence[PreparedImage], prompt: str, prior: PriorStudy, *,
                       mode: ComparisonMode, language: str = "en") -> list[dict[str, object]]:
    """The user turn's content for ``images`` (current) and ``prompt`` with ``prior`` shown as
    ``mode`` says (see the module description); each entry ``{"type": "image"|"text", …}``."""
    date = prior.study_date or _lang(UNKNOWN_DATE, language)
    report = (_lang(PRIOR_REPORT, language).format(date=date, report=prior.report.strip())
              if prior.report and prior.report.strip() else None)
    current = [{"type": "image", "image": img.image} for img in images]
    if mode == "images" and prior.images:
        content: list[dict[str, object]] = [{"type": "text", "text": _lang(PRIOR_LABEL, language).format(date=date)}]
        content += [{"type": "image", "image": img.image} for img in prior.images]
        content.append({"type": "text", "text": _lang(CURRENT_LABEL, language)})
        content += current
        task = "\n\n".join(t for t in (report, _lang(COMPARE, language), prompt) if t)
        content.append({"type": "text", "text": task})
        return content
    if mode == "image_and_report" and prior.images:
        content = [{"type": "text", "text": "Given the current frontal image"}, *current[:1]]
        if len(current) > 1:
            content += [{"type": "text", "text": " the current lateral image"}, current[1]]
        content += [{"type": "text", "text": " and the prior frontal image"},
                    {"type": "image", "image": prior.images[0].image},
                    {"type": "text", "text": f". PRIOR_REPORT: {prior.report.strip() if prior.report else 'N/A'}. "
                                             f"COMPARISON: {date}. {prompt}"}]
        return content
    text = "\n\n".join(t for t in (report, _lang(COMPARE, language) if report else None, prompt) if t)
    return [*current, {"type": "text", "text": text}]
