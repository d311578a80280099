"""Key images of a job, rendered server-side: source frame + SEG overlay + SR boxes, as PNG.

People would rather look than read. For each job the viewer picks a few key frames — for every
segment of its SEG the source frame where the segment is largest, every frame an SR box is drawn
on, or (for a job without either, such as an answered question) the middle frame of the series it
read — and draws them: the frame windowed to 8 bits, each segment as a translucent fill with an
outline and a legend, each SR region as a rectangle labelled with its finding and probability.

The SEG is read with :func:`highdicom.seg.segread`; SR regions are read from the content tree
(TID 1500 planar ROI groups: an ``SCOORD`` whose child ``IMAGE`` item names the source frame).
3D coordinates (``SCOORD3D``) are not drawn yet.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

log = logging.getLogger(__name__)

#: RGB of segments 1, 2, … (cycled): distinguishable on greyscale and for common colour blindness.
PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
           (213, 94, 0), (204, 121, 167)]
BOX_COLOUR = (255, 64, 64)
MAX_KEY_IMAGES = 6
#: Frames are scaled up to at least this many pixels on their long side (nearest neighbour).
MIN_RENDER_PX = 512
SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
CODE_FINDING = "121071"
CODE_FINDING_SITE = "363698007"


class KeyImageError(ValueError):
    """A key image cannot be drawn (its source or result file is missing or unreadable)."""


@dataclass(frozen=True)
class SrBox:
    """A region of an SR drawn on one source frame, in pixel coordinates (column, row)."""

    sop_instance_uid: str
    frame: int
    points: tuple[tuple[float, float], ...]
    label: str


@dataclass
class KeyImage:
    """One frame worth showing and what to draw on it."""

    sop_instance_uid: str
    frame: int  #: 1-based frame number in the source instance
    #: segment number -> mask (rows x columns, bool) on this frame
    masks: dict[int, np.ndarray] = field(default_factory=dict)
    boxes: list[SrBox] = field(default_factory=list)


@dataclass
class JobImages:
    """The key images of one job and the labels of its segments."""

    images: list[KeyImage]
    segment_labels: dict[int, str]


# -- reading the result objects -----------------------------------------------------------------------
def _frame_sources(seg: Dataset) -> list[tuple[str, int, int]]:
    """(source SOP Instance UID, source frame, segment number) of each SEG frame (PS3.3 C.8.20.2)."""
    out = []
    for item in seg.PerFrameFunctionalGroupsSequence:
        segment = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = item.DerivationImageSequence[0].SourceImageSequence[0]
        frame = int(source.get("ReferencedFrameNumber", 1) or 1)
        out.append((str(source.ReferencedSOPInstanceUID), frame, segment))
    return out


def read_seg_masks(path: Path) -> tuple[dict[tuple[str, int], dict[int, np.ndarray]], dict[int, str]]:
    """Masks per (source SOP UID, frame) and segment number, and the segment labels.

    Raises
    ------
    KeyImageError
        If the file is not a SEG highdicom can read.
    """
    try:
        seg = hd.seg.segread(path)
    except (OSError, ValueError, AttributeError, KeyError) as exc:
        raise KeyImageError(f"cannot read SEG {path.name}: {exc}") from exc
    labels = {int(s.SegmentNumber): str(s.SegmentLabel) for s in seg.SegmentSequence}
    pixels = np.asarray(seg.pixel_array)
    if pixels.ndim == 2:
        pixels = pixels[np.newaxis]
    masks: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    for index, (sop_uid, frame, segment) in enumerate(_frame_sources(seg)):
        plane = pixels[index] > 0
        per_segment = masks.setdefault((sop_uid, frame), {})
        per_segment[segment] = per_segment[segment] | plane if segment in per_segment else plane
    return masks, labels


def _items(sequence: object) -> list[Dataset]:
    return list(sequence) if sequence is not None else []  # type: ignore[call-overload]


def _first_int(value: object, default: int) -> int:
    """The first of a possibly multi-valued DICOM integer (IS, US), else ``default``."""
    if value is None or value == "":
        return default
    if isinstance(value, (list, tuple, MultiValue)):
        return int(value[0]) if len(value) else default
    return int(value)  # type: ignore[call-overload]


def _group_label(group: Dataset) -> str:
    finding = site = comment = probability = None
    tracking = None
    for item in _items(group.get("ContentSequence")):
        name = item.ConceptNameCodeSequence[0] if "ConceptNameCodeSequence" in item else None
        code = str(name.CodeValue) if name is not None and "CodeValue" in name else ""
        if item.ValueType == "CODE" and code == CODE_FINDING:
            finding = str(item.ConceptCodeSequence[0].CodeMeaning)
        elif item.ValueType == "CODE" and code == CODE_FINDING_SITE:
            site = str(item.ConceptCodeSequence[0].CodeMeaning)
        elif item.ValueType == "TEXT" and code == "112039":
            tracking = str(item.TextValue)
        elif item.ValueType == "TEXT":
            comment = str(item.TextValue)
        elif item.ValueType == "NUM" and "MeasuredValueSequence" in item:
            value = float(item.MeasuredValueSequence[0].NumericValue)
            probability = f"{value:.2f}"
    parts = [p for p in (finding, site and f"({site})", probability and f"p={probability}") if p]
    label = " ".join(parts) or tracking or "region"
    return f"{label}: {comment}" if comment and len(comment) <= 60 else label


def read_sr_boxes(path: Path) -> list[SrBox]:
    """Every 2D region (``SCOORD``) of an SR with the source frame it is drawn on.

    Raises
    ------
    KeyImageError
        If the file cannot be read as DICOM.
    """
    try:
        ds = dcmread(path)
    except (OSError, ValueError) as exc:
        raise KeyImageError(f"cannot read SR {path.name}: {exc}") from exc
    boxes: list[SrBox] = []

    def walk(container: Dataset) -> None:
        for item in _items(container.get("ContentSequence")):
            if item.get("ValueType") == "SCOORD":
                images = [c for c in _items(item.get("ContentSequence")) if c.get("ValueType") == "IMAGE"]
                data = [float(v) for v in item.GraphicData]
                if images and len(data) >= 4:
                    ref = images[0].ReferencedSOPSequence[0]
                    frame = _first_int(ref.get("ReferencedFrameNumber"), default=1)
                    points = tuple(zip(data[0::2], data[1::2]))
                    boxes.append(SrBox(str(ref.ReferencedSOPInstanceUID), frame, points, _group_label(container)))
            elif item.get("ValueType") == "CONTAINER":
                walk(item)

    walk(ds)
    return boxes


def select_key_images(
    masks: dict[tuple[str, int], dict[int, np.ndarray]], boxes: list[SrBox], fallback: list[tuple[str, int]],
    limit: int = MAX_KEY_IMAGES,
) -> list[KeyImage]:
    """Pick the frames to show: per segment the frame where it is largest, every frame with a
    box, else the ``fallback`` frames; at most ``limit``, in a stable order."""
    chosen: list[tuple[str, int]] = []
    segments = sorted({s for per in masks.values() for s in per})
    for segment in segments:
        areas = [(int(per[segment].sum()), key) for key, per in masks.items() if segment in per]
        if areas:
            area, key = max(areas, key=lambda a: (a[0], a[1]))
            if area > 0 and key not in chosen:
                chosen.append(key)
    for box in boxes:
        key = (box.sop_instance_uid, box.frame)
        if key not in chosen:
            chosen.append(key)
    if not chosen:
        chosen = list(fallback)
    images = []
    for sop_uid, frame in chosen[:limit]:
        images.append(KeyImage(
            sop_instance_uid=sop_uid, frame=frame, masks=dict(masks.get((sop_uid, frame), {})),
            boxes=[b for b in boxes if (b.sop_instance_uid, b.frame) == (sop_uid, frame)],
        ))
    return images


# -- drawing ----------------------------------------------------------------------------------------
def frame_to_uint8(ds: Dataset, frame: int = 1) -> np.ndarray:
    """One frame of ``ds`` as 8-bit greyscale (rows x columns) or RGB (rows x columns x 3).

    Greyscale is rescaled (slope/intercept), then windowed: the first Window Center/Width of the
    instance, else the 1st–99th percentile; MONOCHROME1 is inverted.
    """
    pixels = np.asarray(ds.pixel_array)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if frames > 1:
        pixels = pixels[frame - 1]
    if samples == 3:
        if str(ds.get("PhotometricInterpretation", "")).startswith("YBR"):
            from pydicom.pixels import convert_color_space

            pixels = convert_color_space(pixels, str(ds.PhotometricInterpretation), "RGB")
        if pixels.dtype != np.uint8:
            top = float(pixels.max()) or 1.0
            pixels = (pixels.astype(np.float64) * (255.0 / top)).clip(0, 255).astype(np.uint8)
        return pixels
    values = pixels.astype(np.float64) * float(ds.get("RescaleSlope", 1) or 1) + float(
        ds.get("RescaleIntercept", 0) or 0)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if center is not None and width is not None:
        c = float(center[0]) if isinstance(center, MultiValue) else float(center)
        w = float(width[0]) if isinstance(width, MultiValue) else float(width)
        low, high = c - w / 2, c + w / 2
    else:
        low, high = (float(v) for v in np.percentile(values, (1, 99)))
    if high <= low:
        high = low + 1
    out = ((values - low) / (high - low)).clip(0, 1) * 255
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1":
        out = 255 - out
    return out.astype(np.uint8)


def _outline(mask: np.ndarray) -> np.ndarray:
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    for name in ("DejaVuSans.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        try:
            return ImageFont.truetype(name, size)
        except OSError:
            continue
    return ImageFont.load_default()


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, colour: tuple[int, int, int],
           font: ImageFont.ImageFont | ImageFont.FreeTypeFont) -> None:
    left, top, right, bottom = draw.textbbox(xy, text, font=font)
    draw.rectangle((left - 3, top - 2, right + 3, bottom + 2), fill=(0, 0, 0))
    draw.text(xy, text, fill=colour, font=font)


def render_key_image(ds: Dataset, key: KeyImage, segment_labels: dict[int, str]) -> bytes:
    """Draw ``key`` on its source ``ds`` and return PNG bytes."""
    grey = frame_to_uint8(ds, key.frame)
    rgb = np.repeat(grey[..., np.newaxis], 3, axis=2) if grey.ndim == 2 else grey.copy()
    rgb = rgb.astype(np.float64)
    fitting = {n: m for n, m in key.masks.items() if m.shape == rgb.shape[:2]}
    for segment in set(key.masks) - set(fitting):
        log.warning("SEG segment %d does not fit frame %s of %s", segment, rgb.shape[:2], key.sop_instance_uid)
    # a segment that encloses the others (the body) is only outlined, so what lies inside stays visible
    areas = {n: int(m.sum()) for n, m in fitting.items()}
    enclosing = max(areas, key=lambda n: areas[n]) if len(areas) > 1 else None
    for segment, mask in sorted(fitting.items()):
        colour = np.array(PALETTE[(segment - 1) % len(PALETTE)], dtype=np.float64)
        if segment != enclosing:
            rgb[mask] = rgb[mask] * 0.55 + colour * 0.45
        rgb[_outline(mask)] = colour
    image = Image.fromarray(rgb.clip(0, 255).astype(np.uint8), "RGB")
    scale = max(1, int(np.ceil(MIN_RENDER_PX / max(image.size))))
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    font_px = max(14, image.width // 30)
    font = _font(font_px)
    for box in key.boxes:
        points = [(x * scale, y * scale) for x, y in box.points]
        draw.line(points + [points[0]], fill=BOX_COLOUR, width=max(2, scale))
        x0, y0 = min(p[0] for p in points), min(p[1] for p in points)
        _label(draw, (x0 + 2, max(0, y0 - font_px - 6)), box.label, BOX_COLOUR, font)
    y = 6
    for segment in sorted(key.masks):
        if key.masks[segment].any():
            legend = PALETTE[(segment - 1) % len(PALETTE)]
            _label(draw, (8, y), f"■ {segment_labels.get(segment, f'segment {segment}')}", legend, font)
            y += font_px + 8
    buffer = BytesIO()
    image.save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


# -- per job, cached ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class ResultFile:
    kind: str
    sop_class_uid: str
    path: Path


class KeyImageCache:
    """Key images per job, keyed by the job's result files (sizes included), so a re-run that
    rewrites them is drawn again; a small LRU of PNGs."""

    def __init__(self, max_pngs: int = 64) -> None:
        self._lock = threading.Lock()
        self._plans: OrderedDict[tuple[object, ...], JobImages] = OrderedDict()
        self._pngs: OrderedDict[tuple[object, ...], bytes] = OrderedDict()
        self.max_pngs = max_pngs

    def plan(self, key: tuple[object, ...], build: object) -> JobImages:
        with self._lock:
            if key in self._plans:
                self._plans.move_to_end(key)
                return self._plans[key]
        plan = build()  # type: ignore[operator]
        with self._lock:
            self._plans[key] = plan
            while len(self._plans) > self.max_pngs:
                self._plans.popitem(last=False)
        return plan  # type: ignore[no-any-return]

    def png(self, key: tuple[object, ...], build: object) -> bytes:
        with self._lock:
            if key in self._pngs:
                self._pngs.move_to_end(key)
                return self._pngs[key]
        data = build()  # type: ignore[operator]
        with self._lock:
            self._pngs[key] = data
            while len(self._pngs) > self.max_pngs:
                self._pngs.popitem(last=False)
        return data  # type: ignore[no-any-return]


def plan_job_images(results: list[ResultFile], fallback: list[tuple[str, int]]) -> JobImages:
    """Read a job's SEG and SR files and choose its key images."""
    masks: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    labels: dict[int, str] = {}
    boxes: list[SrBox] = []
    for result in results:
        if result.sop_class_uid == SEG_SOP_CLASS or result.kind == "seg":
            seg_masks, seg_labels = read_seg_masks(result.path)
            offset = max(labels, default=0)  # several SEGs: keep their segments apart
            for key, per in seg_masks.items():
                target = masks.setdefault(key, {})
                for number, mask in per.items():
                    target[number + offset] = mask
            labels.update({n + offset: label for n, label in seg_labels.items()})
        elif result.kind == "sr" or result.sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.88."):
            boxes.extend(read_sr_boxes(result.path))
    return JobImages(select_key_images(masks, boxes, fallback), labels)
