"""Typed results of model tasks.

Every result keeps the model's raw text (what ``generate`` produced, decoded with special tokens)
and the indices of the prepared images it refers to, so the SR writers can reference the right
source instances and a reader can always audit what the model actually said.

Boxes are normalised to 0..1 on the ORIGINAL frame (not the model input): see
:mod:`inference.geometry` for the coordinate conventions and :mod:`inference.boxes` for how each
family's format is mapped back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from inference.tasks import TaskSpec

LabelState = Literal["present", "absent", "uncertain"]


@dataclass(frozen=True)
class Box:
    """An axis-aligned box on one source frame, normalised to 0..1 of its width and height.

    Attributes
    ----------
    label : str
        What the box shows (the phrase, finding or label the model gave).
    x0, y0, x1, y1 : float
        Left, top, right, bottom; ``0 <= x0 <= x1 <= 1`` and ``0 <= y0 <= y1 <= 1``.
    image_index : int
        Index of the source image in the list of prepared images of the request.
    probability : float or None
        Model probability when the model gives one.
    text : str or None
        The sentence or caption the box belongs to, when the model tied one to it.
    """

    label: str
    x0: float
    y0: float
    x1: float
    y1: float
    image_index: int = 0
    probability: float | None = None
    text: str | None = None

    def __post_init__(self) -> None:
        if not (0.0 <= self.x0 <= self.x1 <= 1.0 and 0.0 <= self.y0 <= self.y1 <= 1.0):
            raise ValueError(
                f"Box corners must satisfy 0 <= x0 <= x1 <= 1 and 0 <= y0 <= y1 <= 1, got "
                f"({self.x0}, {self.y0}, {self.x1}, {self.y1})."
            )
        if self.image_index < 0:
            raise ValueError(f"image_index must be >= 0, got {self.image_index}.")
        if self.probability is not None and not 0.0 <= self.probability <= 1.0:
            raise ValueError(f"probability must lie in [0, 1], got {self.probability}.")

    def to_pixels(self, columns: int, rows: int) -> tuple[float, float, float, float]:
        """Corners in continuous pixel coordinates ``(x0, y0, x1, y1)`` of a ``columns x rows`` frame."""
        return self.x0 * columns, self.y0 * rows, self.x1 * columns, self.y1 * rows

    def closed_polyline(self, columns: int, rows: int) -> list[tuple[float, float]]:
        """Five (column, row) points of the closed outline, first point repeated last, as a
        SCOORD POLYLINE wants it (PS3.3 C.18.6.1.2)."""
        x0, y0, x1, y1 = self.to_pixels(columns, rows)
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]


@dataclass(frozen=True, kw_only=True)
class _Result:
    """Fields every result has."""

    task: TaskSpec
    #: Decoded generated tokens (special tokens kept, end-of-sequence and padding removed).
    raw_text: str
    #: Indices of the prepared images that were in the prompt.
    image_indices: tuple[int, ...]


@dataclass(frozen=True, kw_only=True)
class ReportResult(_Result):
    """A narrative report: findings and, when the model separated one, the impression."""

    language: str
    findings: str
    impression: str | None = None


@dataclass(frozen=True, kw_only=True)
class AnswerResult(_Result):
    """The answer to one free-text question."""

    question: str
    answer: str
    language: str


@dataclass(frozen=True, kw_only=True)
class LabelResult(_Result):
    """Image-level classification of one label.

    ``state`` comes from the answer text (yes → present, no → absent, anything else →
    uncertain). ``probability`` is P(yes) / (P(yes) + P(no)) of the first generated token when the
    family's yes/no words are single tokens of the tokenizer, else None.
    """

    label: str
    state: LabelState
    probability: float | None = None


@dataclass(frozen=True, kw_only=True)
class RegionResult(_Result):
    """Boxes for one phrase (``ground``) or finding (``detect``) on one image.

    ``rejected`` holds fragments that looked like box markup but could not be read; the
    boxes found elsewhere in the text are still returned.
    """

    query: str
    boxes: tuple[Box, ...]
    rejected: tuple[str, ...] = ()


@dataclass(frozen=True, kw_only=True)
class RegionCaptionResult(_Result):
    """A caption for one given region."""

    box: Box
    caption: str
    language: str


@dataclass(frozen=True)
class GroundedSentence:
    """One sentence of a grounded report and the boxes the model tied to it (maybe none)."""

    text: str
    boxes: tuple[Box, ...] = ()


@dataclass(frozen=True, kw_only=True)
class GroundedReportResult(_Result):
    """A report whose sentences carry their boxes."""

    language: str
    sentences: tuple[GroundedSentence, ...]
    rejected: tuple[str, ...] = ()

    @property
    def boxes(self) -> tuple[Box, ...]:
        """All boxes of all sentences."""
        return tuple(b for s in self.sentences for b in s.boxes)


TaskResult = (ReportResult | AnswerResult | LabelResult | RegionResult | RegionCaptionResult
              | GroundedReportResult)


@dataclass(frozen=True)
class ModelInfo:
    """What produced the results, for the SR's algorithm identification and Contributing Equipment.

    Attributes
    ----------
    name : str
        Model name (the config's ``name``, else the directory name).
    version : str
        First 16 hex digits of the SHA-256 of ``config.json``; changes when the checkpoint does.
    family : str
        Family adapter name (``medgemma``, ``qwen2_vl``, ...).
    """

    name: str
    version: str
    family: str
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
