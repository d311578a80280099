"""Tasks as data: what a pipeline rule or an API request asks a model to do.

The YAML form of a rule's ``tasks:`` list is accepted as is::

    tasks:
      - report: {language: zh}
      - vqa: {questions: ["Is there a pleural effusion?"]}
      - classify: {labels: [cardiomegaly, pneumothorax]}
      - region_caption: {}
      - report                       # a bare name takes the defaults

and so is the flat form an API body uses: ``{"kind": "vqa", "questions": [...]}``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from inference.results import Box

TaskKind = Literal["report", "vqa", "classify", "ground", "detect", "region_caption",
                   "grounded_report", "segment"]
TASK_KINDS: tuple[str, ...] = get_args(TaskKind)

#: Which list field each kind needs (non-empty), if any.
_REQUIRED_LIST = {"vqa": "questions", "classify": "labels", "ground": "phrases", "detect": "findings"}
_LIST_FIELDS = ("questions", "labels", "phrases", "findings")
_ALLOWED = {
    "report": {"language", "max_new_tokens"},
    "vqa": {"language", "questions", "max_new_tokens"},
    "classify": {"language", "labels", "max_new_tokens"},
    "ground": {"language", "phrases", "max_new_tokens"},
    "detect": {"language", "findings", "max_new_tokens"},
    "region_caption": {"language", "max_new_tokens", "regions"},
    "grounded_report": {"language", "max_new_tokens"},
    "segment": {"labels"},
}
_LANGUAGE = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]{1,8})*$")


@dataclass(frozen=True)
class TaskSpec:
    """One task for a model.

    Attributes
    ----------
    kind : TaskKind
        ``report`` (findings + impression), ``vqa`` (answer ``questions``), ``classify``
        (present/absent/uncertain per label), ``ground`` (phrase → boxes), ``detect`` (finding →
        boxes), ``region_caption`` (box → text; boxes from ``regions`` or from an earlier
        ground/detect task of the same run), ``grounded_report`` (sentences with boxes),
        ``segment`` (masks, for segmentation backends only).
    language : str
        Output language, a lowercase BCP 47 primary tag (``en``, ``zh``).
    max_new_tokens : int or None
        Token budget per generation; None takes the model config's default.
    clinical_context : str
        Age, sex and the request's reason as the prompt's first line
        (:func:`inference.vlm.clinical.context_text`); set per study by the node, never from a rule.
    """

    kind: TaskKind
    language: str = "en"
    questions: tuple[str, ...] = ()
    labels: tuple[str, ...] = ()
    phrases: tuple[str, ...] = ()
    findings: tuple[str, ...] = ()
    max_new_tokens: int | None = None
    regions: tuple[Box, ...] = ()
    clinical_context: str = ""

    def __post_init__(self) -> None:
        if self.kind not in TASK_KINDS:
            raise ValueError(f"Unknown task kind {self.kind!r}; expected one of {', '.join(TASK_KINDS)}.")
        if not _LANGUAGE.match(self.language):
            raise ValueError(f"Task {self.kind}: language {self.language!r} is not a language tag like 'en' or 'zh'.")
        if self.max_new_tokens is not None and (isinstance(self.max_new_tokens, bool)
                                                or not isinstance(self.max_new_tokens, int)
                                                or self.max_new_tokens < 1):
            raise ValueError(f"Task {self.kind}: max_new_tokens must be a positive integer, got {self.max_new_tokens!r}.")
        required = _REQUIRED_LIST.get(self.kind)
        if required and not getattr(self, required):
            raise ValueError(f"Task {self.kind} needs a non-empty '{required}' list.")


def _as_strings(item_name: str, key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{item_name}: '{key}' must be a list of non-empty strings, got {value!r}.")
    return tuple(v.strip() for v in value)


def _parse_regions(item_name: str, value: object) -> tuple[Box, ...]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise ValueError(f"{item_name}: 'regions' must be a list of boxes.")  # noqa: TRY004 (config errors are ValueErrors)
    boxes = []
    for region in value:
        if isinstance(region, Box):
            boxes.append(region)
        elif isinstance(region, Mapping):
            try:
                boxes.append(Box(**dict(region)))
            except TypeError as exc:
                raise ValueError(f"{item_name}: region {region!r} is not a box ({exc}).") from exc
        else:
            raise ValueError(f"{item_name}: region {region!r} is not a box.")  # noqa: TRY004 (config errors are ValueErrors)
    return tuple(boxes)


def parse_task(raw: Mapping[str, object] | str, *, position: int = 0) -> TaskSpec:
    """Parse one task item; see :func:`parse_tasks`."""
    item_name = f"Task #{position + 1} ({raw!r})"
    kind: object
    options: dict[str, object]
    if isinstance(raw, str):
        kind, options = raw.strip(), {}
    elif isinstance(raw, Mapping):
        if "kind" in raw:
            kind = raw["kind"]
            options = {k: v for k, v in raw.items() if k != "kind"}
        elif len(raw) == 1:
            kind, body = next(iter(raw.items()))
            if body is None:
                body = {}
            if not isinstance(body, Mapping):
                raise ValueError(f"{item_name}: options of '{kind}' must be a mapping, e.g. "
                                 f"'- {kind}: {{language: en}}', got {body!r}.")
            options = dict(body)
        else:
            raise ValueError(f"{item_name}: a task is a one-key mapping like '- report: {{language: zh}}' "
                             f"or has a 'kind' key, got keys {sorted(raw)}.")
    else:
        raise ValueError(f"{item_name}: a task is a name or a mapping, got {type(raw).__name__}.")  # noqa: TRY004 (config errors are ValueErrors)
    if not isinstance(kind, str) or kind not in TASK_KINDS:
        raise ValueError(f"{item_name}: unknown task kind {kind!r}; expected one of {', '.join(TASK_KINDS)}.")
    unknown = set(options) - _ALLOWED[kind]
    if unknown:
        raise ValueError(f"{item_name}: option(s) {sorted(unknown)} do not apply to '{kind}'; "
                         f"allowed: {sorted(_ALLOWED[kind])}.")
    fields: dict[str, object] = {}
    for key, value in options.items():
        if key in _LIST_FIELDS:
            fields[key] = _as_strings(item_name, key, value)
        elif key == "regions":
            fields[key] = _parse_regions(item_name, value)
        elif key == "language":
            if not isinstance(value, str):
                raise ValueError(f"{item_name}: language must be a string like 'en', got {value!r}.")
            fields[key] = value.strip().lower()
        else:
            fields[key] = value
    try:
        return TaskSpec(kind=kind, **fields)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ValueError(f"{item_name}: {exc}") from exc


def parse_tasks(raw: Sequence[Mapping[str, object] | str]) -> list[TaskSpec]:
    """Parse a rule's or request's task list.

    Raises
    ------
    ValueError
        Naming the first bad item (its position and content) and what is wrong with it: an
        unknown kind, an option that does not apply, a missing or empty required list
        (``vqa`` questions, ``classify`` labels, ``ground`` phrases, ``detect`` findings), a bad
        language tag or token budget.
    """
    if isinstance(raw, (str, Mapping)) or not isinstance(raw, Sequence):
        raise ValueError(f"tasks must be a list, got {type(raw).__name__}.")  # noqa: TRY004 (config errors are ValueErrors)
    return [parse_task(item, position=i) for i, item in enumerate(raw)]
