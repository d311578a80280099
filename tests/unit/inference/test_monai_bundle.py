"""MONAI bundles built offline in tmp dirs load through MonaiBundle.load and segment on the input grid.

Two kinds of bundle, both real MONAI/torch architectures with configs in the layout of the MONAI
model zoo:

- a tiny 3-D ``UNet`` with random weights (shapes, labels, plumbing);
- a 1x1x1 ``torch.nn.Conv3d`` whose weights are set by hand to threshold the scaled intensity, so its
  masks are known in advance: this checks that orientation, resampling and their inversion put
  every mask back on the input grid, unflipped and unshifted.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.networks.nets import UNet

from inference.errors import InferenceError, InvalidInputError, ModelLoadError
from inference.monai_bundle import MonaiBundle, as_monai_image
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series

UNET_ARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [4, 8, 16],
    "strides": [2, 2],
    "num_res_units": 1,
}
UNET_LABELS = {"0": "background", "1": "lungs", "2": "bone"}


def _metadata(channel_def: dict[str, str] | None, name: str = "tiny_bundle") -> dict[str, Any]:
    pred: dict[str, Any] = {
        "type": "image",
        "format": "segmentation",
        "num_channels": len(channel_def or {}),
        "dtype": "float32",
        "is_patch_data": True,
    }
    if channel_def is not None:
        pred["channel_def"] = channel_def
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "name": name,
        "monai_version": "1.6.1",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "hounsfield",
                    "num_channels": 1,
                    "dtype": "float32",
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {"pred": pred},
        },
    }


def _dict_preprocessing(pixdim: list[float]) -> dict[str, Any]:
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImaged", "keys": "image"},
            {"_target_": "EnsureChannelFirstd", "keys": "image"},
            {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
            {"_target_": "Spacingd", "keys": "image", "pixdim": pixdim, "mode": "bilinear"},
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "image",
                "a_min": -1000,
                "a_max": 1000,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },
            {"_target_": "EnsureTyped", "keys": "image"},
        ],
    }


def _array_preprocessing(pixdim: list[float]) -> dict[str, Any]:
    return {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "LoadImage", "image_only": True},
            {"_target_": "EnsureChannelFirst"},
            {"_target_": "Orientation", "axcodes": "RAS"},
            {"_target_": "Spacing", "pixdim": pixdim, "mode": "bilinear"},
            {
                "_target_": "ScaleIntensityRange",
                "a_min": -1000,
                "a_max": 1000,
                "b_min": 0.0,
                "b_max": 1.0,
                "clip": True,
            },
        ],
    }


def _inference_config(
    network_def: dict[str, Any], preprocessing: dict[str, Any], inferer: dict[str, Any]
) -> dict[str, Any]:
    # the shape of a model-zoo inference.json, including the parts mednode must not touch
    # (dataset paths, postprocessing that writes files)
    return {
        "imports": ["$import glob", "$import os", "$import torch"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "dataset_dir": "/workspace/data/does-not-exist",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/*.nii.gz')))",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "preprocessing": preprocessing,
        "inferer": inferer,
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir"},
            ],
        },
    }


def write_bundle(
    root: Path,
    *,
    metadata: dict[str, Any],
    config: dict[str, Any] | str,
    state: object,
) -> Path:
    """Write a bundle directory: configs/metadata.json, configs/inference.json, models/model.pt."""
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    (root / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2))
    text = config if isinstance(config, str) else json.dumps(config, indent=2)
    (root / "configs" / "inference.json").write_text(text)
    torch.save(state, root / "models" / "model.pt")
    return root


def build_unet_bundle(root: Path, *, seed: int = 0) -> Path:
    """A tiny 3-D UNet bundle with random weights (seeded)."""
    torch.manual_seed(seed)
    network = UNet(**UNET_ARGS)
    config = _inference_config(
        {"_target_": "UNet", **UNET_ARGS},
        _dict_preprocessing([1.5, 1.5, 2.0]),
        {
            "_target_": "SlidingWindowInferer",
            "roi_size": [32, 32, 16],
            "sw_batch_size": 2,
            "overlap": 0.25,
        },
    )
    return write_bundle(
        root, metadata=_metadata(UNET_LABELS), config=config, state=network.state_dict()
    )


def build_threshold_bundle(root: Path, *, exclusive: bool, dictionary: bool) -> Path:
    """A Conv3d 1x1x1 bundle whose output is known: thresholds of the intensity scaled to 0..1.

    ``exclusive``: channels background / dense (x > 0.5, i.e. HU > 0), decided by argmax.
    otherwise: channels dense (HU > 0) / air (x < 0.2, i.e. HU < -600), sigmoid per channel.
    """
    conv = torch.nn.Conv3d(1, 2, kernel_size=1)
    assert conv.bias is not None
    with torch.no_grad():
        if exclusive:
            conv.weight[:, 0, 0, 0, 0] = torch.tensor([-10.0, 10.0])
            conv.bias[:] = torch.tensor([5.0, -5.0])
            labels = {"0": "background", "1": "dense"}
        else:
            conv.weight[:, 0, 0, 0, 0] = torch.tensor([20.0, -20.0])
            conv.bias[:] = torch.tensor([-10.0, 4.0])
            labels = {"0": "dense", "1": "air"}
    pixdim = [1.0, 1.1, 2.0]  # (x, y, z) in RAS: differs from the input on every axis
    preprocessing = _dict_preprocessing(pixdim) if dictionary else _array_preprocessing(pixdim)
    config = _inference_config(
        {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 2, "kernel_size": 1},
        preprocessing,
        {"_target_": "SimpleInferer"},
    )
    return write_bundle(root, metadata=_metadata(labels), config=config, state=conv.state_dict())


def _asymmetric_volume() -> np.ndarray:
    """(slices, rows, columns) HU volume: air, an off-centre dense block, an off-centre air pocket.

    Nothing is symmetric, so a flip or transposition of any axis moves the masks.
    """
    volume = np.full((20, 48, 40), -300.0, dtype=np.float32)
    volume[3:13, 5:21, 24:37] = 400.0
    volume[13:19, 28:44, 3:13] = -900.0
    return volume


SPACING = (2.5, 1.0, 1.2)


@pytest.fixture(scope="module")
def unet_bundle(tmp_path_factory: pytest.TempPathFactory) -> MonaiBundle:
    return MonaiBundle.load(build_unet_bundle(tmp_path_factory.mktemp("unet")))


def test_unet_bundle_loads_with_its_labels_and_metadata(unet_bundle: MonaiBundle) -> None:
    assert unet_bundle.labels == {0: "background", 1: "lungs", 2: "bone"}
    assert unet_bundle.name == "tiny_bundle"
    assert unet_bundle.version == "0.1.0"
    assert unet_bundle.device == torch.device("cpu")


def test_unet_bundle_segments_onto_the_input_grid(unet_bundle: MonaiBundle) -> None:
    volume = np.random.default_rng(0).normal(0.0, 300.0, size=(12, 40, 36)).astype(np.float32)
    masks = unet_bundle.segment(volume, (3.0, 0.8, 0.8))

    assert list(masks) == ["lungs", "bone"]
    for mask in masks.values():
        assert mask.dtype == np.bool_
        assert mask.shape == volume.shape
    assert not (masks["lungs"] & masks["bone"]).any()  # argmax: labels are exclusive


def test_weights_are_the_saved_ones(tmp_path: Path, unet_bundle: MonaiBundle) -> None:
    # same seed, same weights: the bundle's weights were really loaded, not left at random init
    torch.manual_seed(0)
    reference = UNet(**UNET_ARGS).state_dict()
    loaded = unet_bundle._network.state_dict()
    assert all(torch.equal(reference[k], loaded[k].cpu()) for k in reference)


@pytest.mark.parametrize("dictionary", [True, False], ids=["dict-transforms", "array-transforms"])
@pytest.mark.parametrize("exclusive", [True, False], ids=["argmax", "sigmoid"])
def test_masks_are_resampled_back_without_flip_or_shift(
    exclusive: bool, dictionary: bool, tmp_path: Path
) -> None:
    bundle = MonaiBundle.load(
        build_threshold_bundle(tmp_path, exclusive=exclusive, dictionary=dictionary)
    )
    volume = _asymmetric_volume()

    masks = bundle.segment(volume, SPACING)

    expected = {"dense": volume > 0}
    if not exclusive:
        expected["air"] = volume < -600
    assert list(masks) == list(expected)
    for name, truth in expected.items():
        mask = masks[name]
        assert mask.shape == volume.shape
        dice = 2 * (mask & truth).sum() / (mask.sum() + truth.sum())
        assert dice > 0.9, (name, dice)
        centroid = np.argwhere(mask).mean(axis=0)
        assert np.allclose(centroid, np.argwhere(truth).mean(axis=0), atol=1.0), (name, centroid)


def test_a_non_axial_affine_is_honoured(tmp_path: Path) -> None:
    # feet-first stack (slices along -z) with rows along -y: orientation transforms flip two axes
    # and the inversion must flip them back
    bundle = MonaiBundle.load(build_threshold_bundle(tmp_path, exclusive=True, dictionary=True))
    volume = _asymmetric_volume()
    affine = np.array(
        [
            [0.0, 0.0, 1.2, -20.0],
            [0.0, -1.0, 0.0, 30.0],
            [-2.5, 0.0, 0.0, 100.0],
            [0.0, 0.0, 0.0, 1.0],
        ]
    )
    mask = bundle.segment(volume, SPACING, affine_lps=affine)["dense"]
    truth = volume > 0
    assert 2 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.9
    assert np.allclose(np.argwhere(mask).mean(axis=0), np.argwhere(truth).mean(axis=0), atol=1.0)


def test_the_network_sees_what_monai_readers_give_for_the_dicom_series(tmp_path: Path) -> None:
    # bundles are trained on LoadImage output; our in-memory image must be the same array with the
    # same affine, or an orientation-aware bundle would see a mirrored patient
    from monai.transforms import EnsureChannelFirst, LoadImage, Orientation

    volume = _asymmetric_volume()
    geometry = PhantomGeometry(
        rows=48,
        columns=40,
        pixel_spacing_mm=(SPACING[1], SPACING[2]),
        slice_spacing_mm=SPACING[0],
        num_slices=20,
    )
    datasets = make_ct_phantom(geometry=geometry, hu=volume.astype(np.int16))
    write_series(datasets, tmp_path / "series")
    reference = EnsureChannelFirst()(
        LoadImage(reader="PydicomReader", image_only=True)(tmp_path / "series")
    )
    assert isinstance(reference, MetaTensor)

    affine_lps = np.eye(4)
    affine_lps[:3, 0] = (0.0, 0.0, SPACING[0])  # slice axis along +z
    affine_lps[:3, 1] = (0.0, SPACING[1], 0.0)  # rows along +y
    affine_lps[:3, 2] = (SPACING[2], 0.0, 0.0)  # columns along +x
    affine_lps[:3, 3] = [float(v) for v in datasets[0].ImagePositionPatient]
    ours = as_monai_image(volume, SPACING, affine_lps=affine_lps)

    assert ours.shape == reference.shape
    assert np.allclose(ours.affine.numpy(), reference.affine.numpy())
    assert np.array_equal(ours.numpy(), reference.numpy())
    oriented = Orientation("RAS")
    assert np.array_equal(oriented(ours).numpy(), oriented(reference).numpy())
    # without an affine only the origin is unknown
    assert np.allclose(
        as_monai_image(volume, SPACING).affine.numpy()[:3, :3], reference.affine.numpy()[:3, :3]
    )


def test_unusable_input_is_refused(unet_bundle: MonaiBundle) -> None:
    with pytest.raises(InvalidInputError, match="3-D"):
        unet_bundle.segment(np.zeros((8, 8), dtype=np.float32), SPACING)
    with pytest.raises(InvalidInputError, match="spacing_mm"):
        unet_bundle.segment(_asymmetric_volume(), (0.0, 1.0, 1.0))
    with pytest.raises(InvalidInputError, match="NaN"):
        unet_bundle.segment(np.full((4, 8, 8), np.nan, dtype=np.float32), SPACING)
    with pytest.raises(InvalidInputError, match="affine_lps"):
        unet_bundle.segment(_asymmetric_volume(), SPACING, affine_lps=np.zeros((4, 4)))


def test_a_channel_count_that_contradicts_channel_def_is_an_inference_error(tmp_path: Path) -> None:
    bundle_dir = build_threshold_bundle(tmp_path, exclusive=True, dictionary=True)
    metadata = _metadata({"0": "background", "1": "dense", "2": "extra"})
    (bundle_dir / "configs" / "metadata.json").write_text(json.dumps(metadata))
    bundle = MonaiBundle.load(bundle_dir)
    with pytest.raises(InferenceError, match="3"):
        bundle.segment(_asymmetric_volume(), SPACING)


def test_a_failing_preprocessing_is_an_inference_error(tmp_path: Path) -> None:
    root = build_threshold_bundle(tmp_path, exclusive=True, dictionary=True)
    _edit_config(
        root,
        lambda c: c["preprocessing"]["transforms"].append(
            {"_target_": "CopyItemsd", "keys": "label", "names": "label_copy"}
        ),
    )
    bundle = MonaiBundle.load(root)
    with pytest.raises(InferenceError, match="preprocessing of bundle"):
        bundle.segment(_asymmetric_volume(), SPACING)


def _break_missing_weights(root: Path) -> None:
    (root / "models" / "model.pt").unlink()


def _break_missing_metadata(root: Path) -> None:
    (root / "configs" / "metadata.json").unlink()


def _break_no_channel_def(root: Path) -> None:
    (root / "configs" / "metadata.json").write_text(json.dumps(_metadata(None)))


def _break_metadata_json(root: Path) -> None:
    (root / "configs" / "metadata.json").write_text("{not json")


def _break_config_json(root: Path) -> None:
    (root / "configs" / "inference.json").write_text('{"network_def": ')


def _edit_config(root: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    path = root / "configs" / "inference.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _break_no_network(root: Path) -> None:
    _edit_config(root, lambda c: (c.pop("network_def"), c.pop("network")))


def _break_unknown_target(root: Path) -> None:
    _edit_config(root, lambda c: c["network_def"].update({"_target_": "NoSuchNetwork"}))


def _break_wrong_shapes(root: Path) -> None:
    torch.save(
        UNet(**{**UNET_ARGS, "channels": [8, 16, 32]}).state_dict(), root / "models" / "model.pt"
    )


def _break_pickled_model(root: Path) -> None:
    torch.save(UNet(**UNET_ARGS), root / "models" / "model.pt")


def _break_not_a_state_dict(root: Path) -> None:
    torch.save({"epoch": 3, "metric": 0.9}, root / "models" / "model.pt")


@pytest.mark.parametrize(
    ("break_bundle", "message"),
    [
        (_break_missing_weights, "missing models/model.pt"),
        (_break_missing_metadata, "missing configs/metadata.json"),
        (_break_no_channel_def, "channel_def"),
        (_break_metadata_json, "as JSON"),
        (_break_config_json, "cannot parse"),
        (_break_no_network, "neither 'network_def' nor 'network'"),
        (_break_unknown_target, "cannot parse"),
        (_break_wrong_shapes, "does not fit the network"),
        (_break_pickled_model, "weights only"),
        (_break_not_a_state_dict, "not a state_dict"),
    ],
    ids=lambda value: getattr(value, "__name__", "").removeprefix("_break_") or None,
)
def test_broken_bundles_raise_model_load_error(
    break_bundle: Callable[[Path], None], message: str, tmp_path: Path
) -> None:
    root = build_unet_bundle(tmp_path / "bundle")
    break_bundle(root)
    with pytest.raises(ModelLoadError, match=message) as raised:
        MonaiBundle.load(root)
    assert isinstance(raised.value, OSError)


def test_an_unusable_device_is_a_model_load_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="device"):
        MonaiBundle.load(build_unet_bundle(tmp_path / "bundle"), device="nonsense:0")
