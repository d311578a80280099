"""A classification's label and probability, from one yes/no answer, so that they always agree.

A ``classify`` unit asks "Is there {label} in this image? Answer yes or no." and decodes greedily.
Two things come out of the same generation: the answer text, and the model's distribution over
the vocabulary at each step. The label result carries both a state (present / absent / uncertain)
and a probability of "present"; this module ties them together:

* **Where the probability is read.** At the answer's yes/no token: the first generated token that
  is a yes or no word, provided only filler precedes it (whitespace, markdown emphasis, quotes;
  :func:`answer_position`). If the answer begins with any other word ("Uncertain", "The image
  shows..."), there is no yes/no answer and no probability.
* **What it is.** ``p = P(yes words) / (P(yes words) + P(no words))`` at that position, summing
  the single-token spellings of each (``yes``/``Yes``/``present``...; :func:`yes_probability`).
  Log-probabilities in, so the in-process path (logits) and a server's ``logprobs`` compute it
  the same way; a spelling missing from a server's top log-probabilities counts as 0.
* **How the state follows** (:func:`label_outcome`, threshold :data:`PRESENT_THRESHOLD`):
  ``present`` iff the answer says yes and ``p >= 0.5``; ``absent`` iff it says no and
  ``p < 0.5``; otherwise ``uncertain`` with no probability. With greedy decoding the answer's
  word is the most probable single token, so text and ``p`` disagree only when the other word's
  spellings together outweigh it (``yes`` 0.30 against ``No`` 0.25 + ``no`` 0.20): the model has
  no clear answer, and saying so beats reporting a label the probability contradicts.

Invariant: whenever a probability is reported, the state is ``present`` with ``p >= 0.5`` or
``absent`` with ``p < 0.5``, and the answer text begins with that word; ``uncertain`` never
carries a probability. There is never an "uncertain" (or a "no") with p = 0.97. When no
probability can be read (the tokenizer spells no yes/no word as one token, or the answer's word
is not one of those spellings) the state comes from the text alone, without a probability.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping, Sequence

from inference.results import LabelState
from inference.vlm.families import YES_NO

#: ``p`` (probability of "present") at or above this reads as present, below it as absent.
PRESENT_THRESHOLD = 0.5

#: Characters that may precede the yes/no word without being an answer of their own.
FILLER = " \t\r\n*_'\"`"

#: How many filler tokens may precede the yes/no token.
MAX_LEADING_TOKENS = 4

_ZH_UNCERTAIN = ("无法", "不确定", "不能确定", "可能", "不清楚")


def answer_state(answer: str, language: str) -> LabelState:
    """present / absent / uncertain from the first word of a yes/no answer."""
    yes, no = YES_NO.get(language, YES_NO["en"])
    head = answer.strip().strip(FILLER)
    if language == "en":
        head = re.split(r"[\s,.;:!*_'\"`]", head, maxsplit=1)[0]
        if head in yes:
            return "present"
        if head in no:
            return "absent"
        return "uncertain"
    if head.startswith(_ZH_UNCERTAIN):
        return "uncertain"
    for word in no:  # "不是" must not read as "是"
        if head.startswith(word):
            return "absent"
    for word in yes:
        if head.startswith(word):
            return "present"
    return "uncertain"


def answer_position(token_ids: Sequence[int], token_texts: Sequence[str], yes_ids: Collection[int],
                    no_ids: Collection[int]) -> int | None:
    """Index of the generated token that gives the yes/no answer, or None.

    Parameters
    ----------
    token_ids, token_texts : sequence
        The generated tokens (cut at the stop token) and each one's decoded text.
    yes_ids, no_ids : collection of int
        Single-token spellings of the yes and no words.
    """
    for index, (token, text) in enumerate(zip(token_ids, token_texts, strict=True)):
        if token in yes_ids or token in no_ids:
            return index
        if text.strip(FILLER) or index + 1 >= MAX_LEADING_TOKENS:
            return None  # the answer starts with another word
    return None


def yes_probability(yes_logprobs: Sequence[float], no_logprobs: Sequence[float]) -> float | None:
    """``P(yes) / (P(yes) + P(no))`` from the log-probabilities of each word's spellings.

    Returns None when neither word has any probability (all ``-inf`` or none given).
    """
    values = [v for v in (*yes_logprobs, *no_logprobs) if v != -math.inf]
    if not values:
        return None
    top = max(values)  # shift before exponentiating: no underflow for very unlikely words
    yes = sum(math.exp(v - top) for v in yes_logprobs if v != -math.inf)
    no = sum(math.exp(v - top) for v in no_logprobs if v != -math.inf)
    return yes / (yes + no)


def label_outcome(answer: str, language: str, probability: float | None) -> tuple[LabelState, float | None]:
    """The label state and probability to report, consistent with each other and the answer.

    ``probability`` is :func:`yes_probability` at the answer's yes/no token (None when there is
    none, or the tokenizer cannot tell). See the module docstring for the rule.
    """
    state = answer_state(answer, language)
    if probability is None:
        return state, None
    if not 0.0 <= probability <= 1.0 or math.isnan(probability):
        raise ValueError(f"A probability must lie in 0..1, got {probability}.")
    if state == "uncertain":
        return "uncertain", None
    said = "present" if probability >= PRESENT_THRESHOLD else "absent"
    if said != state:
        return "uncertain", None
    return state, probability


def probability_from_logprobs(steps: Sequence[tuple[str, Mapping[str, float]]], language: str) -> float | None:
    """:func:`yes_probability` at the answer's yes/no token, from token texts and log-probabilities.

    For engines that return text rather than token ids (an OpenAI-compatible server's
    ``logprobs.content``: each step's chosen ``token`` and its ``top_logprobs``). A token counts
    as a yes (no) spelling when its text, less filler, is one of the words of :data:`YES_NO`;
    spellings absent from a step's top log-probabilities count as probability 0.

    Parameters
    ----------
    steps : sequence of (str, mapping of str to float)
        Per generated token: its text, and the top alternatives' texts and log-probabilities
        (the chosen token included).
    language : str
        Language of the yes/no words.
    """
    yes_words, no_words = YES_NO.get(language, YES_NO["en"])
    for index, (token, alternatives) in enumerate(steps):
        word = token.strip(FILLER)
        if word in yes_words or word in no_words:
            yes = [lp for text, lp in alternatives.items() if text.strip(FILLER) in yes_words]
            no = [lp for text, lp in alternatives.items() if text.strip(FILLER) in no_words]
            return yes_probability(yes, no)
        if word or index + 1 >= MAX_LEADING_TOKENS:
            return None
    return None
