"""Image preparation for vision-language models, and the exact way back to DICOM pixels.

A model sees an 8-bit RGB image of its own size, made from a DICOM frame by windowing, inversion
(MONOCHROME1), and one geometric step (pad to square, centre crop, stretch, or aspect-keeping
fit). :class:`ImageTransform` records that geometric step, so that any coordinate the model emits
about its input maps back to the ORIGINAL frame's pixel coordinates exactly.

Coordinates are continuous: pixel ``(col, row)`` covers ``[col, col + 1) x [row, row + 1)``,
so the whole image spans ``[0, width] x [0, height]``. Normalised coordinates divide by width and
height. Every geometric step here is an axis-aligned scale plus offset, so the transform is two
affine maps, one per axis, and is invertible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image

from inference.errors import InvalidInputError

#: ``pad``: pad to a centred square, then resize (MedGemma, LLaVA ``expand2square``).
#: ``crop``: centre crop to a square of the short side, then resize (MAIRA-2, CLIP crop).
#: ``resize``: stretch to ``size x size`` (InternVL/MedRegA tiles, MiniGPT-Med).
#: ``fit``: keep the aspect ratio, longer side ``size``, both sides multiples of ``multiple_of``
#: (Qwen2-VL/2.5-VL native resolution).
PrepareMode = Literal["pad", "crop", "resize", "fit"]

#: MedGemma's three CT windows as (centre, width) in HU, rendered as R, G, B: wide
#: (-1024..1024), soft tissue (-135..215) and brain (0..80).
MEDGEMMA_CT_WINDOWS: tuple[tuple[float, float], ...] = ((0.0, 2048.0), (40.0, 350.0), (40.0, 80.0))


@dataclass(frozen=True)
class ImageTransform:
    """Maps coordinates on the model's input image back to the original frame, exactly.

    ``original = input * scale + offset`` on each axis, in continuous pixel coordinates.

    Attributes
    ----------
    original_width, original_height : int
        Columns and Rows of the source frame.
    input_width, input_height : int
        Size of the image handed to the model.
    scale_x, scale_y : float
        Original pixels per input pixel.
    offset_x, offset_y : float
        Original coordinate of input coordinate 0 (negative when the input was padded).
    """

    original_width: int
    original_height: int
    input_width: int
    input_height: int
    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float

    def input_to_original(self, x: float, y: float) -> tuple[float, float]:
        """Input-image pixel coordinates to original pixel coordinates."""
        return x * self.scale_x + self.offset_x, y * self.scale_y + self.offset_y

    def original_to_input(self, x: float, y: float) -> tuple[float, float]:
        """Original pixel coordinates to input-image pixel coordinates."""
        return (x - self.offset_x) / self.scale_x, (y - self.offset_y) / self.scale_y

    def input_normalised_to_original(self, u: float, v: float) -> tuple[float, float]:
        """Coordinates normalised on the input image (0..1; for ``pad`` this is the padded
        square, for ``crop`` the cropped square) to original pixel coordinates."""
        return self.input_to_original(u * self.input_width, v * self.input_height)

    def original_to_input_normalised(self, x: float, y: float) -> tuple[float, float]:
        """Original pixel coordinates to coordinates normalised on the input image."""
        ix, iy = self.original_to_input(x, y)
        return ix / self.input_width, iy / self.input_height

    def original_to_normalised(self, x: float, y: float) -> tuple[float, float]:
        """Original pixel coordinates to coordinates normalised on the original frame."""
        return x / self.original_width, y / self.original_height

    def normalised_to_original(self, u: float, v: float) -> tuple[float, float]:
        """Coordinates normalised on the original frame to original pixel coordinates."""
        return u * self.original_width, v * self.original_height


@dataclass(frozen=True)
class PreparedImage:
    """One image as a model sees it, with the way back to its source frame.

    Attributes
    ----------
    image : PIL.Image.Image
        8-bit RGB at the model's input size.
    transform : ImageTransform
        Input coordinates to original pixel coordinates.
    volume_modality : str or None
        ``"CT"``, ``"MR"``... when the image is one slice of a sampled volume (the prompt then
        labels it, see :mod:`inference.vlm.volume_recipe`); ``None`` for a projection view.
    """

    image: Image.Image
    transform: ImageTransform
    volume_modality: str | None = None


def geometry_for(width: int, height: int, *, size: int, mode: PrepareMode,
                 multiple_of: int = 1) -> tuple[ImageTransform, tuple[int, int, int, int], tuple[int, int]]:
    """Work out the geometric step for a ``width x height`` frame.

    Returns the transform, the box ``(left, top, right, bottom)`` in original pixels that is
    resized onto the input (it extends past the frame when padding), and the input size.
    """
    if width < 1 or height < 1:
        raise InvalidInputError(f"Image of {width}x{height} pixels has no area.")
    if size < 1 or multiple_of < 1:
        raise ValueError(f"size ({size}) and multiple_of ({multiple_of}) must be positive.")
    if mode == "pad":
        side = max(width, height)
        left, top = -((side - width) // 2), -((side - height) // 2)
        src = (left, top, left + side, top + side)
        out = (size, size)
    elif mode == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        src = (left, top, left + side, top + side)
        out = (size, size)
    elif mode == "resize":
        src = (0, 0, width, height)
        out = (size, size)
    elif mode == "fit":
        ratio = size / max(width, height)
        out = (max(multiple_of, round(width * ratio / multiple_of) * multiple_of),
               max(multiple_of, round(height * ratio / multiple_of) * multiple_of))
        src = (0, 0, width, height)
    else:
        raise ValueError(f"Unknown preparation mode {mode!r}; use pad, crop, resize or fit.")
    transform = ImageTransform(
        original_width=width, original_height=height, input_width=out[0], input_height=out[1],
        scale_x=(src[2] - src[0]) / out[0], scale_y=(src[3] - src[1]) / out[1],
        offset_x=float(src[0]), offset_y=float(src[1]),
    )
    return transform, src, out


def apply_voi_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Linear VOI LUT function of PS3.3 C.11.2.1.2.1 onto 0..255 (float, not yet rounded)."""
    if width < 1:
        raise InvalidInputError(f"Window width must be >= 1 (PS3.3 C.11.2.1.2), got {width}.")
    low = center - 0.5 - (width - 1) / 2
    high = center - 0.5 + (width - 1) / 2
    scaled = ((values - (center - 0.5)) / (width - 1) + 0.5) * 255.0
    return np.where(values <= low, 0.0, np.where(values > high, 255.0, scaled))


