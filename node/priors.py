"""Which of a patient's earlier studies a rule compares with: pure choices over C-FIND answers.

The retrieval (:mod:`node.prior_retrieval`) asks the PACS and hands the answers here: the study
level answers go through :func:`candidate_studies` (not the current study, not later than it,
not older than ``max_age_days``, newest first), each candidate's series through
:func:`image_series` (same modality, same body part) and :func:`report_series` (SR documents),
and :func:`choose` keeps the first ``count`` candidates that hold a comparable image series.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

from node.config import RulePriors

#: Series of these modalities hold no image to compare (documents, presentation states, objects)
NON_IMAGE_MODALITIES = frozenset({"SR", "PR", "KO", "SEG", "RTSTRUCT", "REG", "DOC", "OT_DOC"})


def parse_da(value: object) -> date | None:
    """A DICOM DA value (``YYYYMMDD``) as a date; None when empty or malformed."""
    text = str(value or "").strip()
    try:
        return datetime.strptime(text, "%Y%m%d").date() if len(text) == 8 else None
    except ValueError:
        return None


@dataclass(frozen=True)
class CurrentStudy:
    """What the comparison is chosen against: the study the job runs on."""

    study_instance_uid: str
    patient_id: str
    study_date: date | None
    modality: str | None
    body_part_examined: str | None


@dataclass(frozen=True)
class StudyMatch:
    """One study-level C-FIND answer."""

    study_instance_uid: str
    study_date: date | None
    modalities_in_study: frozenset[str] = frozenset()


@dataclass(frozen=True)
class SeriesMatch:
    """One series-level C-FIND answer."""

    series_instance_uid: str
    modality: str
    body_part_examined: str | None = None
    series_number: int | None = None


@dataclass(frozen=True)
class PriorChoice:
    """A prior study to compare with: the image series to retrieve and its SR series (reports)."""

    study: StudyMatch
    image_series: tuple[SeriesMatch, ...]
    report_series: tuple[SeriesMatch, ...] = field(default=())


def study_date_range(current: CurrentStudy, rule: RulePriors) -> str:
    """The StudyDate matching key (PS3.4 C.2.2.2.5, range matching): from ``max_age_days``
    before the current study's date up to that date; empty (any date) when either is unknown."""
    if current.study_date is None:
        return ""
    end = current.study_date.strftime("%Y%m%d")
    if rule.max_age_days is None:
        return f"-{end}"
    start = current.study_date - timedelta(days=rule.max_age_days)
    return f"{start.strftime('%Y%m%d')}-{end}"


def candidate_studies(current: CurrentStudy, studies: Iterable[StudyMatch], rule: RulePriors) -> list[StudyMatch]:
    """Earlier studies worth a series query, newest first.

    The current study is never its own prior; a study dated after the current one is not a prior;
    with ``max_age_days``, a study older than that, or without a date, is left out (the PACS may
    not have applied the date range). With ``same_modality``, a study whose Modalities in Study
    is given and lacks the current modality is left out. Studies without a date sort last.
    """
    kept: dict[str, StudyMatch] = {}
    for study in studies:
        if study.study_instance_uid == current.study_instance_uid or study.study_instance_uid in kept:
            continue
        if current.study_date is not None and study.study_date is not None and study.study_date > current.study_date:
            continue
        if rule.max_age_days is not None and current.study_date is not None and (
                study.study_date is None or (current.study_date - study.study_date).days > rule.max_age_days):
            continue
        if rule.same_modality and current.modality and study.modalities_in_study \
                and current.modality.upper() not in {m.upper() for m in study.modalities_in_study}:
            continue
        kept[study.study_instance_uid] = study
    return sorted(kept.values(), key=lambda s: (s.study_date is not None, s.study_date or date.min), reverse=True)


def _same_text(a: str | None, b: str | None) -> bool:
    return (a or "").strip().upper() == (b or "").strip().upper()


def image_series(current: CurrentStudy, series: Iterable[SeriesMatch], rule: RulePriors) -> list[SeriesMatch]:
    """The series of a candidate study that hold comparable images, in series number order.

    With ``same_modality``, the modality must be the current one; with ``same_body_part``, a body
    part both series state must be the same (a series that does not state one is kept: many
    archives leave Body Part Examined empty).
    """
    out = []
    for s in series:
        if s.modality.upper() in NON_IMAGE_MODALITIES:
            continue
        if rule.same_modality and current.modality and not _same_text(s.modality, current.modality):
            continue
        if rule.same_body_part and current.body_part_examined and s.body_part_examined \
                and not _same_text(s.body_part_examined, current.body_part_examined):
            continue
        out.append(s)
    return sorted(out, key=lambda s: (s.series_number is None, s.series_number or 0, s.series_instance_uid))


def report_series(series: Iterable[SeriesMatch]) -> list[SeriesMatch]:
    """The SR series of a candidate study (where its report may be), in series number order."""
    return sorted((s for s in series if s.modality.upper() == "SR"),
                  key=lambda s: (s.series_number is None, s.series_number or 0, s.series_instance_uid))


def choose(current: CurrentStudy, candidates: Sequence[StudyMatch],
           series_by_study: Mapping[str, Sequence[SeriesMatch]], rule: RulePriors) -> list[PriorChoice]:
    """The first ``rule.count`` candidates (newest first) holding a comparable image series."""
    chosen = []
    for study in candidates:
        series = series_by_study.get(study.study_instance_uid, ())
        images = image_series(current, series, rule)
        if images:
            chosen.append(PriorChoice(study, tuple(images), tuple(report_series(series))))
        if len(chosen) >= rule.count:
            break
    return chosen
