"""Prior-study rules: their configuration, and the pure choice of which prior to compare with."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import pytest

from node.config import ConfigError, RulePriors, load_settings
from node.priors import (
    CurrentStudy,
    SeriesMatch,
    StudyMatch,
    candidate_studies,
    choose,
    image_series,
    parse_da,
    report_series,
    study_date_range,
)
from storage.store import InstanceStore

CURRENT = CurrentStudy("1.2.3.9", "PID1", date(2025, 6, 10), "DX", "CHEST")
RULE = RulePriors(source="PACS@127.0.0.1:104")


def _settings(tmp_path: Path, priors: str) -> object:
    path = tmp_path / "mednode.yaml"
    path.write_text(f"""
destinations:
  pacs: PACS@10.0.0.5:104
models: {{vlm: {{path: /models/x, family: medgemma}}}}
rules:
  - name: chest
    match: {{modality: DX}}
    tasks: [{{report: {{language: en}}}}]
    destinations: []
    priors: {priors}
""")
    return load_settings(path)


def test_rule_priors_defaults_and_source_by_name(tmp_path: Path) -> None:
    settings = _settings(tmp_path, "{source: pacs}")
    priors = settings.rules[0].priors  # type: ignore[attr-defined]
    assert (priors.count, priors.same_modality, priors.same_body_part, priors.max_age_days) == (1, True, True, 730)
    assert (priors.on_unavailable, priors.timeout_s, priors.max_images) == ("continue", 30.0, 1)
    assert str(settings.resolve_destination(priors.source)) == "PACS@10.0.0.5:104"  # type: ignore[attr-defined]


@pytest.mark.parametrize(("priors", "message"), [
    ("{source: nowhere}", "rules.chest.priors.source"),
    ("{source: pacs, on_unavailable: wait}", "on_unavailable"),
    ("{source: pacs, timeout_s: 0}", "timeout_s"),
    ("{source: pacs, count: 2}", "count"),
    ("{source: pacs, max_age_days: -1}", "max_age_days"),
    ("{source: pacs, colour: red}", "colour"),
    ("{count: 1}", "source"),
])
def test_invalid_priors_name_the_key(tmp_path: Path, priors: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _settings(tmp_path, priors)


def test_date_range_covers_max_age_up_to_the_current_date() -> None:
    assert study_date_range(CURRENT, RULE) == "20230611-20250610"
    assert study_date_range(CURRENT, RulePriors(source="pacs", max_age_days=None)) == "-20250610"
    unknown = CurrentStudy("1.2.3.9", "PID1", None, "DX", None)
    assert study_date_range(unknown, RULE) == ""
    assert parse_da("20240115") == date(2024, 1, 15)
    assert parse_da("2024") is None and parse_da("20241399") is None and parse_da(None) is None


def test_candidates_exclude_the_current_study_later_and_older_ones_newest_first() -> None:
    studies = [
        StudyMatch("1.2.3.9", date(2025, 6, 10)),                      # the current study
        StudyMatch("1.2.3.1", date(2024, 1, 15), frozenset({"DX"})),
        StudyMatch("1.2.3.2", date(2025, 1, 2), frozenset({"DX", "SR"})),
        StudyMatch("1.2.3.3", date(2025, 7, 1)),                       # after the current study
        StudyMatch("1.2.3.4", date(2020, 3, 1)),                       # older than 730 days
        StudyMatch("1.2.3.5", date(2024, 5, 5), frozenset({"CT"})),    # other modality
        StudyMatch("1.2.3.6", None),                                   # no date: age unknown
        StudyMatch("1.2.3.1", date(2024, 1, 15)),                      # answered twice
    ]
    assert [s.study_instance_uid for s in candidate_studies(CURRENT, studies, RULE)] == ["1.2.3.2", "1.2.3.1"]
    anything = RulePriors(source="pacs", max_age_days=None, same_modality=False)
    assert [s.study_instance_uid for s in candidate_studies(CURRENT, studies, anything)] == \
        ["1.2.3.2", "1.2.3.5", "1.2.3.1", "1.2.3.4", "1.2.3.6"]


def test_image_series_same_modality_and_body_part_reports_apart() -> None:
    series = [
        SeriesMatch("s.sr", "SR", None, 50),
        SeriesMatch("s.lat", "DX", "CHEST", 2),
        SeriesMatch("s.pa", "DX", "chest", 1),
        SeriesMatch("s.hand", "DX", "HAND", 3),
        SeriesMatch("s.unstated", "DX", None, 4),
        SeriesMatch("s.ct", "CT", "CHEST", 5),
        SeriesMatch("s.pr", "PR", None, 6),
    ]
    assert [s.series_instance_uid for s in image_series(CURRENT, series, RULE)] == ["s.pa", "s.lat", "s.unstated"]
    loose = RulePriors(source="pacs", same_modality=False, same_body_part=False)
    assert [s.series_instance_uid for s in image_series(CURRENT, series, loose)] == \
        ["s.pa", "s.lat", "s.hand", "s.unstated", "s.ct"]
    assert [s.series_instance_uid for s in report_series(series)] == ["s.sr"]


def test_choose_takes_the_newest_candidate_with_a_comparable_series() -> None:
    candidates = [StudyMatch("new", date(2025, 1, 1)), StudyMatch("mid", date(2024, 6, 1)),
                  StudyMatch("old", date(2024, 1, 1))]
    by_study = {
        "new": [SeriesMatch("n1", "DX", "HAND", 1), SeriesMatch("n2", "SR", None, 2)],  # nothing comparable
        "mid": [SeriesMatch("m1", "DX", "CHEST", 1), SeriesMatch("m2", "SR", None, 50)],
        "old": [SeriesMatch("o1", "DX", "CHEST", 1)],
    }
    chosen = choose(CURRENT, candidates, by_study, RULE)
    assert [(c.study.study_instance_uid, [s.series_instance_uid for s in c.image_series],
             [s.series_instance_uid for s in c.report_series]) for c in chosen] == [("mid", ["m1"], ["m2"])]
    assert choose(CURRENT, candidates, {}, RULE) == []


def test_prior_copies_are_outside_the_instance_tree_and_purged(tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "store")
    area = store.prior_area(7)
    store.write(f"{area}/1.2.3.dcm", b"x")
    assert store.instance_files_changed_since(None) == []  # never re-indexed as a received instance
    assert store.purge_priors(3600) == 0
    assert store.purge_priors(3600, now=4e9) == 1
    assert not (tmp_path / "store" / area).exists()
    store.write(f"{area}/1.2.3.dcm", b"x")
    store.remove_area(area)
    assert not (tmp_path / "store" / area).exists()


def test_example_config_has_a_prior_aware_chest_rule_when_a_model_is_configured() -> None:
    example = Path(__file__).resolve().parents[3] / "mednode.example.yaml"
    without = load_settings(example)
    assert all(r.priors is None for r in without.effective_rules)
    chest = next(r for r in load_settings(example, vlm_path="/models/m", vlm_family="medgemma").effective_rules
                 if r.name == "chest-xray")
    assert chest.requires_model == "vlm" and chest.priors is not None
    assert (chest.priors.source, chest.priors.max_age_days, chest.priors.on_unavailable) == ("pacs", 730, "continue")
