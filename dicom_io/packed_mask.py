"""Boolean volumes stored as bits: one eighth of the memory of a ``bool`` array.

A structure mask of a 2,000-slice 512² CT is 524 MB as a ``bool`` array and 66 MB packed. Masks
travel from a model to the SEG writer in this form, and are unpacked a slab of slices at a time
where a stage needs the voxels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True, eq=False)
class PackedMask:
    """A boolean volume, 8 voxels to a byte (:func:`numpy.packbits` along the last axis).

    Attributes
    ----------
    bits
        ``uint8`` array ``(slices, rows, ceil(columns / 8))``; the padding bits of each row are 0.
    shape
        Shape of the boolean volume, ``(slices, rows, columns)``.

    Raises
    ------
    ValueError
        If ``bits`` is not ``uint8`` of the shape ``shape`` packs to.
    """

    bits: np.ndarray
    shape: tuple[int, int, int]

    def __post_init__(self) -> None:
        expected = (*self.shape[:-1], -(-self.shape[-1] // 8))
        if self.bits.dtype != np.uint8 or self.bits.shape != expected:
            raise ValueError(
                f"bits must be uint8 of shape {expected} for a mask of shape {self.shape}, "
                f"got {self.bits.dtype} {self.bits.shape}."
            )

    @classmethod
    def zeros(cls, shape: tuple[int, int, int]) -> PackedMask:
        """An empty mask of ``shape``."""
        return cls(np.zeros((*shape[:-1], -(-shape[-1] // 8)), dtype=np.uint8), tuple(shape))  # type: ignore[arg-type]

    @classmethod
    def from_array(cls, mask: np.ndarray) -> PackedMask:
        """Pack a 3-D boolean array.

        Raises
        ------
        ValueError
            If ``mask`` is not a 3-D boolean array.
        """
        if mask.dtype != np.bool_ or mask.ndim != 3:
            raise ValueError(f"mask must be a 3-D bool array, got {mask.dtype} of shape {mask.shape}.")
        return cls(np.packbits(mask, axis=-1), tuple(int(n) for n in mask.shape))  # type: ignore[arg-type]

    def set_slab(self, start: int, mask: np.ndarray) -> None:
        """Store the boolean slices ``mask`` at slices ``start`` to ``start + len(mask)``."""
        self.bits[start : start + len(mask)] = np.packbits(mask, axis=-1)

    def slab(self, start: int, stop: int) -> np.ndarray:
        """Slices ``start`` to ``stop`` as a new boolean array."""
        return np.unpackbits(self.bits[start:stop], axis=-1, count=self.shape[-1]).view(np.bool_)

    def to_array(self) -> np.ndarray:
        """The whole mask as a new boolean array (8 times the memory of the packed form)."""
        return self.slab(0, self.shape[0])

    def count_nonzero(self) -> int:
        """Number of voxels set."""
        return int(np.bitwise_count(self.bits).sum(dtype=np.int64))
