"""Parsers (and writers) of the box formats the model families emit.

Every parser maps boxes onto one internal form, :class:`inference.results.Box`: a label and
corners normalised 0..1 on the ORIGINAL frame, through the :class:`ImageTransform` of the image
the model saw (undoing pad-to-square, centre crop or resize).

Policy for text that is not what we hoped for (decided once, the same for every family):
parsers never raise on model text. Text with no box markup gives no boxes. A fragment that has
the family's markup but cannot be read (wrong number of coordinates, broken JSON, a box lying
wholly outside the frame) is returned in ``ParsedBoxes.rejected`` next to the boxes that could
be read; the caller keeps the raw text in the result. Boxes are clipped to the frame, and
corners given in the wrong order are sorted.

Frames of reference (``fmt``, per family):

=================  ========================================================  ==================
format             markup                                                    coordinates
=================  ========================================================  ==================
``medgemma``       ``{"box_2d": [y0, x0, y1, x1], "label": ...}`` (JSON)     0–1000 of input
``qwen2_vl``       ``<|object_ref_start|>l<|object_ref_end|>``                0–1000 of input
                   ``<|box_start|>(x0,y0),(x1,y1)<|box_end|>``
``qwen2_5_vl``     ``{"bbox_2d": [x0, y0, x1, y1], "label": ...}`` (JSON)    input pixels
``qwen3_vl``       ``{"bbox_2d": [x0, y0, x1, y1], "label": ...}`` (JSON)    0–1000 of input
``medrega``        ``<ref>obj</ref><box>[[x0, y0, x1, y1]]</box>``           0–1000 of original
``minigpt``        ``<p>label</p> {<x0><y0><x1><y1>}``, ``<delim>`` joins     0–100 of input
``maira2``         ``<obj>text<box><x55><y45><x70><y56></box></obj>``        100 bins of input
``chexagent``      ``<|ref|>p<|/ref|><|box|>(x0,y0),(x1,y1)<|/box|>``         0–100 of input
``paligemma``      ``<loc0123><loc0456><loc0789><loc1000> label``             1024 bins, y first
``llava``          ``[x0, y0, x1, y1]`` floats                               0–1 of input
=================  ========================================================  ==================

"Input" is the image the model saw: the padded square for ``pad`` preparation, the cropped
square for ``crop``. MAIRA-2 bin ``b`` is read as the bin centre ``(b + 0.5) / 100``; the others
read integer ``v`` as ``v / scale``. MedRegA/InternVL's 0–1000 grid is on the original image
(InternVL stretches tiles), so the transform's crop/pad does not apply to it.

The three Qwen generations share a name but not a convention: Qwen2-VL writes its special-token
markup on a 0–1000 grid, Qwen2.5-VL (and fine-tunes of it such as Lingshu) writes JSON in
absolute pixels of the resized image it was given, Qwen3-VL writes the same JSON on 0–1000
again. :data:`inference.vlm.families.FAMILIES` ties each family to its format.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

from inference.geometry import ImageTransform
from inference.results import Box

BoxFormat = Literal["medgemma", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "medrega", "minigpt", "maira2",
                    "chexagent", "paligemma", "llava"]
Frame = Literal["input_normalised", "input_pixels", "original_normalised"]


@dataclass(frozen=True)
class ParsedBoxes:
    """What a parser found.

    Attributes
    ----------
    boxes : tuple of Box
        Readable boxes, in text order.
    spans : tuple of (int, int)
        Character span of each box's markup in the text (same order as ``boxes``).
    rejected : tuple of str
        Markup fragments that could not be read.
    """

    boxes: tuple[Box, ...] = ()
    spans: tuple[tuple[int, int], ...] = ()
    rejected: tuple[str, ...] = ()


def to_box(label: str, coords: tuple[float, float, float, float], transform: ImageTransform, *,
           frame: Frame, image_index: int = 0, text: str | None = None,
           probability: float | None = None) -> Box | None:
    """Map ``(x0, y0, x1, y1)`` in ``frame`` to a Box on the original frame.

    ``input_normalised`` and ``original_normalised`` take 0..1 values, ``input_pixels`` pixels of
    the model input. Returns None when the box lies wholly outside the frame (or has no area).
    """
    x0, y0, x1, y1 = coords
    if frame == "input_normalised":
        (x0, y0), (x1, y1) = (transform.input_normalised_to_original(x0, y0),
                              transform.input_normalised_to_original(x1, y1))
    elif frame == "input_pixels":
        (x0, y0), (x1, y1) = transform.input_to_original(x0, y0), transform.input_to_original(x1, y1)
    elif frame == "original_normalised":
        (x0, y0), (x1, y1) = transform.normalised_to_original(x0, y0), transform.normalised_to_original(x1, y1)
    else:
        raise ValueError(f"Unknown coordinate frame {frame!r}.")
    w, h = transform.original_width, transform.original_height
    left, right = sorted((x0, x1))
    top, bottom = sorted((y0, y1))
    left, right = min(max(left, 0.0), w), min(max(right, 0.0), w)
    top, bottom = min(max(top, 0.0), h), min(max(bottom, 0.0), h)
    if right <= left or bottom <= top:
        return None
    return Box(label=label.strip(), x0=left / w, y0=top / h, x1=right / w, y1=bottom / h,
               image_index=image_index, probability=probability, text=text)


def from_box(box: Box, transform: ImageTransform, frame: Frame) -> tuple[float, float, float, float]:
    """Inverse of :func:`to_box`: a Box's corners in ``frame`` (used to put regions into prompts)."""
    x0, y0 = box.x0 * transform.original_width, box.y0 * transform.original_height
    x1, y1 = box.x1 * transform.original_width, box.y1 * transform.original_height
    if frame == "input_normalised":
        (a, b), (c, d) = transform.original_to_input_normalised(x0, y0), transform.original_to_input_normalised(x1, y1)
    elif frame == "input_pixels":
        (a, b), (c, d) = transform.original_to_input(x0, y0), transform.original_to_input(x1, y1)
    elif frame == "original_normalised":
        a, b, c, d = box.x0, box.y0, box.x1, box.y1
    else:
        raise ValueError(f"Unknown coordinate frame {frame!r}.")
    return a, b, c, d


