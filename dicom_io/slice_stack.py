"""The slices of a cross-sectional series, ordered from headers alone, and decoded one at a time.

A CT or MR series reaches the node either as one single-frame instance per slice, or as one or
more enhanced multi-frame instances (PS3.3 C.7.6.16, Multi-frame Functional Groups) whose frames
each carry their own Plane Position (Patient). :func:`stack_slices` orders every slice (or frame)
along the slice normal from the headers (``stop_before_pixels`` datasets suffice), so a caller
picks the slices it needs first and :func:`read_slice` decodes only those: memory grows with the
number of slices picked, not with the size of the series.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, iter_pixels, pixel_array

from dicom_io.errors import InvalidInstanceError

logger = logging.getLogger(__name__)

#: Orientation cosines may differ this much between slices of one stack (as in :mod:`dicom_io.volume`).
_ORIENTATION_DECIMALS = 4


@dataclass(frozen=True)
class SliceRef:
    """Where one slice of a series is, in the files and in the patient.

    Attributes
    ----------
    dataset : pydicom.dataset.Dataset
        The instance holding the slice; its header suffices (pixels are read by :func:`read_slice`
        from the dataset's Pixel Data when present, else from the file it was read from).
    frame_index : int or None
        0-based frame of a multi-frame instance; ``None`` for a single-frame instance.
    position_mm : float or None
        Position along the slice normal (row x column cosines); ``None`` when the series carries
        no Image Position/Orientation (Patient), in which case slices are in Instance Number order.
    """

    dataset: Dataset
    frame_index: int | None
    position_mm: float | None

    @property
    def frame_number(self) -> int | None:
        """1-based Referenced Frame Number for SR references, ``None`` for single-frame instances."""
        return None if self.frame_index is None else self.frame_index + 1


def number_of_frames(ds: Dataset) -> int:
    """Number of Frames, 1 when absent or unreadable."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def functional_group(ds: Dataset, frame_index: int, keyword: str) -> Dataset | None:
    """The first item of ``keyword`` for one frame (0-based): per-frame group first, then the shared
    group (PS3.3 C.7.6.16); ``None`` when neither has it."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame is not None and frame_index < len(per_frame):
        found = per_frame[frame_index].get(keyword)
        if found:
            return found[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        found = shared[0].get(keyword)
        if found:
            return found[0]
    return None


def _floats(values: object, count: int) -> tuple[float, ...] | None:
    try:
        out = tuple(float(v) for v in values)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return out if len(out) == count else None


def frame_plane(ds: Dataset, frame_index: int | None) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """(orientation, position) of one slice: from the functional groups for a frame (0-based) of a
    multi-frame instance, else from the top-level Image Plane module; ``None`` for what is missing."""
    if frame_index is not None:
        orientation_item = functional_group(ds, frame_index, "PlaneOrientationSequence")
        position_item = functional_group(ds, frame_index, "PlanePositionSequence")
        orientation = _floats(orientation_item.get("ImageOrientationPatient"), 6) if orientation_item else None
        position = _floats(position_item.get("ImagePositionPatient"), 3) if position_item else None
        if orientation is not None and position is not None:
            return orientation, position
    return (_floats(ds.get("ImageOrientationPatient"), 6), _floats(ds.get("ImagePositionPatient"), 3))


def _instance_number(ds: Dataset) -> int:
    try:
        return int(ds.get("InstanceNumber", 0) or 0)
    except (TypeError, ValueError):
        return 0


def stack_slices(datasets: Sequence[Dataset]) -> list[SliceRef]:
    """Every slice of one series (each frame of a multi-frame instance), ordered along the normal.

    Reads headers only. Slices are sorted by their position along the slice normal (PS3.3
    C.7.6.2.1.1: Image Position is the centre of the first pixel; the normal is the cross product
    of the row and column cosines), ascending and stable, so repeated positions (echoes, phases)
    keep their Instance Number / frame order. When slices have several orientations (a localizer
    left in the series), the orientation most slices share is kept and the others are left out.
    A series without plane geometry is ordered by Instance Number, then frame.

    Raises
    ------
    InvalidInstanceError
        If ``datasets`` is empty.
    """
    if not datasets:
        raise InvalidInstanceError("A series with no instances has no slices.")
    entries: list[tuple[Dataset, int | None, tuple[float, ...] | None, tuple[float, ...] | None]] = []
    for ds in sorted(datasets, key=_instance_number):
        frames = number_of_frames(ds)
        for frame in range(frames) if frames > 1 else [None]:
            orientation, position = frame_plane(ds, frame)
            entries.append((ds, frame, orientation, position))
    if any(o is None or p is None for _, _, o, p in entries):
        return [SliceRef(ds, frame, None) for ds, frame, _, _ in entries]
    rounded = Counter(tuple(round(v, _ORIENTATION_DECIMALS) for v in o) for _, _, o, _ in entries if o)
    (main, _), = rounded.most_common(1)
    kept = [e for e in entries if e[2] is not None and tuple(round(v, _ORIENTATION_DECIMALS) for v in e[2]) == main]
    if len(kept) < len(entries):
        logger.warning("series %s: left out %d slice(s) of another orientation than the other %d",
                       datasets[0].get("SeriesInstanceUID", "?"), len(entries) - len(kept), len(kept))
    cosines = np.asarray(kept[0][2], dtype=float)
    normal = np.cross(cosines[:3], cosines[3:])
    refs = [SliceRef(ds, frame, float(np.dot(np.asarray(p), normal))) for ds, frame, _, p in kept if p]
    return sorted(refs, key=lambda r: r.position_mm if r.position_mm is not None else 0.0)


def _rescaled(raw: np.ndarray, ref: SliceRef) -> np.ndarray:
    """Modality LUT of one slice: a frame's Pixel Value Transformation (enhanced objects keep
    Rescale Slope/Intercept in the functional groups, PS3.3 C.7.6.16.2.9), else the top level."""
    ds = ref.dataset
    if ref.frame_index is not None:
        item = functional_group(ds, ref.frame_index, "PixelValueTransformationSequence")
        if item is not None and "RescaleSlope" in item and "RescaleIntercept" in item:
            slope, intercept = float(item.RescaleSlope), float(item.RescaleIntercept)
            return (raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)
    return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)


def pixel_source(ds: Dataset) -> Dataset | str:
    """Where ``ds``'s pixels are read from: the dataset when it holds its Pixel Data, else the file
    it was read from (``ds.filename``), where pydicom reads only the frames asked for. Pixel Data
    left deferred by ``dcmread(defer_size=...)`` counts as not held: touching it would load every
    frame at once.

    Raises
    ------
    InvalidInstanceError
        If the dataset has neither Pixel Data nor a file.
    """
    if "PixelData" in ds and ds.get_item("PixelData", keep_deferred=True).value is not None:
        return ds
    if isinstance(getattr(ds, "filename", None), (str, os.PathLike)):
        return os.fspath(ds.filename)
    if "PixelData" in ds:
        return ds
    raise InvalidInstanceError(
        f"instance {ds.get('SOPInstanceUID', '<unknown>')} was read without pixel data and without "
        "its file name; read it from a file (dcmread keeps the name) or with its pixel data.")


def read_frame(ds: Dataset, frame_index: int | None) -> np.ndarray:
    """Decode one frame (all of a single-frame instance) and nothing else.

    From :func:`pixel_source`: the dataset's own Pixel Data, or the file it was read from.

    Raises
    ------
    InvalidInstanceError
        If the dataset has neither Pixel Data nor a file, or the frame cannot be decoded.
    """
    uid = ds.get("SOPInstanceUID", "<unknown>")
    source = pixel_source(ds)
    try:
        return np.asarray(pixel_array(source, index=frame_index))
    except Exception as exc:  # decoders raise many types; the boundary names the instance
        raise InvalidInstanceError(f"frame {frame_index} of instance {uid} cannot be decoded: {exc}") from exc


def iter_frames(ds: Dataset) -> Iterator[tuple[int, np.ndarray]]:
    """Every frame of a multi-frame instance, ``(0-based index, frame)``, decoded one at a time.

    The file (or Pixel Data) is opened once and the frames are decoded in their order, so the
    instance's header is parsed once, not once a frame as :func:`read_frame` would, and only one
    decoded frame is held at a time.

    Raises
    ------
    InvalidInstanceError
        If the dataset has neither Pixel Data nor a file, or a frame cannot be decoded.
    """
    uid = ds.get("SOPInstanceUID", "<unknown>")
    source = pixel_source(ds)
    index = 0
    try:
        for index, frame in enumerate(iter_pixels(source)):
            yield index, frame
    except InvalidInstanceError:
        raise
    except Exception as exc:  # decoders raise many types; the boundary names the instance
        raise InvalidInstanceError(f"frame {index} of instance {uid} cannot be decoded: {exc}") from exc


def read_slice(ref: SliceRef) -> np.ndarray:
    """The values of one slice after the Modality LUT (HU for CT), as float32 ``(rows, columns)``.

    Raises
    ------
    InvalidInstanceError
        If the slice cannot be decoded or is not a single greyscale plane.
    """
    raw = read_frame(ref.dataset, ref.frame_index)
    if raw.ndim != 2:
        raise InvalidInstanceError(
            f"a slice of instance {ref.dataset.get('SOPInstanceUID', '<unknown>')} decodes to shape "
            f"{raw.shape}; only greyscale slices form volumes.")
    return _rescaled(raw, ref)
