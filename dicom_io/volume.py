"""Read DICOM instances and assemble single-frame series into volumes with geometry."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from os import PathLike
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, pixel_array

from dicom_io.errors import InconsistentSeriesError, InvalidInstanceError

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
    """A single-frame series stacked into one array, with its patient geometry.

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
        Source datasets, in the same order as ``pixels``' first axis (without their Pixel Data
        when :func:`load_volume` was asked to release it).
    image_orientation
        Image Orientation (Patient) shared by all slices: row cosines then column cosines.
    origin_mm
        Image Position (Patient) of the first slice (centre of its top-left pixel).
    slice_positions_mm
        Position of every slice along the slice normal, ascending.
    """

    pixels: np.ndarray
    spacing_mm: tuple[float, float, float]
    datasets: list[Dataset]
    image_orientation: tuple[float, float, float, float, float, float] = (1, 0, 0, 0, 1, 0)
    origin_mm: tuple[float, float, float] = (0.0, 0.0, 0.0)
    slice_positions_mm: tuple[float, ...] = field(default_factory=tuple)
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
    """Decode ``ds``'s pixels into ``out`` (its shape) with the modality LUT applied.

    ``out`` is ``int16`` (only for an integral rescale: computed exactly in ``int32``, then
    stored) or ``float32`` (a linear rescale computed in float32 in place, as before; a Modality
    LUT Sequence goes through pydicom's :func:`apply_modality_lut`, which computes in float64).

    Returns
    -------
    bool
        False, with ``out`` untouched, when ``out`` is ``int16`` and the slice's values do not
        fit in it.
    """
    raw = _decode(ds)
    if raw.shape != out.shape:
        raise InconsistentSeriesError(
            f"instance {ds.SOPInstanceUID} decodes to {raw.shape}, the series is {out.shape}: "
            "Rows/Columns and the pixel data disagree."
        )
    if out.dtype == np.int16:
        rescale = _integer_rescale(ds)
        assert rescale is not None, "int16 volumes are only made for integral rescales"
        values = raw.astype(np.int32)
        if rescale[0] != 1:
            values *= rescale[0]
        if rescale[1] != 0:
            values += rescale[1]
        if values.size and (values.min() < _INT16.min or values.max() > _INT16.max):
            return False
        out[...] = values
        return True
    if "ModalityLUTSequence" in ds:
        out[...] = apply_modality_lut(raw, ds)
        return True
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    out[...] = raw
    if slope != 1:
        out *= np.float32(slope)
    if intercept != 0:
        out += np.float32(intercept)
    return True


def _release_pixel_data(ds: Dataset) -> None:
    """Drop Pixel Data (and pydicom's cached array of it) from ``ds``: the volume holds the pixels."""
    if "PixelData" in ds:
        del ds.PixelData


def load_volume(datasets: Sequence[Dataset], *, release_pixel_data: bool = False) -> Volume:
    """Stack the single-frame images of one series into a :class:`Volume`.

    Slices are sorted along the slice normal (row x column cosines), ascending.

    Parameters
    ----------
    datasets
        Datasets of one series, read with pixel data (or with it deferred:
        :func:`read_dataset`'s ``defer_size``), in any order.
    release_pixel_data
        Delete each dataset's Pixel Data once it is decoded into the volume (the datasets are
        changed): the volume and the encoded pixels are then never held side by side, and
        the datasets read with deferred pixel data are read one slice at a time.

    Returns
    -------
    Volume

    Raises
    ------
    InvalidInstanceError
        If an instance is multi-frame or colour, lacks geometry, or its pixel data
        cannot be decoded.
    InconsistentSeriesError
        If no datasets are given, or they mix series, Rows/Columns, orientation or
        pixel spacing, or two share one slice position.
    """
    if not datasets:
        raise InconsistentSeriesError("load_volume needs at least one dataset.")
    series_uids = {str(ds.get("SeriesInstanceUID", "")) for ds in datasets}
    if len(series_uids) != 1:
        raise InconsistentSeriesError(
            f"datasets belong to {len(series_uids)} series ({sorted(series_uids)}); "
            "split them with group_by_series first."
        )
    for ds in datasets:
        if _number_of_frames(ds) > 1:
            raise InvalidInstanceError(
                f"instance {ds.SOPInstanceUID} is multi-frame; load_volume reads single-frame series."
            )
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

    normal = np.cross(ref_orientation[:3], ref_orientation[3:])
    distances = np.asarray([float(np.dot(p, normal)) for p in positions])
    order = np.argsort(distances, kind="stable")
    sorted_distances = distances[order]
    gaps = np.diff(sorted_distances)
    if np.any(gaps < _DUPLICATE_POSITION_TOLERANCE_MM):
        i = int(np.argmax(gaps < _DUPLICATE_POSITION_TOLERANCE_MM))
        raise InconsistentSeriesError(
            f"instances {datasets[order[i]].SOPInstanceUID} and "
            f"{datasets[order[i + 1]].SOPInstanceUID} share one slice position "
            f"({sorted_distances[i]:.3f} mm along the normal): duplicates or several "
            "stacks (echoes, phases) in one series."
        )
    if len(gaps) > 0:
        slice_spacing = float(np.median(gaps))
    else:
        thickness = first.get("SliceThickness")
        slice_spacing = float(thickness) if thickness else 1.0

    sorted_datasets = [datasets[i] for i in order]
    # decoded slice by slice into one preallocated volume: no list of slices beside it (that
    # doubled the peak); int16 when every rescale is integral (exact, half the bytes of float32),
    # float32 otherwise or from the first slice whose values leave int16 (the slices decoded so
    # far are converted then)
    integral = all(_integer_rescale(ds) is not None for ds in sorted_datasets)
    pixels = np.empty((len(sorted_datasets), *shape), dtype=np.int16 if integral else np.float32)
    for index, ds in enumerate(sorted_datasets):
        if not _decode_into(ds, pixels[index]):
            converted = np.empty(pixels.shape, dtype=np.float32)
            converted[:index] = pixels[:index]
            pixels = converted
            _decode_into(ds, pixels[index])
        if release_pixel_data:
            _release_pixel_data(ds)
    volume = Volume(
        pixels=pixels,
        spacing_mm=(slice_spacing, ref_spacing[0], ref_spacing[1]),
        datasets=sorted_datasets,
        image_orientation=tuple(float(v) for v in ref_orientation),  # type: ignore[arg-type]
        origin_mm=tuple(float(v) for v in positions[order[0]]),  # type: ignore[arg-type]
        slice_positions_mm=tuple(float(d) for d in sorted_distances),
    )
    if not volume.is_uniformly_spaced:
        logger.warning(
            "series %s has non-uniform slice gaps %s mm; using the median %.3f mm",
            volume.series_instance_uid,
            np.round(gaps, 3).tolist(),
            slice_spacing,
        )
    return volume