class _Collector:
    def __init__(self, transform: ImageTransform, image_index: int, frame: Frame) -> None:
        self.transform, self.image_index, self.frame = transform, image_index, frame
        self.boxes: list[Box] = []
        self.spans: list[tuple[int, int]] = []
        self.rejected: list[str] = []

    def add(self, fragment: str, span: tuple[int, int], label: str,
            coords: tuple[float, float, float, float] | None, text: str | None = None) -> None:
        box = None if coords is None else to_box(label, coords, self.transform, frame=self.frame,
                                                  image_index=self.image_index, text=text)
        if box is None:
            self.rejected.append(fragment)
        else:
            self.boxes.append(box)
            self.spans.append(span)

    def result(self) -> ParsedBoxes:
        return ParsedBoxes(tuple(self.boxes), tuple(self.spans), tuple(self.rejected))


_NUMBER = r"-?\d+(?:\.\d+)?"


def _numbers(text: str) -> list[float]:
    return [float(n) for n in re.findall(_NUMBER, text)]


def _four(values: list[float], scale: float) -> tuple[float, float, float, float] | None:
    if len(values) != 4:
        return None
    a, b, c, d = (v / scale for v in values)
    return a, b, c, d


# --- JSON families: MedGemma (box_2d, y first, 0-1000) and Qwen2.5-VL (bbox_2d, pixels) ---------

_JSON_OBJECT = re.compile(r"\{[^{}]*\}")


def _iter_json_objects(text: str, key: str) -> Iterator[tuple[re.Match[str], dict[str, object] | None]]:
    for match in _JSON_OBJECT.finditer(text):
        if key not in match.group(0):
            continue
        try:
            value = json.loads(match.group(0))
        except json.JSONDecodeError:
            yield match, None
            continue
        yield match, value if isinstance(value, dict) else None


def _parse_json(text: str, transform: ImageTransform, image_index: int, default_label: str, *,
                key: str, y_first: bool, scale: float, frame: Frame) -> ParsedBoxes:
    out = _Collector(transform, image_index, frame)
    for match, obj in _iter_json_objects(text, key):
        coords = None
        label = default_label
        if obj is not None:
            raw = obj.get(key)
            label = str(obj.get("label", default_label) or default_label)
            if isinstance(raw, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in raw):
                values = [float(v) for v in raw]
                if y_first and len(values) == 4:
                    values = [values[1], values[0], values[3], values[2]]
                coords = _four(values, scale)
        out.add(match.group(0), match.span(), label, coords, text=None)
    return out.result()


