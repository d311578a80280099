"""Task lists from YAML rules and API bodies."""

import pytest
import yaml

from inference.results import Box
from inference.tasks import TaskSpec, parse_tasks

RULE = """
tasks:
  - report: {language: en}
  - report: {language: zh}
  - vqa: {questions: ["Is there a pleural effusion?", "Which side is the nodule on?"]}
  - classify: {labels: [cardiomegaly, pneumothorax, pleural effusion, consolidation]}
  - ground: {phrases: [right lung, left lung, heart]}
  - detect: {findings: [nodule, pneumothorax]}
  - region_caption: {}
  - grounded_report: {language: en}
  - report
  - grounded_report:
"""


def test_yaml_rule_form():
    tasks = parse_tasks(yaml.safe_load(RULE)["tasks"])
    assert [t.kind for t in tasks] == ["report", "report", "vqa", "classify", "ground", "detect",
                                       "region_caption", "grounded_report", "report", "grounded_report"]
    assert tasks[1].language == "zh"
    assert tasks[2].questions == ("Is there a pleural effusion?", "Which side is the nodule on?")
    assert tasks[3].labels[2] == "pleural effusion"
    assert tasks[4].phrases == ("right lung", "left lung", "heart")
    assert tasks[5].findings == ("nodule", "pneumothorax")
    assert tasks[8] == TaskSpec(kind="report")
    hash(tasks[3])  # frozen, usable as a key


def test_flat_api_form_with_budget_and_regions():
    (task,) = parse_tasks([{"kind": "region_caption", "max_new_tokens": 32,
                            "regions": [{"label": "nodule", "x0": 0.1, "y0": 0.1, "x1": 0.2, "y1": 0.3}]}])
    assert task.max_new_tokens == 32
    assert task.regions == (Box(label="nodule", x0=0.1, y0=0.1, x1=0.2, y1=0.3),)


@pytest.mark.parametrize("raw,message", [
    ([{"summarize": {}}], r"Task #1 .*unknown task kind 'summarize'"),
    (["report", {"vqa": {}}], r"Task #2 .*needs a non-empty 'questions'"),
    ([{"classify": {"labels": []}}], r"needs a non-empty 'labels'"),
    ([{"report": {"questions": ["x"]}}], r"'questions'.* do not apply to 'report'"),
    ([{"report": {"language": "english please"}}], r"not a language tag"),
    ([{"report": {"max_new_tokens": 0}}], r"positive integer"),
    ([{"ground": {"phrases": [1, 2]}}], r"list of non-empty strings"),
    ([{"report": {}, "vqa": {}}], r"one-key mapping"),
    ([{"report": ["en"]}], r"must be a mapping"),
    ([{"region_caption": {"regions": [{"label": "x", "x0": 0.5, "y0": 0, "x1": 0.2, "y1": 1}]}}], r"x0 <= x1"),
    ("report", r"tasks must be a list"),
])
def test_bad_items_are_named(raw, message):
    with pytest.raises(ValueError, match=message):
        parse_tasks(raw)
