"""Weight-free CT analyzer: body, lungs and bone masks with their volumes and mean HU.

This is the node's default model. It needs no download and runs in about a second on a
512 x 512 x 100 volume on one CPU core, so every installation can produce a SEG and an SR
from the first study it receives.

The method is classical thresholding on Hounsfield units:

1. **body**: voxels above ``body_threshold_hu`` (-500 HU, half way between air and soft tissue),
   the largest 3-D connected component (drops the table, blankets, noise), then holes filled
   *slice by slice*. The fill is 2-D because the body is a tube open at both ends of the scanned
   range: a 3-D fill would leave the lungs outside whenever they reach the first or last slice.
   After the fill the body contains the lungs.
2. **lungs**: voxels below ``lung_threshold_hu`` inside the filled body, i.e. air that is enclosed
   by tissue in its slice and therefore not the air around the patient. Connected components
   smaller than ``min_lung_component_ml`` (bowel gas, small airways) are dropped and at most
   ``max_lung_components`` of the largest are kept (two lungs, or one when they touch through the
   trachea/carina).
3. **bone**: voxels above ``bone_threshold_hu`` inside the body.

Why scipy rather than MONAI transforms: ``monai.transforms.KeepLargestConnectedComponent`` needs
scikit-image, which mednode does not depend on, and ``monai.transforms.FillHoles`` fills in 3-D by
iterated dilation (about 2 s per 100 slices of 512 x 512 and wrong for a tube open at its ends).
``scipy.ndimage.label`` does both jobs in one linear pass each, and keeps this module free of the
~5 s MONAI import.

Limitations (it is a default, not a diagnostic device): contrast-filled vessels above the bone
threshold count as bone; air trapped between arms and trunk in one slice can count as lung if it
is larger than ``min_lung_component_ml``; an abdomen-only scan with large bowel gas pockets can
report them as "lungs".
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from inference.errors import InvalidInputError

logger = logging.getLogger(__name__)

ANALYZER_NAME = "mednode-ct-analyzer"
ANALYZER_VERSION = "1.0"

#: Fewest slices accepted: a volume needs extent along the slice axis to have a volume at all.
MIN_SLICES = 2
#: Fewest rows/columns accepted: hole filling needs a border of outside air around the body.
MIN_IN_PLANE_PIXELS = 8

# Face connectivity (6-neighbourhood) in 3-D, and in-plane face connectivity for the slice-wise
# hole fill (no links between slices, so each slice is filled on its own in one labelling pass).
_FACE_3D = ndimage.generate_binary_structure(3, 1)
_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[1] = ndimage.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class CTAnalyzerParams:
    """Thresholds of the built-in CT analyzer.

    Parameters
    ----------
    body_threshold_hu
        Voxels above this are patient (or table) rather than air.
    lung_threshold_hu
        Air inside the body below this is lung.
    bone_threshold_hu
        Voxels inside the body above this are bone.
    min_lung_component_ml
        Air components inside the body smaller than this are not lung (bowel gas, airways).
    max_lung_components
        Keep at most this many of the largest remaining air components (1 or 2).

    Raises
    ------
    InvalidInputError
        If the thresholds are not ordered body < bone and lung < bone, if
        ``min_lung_component_ml`` is negative or not finite, or if ``max_lung_components`` is not 1 or 2.
    """

    body_threshold_hu: float = -500.0
    lung_threshold_hu: float = -400.0
    bone_threshold_hu: float = 250.0
    min_lung_component_ml: float = 20.0
    max_lung_components: int = 2

    def __post_init__(self) -> None:
        if not self.body_threshold_hu < self.bone_threshold_hu:
            raise InvalidInputError(
                f"body_threshold_hu ({self.body_threshold_hu}) must be below "
                f"bone_threshold_hu ({self.bone_threshold_hu})."
            )
        if not self.lung_threshold_hu < self.bone_threshold_hu:
            raise InvalidInputError(
                f"lung_threshold_hu ({self.lung_threshold_hu}) must be below "
                f"bone_threshold_hu ({self.bone_threshold_hu})."
            )
        if not (math.isfinite(self.min_lung_component_ml) and self.min_lung_component_ml >= 0):
            raise InvalidInputError(
                f"min_lung_component_ml must be a finite number >= 0, got {self.min_lung_component_ml}."
            )
        if self.max_lung_components not in (1, 2):
            raise InvalidInputError(
                f"max_lung_components must be 1 or 2, got {self.max_lung_components}."
            )


@dataclass(frozen=True, eq=False)
class StructureStats:
    """One segmented structure.

    Attributes
    ----------
    label
        ``"body"``, ``"lungs"`` or ``"bone"``.
    mask
        Read-only boolean array on the input grid, shape (slices, rows, columns).
    volume_ml
        ``voxel_count`` times the voxel volume, in millilitres.
    mean_hu
        Mean Hounsfield units over the mask; ``nan`` when the mask is empty (e.g. no lungs in a
        head CT): check :attr:`is_empty` before writing it into a report.
    voxel_count
        Number of voxels in the mask.
    """

    label: str
    mask: np.ndarray
    volume_ml: float
    mean_hu: float
    voxel_count: int

    @property
    def is_empty(self) -> bool:
        """True when the structure was not found in the volume."""
        return self.voxel_count == 0


@dataclass(frozen=True)
class CTAnalysis:
    """Result of :func:`analyze_ct`: structures in the order body, lungs, bone."""

    structures: tuple[StructureStats, ...]

    def structure(self, label: str) -> StructureStats:
        """Return the structure called ``label``.

        Raises
        ------
        KeyError
            If no structure has that label.
        """
        for stats in self.structures:
            if stats.label == label:
                return stats
        known = ", ".join(s.label for s in self.structures)
        raise KeyError(f"no structure {label!r}; the analysis has: {known}")


def analyze_ct(
    hu: np.ndarray,
    spacing_mm: tuple[float, float, float],
    *,
    params: CTAnalyzerParams = CTAnalyzerParams(),
) -> CTAnalysis:
    """Segment body, lungs and bone in a CT volume and measure them.

    Parameters
    ----------
    hu
        Hounsfield units (RescaleSlope/RescaleIntercept already applied), shape
        (slices, rows, columns), any real integer or float dtype.
    spacing_mm
        Voxel spacing in the order of the array axes: (distance between slice centres,
        row spacing = PixelSpacing[0], column spacing = PixelSpacing[1]). The slice distance is the
        difference of ImagePositionPatient along the normal, not SliceThickness.
    params
        Thresholds; the defaults suit adult chest/abdomen CT.

    Returns
    -------
    CTAnalysis
        Structures ``body``, ``lungs``, ``bone`` in that order, masks on the input grid.

    Raises
    ------
    InvalidInputError
        If ``hu`` is not a 3-D real-valued array, has fewer than :data:`MIN_SLICES` slices or fewer
        than :data:`MIN_IN_PLANE_PIXELS` rows or columns, contains NaN/inf, has no value below 0
        (stored pixel values instead of HU), or contains no voxel above the body threshold; or if
        ``spacing_mm`` is not three finite positive numbers.
    """
    volume = _validated_volume(hu, params)
    spacing = _validated_spacing(spacing_mm)
    voxel_ml = spacing[0] * spacing[1] * spacing[2] / 1000.0
    started = time.perf_counter()

    body = _body_mask(volume, params)
    lungs = _lung_mask(volume, body, voxel_ml, params)
    bone = body & (volume > params.bone_threshold_hu)

    analysis = CTAnalysis(
        structures=(
            _stats("body", body, volume, voxel_ml),
            _stats("lungs", lungs, volume, voxel_ml),
            _stats("bone", bone, volume, voxel_ml),
        )
    )
    logger.debug(
        "%s %s analysed volume of shape %s in %.2f s",
        ANALYZER_NAME,
        ANALYZER_VERSION,
        volume.shape,
        time.perf_counter() - started,
    )
    return analysis


def _validated_volume(hu: object, params: CTAnalyzerParams) -> np.ndarray:
    if not isinstance(hu, np.ndarray):
        raise InvalidInputError(
            f"hu must be a numpy array of Hounsfield units, got {type(hu).__name__}."
        )
    if hu.dtype == np.bool_ or not (
        np.issubdtype(hu.dtype, np.integer) or np.issubdtype(hu.dtype, np.floating)
    ):
        raise InvalidInputError(
            f"hu must hold real numbers (integer or float), got dtype {hu.dtype}."
        )
    if hu.ndim != 3:
        raise InvalidInputError(
            f"hu must be a 3-D volume (slices, rows, columns), got {hu.ndim} dimension(s) "
            f"with shape {hu.shape}."
        )
    slices, rows, columns = hu.shape
    if slices < MIN_SLICES:
        raise InvalidInputError(
            f"the CT analyzer needs a volume of at least {MIN_SLICES} slices, got {slices}: "
            "a single image (scout, localizer or one slice) has no volume to measure; "
            "route only axial CT series to this task."
        )
    if rows < MIN_IN_PLANE_PIXELS or columns < MIN_IN_PLANE_PIXELS:
        raise InvalidInputError(
            f"the CT analyzer needs at least {MIN_IN_PLANE_PIXELS} rows and columns, got {rows} x {columns}."
        )
    if np.issubdtype(hu.dtype, np.floating) and not np.isfinite(hu).all():
        raise InvalidInputError("hu contains NaN or infinite values; pass Hounsfield units only.")
    if hu.min() >= 0:
        raise InvalidInputError(
            "hu has no value below 0 HU, so there is neither air nor fat in it: it looks like stored "
            "pixel values; apply RescaleSlope and RescaleIntercept before calling analyze_ct."
        )
    if not (hu > params.body_threshold_hu).any():
        raise InvalidInputError(
            f"no voxel is above the body threshold ({params.body_threshold_hu} HU): "
            "the volume contains only air, so there is no patient to measure."
        )
    return hu


def _validated_spacing(spacing_mm: Sequence[float]) -> tuple[float, float, float]:
    try:
        values = tuple(float(v) for v in spacing_mm)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(
            f"spacing_mm must be three numbers (slice, row, column) in mm, got {spacing_mm!r}."
        ) from exc
    if len(values) != 3:
        raise InvalidInputError(
            f"spacing_mm must be three numbers (slice, row, column) in mm, got {len(values)}: {values}."
        )
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise InvalidInputError(
            f"spacing_mm must be finite and positive, got {values}; a zero slice spacing usually "
            "means duplicate ImagePositionPatient values in the series."
        )
    return values[0], values[1], values[2]


def _body_mask(volume: np.ndarray, params: CTAnalyzerParams) -> np.ndarray:
    labels, count = ndimage.label(volume > params.body_threshold_hu, structure=_FACE_3D)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    body = labels == int(sizes.argmax())
    return _fill_holes_slicewise(body)


def _fill_holes_slicewise(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every slice: background not connected in-plane to the slice border."""
    labels, count = ndimage.label(~mask, structure=_IN_PLANE)
    border = np.concatenate(
        (
            labels[:, 0, :].ravel(),
            labels[:, -1, :].ravel(),
            labels[:, :, 0].ravel(),
            labels[:, :, -1].ravel(),
        )
    )
    outside = np.zeros(count + 1, dtype=bool)
    outside[np.unique(border)] = True
    outside[0] = False  # label 0 is the mask itself
    return ~outside[labels]


def _lung_mask(
    volume: np.ndarray, body: np.ndarray, voxel_ml: float, params: CTAnalyzerParams
) -> np.ndarray:
    labels, count = ndimage.label(body & (volume < params.lung_threshold_hu), structure=_FACE_3D)
    if count == 0:
        return np.zeros(volume.shape, dtype=bool)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    min_voxels = max(1, math.ceil(params.min_lung_component_ml / voxel_ml))
    largest = np.argsort(sizes, kind="stable")[::-1][: params.max_lung_components]
    keep = np.zeros(count + 1, dtype=bool)
    kept = [label for label in largest if sizes[label] >= min_voxels]
    keep[np.asarray(kept, dtype=np.intp)] = True
    return keep[labels]


def _stats(label: str, mask: np.ndarray, volume: np.ndarray, voxel_ml: float) -> StructureStats:
    mask.flags.writeable = False
    voxel_count = int(np.count_nonzero(mask))
    mean_hu = float(volume[mask].mean(dtype=np.float64)) if voxel_count else math.nan
    return StructureStats(
        label=label,
        mask=mask,
        volume_ml=voxel_count * voxel_ml,
        mean_hu=mean_hu,
        voxel_count=voxel_count,
    )
