"""From OHIF's viewport canvas back to source-image pixels, and colour tests on screenshots.

OHIF (cornerstone3D) draws one slice into a canvas through an affine camera: every canvas pixel
is a point in patient coordinates (``viewport.canvasToWorld``). :class:`ViewportTransform`
holds that affine, sampled from the live viewport, and maps it through the **source image's own
geometry** (Image Position/Orientation, Pixel Spacing, read here from the DICOM file, not from
OHIF) onto the source pixel grid. Comparing the coloured pixels of a screenshot with a mask on
that grid therefore checks the whole chain — SEG frame → slice → in-plane position — against
what mednode wrote, independently of how OHIF decoded the SEG.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset


@dataclass(frozen=True)
class ImageGeometry:
    """The in-plane geometry of one source image (PS3.3 C.7.6.2)."""

    position_mm: NDArray[np.float64]  # centre of the first (top-left) pixel
    row_direction: NDArray[np.float64]  # direction along a row (increasing column)
    column_direction: NDArray[np.float64]  # direction down a column (increasing row)
    row_spacing_mm: float  # between rows (PixelSpacing[0])
    column_spacing_mm: float  # between columns (PixelSpacing[1])
    rows: int
    columns: int

    @classmethod
    def of(cls, ds: Dataset) -> ImageGeometry:
        """Geometry of ``ds``; projection images without a patient frame get an identity plane.

        A radiograph (CR/DX) has no Image Position/Orientation: cornerstone places it at the
        origin with rows along +x and columns along +y and uses Pixel Spacing (or Imager Pixel
        Spacing, else 1 mm), which is what this does too.
        """
        if "ImageOrientationPatient" in ds and "ImagePositionPatient" in ds:
            iop = np.array([float(v) for v in ds.ImageOrientationPatient])
            position = np.array([float(v) for v in ds.ImagePositionPatient])
            row_dir, col_dir = iop[:3], iop[3:]
        else:
            position, row_dir, col_dir = np.zeros(3), np.array([1.0, 0, 0]), np.array([0, 1.0, 0])
        spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing") or (1.0, 1.0)
        return cls(position, row_dir, col_dir, float(spacing[0]), float(spacing[1]),
                   int(ds.Rows), int(ds.Columns))

    @property
    def normal(self) -> NDArray[np.float64]:
        return np.cross(self.row_direction, self.column_direction)

    def pixel_to_world(self, column: float, row: float) -> NDArray[np.float64]:
        """World point of continuous pixel coordinates whose (0, 0) is the first pixel's centre."""
        return (self.position_mm + column * self.column_spacing_mm * self.row_direction
                + row * self.row_spacing_mm * self.column_direction)


@dataclass(frozen=True)
class ViewportTransform:
    """The viewport's canvas → world affine, sampled at three canvas points.

    ``origin`` is the world point of canvas coordinate (0, 0) (the top-left corner of the
    canvas); ``du``/``dv`` are the world steps of one canvas pixel right/down.
    """

    origin: NDArray[np.float64]
    du: NDArray[np.float64]
    dv: NDArray[np.float64]
    width: int
    height: int

    @classmethod
    def from_samples(cls, c00: list[float], c10: list[float], c01: list[float],
                     width: int, height: int) -> ViewportTransform:
        o = np.asarray(c00, dtype=float)
        return cls(o, np.asarray(c10, dtype=float) - o, np.asarray(c01, dtype=float) - o, width, height)

    def canvas_pixel_centres_world(self) -> NDArray[np.float64]:
        """``(height, width, 3)`` world points of every canvas pixel's centre."""
        v, u = np.mgrid[0:self.height, 0:self.width].astype(float)
        return (self.origin + (u[..., None] + 0.5) * self.du + (v[..., None] + 0.5) * self.dv)

    def world_to_canvas(self, point: NDArray[np.float64]) -> tuple[float, float]:
        """Canvas (x, y) of a world point in the viewport's plane (least squares)."""
        matrix = np.stack([self.du, self.dv], axis=1)
        (u, v), *_ = np.linalg.lstsq(matrix, np.asarray(point, dtype=float) - self.origin, rcond=None)
        return float(u), float(v)


def project_mask(mask: NDArray[np.bool_], image: ImageGeometry, viewport: ViewportTransform,
                 plane_tolerance_mm: float = 0.1) -> NDArray[np.bool_]:
    """The mask (on ``image``'s pixel grid) as seen on the canvas: ``(height, width)`` booleans.

    Raises
    ------
    AssertionError
        If the viewport does not show ``image``'s plane (the canvas is off by more than
        ``plane_tolerance_mm`` along the image normal): the wrong slice is displayed.
    """
    world = viewport.canvas_pixel_centres_world()
    offset = world - image.position_mm
    distance = float(np.abs(offset @ image.normal).max())
    assert distance <= plane_tolerance_mm, (
        f"the viewport's plane is {distance:.2f} mm from the image's plane: another slice is shown")
    column = np.rint(offset @ image.row_direction / image.column_spacing_mm).astype(int)
    row = np.rint(offset @ image.column_direction / image.row_spacing_mm).astype(int)
    inside = (column >= 0) & (column < image.columns) & (row >= 0) & (row < image.rows)
    out = np.zeros(world.shape[:2], dtype=bool)
    out[inside] = mask[row[inside], column[inside]]
    return out


def image_footprint(image: ImageGeometry, viewport: ViewportTransform) -> NDArray[np.bool_]:
    """Canvas pixels that show some pixel of ``image``."""
    return project_mask(np.ones((image.rows, image.columns), dtype=bool), image, viewport,
                        plane_tolerance_mm=np.inf)


def coloured(rgb: NDArray[np.uint8], min_chroma: int = 24) -> NDArray[np.bool_]:
    """Pixels that are not grey: the largest channel difference exceeds ``min_chroma``."""
    channels = rgb[..., :3].astype(int)
    return (channels.max(axis=-1) - channels.min(axis=-1)) > min_chroma


def dilate(mask: NDArray[np.bool_], steps: int = 1) -> NDArray[np.bool_]:
    """4-neighbour binary dilation by ``steps`` pixels (numpy only)."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def erode(mask: NDArray[np.bool_], steps: int = 1) -> NDArray[np.bool_]:
    return ~dilate(~mask, steps)


@dataclass(frozen=True)
class OverlayAgreement:
    """How the coloured pixels of a screenshot agree with a projected mask."""

    precision: float  # coloured pixels that lie on the mask (grown by the tolerance)
    recall: float  # mask pixels (shrunk by the tolerance) that are coloured
    coloured_pixels: int
    mask_pixels: int

    def __str__(self) -> str:
        return (f"precision {self.precision:.3f}, recall {self.recall:.3f} "
                f"({self.coloured_pixels} coloured / {self.mask_pixels} mask canvas pixels)")


def agreement(drawn: NDArray[np.bool_], expected: NDArray[np.bool_], region: NDArray[np.bool_],
              tolerance_px: int = 2) -> OverlayAgreement:
    """Compare ``drawn`` (coloured canvas pixels) with ``expected`` inside ``region``.

    ``tolerance_px`` canvas pixels absorb the outline cornerstone draws on a segment's edge and
    the rounding of pixel borders at a non-integer zoom.
    """
    drawn = drawn & region
    expected = expected & region
    grown, shrunk = dilate(expected, tolerance_px), erode(expected, tolerance_px) & region
    precision = float((drawn & grown).sum() / max(int(drawn.sum()), 1))
    recall = float((drawn & shrunk).sum() / max(int(shrunk.sum()), 1))
    return OverlayAgreement(precision, recall, int(drawn.sum()), int(expected.sum()))
