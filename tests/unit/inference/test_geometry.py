"""Image preparation: windowing, inversion, 16-bit input, and exact coordinate round trips."""


import numpy as np
import pydicom
import pytest

from inference.errors import InvalidInputError
from inference.geometry import (
    MEDGEMMA_CT_WINDOWS,
    apply_voi_window,
    geometry_for,
    prepare_image,
    sample_slices,
    to_uint8,
)
from tests.shared_data import SHARED_DICOM

XR = SHARED_DICOM / "xr"


def test_voi_window_follows_ps3_3_linear_function():
    values = np.array([-160.0, -159.0, 40.0, 239.0, 239.5, 1000.0])
    out = apply_voi_window(values, 40.0, 400.0)
    assert out[0] == 0.0 and out[-1] == 255.0 and out[-2] == 255.0
    assert out[2] == pytest.approx(((40 - 39.5) / 399 + 0.5) * 255)
    assert np.all(np.diff(out) >= 0)
    with pytest.raises(InvalidInputError):
        apply_voi_window(values, 40.0, 0.5)


def test_monochrome1_is_inverted():
    frame = np.array([[0, 100], [50, 100]], dtype=np.uint16)
    normal = to_uint8(frame)
    assert normal.tolist()[0] == [0, 255] and normal[1, 0] in (127, 128)
    inverted = to_uint8(frame, photometric="MONOCHROME1")
    assert (inverted.astype(int) + normal.astype(int) == 255).all()


def test_sixteen_bit_is_windowed_before_the_cast():
    frame = np.array([[0, 1000, 2000, 40000, 65535]], dtype=np.uint16)
    out = to_uint8(frame, window=(1000.0, 2000.0))
    assert out.dtype == np.uint8
    assert out.tolist()[0][0] == 0 and out.tolist()[0][-1] == 255
    assert 120 <= out[0, 1] <= 135  # the window centre lands mid-grey, not saturated
    prepared = prepare_image(frame.repeat(5, axis=0), window=(1000.0, 2000.0), size=5, mode="resize")
    assert prepared.image.mode == "RGB" and prepared.image.size == (5, 5)
    assert np.asarray(prepared.image)[0, :, 0].tolist() == out[0].tolist()


def test_constant_frame_is_black_not_an_error():
    assert to_uint8(np.full((3, 3), 7)).max() == 0


@pytest.mark.parametrize("width,height", [(211, 169), (169, 211), (64, 64)])
@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_pad_and_crop_keep_pixels_where_the_transform_says(width, height, mode):
    rng = np.random.default_rng(0)
    frame = rng.integers(1, 255, size=(height, width)).astype(np.uint8)
    side = max(width, height) if mode == "pad" else min(width, height)
    # size == side: no resampling, so every pixel must sit exactly where the transform maps it.
    prepared = prepare_image(frame, window=(127.5, 256.0), size=side, mode=mode, pad_value=0)
    image = np.asarray(prepared.image)[..., 0]
    expected = to_uint8(frame, window=(127.5, 256.0))
    t = prepared.transform
    for iy in range(side):
        for ix in range(side):
            ox, oy = t.input_to_original(ix + 0.5, iy + 0.5)
            if 0 <= ox < width and 0 <= oy < height:
                assert image[iy, ix] == expected[int(oy), int(ox)]
            else:
                assert image[iy, ix] == 0


@pytest.mark.parametrize("mode,multiple", [("pad", 1), ("crop", 1), ("resize", 1), ("fit", 28)])
@pytest.mark.parametrize("width,height", [(1841, 1955), (211, 169)])
def test_transform_round_trips(mode, multiple, width, height):
    t = geometry_for(width, height, size=448, mode=mode, multiple_of=multiple)[0]
    for x, y in [(0.0, 0.0), (width, height), (17.25, 101.5), (width / 3, height / 7)]:
        assert t.input_to_original(*t.original_to_input(x, y)) == pytest.approx((x, y))
        assert t.input_normalised_to_original(*t.original_to_input_normalised(x, y)) == pytest.approx((x, y))
    if mode in ("resize", "fit"):
        assert t.input_to_original(t.input_width, t.input_height) == pytest.approx((width, height))


def test_real_monochrome1_radiograph_prepares_to_padded_square():
    ds = pydicom.dcmread(XR / "highdicom_dx_thorax.dcm")
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    prepared = prepare_image(ds.pixel_array, photometric="MONOCHROME1", size=56, mode="pad")
    assert prepared.image.size == (56, 56) and prepared.image.mode == "RGB"
    t = prepared.transform
    assert (t.original_width, t.original_height) == (ds.Columns, ds.Rows) == (211, 169)
    assert t.offset_y == -21 and t.offset_x == 0


def test_ct_windows_make_three_channels():
    hu = np.linspace(-1100, 1100, 64 * 64).reshape(64, 64)
    prepared = prepare_image(hu, ct_windows=MEDGEMMA_CT_WINDOWS, size=64, mode="resize")
    rgb = np.asarray(prepared.image).astype(int)
    assert not np.array_equal(rgb[..., 0], rgb[..., 1])
    assert not np.array_equal(rgb[..., 1], rgb[..., 2])
    # 40 HU is mid-grey in the soft-tissue and brain windows.
    assert to_uint8(np.array([40.0]), window=MEDGEMMA_CT_WINDOWS[2])[0] in (128, 129)


def test_bad_shapes_are_refused():
    with pytest.raises(InvalidInputError, match="one frame at a time"):
        prepare_image(np.zeros((2, 4, 4)))


def test_sample_slices_evenly():
    assert sample_slices(100, 5) == [0, 25, 50, 74, 99]
    assert sample_slices(3, 8) == [0, 1, 2]
    assert sample_slices(9, 1) == [4]
    assert sample_slices(10, 2) == [0, 9]
    assert len(sample_slices(200, 16)) == 16
