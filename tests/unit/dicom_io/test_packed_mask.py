"""Masks packed to bits round-trip exactly, whatever the column count."""

from __future__ import annotations

import numpy as np
import pytest

from dicom_io.packed_mask import PackedMask


@pytest.mark.parametrize("columns", [1, 7, 8, 13, 512])
def test_round_trip_count_and_slabs(columns: int) -> None:
    rng = np.random.default_rng(columns)
    mask = rng.random((5, 3, columns)) < 0.4
    packed = PackedMask.from_array(mask)
    assert packed.bits.nbytes == 5 * 3 * -(-columns // 8)
    np.testing.assert_array_equal(packed.to_array(), mask)
    assert packed.to_array().dtype == np.bool_
    assert packed.count_nonzero() == int(mask.sum())
    np.testing.assert_array_equal(packed.slab(1, 4), mask[1:4])
    rebuilt = PackedMask.zeros(mask.shape)
    rebuilt.set_slab(0, mask[:2])
    rebuilt.set_slab(2, mask[2:])
    np.testing.assert_array_equal(rebuilt.bits, packed.bits)


def test_refuses_what_is_not_a_packed_mask() -> None:
    with pytest.raises(ValueError, match="3-D bool"):
        PackedMask.from_array(np.zeros((2, 2, 2), dtype=np.uint8))
    with pytest.raises(ValueError, match="uint8 of shape"):
        PackedMask(np.zeros((2, 2, 1), dtype=np.uint8), (2, 2, 9))