def to_uint8(pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
             window: tuple[float, float] | None = None) -> np.ndarray:
    """Window a single-channel frame to uint8, inverting MONOCHROME1.

    Without a window the frame's own minimum..maximum is stretched to 0..255 (a constant frame
    becomes black). 16-bit and float data are windowed in float64 before the cast: converting
    them to PIL RGB directly saturates.
    """
    values = np.asarray(pixels, dtype=np.float64)
    if window is not None:
        out = apply_voi_window(values, window[0], window[1])
    else:
        low, high = float(values.min()), float(values.max())
        out = np.zeros_like(values) if high <= low else (values - low) * (255.0 / (high - low))
    if photometric == "MONOCHROME1":
        out = 255.0 - out
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def prepare_image(pixels: np.ndarray, *, photometric: str = "MONOCHROME2",
                  window: tuple[float, float] | None = None, size: int = 448,
                  mode: PrepareMode = "pad", multiple_of: int = 1,
                  ct_windows: Sequence[tuple[float, float]] | None = None,
                  pad_value: int = 0) -> PreparedImage:
    """Turn one DICOM frame into the model's 8-bit RGB input and its coordinate transform.

    Parameters
    ----------
    pixels : numpy.ndarray
        ``(rows, columns)`` values after the Modality LUT (e.g. HU for CT), or ``(rows, columns, 3)``
        RGB (``photometric="RGB"``, already 8-bit or windowed per channel).
    photometric : str
        Photometric Interpretation; ``MONOCHROME1`` is inverted so that air is black.
    window : tuple of float, optional
        VOI window ``(center, width)``; default is the frame's min..max.
    size : int
        Model input size (square side; the longer side in ``fit`` mode).
    mode : {"pad", "crop", "resize", "fit"}
        Geometric step, see :data:`PrepareMode`.
    multiple_of : int
        ``fit`` mode only: both sides are rounded to a multiple of this (28 for Qwen2-VL).
    ct_windows : sequence of (center, width), optional
        Render each window as one channel (MedGemma CT: :data:`MEDGEMMA_CT_WINDOWS`); up to 3,
        fewer are repeated. Replaces ``window``.
    pad_value : int
        Grey level of the padding.

    Raises
    ------
    InvalidInputError
        If the array is not 2-D (or 3-D RGB), has no pixels, or a window width is below 1.
    """
    array = np.asarray(pixels)
    if array.ndim == 3 and array.shape[2] == 3:
        if array.dtype != np.uint8:
            array = np.stack([to_uint8(array[..., c], window=window) for c in range(3)], axis=-1)
        rgb = array
    elif array.ndim == 2:
        if ct_windows:
            channels = [to_uint8(array, photometric=photometric, window=w) for w in ct_windows[:3]]
            while len(channels) < 3:
                channels.append(channels[len(channels) % len(ct_windows)])
            rgb = np.stack(channels, axis=-1)
        else:
            grey = to_uint8(array, photometric=photometric, window=window)
            rgb = np.repeat(grey[..., None], 3, axis=-1)
    else:
        raise InvalidInputError(
            f"Expected a (rows, columns) frame or (rows, columns, 3) RGB, got shape {array.shape}; "
            "pass one frame at a time (use sample_slices for volumes)."
        )
    height, width = rgb.shape[:2]
    transform, src, out = geometry_for(width, height, size=size, mode=mode, multiple_of=multiple_of)
    image = Image.fromarray(np.ascontiguousarray(rgb))
    if src != (0, 0, width, height):
        # PIL crop pads with zeros outside the frame; paste on a pad_value canvas instead.
        canvas = Image.new("RGB", (src[2] - src[0], src[3] - src[1]), (pad_value,) * 3)
        canvas.paste(image, (-src[0], -src[1]))
        image = canvas
    if image.size != out:
        image = image.resize(out, Image.Resampling.BICUBIC)
    return PreparedImage(image=image, transform=transform)


def sample_slices(n_slices: int, k: int) -> list[int]:
    """Pick ``k`` slice indices spread evenly over ``n_slices`` (first and last included).

    ``k >= n_slices`` returns every slice; ``k == 1`` the middle one.
    """
    if n_slices < 1:
        raise InvalidInputError("A series with no slices cannot be sampled.")
    if k < 1:
        raise ValueError(f"Number of slices to sample must be >= 1, got {k}.")
    if k >= n_slices:
        return list(range(n_slices))
    if k == 1:
        return [(n_slices - 1) // 2]
    return sorted({math.floor(i * (n_slices - 1) / (k - 1) + 0.5) for i in range(k)})
