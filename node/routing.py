"""Routing: which rules apply to a complete study, and why. Pure functions over values.

Rules are data (:class:`node.config.Rule`); matching uses only equality on coded attributes and
``re.fullmatch`` on text, never evaluation of configured code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from node.config import Rule, SeriesPattern


@dataclass(frozen=True)
class SeriesFacts:
    """What routing may look at in one series."""

    series_instance_uid: str
    modality: str | None = None
    body_part_examined: str | None = None
    series_description: str | None = None
    sop_class_uids: frozenset[str] = field(default_factory=frozenset)
    instance_count: int = 0


@dataclass(frozen=True)
class StudyFacts:
    """What routing may look at in one study."""

    study_instance_uid: str
    study_description: str | None = None
    calling_ae_title: str | None = None
    called_ae_title: str | None = None
    series: tuple[SeriesFacts, ...] = ()


@dataclass(frozen=True)
class RuleCheck:
    """The outcome of one rule on one study, with reasons a person can read."""

    rule: Rule
    matched: bool
    series_uids: tuple[str, ...]
    reasons: tuple[str, ...]


def _text_matches(pattern: str | None, value: str | None) -> bool:
    if pattern is None:
        return True
    return re.fullmatch(pattern, value or "", flags=re.IGNORECASE) is not None


def _in(options: Sequence[str] | None, value: str | None, *, casefold: bool = True) -> bool:
    if options is None:
        return True
    if value is None:
        return False
    if casefold:
        return value.strip().upper() in {o.strip().upper() for o in options}
    return value in options


def _series_reasons(rule: Rule, series: SeriesFacts) -> list[str]:
    m = rule.match
    failed = []
    if not _in(m.modality, series.modality):
        failed.append(f"modality {series.modality!r} not in {m.modality}")
    if not _text_matches(m.body_part_examined, series.body_part_examined):
        failed.append(f"body part {series.body_part_examined!r} !~ {m.body_part_examined!r}")
    if m.sop_class_uid is not None and not (series.sop_class_uids & set(m.sop_class_uid)):
        failed.append("no SOP class of the series is in sop_class_uid")
    if not _text_matches(m.series_description, series.series_description):
        failed.append(f"series description !~ {m.series_description!r}")
    return failed


def check_rule(rule: Rule, study: StudyFacts) -> RuleCheck:
    """Decide whether ``rule`` applies to ``study`` and say why (used by routing and dry runs)."""
    m = rule.match
    study_failures: list[str] = []
    if not _in(m.calling_ae_title, study.calling_ae_title, casefold=False):
        study_failures.append(f"calling AE {study.calling_ae_title!r} not in {m.calling_ae_title}")
    if not _in(m.called_ae_title, study.called_ae_title, casefold=False):
        study_failures.append(f"called AE {study.called_ae_title!r} not in {m.called_ae_title}")
    if not _text_matches(m.study_description, study.study_description):
        study_failures.append(f"study description !~ {m.study_description!r}")
    matched_series: list[str] = []
    series_failures: list[str] = []
    for series in study.series:
        failed = _series_reasons(rule, series)
        if failed:
            series_failures.append(f"series {series.series_instance_uid}: " + "; ".join(failed))
        else:
            matched_series.append(series.series_instance_uid)
    if not study_failures and matched_series:
        return RuleCheck(rule, True, tuple(matched_series), (f"matched {len(matched_series)} series",))
    if not matched_series:
        series_failures.append("no series matches")
    return RuleCheck(rule, False, (), tuple(study_failures + series_failures))


def route(study: StudyFacts, rules: Iterable[Rule]) -> list[RuleCheck]:
    """Return the matching rules for ``study`` in order: the first match wins unless it says
    ``continue: true``, in which case later rules are tried too."""
    selected: list[RuleCheck] = []
    for rule in rules:
        check = check_rule(rule, study)
        if check.matched:
            selected.append(check)
            if not rule.continue_matching:
                break
    return selected


def quiet_period_for(study: StudyFacts, rules: Iterable[Rule], default_s: float) -> float:
    """The quiet period after which ``study`` counts as complete: that of the first rule that
    matches it so far and sets one, else ``default_s``."""
    for check in route(study, rules):
        if check.rule.quiet_period_s is not None:
            return check.rule.quiet_period_s
    return default_s


def series_matches(pattern: SeriesPattern, series: SeriesFacts) -> bool:
    """Whether ``series`` is one ``pattern`` (a rule's ``completion.required_series`` item) asks for."""
    return (
        _in(pattern.modality, series.modality)
        and _text_matches(pattern.body_part_examined, series.body_part_examined)
        and _text_matches(pattern.series_description, series.series_description)
        and (pattern.sop_class_uid is None or bool(series.sop_class_uids & set(pattern.sop_class_uid)))
    )


def missing_series(rule: Rule, study: StudyFacts) -> list[SeriesPattern]:
    """The required series of ``rule`` that ``study`` does not hold yet (none without a
    ``completion``)."""
    if rule.completion is None:
        return []
    return [p for p in rule.completion.required_series
            if not any(series_matches(p, s) for s in study.series)]


@dataclass(frozen=True)
class CompletionCheck:
    """Whether a study counts as complete now, and why (or what it waits for)."""

    due: bool
    reason: str


def check_completion(
    study: StudyFacts,
    rules: Iterable[Rule],
    *,
    default_quiet_s: float,
    quiet_for_s: float,
    receiving_for_s: float,
) -> CompletionCheck:
    """Decide whether ``study`` is complete, from how long it has been quiet and receiving.

    The rules that match the study so far decide: it needs its quiet period
    (:func:`quiet_period_for`) and every required series of those rules; but once it has been
    receiving for the shortest ``completion.max_wait_s`` among them, it is complete with what it
    has, and the reason names what was missing.
    """
    rules = list(rules)
    quiet_s = quiet_period_for(study, rules, default_quiet_s)
    selected = route(study, rules)
    waits = [c.rule.completion.max_wait_s for c in selected
             if c.rule.completion is not None and c.rule.completion.max_wait_s is not None]
    missing = [(c.rule.name, p) for c in selected for p in missing_series(c.rule, study)]
    missing_text = "; ".join(f"{name}: {p.describe()}" for name, p in missing)
    max_wait_s = min(waits) if waits else None
    if max_wait_s is not None and receiving_for_s >= max_wait_s:
        if missing:
            return CompletionCheck(True, f"max wait {max_wait_s:g} s reached without required series ({missing_text})")
        if quiet_for_s < quiet_s:
            return CompletionCheck(True, f"max wait {max_wait_s:g} s reached while instances still arrived")
    if quiet_for_s < quiet_s:
        return CompletionCheck(False, f"waiting for the quiet period of {quiet_s:g} s")
    if missing:
        return CompletionCheck(False, f"waiting for required series ({missing_text})")
    return CompletionCheck(True, f"quiet for {quiet_s:g} s" + (" with every required series" if waits else ""))


def late_series_hold(study: StudyFacts, series_uid: str, rules: Iterable[Rule]) -> str | None:
    """For a series that arrived after ``study`` was complete (``study`` includes it): None when
    a rule would run on it — routing the study now selects a rule whose job reads this series —
    else why it does not reopen the study."""
    for check in route(study, rules):
        if series_uid in check.series_uids:
            return None
    return "late series: no rule would run on it"
