"""Routing rules as data: what matches, in which order, and why not."""

from __future__ import annotations

from typing import Any

import pytest

from node.config import Rule
from node.routing import (
    CompletionCheck,
    SeriesFacts,
    StudyFacts,
    check_completion,
    check_rule,
    late_series_hold,
    missing_series,
    quiet_period_for,
    route,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
SR = "1.2.840.10008.5.1.4.1.1.88.22"


def rule(name: str = "r", **kwargs: Any) -> Rule:
    kwargs.setdefault("tasks", ["ct_analysis"])
    kwargs.setdefault("destinations", [])
    return Rule.model_validate({"name": name, **kwargs})


def ct_series(uid: str = "1.1", **kwargs: Any) -> SeriesFacts:
    values: dict[str, Any] = {"modality": "CT", "body_part_examined": "CHEST",
                              "series_description": "Thorax 1.25mm", "sop_class_uids": frozenset({CT}),
                              "instance_count": 3}
    values.update(kwargs)
    return SeriesFacts(series_instance_uid=uid, **values)


def study(*series: SeriesFacts, **kwargs: Any) -> StudyFacts:
    values: dict[str, Any] = {"study_description": "CT Chest w/o contrast", "calling_ae_title": "CT_SCANNER_1",
                              "called_ae_title": "MEDNODE"}
    values.update(kwargs)
    return StudyFacts(study_instance_uid="1.2.3", series=series or (ct_series(),), **values)


def test_empty_match_applies_to_every_study_with_a_series() -> None:
    check = check_rule(rule(), study(ct_series("1.1"), ct_series("1.2", modality="SR")))
    assert check.matched
    assert check.series_uids == ("1.1", "1.2")


def test_study_without_series_matches_nothing() -> None:
    check = check_rule(rule(), StudyFacts(study_instance_uid="1.2.3"))
    assert not check.matched
    assert "no series matches" in check.reasons


def test_modality_selects_only_matching_series_case_insensitively() -> None:
    facts = study(ct_series("1.1"), ct_series("1.2", modality="SR", sop_class_uids=frozenset({SR})))
    check = check_rule(rule(match={"modality": ["ct"]}), facts)
    assert check.matched and check.series_uids == ("1.1",)
    miss = check_rule(rule(match={"modality": "MR"}), facts)
    assert not miss.matched
    assert any("modality 'CT' not in ['MR']" in r for r in miss.reasons)


@pytest.mark.parametrize(
    ("pattern", "value", "matched"),
    [
        ("chest", "CHEST", True),  # case-insensitive
        ("CHEST", "chest", True),
        ("chest|thorax", "THORAX", True),
        ("ches", "CHEST", False),  # the whole value, not a prefix
        ("hest", "CHEST", False),  # not a search
        ("chest", "CHEST_ABDOMEN", False),
        (".*", None, True),  # a missing value is the empty string
        ("chest", None, False),
    ],
)
def test_body_part_is_a_full_case_insensitive_regex(pattern: str, value: str | None, matched: bool) -> None:
    check = check_rule(rule(match={"body_part_examined": pattern}), study(ct_series(body_part_examined=value)))
    assert check.matched is matched
    if not matched:
        assert any("body part" in r for r in check.reasons)


def test_series_and_study_description_regexes() -> None:
    facts = study(ct_series("1.1", series_description="Thorax 1.25mm"),
                  ct_series("1.2", series_description="Scout"))
    check = check_rule(rule(match={"series_description": r"thorax .*mm"}), facts)
    assert check.matched and check.series_uids == ("1.1",)
    assert check_rule(rule(match={"study_description": r"ct chest.*"}), facts).matched
    miss = check_rule(rule(match={"study_description": "mr.*"}), facts)
    assert not miss.matched and any("study description" in r for r in miss.reasons)


def test_sop_class_condition() -> None:
    facts = study(ct_series("1.1", sop_class_uids=frozenset({CT})),
                  ct_series("1.2", sop_class_uids=frozenset({ENHANCED_CT})))
    check = check_rule(rule(match={"sop_class_uid": [ENHANCED_CT]}), facts)
    assert check.matched and check.series_uids == ("1.2",)
    assert not check_rule(rule(match={"sop_class_uid": SR}), facts).matched


def test_calling_and_called_ae_titles_are_exact() -> None:
    facts = study(calling_ae_title="CT_SCANNER_1", called_ae_title="MEDNODE")
    assert check_rule(rule(match={"calling_ae_title": ["CT_SCANNER_1", "CT_SCANNER_2"]}), facts).matched
    assert check_rule(rule(match={"called_ae_title": "MEDNODE"}), facts).matched
    calling = check_rule(rule(match={"calling_ae_title": "ct_scanner_1"}), facts)
    assert not calling.matched
    assert any("calling AE 'CT_SCANNER_1'" in r for r in calling.reasons)
    called = check_rule(rule(match={"called_ae_title": "RESEARCH"}), facts)
    assert not called.matched and any("called AE" in r for r in called.reasons)
    unknown = check_rule(rule(match={"calling_ae_title": "X"}), study(calling_ae_title=None))
    assert not unknown.matched


def test_all_conditions_must_hold_and_every_failure_is_reported() -> None:
    facts = study(ct_series(modality="MR", body_part_examined="HEAD"), calling_ae_title="OTHER")
    check = check_rule(rule(match={"modality": "CT", "body_part_examined": "chest", "calling_ae_title": "CT1"}),
                       facts)
    assert not check.matched
    assert check.series_uids == ()
    text = " | ".join(check.reasons)
    assert "calling AE" in text and "modality" in text and "body part" in text and "no series matches" in text


def test_first_matching_rule_wins() -> None:
    rules = [rule("mr", match={"modality": "MR"}), rule("ct-a", match={"modality": "CT"}), rule("ct-b")]
    assert [c.rule.name for c in route(study(), rules)] == ["ct-a"]


def test_continue_lets_later_rules_match_too() -> None:
    rules = [
        rule("ct-a", match={"modality": "CT"}, **{"continue": True}),
        rule("mr", match={"modality": "MR"}),
        rule("ct-b", match={"body_part_examined": "chest"}),
        rule("ct-c"),  # after ct-b, which does not continue
    ]
    assert [c.rule.name for c in route(study(), rules)] == ["ct-a", "ct-b"]


def test_no_rule_matches_gives_an_empty_route() -> None:
    assert route(study(ct_series(modality="US")), [rule(match={"modality": "CT"})]) == []


def test_quiet_period_is_that_of_the_first_matching_rule_that_sets_one() -> None:
    rules = [
        rule("mr", match={"modality": "MR"}, quiet_period_s=1),
        rule("ct", match={"modality": "CT"}, **{"continue": True}),
        rule("chest", match={"body_part_examined": "chest"}, quiet_period_s=30),
    ]
    assert quiet_period_for(study(), rules, default_s=15) == 30
    assert quiet_period_for(study(ct_series(body_part_examined="HEAD")), rules, default_s=15) == 15
    assert quiet_period_for(study(ct_series(modality="MR")), rules, default_s=15) == 1
    assert quiet_period_for(study(), [], default_s=15) == 15


# -- completion per rule and late series (issue 12) --------------------------------------------
def chest_rule(**completion: Any) -> Rule:
    completion.setdefault("required_series", [{"modality": "DX", "series_description": "PA"},
                                              {"modality": ["DX"], "series_description": "LAT"}])
    completion.setdefault("max_wait_s", 600)
    return rule("chest", match={"modality": "DX"}, completion=completion)


def dx(uid: str, description: str) -> SeriesFacts:
    return SeriesFacts(uid, modality="DX", series_description=description, instance_count=1)


def completion(facts: StudyFacts, rules: list[Rule], *, quiet_for_s: float, receiving_for_s: float) -> CompletionCheck:
    return check_completion(facts, rules, default_quiet_s=30, quiet_for_s=quiet_for_s,
                            receiving_for_s=receiving_for_s)


def test_a_study_waits_for_every_required_series_beyond_the_quiet_period() -> None:
    pa_only = study(dx("1", "PA"))
    assert missing_series(chest_rule(), pa_only)[0].series_description == "LAT"

    waiting = completion(pa_only, [chest_rule()], quiet_for_s=300, receiving_for_s=310)
    assert not waiting.due
    assert "chest: modality DX, series_description 'LAT'" in waiting.reason

    both = study(dx("1", "PA"), dx("2", "lat"))  # case-insensitive, as match patterns
    assert missing_series(chest_rule(), both) == []
    assert not completion(both, [chest_rule()], quiet_for_s=29, receiving_for_s=40).due  # quiet first
    done = completion(both, [chest_rule()], quiet_for_s=30, receiving_for_s=40)
    assert done.due and done.reason == "quiet for 30 s with every required series"


def test_max_wait_completes_with_what_the_study_has_and_says_what_was_missing() -> None:
    pa_only = study(dx("1", "PA"))
    assert not completion(pa_only, [chest_rule()], quiet_for_s=500, receiving_for_s=599).due
    late = completion(pa_only, [chest_rule()], quiet_for_s=500, receiving_for_s=600)
    assert late.due
    assert late.reason == "max wait 600 s reached without required series (chest: modality DX, series_description 'LAT')"


def test_max_wait_alone_bounds_a_study_that_keeps_receiving() -> None:
    trickle = rule("ct", match={"modality": "CT"}, completion={"max_wait_s": 120})
    assert not completion(study(), [trickle], quiet_for_s=1, receiving_for_s=119).due
    check = completion(study(), [trickle], quiet_for_s=1, receiving_for_s=120)
    assert check.due and "instances still arrived" in check.reason


def test_without_completion_options_the_quiet_period_alone_decides() -> None:
    assert not completion(study(), [rule()], quiet_for_s=29, receiving_for_s=10_000).due
    assert completion(study(), [rule()], quiet_for_s=30, receiving_for_s=30).due
    # a rule that does not match the study does not make it wait
    assert completion(study(ct_series(modality="MR")), [chest_rule()], quiet_for_s=30, receiving_for_s=30).due


def test_a_late_series_reopens_only_if_routing_would_run_a_rule_on_it() -> None:
    rules = [rule("ct", match={"modality": "CT"})]
    assert late_series_hold(study(ct_series("1"), ct_series("2")), "2", rules) is None
    assert late_series_hold(study(ct_series("1"), ct_series("2", modality="MR")), "2", rules) == (
        "late series: no rule would run on it")
    assert late_series_hold(study(ct_series("2", modality="MR")), "2", rules) is not None


def test_a_late_series_another_rule_would_match_is_held_when_the_first_rule_wins() -> None:
    # the first matching rule wins: routing the study again would run "axial" only, not on a scout
    rules = [rule("axial", match={"modality": "CT", "series_description": "axial.*"}),
             rule("any-ct", match={"modality": "CT"})]
    facts = study(ct_series("1", series_description="axial 1mm"), ct_series("2", series_description="scout"))
    assert late_series_hold(facts, "2", rules) is not None
    rules[0] = rule("axial", match={"modality": "CT", "series_description": "axial.*"}, **{"continue": True})
    assert late_series_hold(facts, "2", rules) is None


@pytest.mark.parametrize(("completion_options", "message"), [
    ({"required_series": [{"modality": "DX"}]}, "max_wait_s: required with required_series"),
    ({"required_series": [{}], "max_wait_s": 60}, "names at least one of modality"),
    ({"required_series": [{"series_description": "(PA"}], "max_wait_s": 60}, "not a valid regular expression"),
    ({"max_wait_s": 0}, "greater than 0"),
    ({"max_wait": 60}, "Extra inputs are not permitted"),
])
def test_completion_options_are_validated(completion_options: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rule("chest", completion=completion_options)


def test_max_wait_shorter_than_the_quiet_period_is_refused() -> None:
    with pytest.raises(ValueError, match=r"completion.max_wait_s \(10\) is shorter than quiet_period_s \(30\)"):
        rule("chest", quiet_period_s=30, completion={"max_wait_s": 10})


def test_a_completion_error_in_the_settings_names_the_key(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from node.config import ConfigError, load_settings

    rules = [{"name": "chest", "tasks": ["ct_analysis"], "destinations": [],
              "completion": {"required_series": [{"modality": "DX", "series_description": "(PA"}],
                             "max_wait_s": 600}}]
    with pytest.raises(ConfigError, match=r"rules\.0\.completion\.required_series\.0\.series_description"):
        load_settings(data_dir=tmp_path, rules=rules)
