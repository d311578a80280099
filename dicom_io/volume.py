"""Read DICOM instances and assemble a series, single-frame or enhanced multi-frame, into a volume."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, pixel_array

from dicom_io.errors import InconsistentSeriesError, InvalidInstanceError
from dicom_io.slice_stack import frame_plane, functional_group, iter_frames

logger = logging.getLogger(__name__)

#: Positions closer than this along the slice normal count as the same slice.
_DUPLICATE_POSITION_TOLERANCE_MM = 1e-3
#: Orientation cosines may differ this much between slices of one volume.
_ORIENTATION_TOLERANCE = 1e-4
#: Relative deviation from the median slice gap above which spacing is non-uniform.
_UNIFORM_SPACING_TOLERANCE = 0.01
_INT16 = np.iinfo(np.int16)


@dataclass
class Volume:
    """A series stacked into one array, with its patient geometry: one slice per single-frame
    instance, or one per frame of enhanced (multi-frame) instances.

    Attributes
    ----------
    pixels
        Array ``(slices, rows, cols)``, modality LUT applied (HU for CT): ``int16`` when every
        slice's Rescale Slope and Intercept are integers and its values fit (most CT: exact, and
        half the memory of ``float32``), else ``float32``.
    spacing_mm
        ``(slice, row, col)`` spacing. The slice spacing is the median gap between
        Image Position (Patient) values along the slice normal, not SliceThickness.
    datasets
        Source datasets (without their Pixel Data when :func:`load_volume` was asked to release
        it): for a single-frame series one per slice, in the same order as ``pixels``' first axis;
        for a multi-frame series each instance once, in the order of its first slice
        (:attr:`source_frames` tells which frame each slice is).
    image_orientation
        Image Orientation (Patient) shared by all slices: row cosines then column cosines.
    origin_mm
        Image Position (Patient) of the first slice (centre of its top-left pixel).
    slice_positions_mm
        Position of every slice along the slice normal, ascending.
    source_frames
        For a multi-frame series, each slice's source in ``pixels`` order: ``(index into
        datasets, 1-based frame number)``; empty for a single-frame series.
    """

    pixels: np.ndarray
    spacing_mm: tuple[float, float, float]
    datasets: list[Dataset]
    image_orientation: tuple[float, float, float, float, float, float] = (1, 0, 0, 0, 1, 0)
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    slice_positions_mm: tuple[float, ...] = field(default_factory=tuple)
    source_frames: tuple[tuple[int, int], ...] = ()
    #: ``(slices, rows, cols)``; still known after :meth:`release_pixels`
    shape: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        self.shape = tuple(int(n) for n in self.pixels.shape)

    def release_pixels(self) -> None:
        """Free the pixels once no stage reads them (a SEG and its SR need only the geometry
        and the headers): ``pixels`` becomes an array of no slices, so a late reader fails on
        its shape instead of reading stale values. :attr:`shape` keeps the volume's shape."""
        self.pixels = np.empty((0, *self.shape[1:]), dtype=self.pixels.dtype)

    @property
    def is_multi_frame(self) -> bool:
        """Whether the slices are frames of enhanced (multi-frame) instances."""
        return bool(self.source_frames)

    def slice_source(self, index: int) -> tuple[Dataset, int | None]:
        """The instance holding slice ``index`` and its 1-based frame number (``None`` for a
        single-frame instance)."""
        if self.source_frames:
            instance, frame_number = self.source_frames[index]
            return self.datasets[instance], frame_number
        return self.datasets[index], None

    @property
    def slice_normal(self) -> np.ndarray:
        """Unit normal of the slices (row cosines x column cosines)."""
        row = np.asarray(self.image_orientation[:3], dtype=float)
        col = np.asarray(self.image_orientation[3:], dtype=float)
        return np.cross(row, col)

    @property
    def is_uniformly_spaced(self) -> bool:
        """Whether every slice gap equals ``spacing_mm[0]`` within 1 %."""
        if len(self.slice_positions_mm) < 3:
            return True
        gaps = np.diff(np.asarray(self.slice_positions_mm))
        return bool(
            np.all(
                np.abs(gaps - self.spacing_mm[0]) <= _UNIFORM_SPACING_TOLERANCE * self.spacing_mm[0]
            )
        )

    @property
    def voxel_volume_ml(self) -> float:
        """Volume of one voxel in millilitres (1 mL = 1000 mm3)."""
        return float(np.prod(self.spacing_mm)) / 1000.0

    @property
    def series_instance_uid(self) -> str:
        """Series Instance UID of the source series."""
        return str(self.datasets[0].SeriesInstanceUID)

    @property
    def modality(self) -> str:
        """Modality of the source series."""
        return str(self.datasets[0].get("Modality", ""))

    @property
    def affine(self) -> np.ndarray:
        """4x4 matrix mapping ``(slice, row, col, 1)`` indices to patient LPS mm."""
        row_cos = np.asarray(self.image_orientation[:3], dtype=float)
        col_cos = np.asarray(self.image_orientation[3:], dtype=float)
        matrix = np.eye(4)
        matrix[:3, 0] = self.slice_normal * self.spacing_mm[0]
        matrix[:3, 1] = col_cos * self.spacing_mm[1]
        matrix[:3, 2] = row_cos * self.spacing_mm[2]
        matrix[:3, 3] = self.origin_mm
        return matrix