def parse_medgemma(text: str, transform: ImageTransform, *, image_index: int = 0,
                   default_label: str = "") -> ParsedBoxes:
    """MedGemma / Gemma 3: ``{"box_2d": [y0, x0, y1, x1], "label": ...}`` on 0–1000 of the
    (padded square) input, usually inside a fenced ``json`` list."""
    return _parse_json(text, transform, image_index, default_label, key="box_2d", y_first=True,
                       scale=1000.0, frame="input_normalised")


def parse_qwen2_5_vl(text: str, transform: ImageTransform, *, image_index: int = 0,
                     default_label: str = "") -> ParsedBoxes:
    """Qwen2.5-VL (and Lingshu): ``{"bbox_2d": [x0, y0, x1, y1], "label": ...}`` in absolute
    pixels of the resized input (the image the processor turned into patches)."""
    return _parse_json(text, transform, image_index, default_label, key="bbox_2d", y_first=False,
                       scale=1.0, frame="input_pixels")


def parse_qwen3_vl(text: str, transform: ImageTransform, *, image_index: int = 0,
                   default_label: str = "") -> ParsedBoxes:
    """Qwen3-VL: ``{"bbox_2d": [x0, y0, x1, y1], "label": ...}`` on 0–1000 of the input."""
    return _parse_json(text, transform, image_index, default_label, key="bbox_2d", y_first=False,
                       scale=1000.0, frame="input_normalised")


# --- Qwen2-VL: special-token markup on 0-1000 -----------------------------------------------------

_QWEN2_VL = re.compile(
    r"(?:<\|object_ref_start\|>(?P<ref>.*?)<\|object_ref_end\|>\s*)?"
    r"<\|box_start\|>(?P<box>.*?)<\|box_end\|>", re.DOTALL)
_POINT = re.compile(r"\(\s*(" + _NUMBER + r")\s*,\s*(" + _NUMBER + r")\s*\)")


def parse_qwen2_vl(text: str, transform: ImageTransform, *, image_index: int = 0,
                   default_label: str = "") -> ParsedBoxes:
    """Qwen2-VL: ``<|object_ref_start|>label<|object_ref_end|><|box_start|>(x0,y0),(x1,y1)<|box_end|>``
    on 0–1000 of the input. One box markup may hold several corner pairs (several boxes of one
    label); a markup without a label keeps the previous one (or the default).

    The markers are special tokens: parse text decoded with ``skip_special_tokens=False``.
    """
    out = _Collector(transform, image_index, "input_normalised")
    label = default_label
    for match in _QWEN2_VL.finditer(text):
        if match.group("ref") is not None:
            label = match.group("ref").strip()
        points = [(float(x), float(y)) for x, y in _POINT.findall(match.group("box"))]
        leftover = _POINT.sub("", match.group("box")).strip(" ,")
        if not points or len(points) % 2 or leftover:
            out.add(match.group(0), match.span(), label, None)
            continue
        for (x0, y0), (x1, y1) in zip(points[::2], points[1::2], strict=True):
            out.add(match.group(0), match.span(), label, _four([x0, y0, x1, y1], 1000.0))
    return out.result()


# --- MedRegA / InternVL -------------------------------------------------------------------------

_MEDREGA = re.compile(r"(?:<ref>(?P<ref>.*?)</ref>\s*)?<box>(?P<box>.*?)</box>", re.DOTALL)


def parse_medrega(text: str, transform: ImageTransform, *, image_index: int = 0,
                  default_label: str = "") -> ParsedBoxes:
    """MedRegA / InternVL: ``<ref>obj</ref><box>[[x0, y0, x1, y1], ...]</box>`` on 0–1000 of the
    original image; one ref may carry several boxes."""
    out = _Collector(transform, image_index, "original_normalised")
    for match in _MEDREGA.finditer(text):
        label = (match.group("ref") or default_label).strip()
        groups = re.findall(r"\[([^\[\]]*)\]", match.group("box"))
        if not groups:
            out.add(match.group(0), match.span(), label, None)
        for group in groups:
            out.add(match.group(0), match.span(), label, _four(_numbers(group), 1000.0))
    return out.result()


# --- MiniGPT-Med / MiniGPT-v2 -----------------------------------------------------------------

_MINIGPT = re.compile(r"(?:<p>(?P<label>.*?)</p>\s*)?\{(?P<box>(?:\s*<-?\d+(?:\.\d+)?>\s*)+)\}", re.DOTALL)


