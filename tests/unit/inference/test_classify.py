"""A classification's state and probability agree with each other and with the answer text."""

import math

import pytest

from inference.vlm.classify import (
    PRESENT_THRESHOLD,
    answer_position,
    answer_state,
    label_outcome,
    probability_from_logprobs,
    yes_probability,
)

YES, NO = [11, 12], [21, 22]


@pytest.mark.parametrize("ids,texts,expected", [
    ([11, 5, 6], ["Yes", ",", " there"], 0),                  # the answer's first token
    ([3, 4, 21, 7], [" ", "**", "No", "**"], 2),             # after markdown and spaces
    ([8, 11], ["Uncertain", "yes"], None),                   # begins with another word
    ([9, 21], ["The", " no"], None),
    ([3, 3, 3, 3, 11], [" ", " ", " ", " ", "yes"], None),  # too far in
    ([], [], None),
])
def test_answer_position(ids, texts, expected):
    assert answer_position(ids, texts, YES, NO) == expected


def test_yes_probability_sums_spellings_and_ignores_the_rest_of_the_vocabulary():
    p = yes_probability([math.log(0.30), math.log(0.10)], [math.log(0.05), -math.inf])
    assert p == pytest.approx(0.40 / 0.45)
    # Very unlikely words do not underflow to 0/0.
    assert yes_probability([-2000.0], [-2001.0]) == pytest.approx(1 / (1 + math.exp(-1)))
    assert yes_probability([-math.inf], [-math.inf]) is None
    assert yes_probability([], []) is None


@pytest.mark.parametrize("answer,language,p,expected", [
    ("Yes, there is.", "en", 0.97, ("present", 0.97)),
    ("no", "en", 0.02, ("absent", 0.02)),
    ("**No**", "en", 0.1, ("absent", 0.1)),
    ("Yes", "en", PRESENT_THRESHOLD, ("present", PRESENT_THRESHOLD)),
    # The complaint of issue 13: an answer that is not yes/no never carries a probability.
    ("Uncertain.", "en", 0.97, ("uncertain", None)),
    ("It is hard to say.", "en", 0.97, ("uncertain", None)),
    # Text and probability disagree (the other word's spellings outweigh the answer's): uncertain.
    ("no", "en", 0.97, ("uncertain", None)),
    ("Yes", "en", 0.3, ("uncertain", None)),
    # No probability could be read: the text alone decides.
    ("Yes", "en", None, ("present", None)),
    ("maybe", "en", None, ("uncertain", None)),
    ("是的", "zh", 0.9, ("present", 0.9)),
    ("不是", "zh", 0.9, ("uncertain", None)),
    ("无法判断", "zh", 0.9, ("uncertain", None)),
    ("没有积液", "zh", 0.08, ("absent", 0.08)),
])
def test_label_outcome(answer, language, p, expected):
    assert label_outcome(answer, language, p) == expected


@pytest.mark.parametrize("p", [0.0, 0.2, 0.49, 0.5, 0.51, 0.97, 1.0, None])
@pytest.mark.parametrize("answer", ["yes", "No.", "Present", "uncertain", "", "I think so"])
def test_invariant_over_every_combination(answer, p):
    state, probability = label_outcome(answer, "en", p)
    if probability is not None:
        assert probability == p
        assert state == ("present" if probability >= PRESENT_THRESHOLD else "absent")
        assert answer_state(answer, "en") == state
    if state == "uncertain":
        assert probability is None


def test_a_probability_outside_0_1_is_a_bug():
    with pytest.raises(ValueError, match="0..1"):
        label_outcome("yes", "en", 1.5)


def test_probability_from_a_servers_logprobs():
    """The same rule on token texts and top log-probabilities (OpenAI ``logprobs.content``)."""
    ln = math.log
    steps = [("**", {"**": ln(0.9), "Yes": ln(0.05)}),
             ("Yes", {"Yes": ln(0.6), " yes": ln(0.1), "No": ln(0.2), "Maybe": ln(0.1)}),
             ("**", {"**": ln(0.99)})]
    assert probability_from_logprobs(steps, "en") == pytest.approx(0.7 / 0.9)
    assert probability_from_logprobs([("Uncertain", {"Uncertain": ln(0.5), "Yes": ln(0.49)})], "en") is None
    assert probability_from_logprobs([("是", {"是": ln(0.8), "否": ln(0.1)})], "zh") == pytest.approx(8 / 9)
    assert probability_from_logprobs([], "en") is None
