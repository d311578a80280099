"""Segmentation with a MONAI bundle that is already on local disk.

A MONAI bundle is a directory::

    configs/metadata.json    # network_data_format: inputs, outputs (channel_def = label names)
    configs/inference.json   # network_def / network, preprocessing, inferer (.yaml also accepted)
    models/model.pt          # the network's state_dict

:meth:`MonaiBundle.load` parses the configs with :class:`monai.bundle.ConfigParser`, builds the
network, loads the weights with ``torch.load(..., weights_only=True)`` (no pickled code runs) and
keeps everything in memory; :meth:`MonaiBundle.segment` then runs one volume at a time. Nothing here
downloads: ``monai.bundle.download``/``load`` are never called, the bundle must be installed by the
administrator. Note that bundle configs may contain ``$`` expressions that MONAI evaluates as Python
when they are parsed: install only bundles from sources you trust, like any other code.

What is taken from the bundle and what is not:

- ``preprocessing`` runs as configured, except the transforms that read or write files
  (``LoadImage[d]``, ``SaveImage[d]``) and ``EnsureChannelFirst[d]``: the volume arrives as an array
  with a channel axis and an affine, exactly what those transforms would have produced.
- ``inferer`` runs as configured (a plain forward pass when absent).
- ``postprocessing`` is *not* used (it usually saves files): the logits become masks here, by
  argmax when channel 0 is ``background`` and by sigmoid > 0.5 per channel otherwise, and the
  preprocessing is inverted (nearest neighbour) so every mask lies on the input grid.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import Inferer, SimpleInferer
from monai.transforms import (
    Compose,
    EnsureChannelFirst,
    EnsureChannelFirstd,
    Invertd,
    LoadImage,
    LoadImaged,
    MapTransform,
    Orientation,
    Orientationd,
    SaveImage,
    SaveImaged,
)
from monai.transforms.utils import convert_applied_interp_mode
from monai.utils import optional_import

from inference.errors import InferenceError, InvalidInputError, ModelLoadError

logger = logging.getLogger(__name__)

METADATA_PATH = Path("configs/metadata.json")
INFERENCE_CONFIG_PATHS = (Path("configs/inference.json"), Path("configs/inference.yaml"))
WEIGHTS_PATH = Path("models/model.pt")

# Transforms that read/write files or add the channel axis; segment() hands over an in-memory,
# channel-first MetaTensor instead.
_SKIPPED_TRANSFORMS = (
    LoadImage,
    LoadImaged,
    SaveImage,
    SaveImaged,
    EnsureChannelFirst,
    EnsureChannelFirstd,
)
_PRED_KEY = "pred"
_, _HAS_NIBABEL = optional_import("nibabel")
_BACKGROUND = "background"
# LPS (DICOM) <-> RAS (what MONAI's readers produce by default) for a 4x4 affine.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
# index (col, row, slice, 1) -> index (slice, row, col, 1)
_MONAI_TO_DICOM_INDEX = np.array(
    [[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float
)


class MonaiBundle:
    """A MONAI segmentation bundle loaded once and kept in memory.

    Build it with :meth:`load`. Attributes are read-only by convention.

    Attributes
    ----------
    bundle_dir
        The directory it was loaded from.
    name, version
        ``name`` and ``version`` from ``metadata.json`` (empty when absent).
    labels
        Output channel index -> name, from ``network_data_format.outputs.<pred>.channel_def``.
    device
        Torch device the network runs on.
    """

    def __init__(
        self,
        *,
        bundle_dir: Path,
        name: str,
        version: str,
        labels: dict[int, str],
        network: torch.nn.Module,
        inferer: Inferer,
        preprocessing: Compose | None,
        input_key: str,
        device: torch.device,
    ) -> None:
        self.bundle_dir = bundle_dir
        self.name = name
        self.version = version
        self.labels = labels
        self.device = device
        self._network = network
        self._inferer = inferer
        self._preprocessing = preprocessing
        self._input_key = input_key
        self._exclusive = labels.get(0, "").lower() == _BACKGROUND

    @classmethod
    def load(cls, bundle_dir: Path, *, device: str = "cpu") -> MonaiBundle:
        """Parse the bundle's configs, build its network and load its weights.

        Parameters
        ----------
        bundle_dir
            Bundle root (the directory holding ``configs/`` and ``models/``).
        device
            Torch device string, e.g. ``"cpu"`` or ``"cuda:0"``.

        Raises
        ------
        ModelLoadError
            If a required file is missing, ``metadata.json`` is not JSON or has no usable
            ``channel_def``, the config defines neither ``network_def`` nor ``network`` or cannot be
            parsed, ``models/model.pt`` is not a plain state_dict (``weights_only`` load), its keys or
            shapes do not match the network, or ``device`` is not usable.
        """
        bundle_dir = Path(bundle_dir)
        metadata_file = bundle_dir / METADATA_PATH
        weights_file = bundle_dir / WEIGHTS_PATH
        config_file = next(
            (bundle_dir / p for p in INFERENCE_CONFIG_PATHS if (bundle_dir / p).is_file()), None
        )
        missing = [
            str(path.relative_to(bundle_dir))
            for path in (metadata_file, weights_file)
            if not path.is_file()
        ]
        if config_file is None:
            missing.append(" or ".join(str(p) for p in INFERENCE_CONFIG_PATHS))
        if missing:
            raise ModelLoadError(
                f"MONAI bundle {bundle_dir} is incomplete: missing {', '.join(missing)}. A bundle needs "
                f"{METADATA_PATH}, {INFERENCE_CONFIG_PATHS[0]} and {WEIGHTS_PATH} (a state_dict); "
                "fetch it with `python -m monai.bundle download` on a machine with network access and copy it here."
            )
        assert config_file is not None  # for mypy: missing would have listed it

        torch_device = _torch_device(device)
        metadata = _read_metadata(metadata_file)
        input_key = _input_key(metadata)
        labels = _labels(metadata, metadata_file)

        parser = ConfigParser()
        try:
            parser.read_meta(metadata_file)
            parser.read_config(config_file)
            parser["bundle_root"] = str(bundle_dir)
            parser["device"] = torch_device
            network_id = next((key for key in ("network_def", "network") if key in parser), None)
            if network_id is None:
                raise ModelLoadError(
                    f"{config_file} defines neither 'network_def' nor 'network'; add the network's "
                    "'_target_' and arguments under 'network_def'."
                )
            network = parser.get_parsed_content(network_id)
            preprocessing = (
                parser.get_parsed_content("preprocessing") if "preprocessing" in parser else None
            )
            inferer = (
                parser.get_parsed_content("inferer") if "inferer" in parser else SimpleInferer()
            )
        except ModelLoadError:
            raise
        except Exception as exc:  # boundary: a bundle config can fail in any way MONAI/torch can
            raise ModelLoadError(
                f"cannot parse the MONAI bundle config {config_file}: {exc}"
            ) from exc
        if not isinstance(network, torch.nn.Module):
            raise ModelLoadError(
                f"'{network_id}' in {config_file} builds a {type(network).__name__}, not a torch.nn.Module."
            )
        if not isinstance(inferer, Inferer):
            raise ModelLoadError(
                f"'inferer' in {config_file} builds a {type(inferer).__name__}, not a MONAI Inferer."
            )

        state_dict = _read_state_dict(weights_file, torch_device)
        try:
            network.load_state_dict(state_dict, strict=True)
        except RuntimeError as exc:
            raise ModelLoadError(
                f"{weights_file} does not fit the network '{network_id}' of {config_file}: {exc}"
            ) from exc
        try:
            network = network.to(torch_device).train(False)  # inference mode (dropout, batch norm)
        except (RuntimeError, AssertionError) as exc:
            raise ModelLoadError(
                f"cannot move the network of {bundle_dir} to {torch_device}: {exc}"
            ) from exc

        bundle = cls(
            bundle_dir=bundle_dir,
            name=str(metadata.get("name", "")),
            version=str(metadata.get("version", "")),
            labels=labels,
            network=network,
            inferer=inferer,
            preprocessing=_without_io_transforms(preprocessing, config_file),
            input_key=input_key,
            device=torch_device,
        )
        logger.info(
            "loaded MONAI bundle %s %s from %s on %s (labels %s)",
            bundle.name or "(unnamed)",
            bundle.version,
            bundle_dir,
            torch_device,
            labels,
        )
        return bundle

    def segment(
        self,
        volume: np.ndarray,
        spacing_mm: Sequence[float],
        *,
        affine_lps: np.ndarray | None = None,
    ) -> dict[str, np.ndarray]:
        """Segment one volume; return a boolean mask per non-background label on the input grid.

        Parameters
        ----------
        volume
            Intensities (HU for CT), shape (slices, rows, columns), the layout of ``dicom_io`` volumes.
        spacing_mm
            (slice, row, column) spacing in mm.
        affine_lps
            Optional 4x4 matrix from (slice, row, column, 1) indices to patient LPS mm (``Volume.affine``
            of ``dicom_io``). Without it the volume is taken as a standard axial stack (rows along +y,
            columns along +x, slices along +z), which orientation-aware bundles need to know.

        Returns
        -------
        dict
            Label name -> ``bool`` array of ``volume.shape``, one entry per output channel except a
            channel 0 named ``background``, in channel order.

        Raises
        ------
        InvalidInputError
            If ``volume`` is not a finite 3-D real array, ``spacing_mm`` not three positive numbers, or
            ``affine_lps`` not an invertible 4x4 matrix.
        InferenceError
            If the network's output has a different number of channels than ``channel_def`` names,
            or the preprocessing changed the grid in a way that cannot be inverted.
        """
        array = _validated_volume(volume)
        image = as_monai_image(array, spacing_mm, affine_lps=affine_lps)
        processed = self._preprocess(image)
        with torch.inference_mode():
            output = self._inferer(inputs=processed[None].to(self.device), network=self._network)
        logits = _first_tensor(output)[0].detach().float().cpu()
        expected = max(self.labels) + 1
        if logits.shape[0] != expected:
            raise InferenceError(
                f"bundle {self.bundle_dir} produced {logits.shape[0]} output channels but its channel_def "
                f"names {expected}; fix network_data_format.outputs in metadata.json."
            )
        if self._exclusive:
            prediction = logits.argmax(dim=0, keepdim=True).float()
        else:
            prediction = (torch.sigmoid(logits) > 0.5).float()
        restored = self._invert(prediction, processed)
        if tuple(restored.shape[1:]) != array.shape[::-1]:
            raise InferenceError(
                f"bundle {self.bundle_dir} preprocessing changed the grid from {array.shape[::-1]} to "
                f"{tuple(restored.shape[1:])} and could not be inverted; use invertible spatial transforms."
            )
        restored_np = np.rint(restored.numpy()).astype(np.int64).transpose(0, 3, 2, 1)

        masks: dict[str, np.ndarray] = {}
        for channel, name in sorted(self.labels.items()):
            if self._exclusive:
                if channel == 0:
                    continue
                masks[name] = restored_np[0] == channel
            else:
                masks[name] = restored_np[channel] > 0
        return masks

    def _preprocess(self, image: MetaTensor) -> MetaTensor:
        if self._preprocessing is None:
            return image
        try:
            if _is_dictionary(self._preprocessing):
                result = self._preprocessing({self._input_key: image})[self._input_key]
            else:
                result = self._preprocessing(image)
        except (RuntimeError, ValueError, KeyError) as exc:
            # MONAI wraps the real error as "applying transform <...>": name both
            raise InferenceError(
                f"preprocessing of bundle {self.bundle_dir} failed: {exc} ({exc.__cause__!r})"
            ) from exc
        if not isinstance(result, MetaTensor):
            result = MetaTensor(torch.as_tensor(result))
        return result

    def _invert(self, prediction: torch.Tensor, processed: MetaTensor) -> torch.Tensor:
        if self._preprocessing is None or not processed.applied_operations:
            return prediction
        if _is_dictionary(self._preprocessing):
            inverter = Invertd(
                keys=_PRED_KEY,
                transform=self._preprocessing,
                orig_keys=self._input_key,
                nearest_interp=True,
            )
            data: dict[Hashable, torch.Tensor] = {self._input_key: processed, _PRED_KEY: prediction}
            inverted = inverter(data)[_PRED_KEY]
        else:
            pred = MetaTensor(prediction, meta=deepcopy(processed.meta))  # meta holds the affine
            pred.applied_operations = convert_applied_interp_mode(
                deepcopy(processed.applied_operations), mode="nearest", align_corners=None
            )
            inverted = self._preprocessing.inverse(pred)
        return torch.as_tensor(inverted).detach().cpu()


def as_monai_image(
    volume: np.ndarray, spacing_mm: Sequence[float], *, affine_lps: np.ndarray | None = None
) -> MetaTensor:
    """The channel-first MetaTensor that MONAI's readers would give for this volume.

    MONAI readers (``LoadImage`` with ITK, NIfTI or pydicom readers) return arrays indexed
    (x, y, z) = (column, row, slice) with a RAS affine; bundles are trained on that, so the
    (slice, row, column) LPS volume of ``dicom_io`` is transposed and its affine converted.

    Raises
    ------
    InvalidInputError
        If ``spacing_mm`` is not three positive numbers or ``affine_lps`` not an invertible 4x4 matrix.
    """
    affine = _ras_affine(spacing_mm, affine_lps)
    pixels = np.ascontiguousarray(volume.transpose(2, 1, 0), dtype=np.float32)
    return MetaTensor(
        torch.from_numpy(pixels)[None],
        affine=torch.from_numpy(affine),
        meta={"space": "RAS", "original_affine": affine.copy(), "spatial_shape": pixels.shape},
    )


def _torch_device(device: str) -> torch.device:
    try:
        torch_device = torch.device(device)
        torch.empty(1, device=torch_device)
    except (RuntimeError, AssertionError) as exc:
        raise ModelLoadError(f"device {device!r} is not usable here: {exc}") from exc
    return torch_device


def _read_metadata(metadata_file: Path) -> dict[str, Any]:
    try:
        metadata = json.loads(metadata_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {metadata_file} as JSON: {exc}") from exc
    if not isinstance(metadata, dict):
        raise ModelLoadError(
            f"{metadata_file} must hold a JSON object, got {type(metadata).__name__}."
        )
    return metadata


def _network_data_format(metadata: Mapping[str, Any], part: str) -> Mapping[str, Any]:
    section = metadata.get("network_data_format", {})
    value = section.get(part, {}) if isinstance(section, Mapping) else {}
    return value if isinstance(value, Mapping) else {}


def _input_key(metadata: Mapping[str, Any]) -> str:
    inputs = _network_data_format(metadata, "inputs")
    return str(next(iter(inputs), "image"))


def _labels(metadata: Mapping[str, Any], metadata_file: Path) -> dict[int, str]:
    outputs = _network_data_format(metadata, "outputs")
    if not outputs:
        raise ModelLoadError(
            f"{metadata_file} has no network_data_format.outputs; it must name the output channels."
        )
    key = _PRED_KEY if _PRED_KEY in outputs else next(iter(outputs))
    output = outputs[key]
    channel_def = output.get("channel_def") if isinstance(output, Mapping) else None
    if not isinstance(channel_def, Mapping) or not channel_def:
        raise ModelLoadError(
            f"{metadata_file} has no network_data_format.outputs.{key}.channel_def; add one like "
            '{"0": "background", "1": "liver"} so the masks can be named.'
        )
    try:
        labels = {int(channel): str(name) for channel, name in channel_def.items()}
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(
            f"channel_def in {metadata_file} must map channel numbers to names: {exc}"
        ) from exc
    if sorted(labels) != list(range(len(labels))):
        raise ModelLoadError(
            f"channel_def in {metadata_file} must number the channels 0..{len(labels) - 1}, got {sorted(labels)}."
        )
    if len(set(labels.values())) != len(labels):
        raise ModelLoadError(f"channel_def in {metadata_file} repeats a name: {labels}.")
    return labels


def _read_state_dict(weights_file: Path, device: torch.device) -> Mapping[str, torch.Tensor]:
    try:
        checkpoint = torch.load(weights_file, map_location=device, weights_only=True)
    except Exception as exc:  # boundary: torch.load raises many types for bad files
        raise ModelLoadError(
            f"cannot load {weights_file} as weights only ({type(exc).__name__}: {exc}); it must be a "
            "state_dict saved with torch.save(model.state_dict(), path), not a pickled model or TorchScript."
        ) from exc
    if isinstance(checkpoint, Mapping):
        for wrapper in ("model", "state_dict", "network"):
            inner = checkpoint.get(wrapper)
            if isinstance(inner, Mapping):
                checkpoint = inner
                break
        if checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
            return checkpoint
    raise ModelLoadError(
        f"{weights_file} holds a {type(checkpoint).__name__} that is not a state_dict of tensors "
        "(nor one under a 'model'/'state_dict' key)."
    )


def _without_io_transforms(preprocessing: object, config_file: Path) -> Compose | None:
    if preprocessing is None:
        return None
    if isinstance(preprocessing, Compose):
        transforms = list(preprocessing.transforms)
    elif isinstance(preprocessing, Sequence):
        transforms = list(preprocessing)
    elif callable(preprocessing):
        transforms = [preprocessing]
    else:
        raise ModelLoadError(
            f"'preprocessing' in {config_file} builds a {type(preprocessing).__name__}, not a Compose."
        )
    kept = [t for t in transforms if not isinstance(t, _SKIPPED_TRANSFORMS)]
    if any(isinstance(t, (Orientation, Orientationd)) for t in kept) and not _HAS_NIBABEL:
        raise ModelLoadError(
            f"the preprocessing in {config_file} reorients images, which MONAI does with nibabel; "
            "install nibabel in mednode's environment."
        )
    return Compose(kept) if kept else None


def _is_dictionary(compose: Compose) -> bool:
    return any(isinstance(t, MapTransform) for t in compose.transforms)


def _validated_volume(volume: object) -> np.ndarray:
    if not isinstance(volume, np.ndarray) or volume.ndim != 3:
        shape = getattr(volume, "shape", None)
        raise InvalidInputError(
            f"volume must be a 3-D numpy array (slices, rows, columns), got shape {shape}."
        )
    if volume.dtype == np.bool_ or not (
        np.issubdtype(volume.dtype, np.integer) or np.issubdtype(volume.dtype, np.floating)
    ):
        raise InvalidInputError(f"volume must hold real numbers, got dtype {volume.dtype}.")
    if min(volume.shape) < 1:
        raise InvalidInputError(f"volume is empty: shape {volume.shape}.")
    if np.issubdtype(volume.dtype, np.floating) and not np.isfinite(volume).all():
        raise InvalidInputError("volume contains NaN or infinite values.")
    return volume


def _ras_affine(spacing_mm: Sequence[float], affine_lps: np.ndarray | None) -> np.ndarray:
    """The RAS affine of the (column, row, slice) array that MONAI transforms see."""
    try:
        spacing = [float(v) for v in spacing_mm]
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"spacing_mm must be three numbers, got {spacing_mm!r}.") from exc
    if len(spacing) != 3 or not all(math.isfinite(v) and v > 0 for v in spacing):
        raise InvalidInputError(
            f"spacing_mm must be three finite positive numbers (slice, row, column), got {spacing}."
        )
    if affine_lps is None:
        # standard axial stack: slices along +z, rows along +y, columns along +x (LPS)
        dicom_affine = np.eye(4)
        dicom_affine[:3, :3] = [
            [0.0, 0.0, spacing[2]],
            [0.0, spacing[1], 0.0],
            [spacing[0], 0.0, 0.0],
        ]
    else:
        dicom_affine = np.asarray(affine_lps, dtype=float)
        if (
            dicom_affine.shape != (4, 4)
            or not np.isfinite(dicom_affine).all()
            or abs(np.linalg.det(dicom_affine)) < 1e-9
        ):
            raise InvalidInputError(
                f"affine_lps must be an invertible 4x4 matrix, got {dicom_affine.tolist()}."
            )
    return _LPS_TO_RAS @ dicom_affine @ _MONAI_TO_DICOM_INDEX


def _first_tensor(output: object) -> torch.Tensor:
    """The logits of an inferer's output (a tensor, or the first of a tuple/list/dict of them)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (list, tuple)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    if isinstance(output, Mapping) and output:
        first = next(iter(output.values()))
        if isinstance(first, torch.Tensor):
            return first
    raise InferenceError(
        f"the bundle's inferer returned {type(output).__name__}, not a tensor of logits."
    )