def parse_minigpt(text: str, transform: ImageTransform, *, image_index: int = 0,
                  default_label: str = "") -> ParsedBoxes:
    """MiniGPT-Med / MiniGPT-v2: ``<p>label</p> {<x0><y0><x1><y1>}`` on 0–100 of the (stretched)
    input; several joined by ``<delim>``, a label followed by several boxes keeps its label."""
    out = _Collector(transform, image_index, "input_normalised")
    label = default_label
    for match in _MINIGPT.finditer(text):
        if match.group("label") is not None:
            label = match.group("label").strip()
        out.add(match.group(0), match.span(), label, _four(_numbers(match.group("box")), 100.0))
    return out.result()


# --- MAIRA-2 --------------------------------------------------------------------------------------

_MAIRA_OBJ = re.compile(r"<obj>(?P<body>.*?)</obj>", re.DOTALL)
_MAIRA_BOX = re.compile(r"<box>(?P<box>.*?)</box>", re.DOTALL)
_MAIRA_COORD = re.compile(r"<([xy])(\d+)>")


def parse_maira2(text: str, transform: ImageTransform, *, image_index: int = 0,
                 default_label: str = "") -> ParsedBoxes:
    """MAIRA-2: ``<obj>sentence<box><x55><y45><x70><y56></box></obj>``, 100 bins of the
    centre-cropped square, each bin read at its centre. The sentence is the label and the text."""
    out = _Collector(transform, image_index, "input_normalised")
    for obj in _MAIRA_OBJ.finditer(text):
        body = obj.group("body")
        sentence = _MAIRA_BOX.sub("", body).strip() or default_label
        boxes = list(_MAIRA_BOX.finditer(body))
        if not boxes:
            out.add(obj.group(0), obj.span(), sentence, None)
        for box in boxes:
            coords = _MAIRA_COORD.findall(box.group("box"))
            axes = "".join(axis for axis, _ in coords)
            values = None
            if axes == "xyxy":
                values = tuple((float(v) + 0.5) / 100.0 for _, v in coords)
            out.add(obj.group(0), obj.span(), sentence, values, text=sentence)  # type: ignore[arg-type]
    return out.result()


# --- CheXagent ----------------------------------------------------------------------------------

_CHEXAGENT = re.compile(r"(?:<\|ref\|>(?P<ref>.*?)<\|/ref\|>\s*)?<\|box\|>(?P<box>.*?)<\|/box\|>", re.DOTALL)


def parse_chexagent(text: str, transform: ImageTransform, *, image_index: int = 0,
                    default_label: str = "") -> ParsedBoxes:
    """CheXagent: ``<|ref|>phrase<|/ref|><|box|>(x0,y0),(x1,y1)<|/box|>`` on 0–100 of the input."""
    out = _Collector(transform, image_index, "input_normalised")
    for match in _CHEXAGENT.finditer(text):
        label = (match.group("ref") or default_label).strip()
        out.add(match.group(0), match.span(), label, _four(_numbers(match.group("box")), 100.0))
    return out.result()


# --- PaliGemma -----------------------------------------------------------------------------------

_PALIGEMMA = re.compile(r"((?:<loc\d{4}>){4})\s*([^<;\n]*)")


def parse_paligemma(text: str, transform: ImageTransform, *, image_index: int = 0,
                    default_label: str = "") -> ParsedBoxes:
    """PaliGemma: ``<locY0><locX0><locY1><locX1> label`` with 1024 bins of the input, y first;
    several detections separated by ``;``."""
    out = _Collector(transform, image_index, "input_normalised")
    for match in _PALIGEMMA.finditer(text):
        y0, x0, y1, x1 = (float(v) for v in re.findall(r"<loc(\d{4})>", match.group(1)))
        coords = None if max(y0, x0, y1, x1) > 1024 else _four([x0, y0, x1, y1], 1024.0)
        out.add(match.group(0), match.span(), match.group(2).strip() or default_label, coords)
    return out.result()


# --- LLaVA family -----------------------------------------------------------------------------

_LLAVA = re.compile(r"\[\s*(" + _NUMBER + r"(?:\s*,\s*" + _NUMBER + r")*)\s*\]")


def parse_llava(text: str, transform: ImageTransform, *, image_index: int = 0,
                default_label: str = "") -> ParsedBoxes:
    """LLaVA-1.5 / LLaVA-Med: ``[x0, y0, x1, y1]`` as floats 0–1 of the padded square input.

    A bracketed list of four numbers that are not all within 0..1 is rejected (it is not a
    LLaVA box); lists of other lengths are ordinary text and ignored.
    """
    out = _Collector(transform, image_index, "input_normalised")
    for match in _LLAVA.finditer(text):
        values = _numbers(match.group(1))
        if len(values) != 4:
            continue
        coords = _four(values, 1.0) if all(0.0 <= v <= 1.0 for v in values) else None
        out.add(match.group(0), match.span(), default_label, coords)
    return out.result()


