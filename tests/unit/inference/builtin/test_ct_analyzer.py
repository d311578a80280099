"""The built-in CT analyzer measures the phantom's analytic volumes and refuses what it cannot measure."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pydicom
import pytest

from inference.builtin import (
    ANALYZER_NAME,
    ANALYZER_VERSION,
    CTAnalyzerParams,
    analyze_ct,
)
from inference.errors import InferenceError, InvalidInputError
from tests.phantom import (
    PhantomAnatomy,
    PhantomGeometry,
    hu_from_datasets,
    make_ct_phantom,
    make_ct_volume,
    phantom_truth,
    write_series,
)

VOLUME_TOLERANCE = 0.02
MEAN_HU_TOLERANCE = 5.0

GEOMETRIES = {
    # thin anisotropic slices; anatomy halved so the 0.7 mm grid stays small (224 x 224 x 36)
    "0.7x0.7x2.5mm": (
        PhantomGeometry(
            rows=224, columns=224, pixel_spacing_mm=(0.7, 0.7), slice_spacing_mm=2.5, num_slices=36
        ),
        PhantomAnatomy().scaled(0.5),
    ),
    "1.2x1.2x5mm": (PhantomGeometry(), PhantomAnatomy()),
    # thick slices, rectangular pixels, unsigned storage below
    "0.9x1.1x7.5mm": (
        PhantomGeometry(
            rows=260, columns=330, pixel_spacing_mm=(0.9, 1.1), slice_spacing_mm=7.5, num_slices=22
        ),
        PhantomAnatomy(),
    ),
}


@pytest.mark.parametrize("pixel_representation", [0, 1], ids=["unsigned", "signed"])
@pytest.mark.parametrize("name", list(GEOMETRIES))
def test_volumes_and_mean_hu_of_the_phantom_match_the_analytic_values(
    name: str, pixel_representation: int, tmp_path: Path
) -> None:
    geometry, anatomy = GEOMETRIES[name]
    datasets = make_ct_phantom(
        geometry=geometry,
        anatomy=anatomy,
        pixel_representation=pixel_representation,
        noise_hu_sd=20.0,
    )
    # through DICOM bytes, so the phantom's stored values and rescale are exercised too
    read_back = [pydicom.dcmread(path) for path in write_series(datasets, tmp_path)]
    hu = hu_from_datasets(read_back)
    truth = phantom_truth(geometry, anatomy)

    analysis = analyze_ct(hu, geometry.spacing_mm)

    assert [s.label for s in analysis.structures] == ["body", "lungs", "bone"]
    measured = {s.label: s for s in analysis.structures}
    expected_ml = {"body": truth.body_ml, "lungs": truth.lungs_ml, "bone": truth.bone_ml}
    expected_hu = {
        "body": truth.body_mean_hu,
        "lungs": truth.lungs_mean_hu,
        "bone": truth.bone_mean_hu,
    }
    for label, stats in measured.items():
        assert stats.volume_ml == pytest.approx(expected_ml[label], rel=VOLUME_TOLERANCE), label
        assert stats.mean_hu == pytest.approx(expected_hu[label], abs=MEAN_HU_TOLERANCE), label
        assert stats.voxel_count == int(stats.mask.sum())
        assert stats.volume_ml == pytest.approx(
            stats.voxel_count * math.prod(geometry.spacing_mm) / 1000
        )


def test_masks_are_boolean_on_the_input_grid_and_nested() -> None:
    geometry = PhantomGeometry()
    hu = make_ct_volume(geometry)
    analysis = analyze_ct(hu, geometry.spacing_mm)
    body, lungs, bone = (analysis.structure(label).mask for label in ("body", "lungs", "bone"))
    for mask in (body, lungs, bone):
        assert mask.dtype == np.bool_
        assert mask.shape == hu.shape
        assert not mask.flags.writeable
    assert not (lungs & ~body).any()
    assert not (bone & ~body).any()
    assert not (lungs & bone).any()
    # no partial volume in the phantom: thresholds recover the voxelised structures exactly
    assert np.array_equal(lungs, hu == PhantomAnatomy().lung_hu)
    assert np.array_equal(bone, hu == PhantomAnatomy().bone_hu)
    assert np.array_equal(body, hu != -1000)
    # the two lungs are separate components, one on each side
    columns = np.nonzero(lungs.any(axis=(0, 1)))[0]
    assert columns.min() < hu.shape[2] // 2 < columns.max()
    assert not lungs[:, :, hu.shape[2] // 2].any()


def test_lungs_cut_by_the_first_and_last_slices_are_still_lungs() -> None:
    # a chest scan rarely covers the whole lungs; the body is then a tube open at both ends and
    # a 3-D hole fill would leave the lungs outside it
    geometry = PhantomGeometry()
    hu = make_ct_volume(geometry)[15:25]
    lung_hu = PhantomAnatomy().lung_hu
    assert (hu[0] == lung_hu).any() and (hu[-1] == lung_hu).any()

    analysis = analyze_ct(hu, geometry.spacing_mm)

    assert np.array_equal(analysis.structure("lungs").mask, hu == lung_hu)


def test_gas_pockets_outside_air_and_a_separate_table_are_excluded() -> None:
    geometry = PhantomGeometry()
    hu = make_ct_volume(geometry)
    expected_lungs = hu == PhantomAnatomy().lung_hu
    expected_body = hu != -1000
    # a ~1.4 mL gas pocket in the abdomen (below min_lung_component_ml) ...
    hu[18:20, 150:160, 120:130] = -900
    # ... and a table below the patient, not touching it
    hu[:, 245:250, 20:236] = 100

    analysis = analyze_ct(hu, geometry.spacing_mm)

    assert np.array_equal(analysis.structure("lungs").mask, expected_lungs)
    assert np.array_equal(analysis.structure("body").mask, expected_body)
    # max_lung_components=1 keeps the larger of the two (equal) lungs only
    one_lung = analyze_ct(hu, geometry.spacing_mm, params=CTAnalyzerParams(max_lung_components=1))
    assert one_lung.structure("lungs").voxel_count == pytest.approx(
        expected_lungs.sum() / 2, rel=0.01
    )


def test_volumes_scale_with_the_spacing_given() -> None:
    # guards the mL conversion: the same voxels with twice the slice spacing are twice the volume
    geometry = PhantomGeometry()
    hu = make_ct_volume(geometry)
    single = analyze_ct(hu, (5.0, 1.2, 1.2))
    double = analyze_ct(hu, (10.0, 1.2, 1.2))
    for a, b in zip(single.structures, double.structures, strict=True):
        assert b.volume_ml == pytest.approx(2 * a.volume_ml)
        assert b.voxel_count == a.voxel_count


def test_a_volume_without_lungs_reports_an_empty_structure() -> None:
    geometry = PhantomGeometry()
    hu = make_ct_volume(geometry, PhantomAnatomy(lung_hu=40))
    lungs = analyze_ct(hu, geometry.spacing_mm).structure("lungs")
    assert lungs.is_empty
    assert lungs.volume_ml == 0.0
    assert math.isnan(lungs.mean_hu)


def test_identity_constants() -> None:
    assert ANALYZER_NAME == "mednode-ct-analyzer"
    assert ANALYZER_VERSION == "1.0"


def _phantom_hu() -> np.ndarray:
    geometry = PhantomGeometry(rows=64, columns=64, pixel_spacing_mm=(5.0, 5.0), num_slices=36)
    return make_ct_volume(geometry, PhantomAnatomy().scaled(0.5))


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda: _phantom_hu()[0], "3-D volume"),
        (lambda: _phantom_hu()[None], "3-D volume"),
        (lambda: _phantom_hu()[:1], "at least 2 slices"),
        (lambda: _phantom_hu()[:, :4, :], "at least 8 rows and columns"),
        (lambda: _phantom_hu() > 0, "real numbers"),
        (lambda: _phantom_hu().astype(np.complex64), "real numbers"),
        (lambda: np.where(_phantom_hu() > 0, np.nan, -1000.0), "NaN"),
        (lambda: (_phantom_hu() + 1024).astype(np.uint16), "stored\npixel values"),
        (lambda: np.full((4, 16, 16), -1000, dtype=np.int16), "only air"),
        (lambda: _phantom_hu().tolist(), "numpy array"),
    ],
    ids=[
        "2d",
        "4d",
        "one-slice",
        "tiny-slices",
        "bool",
        "complex",
        "nan",
        "stored-values",
        "all-air",
        "list",
    ],
)
def test_unusable_volumes_are_refused_with_the_reason(make_input: object, message: str) -> None:
    with pytest.raises(InvalidInputError) as raised:
        analyze_ct(make_input(), (5.0, 5.0, 5.0))  # type: ignore[operator]
    assert message.replace("\n", " ") in str(raised.value)
    assert isinstance(raised.value, InferenceError) and isinstance(raised.value, ValueError)


@pytest.mark.parametrize(
    "spacing",
    [
        (0.0, 1.0, 1.0),
        (5.0, -1.0, 1.0),
        (5.0, 1.0, math.nan),
        (5.0, 1.0, math.inf),
        (5.0, 1.0),
        (5.0, 1.0, 1.0, 1.0),
        ("a", 1, 1),
        None,
    ],
    ids=["zero", "negative", "nan", "inf", "two", "four", "text", "none"],
)
def test_bad_spacing_is_refused(spacing: object) -> None:
    with pytest.raises(InvalidInputError, match="spacing_mm"):
        analyze_ct(_phantom_hu(), spacing)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"body_threshold_hu": 300.0},
        {"lung_threshold_hu": 300.0},
        {"min_lung_component_ml": -1.0},
        {"min_lung_component_ml": math.nan},
        {"max_lung_components": 0},
        {"max_lung_components": 3},
    ],
)
def test_inconsistent_params_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(InvalidInputError):
        CTAnalyzerParams(**kwargs)  # type: ignore[arg-type]


# -- slab by slab: the same masks and numbers as the whole-volume computation -------------------
def _whole_volume_reference(hu: np.ndarray, params: CTAnalyzerParams, voxel_ml: float) -> dict[str, np.ndarray]:
    """The analyzer as it was before it worked slab by slab (whole-volume labels in int32)."""
    from scipy import ndimage

    face = ndimage.generate_binary_structure(3, 1)
    in_plane = np.zeros((3, 3, 3), dtype=bool)
    in_plane[1] = ndimage.generate_binary_structure(2, 1)
    labels, count = ndimage.label(hu > params.body_threshold_hu, structure=face)
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    body = labels == int(sizes.argmax())
    holes, count = ndimage.label(~body, structure=in_plane)
    border = np.concatenate((holes[:, 0, :].ravel(), holes[:, -1, :].ravel(), holes[:, :, 0].ravel(),
                             holes[:, :, -1].ravel()))
    outside = np.zeros(count + 1, dtype=bool)
    outside[np.unique(border)] = True
    outside[0] = False
    body = ~outside[holes]
    labels, count = ndimage.label(body & (hu < params.lung_threshold_hu), structure=face)
    lungs = np.zeros(hu.shape, dtype=bool)
    if count:
        sizes = np.bincount(labels.ravel(), minlength=count + 1)
        sizes[0] = 0
        min_voxels = max(1, math.ceil(params.min_lung_component_ml / voxel_ml))
        largest = np.argsort(sizes, kind="stable")[::-1][: params.max_lung_components]
        keep = np.zeros(count + 1, dtype=bool)
        keep[np.asarray([label for label in largest if sizes[label] >= min_voxels], dtype=np.intp)] = True
        lungs = keep[labels]
    return {"body": body, "lungs": lungs, "bone": body & (hu > params.bone_threshold_hu)}


@pytest.mark.parametrize("slab_slices", [1, 3, 7, 64])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_slab_by_slab_masks_and_means_equal_the_whole_volume_computation(
    slab_slices: int, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # air pockets, tables and noise that cross slab borders in every direction: components
    # joined across borders, ties in size, the table as the second-largest component
    from inference.builtin import ct_analyzer

    monkeypatch.setattr(ct_analyzer, "SLAB_SLICES", slab_slices)
    rng = np.random.default_rng(seed)
    size = 40
    yy, xx = np.mgrid[:size, :size]
    hu = np.full((30, size, size), -1000, dtype=np.int16)
    hu[:, np.hypot(yy - 20, xx - 20) < 15] = 40
    hu[:, 37:39, 5:35] = 100  # a table, apart from the body
    for _ in range(8):
        cy, cx = rng.integers(10, 30, 2)
        z0, z1 = sorted(rng.integers(0, 30, 2))
        hu[z0 : z1 + 1, np.hypot(yy - cy, xx - cx) < rng.integers(1, 5)] = -850
    hu[:, np.hypot(yy - 20, xx - 20) < 3] = 700
    hu += rng.integers(-30, 31, hu.shape).astype(np.int16)
    hu[rng.random(hu.shape) < 0.002] = -900  # single-voxel air inside and outside
    spacing = (1.0, 1.0, 1.0)
    for params in (CTAnalyzerParams(min_lung_component_ml=0.0),
                   CTAnalyzerParams(min_lung_component_ml=0.005, max_lung_components=1)):
        expected = _whole_volume_reference(hu, params, voxel_ml=0.001)
        for volume in (hu, hu.astype(np.float32)):
            analysis = analyze_ct(volume, spacing, params=params)
            for stats in analysis.structures:
                mask = expected[stats.label]
                np.testing.assert_array_equal(stats.mask, mask, err_msg=stats.label)
                assert stats.voxel_count == int(mask.sum())
                if stats.voxel_count:
                    assert stats.mean_hu == float(hu[mask].mean(dtype=np.float64)), stats.label


@pytest.mark.parametrize("slab_slices", [1, 4, 64])
def test_ties_in_size_are_broken_as_on_the_whole_volume(slab_slices: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # two bodies of one size (the first in C order wins), and in it two air pockets of one size
    # that both span slab borders (max_lung_components=1 keeps the one the stable sort puts last)
    from inference.builtin import ct_analyzer

    monkeypatch.setattr(ct_analyzer, "SLAB_SLICES", slab_slices)
    hu = np.full((12, 30, 40), -1000, dtype=np.int16)
    hu[1:11, 5:25, 2:18] = 40
    hu[1:11, 5:25, 22:38] = 40
    for offset in (0, 20):  # the same pockets in both bodies keep them of one size
        hu[3:9, 10:14, 5 + offset : 8 + offset] = -900
        hu[3:9, 15:19, 10 + offset : 13 + offset] = -900
    params = CTAnalyzerParams(min_lung_component_ml=0.0, max_lung_components=1)
    expected = _whole_volume_reference(hu, params, voxel_ml=0.001)
    assert expected["body"][:, :, :20].any() and not expected["body"][:, :, 20:].any()
    analysis = analyze_ct(hu, (1.0, 1.0, 1.0), params=params)
    for stats in analysis.structures:
        np.testing.assert_array_equal(stats.mask, expected[stats.label], err_msg=stats.label)
    assert analysis.structure("lungs").voxel_count == 6 * 4 * 3