def read_dataset(
    path: str | PathLike[str] | BinaryIO,
    *,
    stop_before_pixels: bool = False,
    defer_size: int | None = None,
) -> Dataset:
    """Read one DICOM Part 10 file.

    Parameters
    ----------
    path
        File path or binary file-like object.
    stop_before_pixels
        Skip Pixel Data (faster when only the header is needed).
    defer_size
        Values longer than this many bytes (Pixel Data) are read from the file only when
        accessed (pydicom's ``defer_size``; ``path`` must be a path that stays readable), so a
        series' datasets can be held while their pixels are decoded one at a time.

    Returns
    -------
    pydicom.Dataset

    Raises
    ------
    InvalidInstanceError
        If the file is not DICOM Part 10 (no preamble/``DICM``/File Meta), cannot be
        parsed, or parses to a dataset without SOP Class/Instance UID. pydicom 3.0
        returns an *empty* dataset with only a warning when encapsulated Pixel Data
        misses its Sequence Delimitation Item; that is treated as invalid too.
    """
    name = getattr(path, "name", path)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(path, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
    except InvalidDicomError as exc:
        raise InvalidInstanceError(
            f"{name} is not a DICOM Part 10 file (no preamble, 'DICM' prefix or File Meta "
            f"Information): {exc}. Ask the sender to store it as a Part 10 file."
        ) from exc
    except (OSError, EOFError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
        raise InvalidInstanceError(f"{name} could not be parsed as DICOM: {exc}") from exc
    reasons = "; ".join(str(w.message) for w in caught)
    if len(ds) == 0:
        raise InvalidInstanceError(
            f"{name} parsed to an empty dataset (the file is probably truncated)"
            + (f": {reasons}" if reasons else ".")
        )
    missing = [kw for kw in ("SOPClassUID", "SOPInstanceUID") if not ds.get(kw)]
    if missing:
        raise InvalidInstanceError(
            f"{name} lacks {', '.join(missing)}, which every DICOM instance needs"
            + (f" (reader warnings: {reasons})" if reasons else ".")
        )
    if caught:
        # Warning texts may quote element values (patient data): log their kinds only.
        logger.warning(
            "reading %s: %d reader warning(s) of kind %s",
            ds.SOPInstanceUID,
            len(caught),
            sorted({w.category.__name__ for w in caught}),
        )
    return ds


def group_by_series(datasets: Iterable[Dataset]) -> dict[str, list[Dataset]]:
    """Group datasets by Series Instance UID, keeping their input order within a series.

    Raises
    ------
    InvalidInstanceError
        If a dataset has no Series Instance UID.
    """
    series: dict[str, list[Dataset]] = {}
    for ds in datasets:
        uid = ds.get("SeriesInstanceUID")
        if not uid:
            raise InvalidInstanceError(
                f"instance {ds.get('SOPInstanceUID', '<no SOP Instance UID>')} has no Series Instance UID."
            )
        series.setdefault(str(uid), []).append(ds)
    return series


def _geometry(ds: Dataset) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    uid = ds.get("SOPInstanceUID", "<unknown>")
    try:
        orientation = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        position = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=float)
        spacing = tuple(float(v) for v in ds.PixelSpacing)
    except (AttributeError, TypeError, ValueError) as exc:
        raise InvalidInstanceError(
            f"instance {uid} has no usable Image Orientation/Position (Patient) or Pixel "
            f"Spacing ({exc}); only cross-sectional series (CT, MR, PT) form volumes."
        ) from exc
    if orientation.shape != (6,) or position.shape != (3,) or len(spacing) != 2:
        raise InvalidInstanceError(f"instance {uid} has malformed geometry attributes.")
    if min(spacing) <= 0:
        raise InvalidInstanceError(f"instance {uid} has non-positive Pixel Spacing {spacing}.")
    return orientation, position, (spacing[0], spacing[1])


def _number_of_frames(ds: Dataset) -> int:
    value = ds.get("NumberOfFrames", 1)
    try:
        return int(value or 1)
    except (TypeError, ValueError) as exc:
        raise InvalidInstanceError(
            f"instance {ds.get('SOPInstanceUID', '<unknown>')} has an invalid Number of Frames "
            f"{value!r} (VR IS needs an integer)."
        ) from exc


def _decode(ds: Dataset) -> np.ndarray:
    uid = ds.SOPInstanceUID
    try:
        # a read-only view on the Pixel Data of native (uncompressed) data, not a copy, and not
        # cached on the dataset as ``ds.pixel_array`` would: 300 × 512² CT, 0.5 s less
        raw = pixel_array(ds, view_only=True)
    except Exception as exc:  # decoders raise many types; the boundary names the instance
        raise InvalidInstanceError(
            f"pixel data of instance {uid} cannot be decoded "
            f"(transfer syntax {ds.file_meta.get('TransferSyntaxUID', 'unknown')}): {exc}"
        ) from exc
    if raw.ndim != 2:
        raise InvalidInstanceError(
            f"instance {uid} decodes to shape {raw.shape}; only single-frame greyscale "
            "images form volumes."
        )
    return raw


def _integer_rescale(ds: Dataset) -> tuple[int, int] | None:
    """Rescale Slope and Intercept when both are integers (and no Modality LUT Sequence applies)."""
    if "ModalityLUTSequence" in ds:
        return None
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    if not (slope.is_integer() and intercept.is_integer()):
        return None
    return int(slope), int(intercept)


def _decode_into(ds: Dataset, out: np.ndarray) -> bool:
    """Decode ``ds``'s pixels into ``out`` (its shape) with the modality LUT applied
    (:func:`_rescale_into`)."""
    return _rescale_into(_decode(ds), out, ds, f"instance {ds.SOPInstanceUID}")


def _rescale_into(raw: np.ndarray, out: np.ndarray, rescale: Dataset, name: str) -> bool:
    """Write ``raw`` into ``out`` (its shape) with the modality LUT of ``rescale`` applied.

    ``rescale`` holds Rescale Slope and Intercept (or a Modality LUT Sequence): a single-frame
    instance, or a frame's Pixel Value Transformation item. ``out`` is ``int16`` (only for an
    integral rescale: computed exactly in ``int32``, then stored) or ``float32`` (a linear rescale
    computed in float32 in place, as before; a Modality LUT Sequence goes through pydicom's
    :func:`apply_modality_lut`, which computes in float64).

    Returns
    -------
    bool
        False, with ``out`` untouched, when ``out`` is ``int16`` and the slice's values do not
        fit in it.
    """
    if raw.shape != out.shape:
        raise InconsistentSeriesError(
            f"{name} decodes to {raw.shape}, the series is {out.shape}: "
            "Rows/Columns and the pixel data disagree."
        )
    if out.dtype == np.int16:
        integral = _integer_rescale(rescale)
        assert integral is not None, "int16 volumes are only made for integral rescales"
        if integral[0] == 1 and raw.dtype.kind in "iu":
            return _shift_into(raw, integral[1], out)
        values = raw.astype(np.int32)
        if integral[0] != 1:
            values *= integral[0]
        if integral[1] != 0:
            values += integral[1]
        if values.size and (values.min() < _INT16.min or values.max() > _INT16.max):
            return False
        out[...] = values
        return True
    if "ModalityLUTSequence" in rescale:
        out[...] = apply_modality_lut(raw, rescale)
        return True
    slope = float(rescale.get("RescaleSlope", 1) or 1)
    intercept = float(rescale.get("RescaleIntercept", 0) or 0)
    out[...] = raw
    if slope != 1:
        out *= np.float32(slope)
    if intercept != 0:
        out += np.float32(intercept)
    return True


def _shift_into(raw: np.ndarray, intercept: int, out: np.ndarray) -> bool:
    """``raw + intercept`` into the ``int16`` array ``out``, exactly, or False (``out`` untouched)
    when a value would leave ``int16``.

    The range is checked on the stored values' extremes first, so the sum is computed in
    ``int32`` by the ufunc's own buffer and written straight into ``out``, without an ``int32``
    copy of the slice (1,000 CT slices: read 1.93 → 1.81 s, docs/BENCHMARKS.md, run 9).
    """
    if raw.size == 0:
        return True
    if int(raw.min()) + intercept < _INT16.min or int(raw.max()) + intercept > _INT16.max:
        return False
    np.add(raw, intercept, out=out, dtype=np.int32, casting="unsafe")
    return True


def _is_multi_frame(ds: Dataset) -> bool:
    """Whether ``ds`` is an enhanced (multi-frame) image: several frames, or functional groups
    (an enhanced instance of one frame keeps its plane there too)."""
    return _number_of_frames(ds) > 1 or "PerFrameFunctionalGroupsSequence" in ds


def _release_pixel_data(ds: Dataset) -> None:
    """Drop Pixel Data (and pydicom's cached array of it) from ``ds``: the volume holds the pixels."""
    if "PixelData" in ds:
        del ds.PixelData


def _along_normal(
    positions: Sequence[np.ndarray], orientation: np.ndarray, name: Callable[[int], str]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The slices' order along the normal of ``orientation`` (row × column cosines), their sorted
    distances along it and the gaps between them.

    Raises
    ------
    InconsistentSeriesError
        If two slices share one position (``name(i)`` names slice ``i`` in the message).
    """
    normal = np.cross(orientation[:3], orientation[3:])
    distances = np.asarray([float(np.dot(p, normal)) for p in positions])
    order = np.argsort(distances, kind="stable")
    sorted_distances = distances[order]
    gaps = np.diff(sorted_distances)
    if np.any(gaps < _DUPLICATE_POSITION_TOLERANCE_MM):
        i = int(np.argmax(gaps < _DUPLICATE_POSITION_TOLERANCE_MM))
        raise InconsistentSeriesError(
            f"{name(int(order[i]))} and {name(int(order[i + 1]))} share one slice position "
            f"({sorted_distances[i]:.3f} mm along the normal): duplicates, or several stacks "
            "(echoes, phases, temporal positions) in one series; a volume has one slice a position."
        )
    return order, sorted_distances, gaps


def _slice_spacing(gaps: np.ndarray, thickness: object) -> float:
    """The median gap between slices; for one slice its thickness (1 mm when it has none)."""
    if len(gaps) > 0:
        return float(np.median(gaps))
    return float(thickness) if thickness else 1.0  # type: ignore[arg-type]


def _warn_if_uneven(volume: Volume, gaps: np.ndarray) -> None:
    if not volume.is_uniformly_spaced:
        logger.warning("series %s has non-uniform slice gaps %s mm; using the median %.3f mm",
                       volume.series_instance_uid, np.round(gaps, 3).tolist(), volume.spacing_mm[0])


def load_volume(datasets: Sequence[Dataset], *, release_pixel_data: bool = False) -> Volume:
    """Stack the images of one series into a :class:`Volume`.

    A series is either single-frame instances (CT/MR Image Storage: one slice each) or enhanced
    multi-frame instances (Enhanced or Legacy Converted Enhanced CT/MR: one or more instances,
    each frame a slice with its plane in the functional groups, :func:`_load_frames`). Slices are
    sorted along the slice normal (row x column cosines), ascending.

    Parameters
    ----------
    datasets
        Datasets of one series, read with pixel data (or with it deferred:
        :func:`read_dataset`'s ``defer_size``), in any order.
    release_pixel_data
        Delete each dataset's Pixel Data once it is decoded into the volume (the datasets are
        changed): the volume and the encoded pixels are then never held side by side, and
        the datasets read with deferred pixel data are read one slice (or frame) at a time.

    Returns
    -------
    Volume

    Raises
    ------
    InvalidInstanceError
        If an instance is colour, lacks geometry, or its pixel data cannot be decoded.
    InconsistentSeriesError
        If no datasets are given, or they mix series, single- and multi-frame instances,
        Rows/Columns, orientation or pixel spacing, or two slices share one position (several
        stacks, echoes or phases in one series).
    """
    if not datasets:
        raise InconsistentSeriesError("load_volume needs at least one dataset.")
    _one_series(datasets)
    enhanced = [ds for ds in datasets if _is_multi_frame(ds)]
    if len(enhanced) == len(datasets):
        return _load_frames(datasets, release_pixel_data=release_pixel_data)
    if enhanced:
        raise InconsistentSeriesError(
            f"series {datasets[0].get('SeriesInstanceUID', '')} mixes {len(enhanced)} multi-frame instance(s) "
            f"(e.g. {enhanced[0].SOPInstanceUID}) with {len(datasets) - len(enhanced)} single-frame "
            "one(s); a volume is made of either. Route the series' images to separate series."
        )
    layout = _single_frame_layout(datasets)
    sorted_datasets = [datasets[i] for i in layout.order]
    # decoded slice by slice into one preallocated volume: no list of slices beside it (that
    # doubled the peak); int16 when every rescale is integral (exact, half the bytes of float32),
    # float32 otherwise or from the first slice whose values leave int16 (the slices decoded so
    # far are converted then)
    integral = all(_integer_rescale(ds) is not None for ds in sorted_datasets)
    pixels = np.empty((len(sorted_datasets), *layout.shape), dtype=np.int16 if integral else np.float32)
    for index, ds in enumerate(sorted_datasets):
        if not _decode_into(ds, pixels[index]):
            converted = np.empty(pixels.shape, dtype=np.float32)
            converted[:index] = pixels[:index]
            pixels = converted
            _decode_into(ds, pixels[index])
        if release_pixel_data:
            _release_pixel_data(ds)
    return layout.volume(pixels, sorted_datasets)


class SeriesAccumulator:
    """The single-frame images of one series, decoded into one buffer as they are read (in any
    order, a few at a time), and stacked **in place** into the :class:`Volume` that
    :func:`load_volume` makes of the same datasets (:meth:`volume`).

    A read-ahead of a series still being received adds each file as it arrives; its job then
    adds the last few and takes the volume without a second copy of the pixels: the slices are
    put in order within the buffer, each moved at most once (none when they arrived in order),
    and the volume is a view of the buffer's first slices. The buffer is reserved for
    ``capacity`` slices (twice as many when they run out, the slices then copied once); the
    pages of slices never written are never touched, so they take address space, not memory.
    Pixels are ``int16`` when every rescale is integral and its values fit, ``float32``
    otherwise (the buffer is converted on the first slice that needs it), as in
    :func:`load_volume`.
    """

    def __init__(self, *, capacity: int = 1024) -> None:
        self._capacity = max(1, capacity)
        self._pixels: np.ndarray | None = None
        self._datasets: list[Dataset] = []
        self._index: dict[str, int] = {}
        self._ready: tuple[tuple[str, ...], Volume] | None = None

    def __len__(self) -> int:
        return len(self._datasets)

    def __contains__(self, key: object) -> bool:
        return key in self._index

    def add(self, key: str, ds: Dataset, *, release_pixel_data: bool = False) -> None:
        """Decode the single-frame image ``ds`` (named ``key``: its stored path) into the buffer.

        Raises
        ------
        InvalidInstanceError
            If ``ds`` is multi-frame, or its pixel data cannot be decoded.
        InconsistentSeriesError
            If its matrix size differs from the slices held, or ``key`` is held already.
        """
        if key in self._index:
            raise InconsistentSeriesError(f"{key} is held already")
        if _is_multi_frame(ds):
            raise InvalidInstanceError(
                f"instance {ds.SOPInstanceUID} is a multi-frame image: read its series with load_volume.")
        shape = (int(ds.Rows), int(ds.Columns))
        if self._pixels is None:
            dtype = np.int16 if _integer_rescale(ds) is not None else np.float32
            self._pixels = np.empty((self._capacity, *shape), dtype=dtype)
        elif shape != self._pixels.shape[1:]:
            first = self._datasets[0]
            raise InconsistentSeriesError(
                f"instance {ds.SOPInstanceUID} is {shape[0]}x{shape[1]}, instance "
                f"{first.SOPInstanceUID} is {first.Rows}x{first.Columns}: mixed matrix sizes.")
        count = len(self._datasets)
        if count == len(self._pixels):
            self._reserve(2 * count, self._pixels.dtype)
        assert self._pixels is not None
        if self._pixels.dtype == np.int16 and _integer_rescale(ds) is None:
            self._reserve(len(self._pixels), np.dtype(np.float32))
        assert self._pixels is not None
        if not _decode_into(ds, self._pixels[count]):  # its values leave int16
            self._reserve(len(self._pixels), np.dtype(np.float32))
            _decode_into(ds, self._pixels[count])
        if release_pixel_data:
            _release_pixel_data(ds)
        self._datasets.append(ds)
        self._index[key] = count
        self._ready = None

    def _reserve(self, capacity: int, dtype: np.dtype) -> None:
        """A new buffer of ``capacity`` slices of ``dtype``, the slices held copied into it."""
        assert self._pixels is not None
        count = len(self._datasets)
        pixels = np.empty((capacity, *self._pixels.shape[1:]), dtype=dtype)
        pixels[:count] = self._pixels[:count]
        self._pixels = pixels

    def volume(self, keys: Sequence[str],
               prepare: Callable[[list[Dataset]], list[Dataset]] | None = None) -> Volume:
        """The volume of the images ``keys`` (each held), checked and ordered as
        :func:`load_volume` does; ``prepare`` may replace their datasets first (with datasets
        of the same images). Images held but not in ``keys`` are left out (moved behind them).

        The volume's pixels are a view of this buffer: add nothing after taking one. Asked again
        for the same keys with nothing added, it returns the same volume.

        Raises
        ------
        KeyError
            If a key is not held.
        InconsistentSeriesError
            As :func:`load_volume`.
        """
        keys = tuple(keys)
        if self._ready is not None and self._ready[0] == keys:
            return self._ready[1]
        if not keys:
            raise InconsistentSeriesError("a volume needs at least one image.")
        wanted = [self._index[key] for key in keys]
        datasets = [self._datasets[i] for i in wanted]
        if prepare is not None:
            datasets = prepare(datasets)
        _one_series(datasets)
        layout = _single_frame_layout(datasets)
        assert self._pixels is not None
        # slot i of the buffer gets the slice now in slot source[i]: the wanted ones in their
        # order along the normal, then the others
        taken = set(wanted)
        source = [wanted[i] for i in layout.order] + [i for i in range(len(self._datasets)) if i not in taken]
        _permute_in_place(self._pixels, source)
        by_slot = [self._datasets[i] for i in source]
        for slot, i in enumerate(layout.order):
            by_slot[slot] = datasets[i]  # the prepared datasets of the wanted images
        self._datasets = by_slot
        key_of_slot = {index: key for key, index in self._index.items()}
        self._index = {key_of_slot[i]: slot for slot, i in enumerate(source)}
        volume = layout.volume(self._pixels[: len(keys)], by_slot[: len(keys)])
        self._ready = (keys, volume)
        return volume


def _permute_in_place(pixels: np.ndarray, source: list[int]) -> None:
    """``pixels[i] = pixels[source[i]]`` for every ``i`` of the permutation ``source``, with one
    slice of extra memory: each cycle of the permutation is followed once."""
    done = [False] * len(source)
    for start in range(len(source)):
        if done[start] or source[start] == start:
            continue
        first = pixels[start].copy()
        slot = start
        while True:
            done[slot] = True
            nxt = source[slot]
            if nxt == start:
                pixels[slot] = first
                break
            pixels[slot] = pixels[nxt]
            slot = nxt


@dataclass(frozen=True)
class _Layout:
    """A single-frame series' checked geometry: its slices' order along the normal and spacing."""

    shape: tuple[int, int]
    order: np.ndarray
    orientation: np.ndarray
    pixel_spacing: tuple[float, float]
    slice_spacing: float
    origin: np.ndarray
    sorted_distances: np.ndarray
    gaps: np.ndarray

    def volume(self, pixels: np.ndarray, sorted_datasets: list[Dataset]) -> Volume:
        volume = Volume(
            pixels=pixels,
            spacing_mm=(self.slice_spacing, self.pixel_spacing[0], self.pixel_spacing[1]),
            datasets=sorted_datasets,
            image_orientation=tuple(float(v) for v in self.orientation),  # type: ignore[arg-type]
            origin_mm=tuple(float(v) for v in self.origin),  # type: ignore[arg-type]
            slice_positions_mm=tuple(float(d) for d in self.sorted_distances),
        )
        _warn_if_uneven(volume, self.gaps)
        return volume


def _one_series(datasets: Sequence[Dataset]) -> None:
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1:
        raise InconsistentSeriesError(
            f"datasets belong to {len(series_uids)} series ({sorted(series_uids)}); "
            "split them with group_by_series first."
        )


def _single_frame_layout(datasets: Sequence[Dataset]) -> _Layout:
    """Check that single-frame ``datasets`` form one volume (matrix size, orientation, pixel
    spacing, one slice a position) and order them along the slice normal."""
    first = datasets[0]
    ref_orientation, _, ref_spacing = _geometry(first)
    shape = (int(first.Rows), int(first.Columns))
    positions = []
    for ds in datasets:
        orientation, position, spacing = _geometry(ds)
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise InconsistentSeriesError(
                f"instance {ds.SOPInstanceUID} is {ds.Rows}x{ds.Columns}, "
                f"instance {first.SOPInstanceUID} is {shape[0]}x{shape[1]}: mixed matrix sizes."
            )
        if not np.allclose(orientation, ref_orientation, atol=_ORIENTATION_TOLERANCE):
            raise InconsistentSeriesError(
                f"instance {ds.SOPInstanceUID} has orientation {orientation.tolist()}, "
                f"instance {first.SOPInstanceUID} {ref_orientation.tolist()}: mixed orientations."
            )
        if not np.allclose(spacing, ref_spacing, rtol=1e-4):
            raise InconsistentSeriesError(
                f"instance {ds.SOPInstanceUID} has Pixel Spacing {spacing}, "
                f"instance {first.SOPInstanceUID} {ref_spacing}: mixed pixel spacing."
            )
        positions.append(position)
    order, sorted_distances, gaps = _along_normal(
        positions, ref_orientation, lambda i: f"instance {datasets[i].SOPInstanceUID}")
    return _Layout(shape=shape, order=order, orientation=ref_orientation, pixel_spacing=ref_spacing,
                   slice_spacing=_slice_spacing(gaps, first.get("SliceThickness")),
                   origin=positions[order[0]], sorted_distances=sorted_distances, gaps=gaps)


@dataclass(frozen=True)
class _Frame:
    """One frame of an enhanced instance, with the geometry and rescale its functional groups give."""

    instance: int
    frame_index: int
    orientation: np.ndarray
    position: np.ndarray
    spacing: tuple[float, float]
    rescale: Dataset
    stack_id: str | None

    def name(self, datasets: Sequence[Dataset]) -> str:
        return f"frame {self.frame_index + 1} of instance {datasets[self.instance].SOPInstanceUID}"


def _pair(values: object) -> tuple[float, float] | None:
    try:
        out = tuple(float(v) for v in values)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    return (out[0], out[1]) if len(out) == 2 else None


def _frames_of(ds: Dataset, instance: int) -> list[_Frame]:
    """The frames of one enhanced instance, from its Per-Frame and Shared Functional Groups
    (PS3.3 C.7.6.16): Plane Orientation, Plane Position, Pixel Measures, Pixel Value
    Transformation (else the top-level rescale), Frame Content's Stack ID."""
    uid = ds.SOPInstanceUID
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if samples != 1:
        raise InvalidInstanceError(
            f"instance {uid} is colour ({ds.get('PhotometricInterpretation', '?')}, {samples} samples "
            "a pixel); only greyscale images form volumes."
        )
    frames = []
    for index in range(_number_of_frames(ds)):
        orientation, position = frame_plane(ds, index)
        measures = functional_group(ds, index, "PixelMeasuresSequence")
        spacing = _pair(measures.get("PixelSpacing")) if measures is not None else None
        spacing = spacing or _pair(ds.get("PixelSpacing"))
        if orientation is None or position is None or spacing is None:
            raise InvalidInstanceError(
                f"frame {index + 1} of instance {uid} has no Plane Orientation, Plane Position or "
                "Pixel Measures (Per-Frame or Shared Functional Groups, PS3.3 C.7.6.16.2): only "
                "frames with patient geometry (CT, MR, PT) form volumes."
            )
        if min(spacing) <= 0:
            raise InvalidInstanceError(
                f"frame {index + 1} of instance {uid} has non-positive Pixel Spacing {spacing}."
            )
        transform = functional_group(ds, index, "PixelValueTransformationSequence")
        rescale = (transform if transform is not None and "RescaleSlope" in transform
                   and "RescaleIntercept" in transform else ds)
        content = functional_group(ds, index, "FrameContentSequence")
        stack_id = content.get("StackID") if content is not None else None
        frames.append(_Frame(instance, index, np.asarray(orientation, dtype=float),
                             np.asarray(position, dtype=float), spacing, rescale,
                             None if stack_id in (None, "") else str(stack_id)))
    return frames


def _load_frames(datasets: Sequence[Dataset], *, release_pixel_data: bool) -> Volume:
    """:func:`load_volume` of enhanced multi-frame instances: every frame is a slice.

    The frames are checked as the classic slices are (one matrix size, orientation and pixel
    spacing; distinct positions along the normal) and sorted along the normal, whatever their
    instance, frame order or Dimension Organization. Frames of several stacks (Stack ID) are
    refused: one volume is one stack. Each instance's frames are decoded one at a time, from its
    file when its Pixel Data was deferred (:func:`dicom_io.slice_stack.iter_frames`), into their
    slots of one preallocated volume.
    """
    first = datasets[0]
    shape = (int(first.Rows), int(first.Columns))
    frames: list[_Frame] = []
    for instance, ds in enumerate(datasets):
        if (int(ds.Rows), int(ds.Columns)) != shape:
            raise InconsistentSeriesError(
                f"instance {ds.SOPInstanceUID} is {ds.Rows}x{ds.Columns}, "
                f"instance {first.SOPInstanceUID} is {shape[0]}x{shape[1]}: mixed matrix sizes."
            )
        frames.extend(_frames_of(ds, instance))
    stacks = sorted({f.stack_id for f in frames if f.stack_id is not None})
    if len(stacks) > 1:
        raise InconsistentSeriesError(
            f"series {first.SeriesInstanceUID} holds {len(stacks)} stacks (Stack IDs {stacks}); "
            "one volume is one stack: send each stack as its own series."
        )
    reference = frames[0]
    for frame in frames:
        if not np.allclose(frame.orientation, reference.orientation, atol=_ORIENTATION_TOLERANCE):
            raise InconsistentSeriesError(
                f"{frame.name(datasets)} has orientation {frame.orientation.tolist()}, "
                f"{reference.name(datasets)} {reference.orientation.tolist()}: mixed orientations."
            )
        if not np.allclose(frame.spacing, reference.spacing, rtol=1e-4):
            raise InconsistentSeriesError(
                f"{frame.name(datasets)} has Pixel Spacing {frame.spacing}, "
                f"{reference.name(datasets)} {reference.spacing}: mixed pixel spacing."
            )
    order, sorted_distances, gaps = _along_normal(
        [f.position for f in frames], reference.orientation, lambda i: frames[i].name(datasets))
    measures = functional_group(first, 0, "PixelMeasuresSequence")
    slice_spacing = _slice_spacing(
        gaps, (measures.get("SliceThickness") if measures is not None else None) or first.get("SliceThickness"))

    sorted_frames = [frames[i] for i in order]
    # instances in the order of their first slice; each slice's (instance, 1-based frame)
    instance_order: list[int] = []
    for frame in sorted_frames:
        if frame.instance not in instance_order:
            instance_order.append(frame.instance)
    new_index = {old: new for new, old in enumerate(instance_order)}
    slot = {(f.instance, f.frame_index): i for i, f in enumerate(sorted_frames)}

    # as the classic path: int16 when every rescale is integral, float32 otherwise or from the
    # first frame whose values leave int16 (the whole volume is converted then)
    integral = all(_integer_rescale(f.rescale) is not None for f in frames)
    pixels = np.empty((len(frames), *shape), dtype=np.int16 if integral else np.float32)
    decoded = 0
    for instance, ds in enumerate(datasets):
        count = 0
        for frame_index, raw in iter_frames(ds):
            index = slot.get((instance, frame_index))
            if index is None:
                raise InconsistentSeriesError(
                    f"instance {ds.SOPInstanceUID} decodes to more frames than its Number of Frames "
                    f"{_number_of_frames(ds)}.")
            frame = sorted_frames[index]
            if raw.ndim != 2:
                raise InvalidInstanceError(
                    f"{frame.name(datasets)} decodes to shape {raw.shape}; only greyscale frames "
                    "form volumes.")
            if not _rescale_into(raw, pixels[index], frame.rescale, frame.name(datasets)):
                pixels = pixels.astype(np.float32)
                _rescale_into(raw, pixels[index], frame.rescale, frame.name(datasets))
            count += 1
        if count != _number_of_frames(ds):
            raise InvalidInstanceError(
                f"instance {ds.SOPInstanceUID} decodes to {count} frames, its Number of Frames is "
                f"{_number_of_frames(ds)}.")
        decoded += count
        if release_pixel_data:
            _release_pixel_data(ds)
    volume = Volume(
        pixels=pixels,
        spacing_mm=(slice_spacing, reference.spacing[0], reference.spacing[1]),
        datasets=[datasets[i] for i in instance_order],
        image_orientation=tuple(float(v) for v in reference.orientation),  # type: ignore[arg-type]
        origin_mm=tuple(float(v) for v in sorted_frames[0].position),  # type: ignore[arg-type]
        slice_positions_mm=tuple(float(d) for d in sorted_distances),
        source_frames=tuple((new_index[f.instance], f.frame_index + 1) for f in sorted_frames),
    )
    _warn_if_uneven(volume, gaps)
    logger.info("series %s: %d frame(s) of %d multi-frame instance(s) form a volume",
                volume.series_instance_uid, decoded, len(datasets))
    return volume
