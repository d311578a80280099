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
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from dicom_io.packed_mask import PackedMask
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

#: Slices processed at a time. Every whole-volume intermediate (int32 labels: 4 bytes a voxel,
#: boolean masks) exists for one slab only; the masks are kept packed to bits
#: (:class:`~dicom_io.packed_mask.PackedMask`). So the analyzer holds the volume plus 3/8 of a byte
#: a voxel, plus ~6 bytes a voxel of one slab (32 slices of 512²: ~50 MB).
SLAB_SLICES = 32


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
    packed_mask
        The mask on the input grid, packed to bits (1/8 of the memory of a boolean array);
        :attr:`mask` unpacks it.
    volume_ml
        ``voxel_count`` times the voxel volume, in millilitres.
    mean_hu
        Mean Hounsfield units over the mask; ``nan`` when the mask is empty (e.g. no lungs in a
        head CT): check :attr:`is_empty` before writing it into a report.
    voxel_count
        Number of voxels in the mask.
    """

    label: str
    packed_mask: PackedMask
    volume_ml: float
    mean_hu: float
    voxel_count: int

    @property
    def mask(self) -> np.ndarray:
        """The mask as a new read-only boolean array, shape (slices, rows, columns)."""
        mask = self.packed_mask.to_array()
        mask.flags.writeable = False
        return mask

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
    bone = _bone_mask(volume, body, params)

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
    if np.issubdtype(hu.dtype, np.floating) and not all(
        np.isfinite(hu[start:stop]).all() for start, stop in _slabs(slices)
    ):
        raise InvalidInputError("hu contains NaN or infinite values; pass Hounsfield units only.")
    if hu.min() >= 0:
        raise InvalidInputError(
            "hu has no value below 0 HU, so there is neither air nor fat in it: it looks like stored "
            "pixel values; apply RescaleSlope and RescaleIntercept before calling analyze_ct."
        )
    if not hu.max() > params.body_threshold_hu:
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


def _slabs(slices: int) -> list[tuple[int, int]]:
    return [(start, min(slices, start + SLAB_SLICES)) for start in range(0, slices, SLAB_SLICES)]


@dataclass(frozen=True)
class _Components:
    """The 3-D face-connected components of a mask made slab by slab (:func:`_components`).

    Attributes
    ----------
    sizes
        Voxels of each component, indexed by the label :func:`scipy.ndimage.label` gives it on
        the whole volume (index 0, the background, is 0).
    label_of_piece
        Whole-volume label of each slab-wise piece, pieces numbered across slabs from 0.
    first_piece
        Index of each slab's first piece in ``label_of_piece``, and the total at the end.
    """

    sizes: np.ndarray
    label_of_piece: np.ndarray
    first_piece: list[int]


def _components(mask_of: Callable[[int, int], np.ndarray], slices: int) -> _Components:
    """Label the components of a mask one slab at a time and join them across slab borders.

    ``mask_of(start, stop)`` gives the mask's slices ``start`` to ``stop``. The result is what
    :func:`scipy.ndimage.label` with face connectivity gives on the whole mask, without its
    whole-volume int32 label array: pieces touching across a slab border are joined with
    :func:`scipy.sparse.csgraph.connected_components`, and components are numbered as
    ``ndimage.label`` numbers them, by their first voxel in C order (the first voxel of a
    component lies in its piece with the lowest slab-wise number).
    """
    sizes: list[np.ndarray] = []
    first_piece = [0]
    links: list[np.ndarray] = []
    previous_last: np.ndarray | None = None
    for start, stop in _slabs(slices):
        labels, count = ndimage.label(mask_of(start, stop), structure=_FACE_3D)
        offset = first_piece[-1]
        sizes.append(np.bincount(labels.ravel(), minlength=count + 1)[1:])
        if previous_last is not None:
            touching = (previous_last > 0) & (labels[0] > 0)
            # pieces numbered from 0 across slabs: slab-wise label - 1 + offset
            pairs = np.stack((previous_last[touching] + (first_piece[-2] - 1), labels[0][touching] + (offset - 1)))
            links.append(np.unique(pairs, axis=1))
        previous_last = labels[-1].copy()
        first_piece.append(offset + count)
    total = first_piece[-1]
    if total == 0:
        return _Components(np.zeros(1, dtype=np.int64), np.zeros(0, dtype=np.int64), first_piece)
    piece_sizes = np.concatenate(sizes).astype(np.int64)
    edges = np.concatenate(links, axis=1) if links else np.zeros((2, 0), dtype=np.int64)
    graph = coo_matrix((np.ones(edges.shape[1], dtype=np.int8), (edges[0], edges[1])), shape=(total, total))
    count, component = connected_components(graph, directed=False)
    first = np.full(count, total, dtype=np.int64)
    np.minimum.at(first, component, np.arange(total, dtype=np.int64))
    label_of_component = np.empty(count, dtype=np.int64)
    label_of_component[np.argsort(first)] = np.arange(1, count + 1)
    label_of_piece = label_of_component[component]
    whole_sizes = np.zeros(count + 1, dtype=np.int64)
    np.add.at(whole_sizes, label_of_piece, piece_sizes)
    return _Components(whole_sizes, label_of_piece, first_piece)


def _keep_components(
    mask_of: Callable[[int, int], np.ndarray],
    components: _Components,
    keep: np.ndarray,
    shape: tuple[int, int, int],
    then: Callable[[np.ndarray], np.ndarray] | None = None,
) -> PackedMask:
    """The voxels of the components whose whole-volume label is set in ``keep``, slab by slab
    (labelling a slab again where it has pieces both kept and dropped), ``then`` applied to each
    slab before it is packed."""
    out = PackedMask.zeros(shape)
    for index, (start, stop) in enumerate(_slabs(shape[0])):
        kept = keep[components.label_of_piece[components.first_piece[index] : components.first_piece[index + 1]]]
        if kept.all():
            slab = mask_of(start, stop)
        elif not kept.any():
            slab = np.zeros((stop - start, *shape[1:]), dtype=bool)
        else:
            labels, _ = ndimage.label(mask_of(start, stop), structure=_FACE_3D)
            lookup = np.zeros(len(kept) + 1, dtype=bool)
            lookup[1:] = kept
            slab = lookup[labels]
        out.set_slab(start, then(slab) if then is not None else slab)
    return out


def _body_mask(volume: np.ndarray, params: CTAnalyzerParams) -> PackedMask:
    def above(start: int, stop: int) -> np.ndarray:
        return volume[start:stop] > params.body_threshold_hu

    components = _components(above, volume.shape[0])
    sizes = components.sizes.copy()
    sizes[0] = 0
    keep = np.zeros(len(sizes), dtype=bool)
    keep[int(sizes.argmax())] = True
    return _keep_components(above, components, keep, volume.shape, then=_fill_holes_slicewise)


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
    volume: np.ndarray, body: PackedMask, voxel_ml: float, params: CTAnalyzerParams
) -> PackedMask:
    def enclosed_air(start: int, stop: int) -> np.ndarray:
        air = body.slab(start, stop)
        air &= volume[start:stop] < params.lung_threshold_hu
        return air

    components = _components(enclosed_air, volume.shape[0])
    count = len(components.sizes) - 1
    if count == 0:
        return PackedMask.zeros(volume.shape)
    sizes = components.sizes.copy()
    sizes[0] = 0
    min_voxels = max(1, math.ceil(params.min_lung_component_ml / voxel_ml))
    largest = np.argsort(sizes, kind="stable")[::-1][: params.max_lung_components]
    keep = np.zeros(count + 1, dtype=bool)
    kept = [label for label in largest if sizes[label] >= min_voxels]
    keep[np.asarray(kept, dtype=np.intp)] = True
    return _keep_components(enclosed_air, components, keep, volume.shape)


def _bone_mask(volume: np.ndarray, body: PackedMask, params: CTAnalyzerParams) -> PackedMask:
    bone = PackedMask.zeros(volume.shape)
    for start, stop in _slabs(volume.shape[0]):
        slab = body.slab(start, stop)
        slab &= volume[start:stop] > params.bone_threshold_hu
        bone.set_slab(start, slab)
    return bone


def _stats(label: str, mask: PackedMask, volume: np.ndarray, voxel_ml: float) -> StructureStats:
    voxel_count = mask.count_nonzero()
    mean_hu = math.nan
    if voxel_count:
        # integers are summed exactly (int64), so the mean equals the whole-volume
        # volume[mask].mean(dtype=float64) it replaces; floats in float64 per slab
        integral = np.issubdtype(volume.dtype, np.integer)
        total: float | int = 0
        for start, stop in _slabs(volume.shape[0]):
            values = volume[start:stop][mask.slab(start, stop)]
            total += int(values.sum(dtype=np.int64)) if integral else float(values.sum(dtype=np.float64))
        mean_hu = float(total) / voxel_count
    return StructureStats(
        label=label,
        packed_mask=mask,
        volume_ml=voxel_count * voxel_ml,
        mean_hu=mean_hu,
        voxel_count=voxel_count,
    )
