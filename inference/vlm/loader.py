"""Loading a vision-language checkpoint from a local directory, once per process.

``load_vlm`` always loads; ``get_vlm`` keeps one loaded model per configuration for the life of
the worker process (a GPU worker must not reload weights per task). Nothing here reaches the
network: every ``from_pretrained`` runs with ``local_files_only=True``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from inference.errors import ModelLoadError
from inference.results import ModelInfo
from inference.vlm.families import FAMILIES, Family, get_family

if TYPE_CHECKING:
    import torch

    from inference.vlm.runtime import VLM

logger = logging.getLogger(__name__)

DType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass(frozen=True)
class VLMConfig:
    """Where a vision-language model is and how to run it.

    Attributes
    ----------
    path : str
        Local checkpoint directory (``config.json``, weights, processor files).
    family : str
        Family adapter name, see :data:`inference.vlm.families.FAMILIES`.
    dtype : {"auto", "float32", "bfloat16", "float16"}
        ``auto``: bfloat16 on CUDA when supported (else float16), float32 on CPU.
    device : str
        ``auto`` (CUDA when available), ``cpu``, ``cuda``, ``cuda:1``...
    trust_remote_code : bool
        Allow modelling code shipped inside the checkpoint. Off unless the config says so.
    max_new_tokens : int
        Default token budget per generation (a task's own budget wins).
    batch_size : int
        Prompts per ``generate`` call, for families that batch.
    image_size : int or None
        Override of the model input size (default: what the processor states).
    name : str or None
        Model name for the SR's algorithm identification (default: directory name).
    cpu_max_weights_mb : int or None
        With ``device: auto`` and no CUDA device, refuse checkpoints whose weight files are larger
        than this (a 4B model on a CPU takes minutes per study; it is almost always a worker started
        on the wrong host). ``device: cpu`` runs any size; None never refuses.
    """

    path: str
    family: str
    dtype: DType = "auto"
    device: str = "auto"
    trust_remote_code: bool = False
    max_new_tokens: int = 256
    batch_size: int = 4
    image_size: int | None = None
    name: str | None = None
    cpu_max_weights_mb: int | None = 2048

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) and batch_size "
                             f"({self.batch_size}) must be positive.")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}.")


def _resolve_device_and_dtype(cfg: VLMConfig) -> tuple[str, torch.dtype]:
    import torch

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"Model config asks for device {device!r} but no CUDA device is available; "
                             "set device: cpu (or auto).")
    if cfg.dtype == "auto":
        if device.startswith("cuda"):
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        else:
            dtype = torch.float32  # bf16 on CPU is slower than fp32 here
    else:
        dtype = getattr(torch, cfg.dtype)
    return device, dtype


#: Checkpoints whose transformers processor insists on a torchvision video processor.
IMAGE_ONLY_PROCESSORS = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl")


def _image_only_processor(path: Path, model_type: str, trust_remote_code: bool) -> object:
    """Qwen2-VL / 2.5-VL / 3-VL or InternVL processor without its video processor.

    transformers builds those processors with a video processor that needs torchvision; mednode
    only sends images, so the processor is assembled from the image processor and tokenizer
    with ``video_processor=None``, plus the settings of ``processor_config.json`` (InternVL's
    ``image_seq_length``).
    """
    import inspect

    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer

    base: type = {"qwen2_5_vl": transformers.Qwen2_5_VLProcessor,
                  "qwen3_vl": transformers.Qwen3VLProcessor,
                  "internvl": transformers.InternVLProcessor}.get(model_type, transformers.Qwen2VLProcessor)
    settings: dict[str, object] = {}
    processor_config = path / "processor_config.json"
    if processor_config.is_file():
        accepted = set(inspect.signature(base).parameters) - {
            "self", "image_processor", "tokenizer", "video_processor", "chat_template", "kwargs"}
        loaded = json.loads(processor_config.read_text(encoding="utf-8"))
        settings = {k: v for k, v in loaded.items() if k in accepted}

    class ImageOnlyProcessor(base):  # type: ignore[valid-type, misc]
        def __init__(self, image_processor: object = None, tokenizer: object = None,
                     chat_template: str | None = None, **kwargs: object) -> None:
            super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)
            self.video_processor = None

    image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True,
                                                         trust_remote_code=trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                              trust_remote_code=trust_remote_code)
    chat_template = tokenizer.chat_template
    for name in ("chat_template.jinja", "chat_template.json"):
        file = path / name
        if chat_template is None and file.is_file():
            text = file.read_text(encoding="utf-8")
            chat_template = json.loads(text)["chat_template"] if name.endswith(".json") else text
    return ImageOnlyProcessor(image_processor=image_processor, tokenizer=tokenizer,
                              chat_template=chat_template, **settings)


def _check_directory(cfg: VLMConfig, family: Family) -> tuple[Path, dict[str, object]]:
    path = Path(cfg.path).expanduser()
    if not path.is_dir():
        raise ModelLoadError(
            f"Model directory {str(path)!r} does not exist. Point the model's 'path' (or "
            "MEDNODE_VLM_PATH) at a local checkpoint directory; download one with "
            "'mednode models pull <hub id>' on a machine with network access."
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"{str(path)!r} has no config.json: it is not a transformers checkpoint directory.")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{str(config_file)!r} cannot be read as JSON: {exc}.") from exc
    model_type = str(config.get("model_type", ""))
    if family.model_types and model_type not in family.model_types:
        fitting = [f.name for f in FAMILIES.values() if model_type in f.model_types]
        hint = (f"set family: {fitting[0]} (each family parses boxes in its own convention)"
                if fitting else "fix the model's 'family' setting")
        raise ModelLoadError(
            f"{str(path)!r} holds a {model_type or 'untyped'!r} model but family {family.name!r} "
            f"expects model_type {', '.join(family.model_types)}; {hint}."
        )
    needs_code = family.requires_remote_code or "auto_map" in config
    if needs_code and not cfg.trust_remote_code:
        raise ModelLoadError(
            f"{str(path)!r} ({family.name}) runs Python code shipped inside the checkpoint. Set "
            "trust_remote_code: true for this model only if you have reviewed that code."
        )
    return path, config


#: Files that hold a checkpoint's weights.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def weights_mb(path: Path) -> float:
    """Size of the weight files in checkpoint directory ``path``, in MiB."""
    return sum(f.stat().st_size for f in path.iterdir()
               if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)) / 2**20


def refuse_large_on_cpu(cfg: VLMConfig, path: Path, device: str) -> None:
    """Raise :class:`ModelLoadError` when ``device: auto`` fell back to the CPU for a checkpoint
    above ``cpu_max_weights_mb`` (see :class:`VLMConfig`)."""
    if cfg.device != "auto" or device != "cpu" or cfg.cpu_max_weights_mb is None:
        return
    size = weights_mb(path)
    if size > cfg.cpu_max_weights_mb:
        raise ModelLoadError(
            f"this worker has no CUDA device and {str(path)!r} holds {size / 1024:.1f} GiB of weights "
            f"(above models.vlm.cpu_max_weights_mb = {cfg.cpu_max_weights_mb}): run the inference "
            "worker on a GPU host, or set models.vlm.device: cpu to run it on the CPU anyway (slow)."
        )


def refuse_parser_only(family: Family) -> None:
    """Raise :class:`ModelLoadError` for a parser-only family, saying why and what to use instead."""
    if not family.loadable:
        loadable = ", ".join(f.name for f in FAMILIES.values() if f.loadable)
        raise ModelLoadError(
            f"Family {family.name!r} is parser-only: mednode reads its answers but cannot load its "
            f"checkpoints. {family.note} Loadable families: {loadable}."
        )


def load_vlm(cfg: VLMConfig) -> VLM:
    """Load processor and model from ``cfg.path`` and wrap them in a :class:`VLM`.

    Raises
    ------
    ModelLoadError
        If the directory or its ``config.json`` is missing, the family is unknown, parser-only
        (:func:`refuse_parser_only`) or does not match the checkpoint's ``model_type``, the
        checkpoint needs ``trust_remote_code`` that the config does not grant, CUDA is asked for
        but absent, or transformers fails to load the files.
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from inference.vlm.runtime import VLM

    try:
        family = get_family(cfg.family)
    except KeyError as exc:
        raise ModelLoadError(str(exc.args[0])) from exc
    refuse_parser_only(family)
    path, config = _check_directory(cfg, family)
    device, dtype = _resolve_device_and_dtype(cfg)
    refuse_large_on_cpu(cfg, path, device)
    model_type = str(config.get("model_type", ""))
    try:
        if model_type in IMAGE_ONLY_PROCESSORS:
            processor = _image_only_processor(path, model_type, cfg.trust_remote_code)
        else:
            processor = AutoProcessor.from_pretrained(path, local_files_only=True,
                                                      trust_remote_code=cfg.trust_remote_code)
            if getattr(processor, "chat_template", None) is None and family.chat_template:
                processor.chat_template = family.chat_template  # PaliGemma: no chat turns
        model = AutoModelForImageTextToText.from_pretrained(
            path, local_files_only=True, dtype=dtype, trust_remote_code=cfg.trust_remote_code,
        )
    except (OSError, ValueError, ImportError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"transformers could not load {str(path)!r} as {family.name}: {exc}") from exc
    model = model.to(device)  # type: ignore[arg-type]
    model.train(False)  # inference mode (dropout off)
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        raise ModelLoadError(f"The processor of {str(path)!r} has no tokenizer.")
    tokenizer.padding_side = "left"  # decoder-only batching pads on the left
    version = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()[:16]
    info = ModelInfo(name=cfg.name or path.name, version=version, family=family.name,
                     extra={"model_type": model_type, "dtype": str(dtype).removeprefix("torch."),
                            "device": device})
    logger.info("Loaded VLM %s (family %s, version %s) on %s as %s", info.name, family.name,
                version, device, info.extra["dtype"])
    return VLM(cfg, family, model, processor, info=info, device=device, dtype=dtype)


_CACHE: dict[VLMConfig, VLM] = {}
_CACHE_LOCK = threading.Lock()


def get_vlm(cfg: VLMConfig, *, on_load: Callable[[VLM, float], None] | None = None) -> VLM:
    """The process-wide loaded model for ``cfg``, loading it on first use.

    Threads that ask while it loads wait for that one load. ``on_load(vlm, seconds)`` is called
    once, by the thread that loaded it, before any thread gets the model (set metrics or a
    ``batch_observer`` there).
    """
    with _CACHE_LOCK:
        vlm = _CACHE.get(cfg)
        if vlm is None:
            started = time.perf_counter()
            vlm = load_vlm(cfg)
            if on_load is not None:
                on_load(vlm, time.perf_counter() - started)
            _CACHE[cfg] = vlm
        return vlm


def loaded_vlms() -> list[VLM]:
    """The models this process holds loaded (for worker status: device, batch queue)."""
    with _CACHE_LOCK:
        return list(_CACHE.values())


def loaded_models() -> list[ModelInfo]:
    """What this process holds loaded (for worker status pages)."""
    with _CACHE_LOCK:
        return [vlm.info for vlm in _CACHE.values()]


def clear_vlm_cache() -> None:
    """Forget loaded models (frees them once no caller holds a reference)."""
    with _CACHE_LOCK:
        _CACHE.clear()
