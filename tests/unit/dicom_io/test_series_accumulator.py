"""Single-frame images decoded into a SeriesAccumulator as they arrive, in any order, and stacked
in place make the volume load_volume makes of the same datasets: a read-ahead of a series still
being received must not change a result."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest
from pydicom.dataset import Dataset

from dicom_io.errors import InconsistentSeriesError, InvalidInstanceError
from dicom_io.volume import SeriesAccumulator, Volume, _permute_in_place, load_volume
from tests.phantom import PhantomGeometry, make_ct_phantom

GEOMETRY = PhantomGeometry(rows=80, columns=80, pixel_spacing_mm=(4.0, 4.0), slice_spacing_mm=10.0, num_slices=18)


def _series(**kwargs: object) -> list[Dataset]:
    datasets = make_ct_phantom(geometry=GEOMETRY, noise_hu_sd=20.0, seed=11, **kwargs)  # type: ignore[arg-type]
    random.Random(5).shuffle(datasets)  # in any order, as instances arrive
    return datasets


def _assert_same(stacked: Volume, loaded: Volume) -> None:
    assert stacked.pixels.dtype == loaded.pixels.dtype
    np.testing.assert_array_equal(stacked.pixels, loaded.pixels)
    assert [ds.SOPInstanceUID for ds in stacked.datasets] == [ds.SOPInstanceUID for ds in loaded.datasets]
    assert stacked.spacing_mm == loaded.spacing_mm
    assert stacked.origin_mm == loaded.origin_mm
    assert stacked.image_orientation == loaded.image_orientation
    assert stacked.slice_positions_mm == loaded.slice_positions_mm


def _accumulated(datasets: list[Dataset], capacity: int = 1024) -> tuple[SeriesAccumulator, list[str]]:
    accumulator = SeriesAccumulator(capacity=capacity)
    for ds in datasets:
        accumulator.add(ds.SOPInstanceUID, copy.deepcopy(ds), release_pixel_data=True)
    return accumulator, [ds.SOPInstanceUID for ds in datasets]


def _loaded(datasets: list[Dataset]) -> Volume:
    return load_volume([copy.deepcopy(ds) for ds in datasets])


def test_slices_added_in_any_order_stack_into_the_loaded_volume_in_int16() -> None:
    datasets = _series()
    accumulator, keys = _accumulated(datasets)
    volume = accumulator.volume(keys)
    _assert_same(volume, _loaded(datasets))
    assert volume.pixels.dtype == np.int16
    assert accumulator.volume(keys) is volume  # asked again: the same volume


def test_the_volume_is_the_buffer_stacked_in_place() -> None:
    accumulator, keys = _accumulated(_series(), capacity=64)
    volume = accumulator.volume(keys)
    assert volume.pixels.flags.c_contiguous
    assert volume.pixels.shape[0] == len(accumulator)  # every held slice, none of the unused capacity
    assert np.shares_memory(volume.pixels, accumulator._pixels)  # no second copy of the pixels


def test_a_buffer_that_runs_out_grows_and_keeps_every_slice() -> None:
    datasets = _series()
    accumulator, keys = _accumulated(datasets, capacity=2)
    _assert_same(accumulator.volume(keys), _loaded(datasets))


def test_a_non_integral_rescale_stacks_as_float32_like_the_load() -> None:
    datasets = _series(rescale_slope=0.5, rescale_intercept=-1100.5)
    accumulator, keys = _accumulated(datasets)
    _assert_same(accumulator.volume(keys), _loaded(datasets))
    assert accumulator.volume(keys).pixels.dtype == np.float32


@pytest.mark.parametrize("where", [0, 9, 17])
def test_one_slice_beyond_int16_turns_the_buffer_to_float32_like_the_load(where: int) -> None:
    datasets = _series()
    datasets[where].RescaleIntercept = "32000"  # only this slice's values leave int16
    accumulator, keys = _accumulated(datasets)
    _assert_same(accumulator.volume(keys), _loaded(datasets))


def test_more_slices_after_a_volume_and_a_held_one_left_out() -> None:
    datasets = _series()
    accumulator, keys = _accumulated(datasets[:10])
    _assert_same(accumulator.volume(keys), _loaded(datasets[:10]))  # a read ahead, finished early
    for ds in datasets[10:]:  # more arrived
        accumulator.add(ds.SOPInstanceUID, copy.deepcopy(ds))
    wanted = [ds for i, ds in enumerate(datasets) if i != 4]  # one held image is no longer wanted
    _assert_same(accumulator.volume([ds.SOPInstanceUID for ds in wanted]), _loaded(wanted))


def test_prepared_datasets_are_the_volumes() -> None:
    datasets = _series()
    accumulator, keys = _accumulated(datasets)
    prepared: list[Dataset] = []

    def prepare(given: list[Dataset]) -> list[Dataset]:
        prepared.extend(copy.copy(ds) for ds in given)
        return prepared

    volume = accumulator.volume(keys, prepare)
    assert {id(ds) for ds in volume.datasets} == {id(ds) for ds in prepared}


def test_stacking_checks_the_series_as_the_load_does() -> None:
    datasets = _series()
    accumulator, keys = _accumulated(datasets)
    duplicate = copy.deepcopy(datasets[0])
    duplicate.SOPInstanceUID = "2.25.1"
    accumulator.add("duplicate", duplicate)
    with pytest.raises(InconsistentSeriesError, match="share one slice position"):
        accumulator.volume([*keys, "duplicate"])
    other = make_ct_phantom(geometry=GEOMETRY, series_instance_uid="2.25.99")[0]
    accumulator.add("other", other)
    with pytest.raises(InconsistentSeriesError, match="2 series"):
        accumulator.volume([*keys, "other"])
    with pytest.raises(KeyError):
        accumulator.volume(["never added"])
    with pytest.raises(InconsistentSeriesError, match="held already"):
        accumulator.add(keys[0], datasets[0])
    small = make_ct_phantom(geometry=PhantomGeometry(rows=88, columns=80, pixel_spacing_mm=(4.0, 4.0),
                                                     slice_spacing_mm=10.0, num_slices=18))[0]
    with pytest.raises(InconsistentSeriesError, match="mixed matrix sizes"):
        accumulator.add("small", small)


def test_a_multi_frame_image_is_not_added() -> None:
    ds = _series()[0]
    ds.NumberOfFrames = 2
    with pytest.raises(InvalidInstanceError, match="multi-frame"):
        SeriesAccumulator().add("a", ds)


@pytest.mark.parametrize("seed", range(5))
def test_a_permutation_in_place_equals_the_copy(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(-1000, 1000, size=(23, 3, 4), dtype=np.int16)
    source = [int(i) for i in rng.permutation(23)]
    expected = pixels[source].copy()
    _permute_in_place(pixels, source)
    np.testing.assert_array_equal(pixels, expected)