# --- Writers (for putting regions into prompts, and for round-trip tests) -------------------------

def _clamp_int(value: float, top: int) -> int:
    return int(min(max(round(value), 0), top))


def format_box(fmt: BoxFormat, box: Box, transform: ImageTransform) -> str:
    """Write ``box`` in a family's markup (inverse of the parser, up to its quantisation)."""
    if fmt == "medgemma":
        x0, y0, x1, y1 = (_clamp_int(v * 1000, 1000) for v in from_box(box, transform, "input_normalised"))
        return json.dumps({"box_2d": [y0, x0, y1, x1], "label": box.label}, ensure_ascii=False)
    if fmt == "qwen2_vl":
        q = [_clamp_int(v * 1000, 1000) for v in from_box(box, transform, "input_normalised")]
        return (f"<|object_ref_start|>{box.label}<|object_ref_end|>"
                f"<|box_start|>({q[0]},{q[1]}),({q[2]},{q[3]})<|box_end|>")
    if fmt == "qwen2_5_vl":
        px = [_clamp_int(v, 100_000) for v in from_box(box, transform, "input_pixels")]
        return json.dumps({"bbox_2d": px, "label": box.label}, ensure_ascii=False)
    if fmt == "qwen3_vl":
        q = [_clamp_int(v * 1000, 1000) for v in from_box(box, transform, "input_normalised")]
        return json.dumps({"bbox_2d": q, "label": box.label}, ensure_ascii=False)
    if fmt == "medrega":
        q = [_clamp_int(v * 1000, 999) for v in from_box(box, transform, "original_normalised")]
        return f"<ref>{box.label}</ref><box>[[{q[0]}, {q[1]}, {q[2]}, {q[3]}]]</box>"
    if fmt == "minigpt":
        q = [_clamp_int(v * 100, 100) for v in from_box(box, transform, "input_normalised")]
        return f"<p>{box.label}</p> {{<{q[0]}><{q[1]}><{q[2]}><{q[3]}>}}"
    if fmt == "maira2":
        q = [_clamp_int(v * 100 - 0.5, 99) for v in from_box(box, transform, "input_normalised")]
        return f"<obj>{box.label}<box><x{q[0]}><y{q[1]}><x{q[2]}><y{q[3]}></box></obj>"
    if fmt == "chexagent":
        q = [_clamp_int(v * 100, 100) for v in from_box(box, transform, "input_normalised")]
        return f"<|ref|>{box.label}<|/ref|><|box|>({q[0]},{q[1]}),({q[2]},{q[3]})<|/box|>"
    if fmt == "paligemma":
        q = [_clamp_int(v * 1024, 1023) for v in from_box(box, transform, "input_normalised")]
        return f"<loc{q[1]:04d}><loc{q[0]:04d}><loc{q[3]:04d}><loc{q[2]:04d}> {box.label}"
    if fmt == "llava":
        v = from_box(box, transform, "input_normalised")
        return "[" + ", ".join(f"{min(max(c, 0.0), 1.0):.2f}" for c in v) + "]"
    raise ValueError(f"Unknown box format {fmt!r}.")


Parser = Callable[..., ParsedBoxes]

#: Formats whose boxes are JSON objects that carry their sentence or phrase as ``label``.
JSON_FORMATS: frozenset[str] = frozenset({"medgemma", "qwen2_5_vl", "qwen3_vl"})

PARSERS: dict[str, Parser] = {
    "medgemma": parse_medgemma,
    "qwen2_vl": parse_qwen2_vl,
    "qwen2_5_vl": parse_qwen2_5_vl,
    "qwen3_vl": parse_qwen3_vl,
    "medrega": parse_medrega,
    "minigpt": parse_minigpt,
    "maira2": parse_maira2,
    "chexagent": parse_chexagent,
    "paligemma": parse_paligemma,
    "llava": parse_llava,
}


def parse_boxes(fmt: BoxFormat, text: str, transform: ImageTransform, *, image_index: int = 0,
                default_label: str = "") -> ParsedBoxes:
    """Parse ``text`` with the parser of ``fmt``; see the module docstring for the policy."""
    try:
        parser = PARSERS[fmt]
    except KeyError:
        raise ValueError(f"Unknown box format {fmt!r}; known: {', '.join(PARSERS)}.") from None
    return parser(text, transform, image_index=image_index, default_label=default_label)
