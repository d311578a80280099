#!/usr/bin/env python3
"""Inference benchmark: mednode's VLM runtime against a plain ``model.generate`` loop.

A randomly initialised Gemma 3 model (MedGemma's architecture) of a realistic size is built
offline from a config -- no download -- with a byte-level BPE tokenizer trained on the fly, and
saved to a temporary directory:

* ``--size 4b`` (default on CUDA): the published Gemma 3 4B shapes (SigLIP 400M at 896 px,
  256 image tokens, 34-layer decoder, 262k vocabulary), about 4.3 B parameters, bf16;
* ``--size 100m`` (default on CPU): a 12-layer decoder of width 640 with a 6-layer SigLIP at
  224 px (64 image tokens), about 0.1 B parameters, float32.

The directory is loaded once through the product's loader (:func:`inference.vlm.load_vlm`), and
both arms then share that one model in memory:

* **runtime**: :meth:`inference.vlm.VLM.run_batch` with one ``report`` task of a fixed token
  budget per study, ``batch_size`` = B (chat template, left padding, ``generate``, decoding and
  report parsing into typed results, as a worker does);
* **plain**: the same PIL images and prompt text through ``processor.apply_chat_template`` (left
  padded), ``model.generate`` and ``tokenizer.batch_decode``, B studies per call.

A study is one chest radiograph (default: the CR of ``/work/shared/dicom/xr/``, decoded with
``dicom_io`` and prepared by ``VLM.prepare`` once, outside the timing) with one report of
``--new-tokens`` tokens. Random weights may emit an end-of-sequence token at any step, so both
arms force the budget the same way: ``min_new_tokens`` = ``max_new_tokens`` on the model's
``generation_config`` (transformers' ``MinNewTokensLengthLogitsProcessor`` masks every stop
token until the budget is reached). A wrapper around ``model.generate`` counts the generated
tokens of every call, and the benchmark refuses to report a cell whose count is not exactly
studies x budget.

Each batch size runs one untimed warm-up call per arm, then ``--rounds`` timed calls per arm,
alternating arms (and which arm goes first) so that clock or thermal drift hits both. Reported: generated tokens/s,
studies/hour, the runtime/plain ratio, and the peak memory of each cell
(``torch.cuda.max_memory_allocated`` on CUDA, the process's peak RSS -- VmHWM, reset per cell
-- on CPU).

Usage::

    .venv/bin/python bench/inference.py                        # CUDA if present, else CPU
    .venv/bin/python bench/inference.py --device cpu --size 100m --write-docs
    python3 bench/inference.py --json out.json                 # on a GPU machine
    .venv/bin/python bench/inference.py --from-json out.json --write-docs   # render here
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np

from tests.shared_data import SHARED_DICOM

DOCS = REPO_ROOT / "docs" / "BENCHMARKS.md"
BEGIN = "<!-- BEGIN inference (written by bench/inference.py --write-docs) -->"
END = "<!-- END inference -->"
DEFAULT_IMAGE = SHARED_DICOM / "xr" / "RG1_J2KI_chest_PA.dcm"

#: Model shapes per ``--size``. ``4b`` follows the published Gemma 3 4B configuration.
SIZES: dict[str, dict[str, Any]] = {
    "4b": {
        "text": {"vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240,
                 "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4,
                 "head_dim": 256, "sliding_window": 1024, "max_position_embeddings": 131072,
                 "query_pre_attn_scalar": 256,
                 "rope_parameters": {
                     "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                     "full_attention": {"rope_type": "linear", "rope_theta": 1000000.0, "factor": 8.0}}},
        "vision": {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27,
                   "num_attention_heads": 16, "image_size": 896, "patch_size": 14,
                   "vision_use_head": False},
        "image_tokens": 256,
    },
    "100m": {
        "text": {"vocab_size": 32000, "hidden_size": 640, "intermediate_size": 2560,
                 "num_hidden_layers": 12, "num_attention_heads": 8, "num_key_value_heads": 4,
                 "head_dim": 64, "sliding_window": 512, "max_position_embeddings": 8192,
                 "query_pre_attn_scalar": 64},
        "vision": {"hidden_size": 384, "intermediate_size": 1536, "num_hidden_layers": 6,
                   "num_attention_heads": 6, "image_size": 224, "patch_size": 14,
                   "vision_use_head": False},
        "image_tokens": 64,
    },
    # Only for checking the script itself (seconds on CPU); not a benchmark size.
    "tiny": {
        "text": {"vocab_size": 1024, "hidden_size": 64, "intermediate_size": 128,
                 "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                 "head_dim": 16, "sliding_window": 64, "max_position_embeddings": 1024,
                 "query_pre_attn_scalar": 16},
        "vision": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                   "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
                   "vision_use_head": False},
        "image_tokens": 4,
    },
}

_CORPUS = [
    "FINDINGS: The heart is enlarged. There is no pleural effusion. The lungs are clear.",
    "IMPRESSION: Cardiomegaly. No pneumothorax. Right lower lobe consolidation.",
    "Write the radiology report for this study with two sections, 'FINDINGS:' and 'IMPRESSION:'.",
    "Is there a pleural effusion? Which side is the nodule on? yes no uncertain present absent",
    "right lung, left lung, heart, nodule, pneumothorax, consolidation, cardiomegaly",
]


# --- model ------------------------------------------------------------------------------------


def build_gemma3(out: Path, size: str, *, device: str, seed: int = 0) -> tuple[Path, int]:
    """Build a random-weight Gemma 3 image-text model of ``size`` and save it with its processor.

    Weights are initialised directly on ``device`` (bf16 on CUDA) so that a 4B model is built in
    seconds; the saved directory is an ordinary transformers checkpoint.

    Returns
    -------
    (Path, int)
        The directory and the number of parameters.
    """
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        Gemma3Config,
        Gemma3ForConditionalGeneration,
        Gemma3Processor,
        Gemma3TextConfig,
        GenerationConfig,
        PreTrainedTokenizerFast,
        SiglipVisionConfig,
    )
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    shapes = SIZES[size]
    torch.manual_seed(seed)
    specials = ["<pad>", "<eos>", "<bos>", "<start_of_image>", "<end_of_image>",
                "<image_soft_token>", "<end_of_turn>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    template = (
        "{% for m in messages %}{{ '<start_of_turn>' + m['role'] + '\n' }}"
        "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<start_of_image>' }}"
        "{% else %}{{ c['text'] }}{% endif %}{% endfor %}{{ '<end_of_turn>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, chat_template=template, padding_side="left",
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
        pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    end_of_turn = tokenizer.convert_tokens_to_ids("<end_of_turn>")
    text = Gemma3TextConfig(**shapes["text"], pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    vision = SiglipVisionConfig(**shapes["vision"])
    config = Gemma3Config(  # type: ignore[call-arg]  # eos_token_id goes to PreTrainedConfig
        text_config=text, vision_config=vision, mm_tokens_per_image=shapes["image_tokens"],
        boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
        image_token_index=tokenizer.image_token_id, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Gemma3ForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(previous)
    params = sum(p.numel() for p in model.parameters())
    side = shapes["vision"]["image_size"]
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": side, "width": side},
                                                do_pan_and_scan=False),
        tokenizer=tokenizer, image_seq_length=shapes["image_tokens"], chat_template=template)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        eos_token_id=[tokenizer.eos_token_id, end_of_turn], pad_token_id=tokenizer.pad_token_id,
        do_sample=False)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    del model
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return out, params


# --- input -----------------------------------------------------------------------------------


def load_frame(path: Path | None, seed: int = 0) -> tuple[np.ndarray, str, tuple[float, float] | None, str]:
    """Pixels, photometric interpretation, VOI window and a description of the source.

    A DICOM file is decoded with :mod:`dicom_io` and its modality LUT applied; ``None`` or a
    missing file gives a synthetic 2048x2048 12-bit frame (the bench measures compute, and a
    random-weight model's compute does not depend on what the image shows).
    """
    if path is not None and path.is_file():
        from pydicom.pixels import apply_modality_lut

        from dicom_io.volume import read_dataset

        ds = read_dataset(path)
        pixels = np.asarray(apply_modality_lut(ds.pixel_array, ds), dtype=np.float32)
        window = None
        if "WindowCenter" in ds and "WindowWidth" in ds:
            center, width = ds.WindowCenter, ds.WindowWidth
            center = center[0] if isinstance(center, Sequence) else center
            width = width[0] if isinstance(width, Sequence) else width
            window = (float(center), float(width))
        source = f"{path.name} ({ds.Modality}, {pixels.shape[1]}x{pixels.shape[0]})"
        return pixels, str(ds.PhotometricInterpretation), window, source
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 4096, size=(2048, 2048)).astype(np.uint16)
    return pixels, "MONOCHROME2", None, "synthetic 2048x2048 12-bit frame"


# --- measurement ---------------------------------------------------------------------------


@dataclass
class Cell:
    """One (batch size, arm) measurement."""

    batch: int
    arm: str
    studies: int
    tokens: int
    seconds: list[float] = field(default_factory=list)
    peak_mib: float = 0.0

    @property
    def total_s(self) -> float:
        return sum(self.seconds)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.total_s

    @property
    def studies_per_h(self) -> float:
        return self.studies / self.total_s * 3600.0


class TokenCounter:
    """Wraps ``model.generate`` and counts generated tokens (new positions x rows) per call."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.inner = model.generate
        self.tokens = 0
        self.per_row: list[int] = []
        model.generate = self  # instance attribute: both arms call through it

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner(*args, **kwargs)
        sequences = out.sequences if hasattr(out, "sequences") else out
        new = sequences.shape[1] - kwargs["input_ids"].shape[1]
        self.per_row.append(int(new))
        self.tokens += int(new) * int(sequences.shape[0])
        return out

    def restore(self) -> None:
        del self.model.generate


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _reset_peak(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.reset_peak_memory_stats()
    else:
        try:  # "5" resets the peak RSS (VmHWM) of this process (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError as exc:
            print(f"note: cannot reset peak RSS ({exc}); CPU peaks are since process start",
                  file=sys.stderr)


def _peak_mib(device: str) -> float:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Build, load and measure; returns everything the table needs as plain data."""
    import torch
    import transformers

    from inference.tasks import TaskSpec
    from inference.vlm import VLM, VLMConfig, load_vlm

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    size = args.size if args.size != "auto" else ("4b" if device.startswith("cuda") else "100m")
    if not device.startswith("cuda") and args.threads:
        torch.set_num_threads(args.threads)
    budget = args.new_tokens
    batches = [int(b) for b in args.batches.split(",")]

    with tempfile.TemporaryDirectory(prefix="mednode-bench-") as tmp:
        t0 = time.perf_counter()
        model_dir, params = build_gemma3(Path(tmp) / f"gemma3-{size}", size, device=device)
        build_s = time.perf_counter() - t0
        disk_gb = sum(f.stat().st_size for f in model_dir.iterdir()) / 1e9
        t0 = time.perf_counter()
        base = load_vlm(VLMConfig(path=str(model_dir), family="medgemma", device=device,
                                  max_new_tokens=budget, batch_size=1))
        _sync(device)
        load_s = time.perf_counter() - t0
        weights_mib = (torch.cuda.memory_allocated() / 2**20 if device.startswith("cuda")
                       else _peak_mib(device))
        print(f"built {_params(params)} params in {build_s:.1f} s ({disk_gb:.1f} GB on disk), "
              f"loaded in {load_s:.1f} s on {device} as {base.info.extra['dtype']}", flush=True)

        frame, photometric, window, source = load_frame(None if args.synthetic else args.image)
        t0 = time.perf_counter()
        image = base.prepare(frame, photometric=photometric, window=window)
        prepare_ms = (time.perf_counter() - t0) * 1000
        task = TaskSpec(kind="report", language="en", max_new_tokens=budget)
        prompt = base.family.prompt(task)

        # Force the budget in both arms: stop tokens are masked until `budget` new tokens.
        model_any: Any = base.model
        model_any.generation_config.min_new_tokens = budget
        counter = TokenCounter(model_any)
        processor: Any = base.processor
        tokenizer: Any = base.tokenizer
        model: Any = base.model
        pad_id = tokenizer.pad_token_id
        prompt_tokens = 0

        def plain(n: int) -> list[str]:
            nonlocal prompt_tokens
            messages = [[{"role": "user", "content": [{"type": "image", "image": image.image},
                                                      {"type": "text", "text": prompt}]}]] * n
            inputs = processor.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                return_tensors="pt", processor_kwargs={"padding": True},
            ).to(device, dtype=base.dtype)
            prompt_tokens = int(inputs["input_ids"].shape[1])
            with torch.inference_mode():
                out = model.generate(**inputs, max_new_tokens=budget, min_new_tokens=budget,
                                     do_sample=False, pad_token_id=pad_id)
            return tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)

        def runtime_arm(vlm: VLM) -> Callable[[int], list[Any]]:
            def run(n: int) -> list[Any]:
                return vlm.run_batch([([image], task)] * n)
            return run

        cells: list[Cell] = []
        for b in batches:
            vlm = VLM(replace(base.cfg, batch_size=b), base.family, model, processor,
                      info=base.info, device=device, dtype=base.dtype)
            arms: dict[str, Callable[[int], list[Any]]] = {"runtime": runtime_arm(vlm), "plain": plain}
            row = {name: Cell(b, name, 0, 0) for name in arms}
            for name, fn in arms.items():  # warm-up, untimed (kernels, allocator, caches)
                fn(b)
                _sync(device)
            peaks = dict.fromkeys(arms, 0.0)
            for r in range(args.rounds):
                order = list(arms.items()) if r % 2 == 0 else list(reversed(arms.items()))
                for name, fn in order:
                    _reset_peak(device)
                    before = counter.tokens
                    _sync(device)
                    t0 = time.perf_counter()
                    outputs = fn(b)
                    _sync(device)
                    row[name].seconds.append(time.perf_counter() - t0)
                    peaks[name] = max(peaks[name], _peak_mib(device))
                    got = counter.tokens - before
                    if got != b * budget or len(outputs) != b:
                        raise RuntimeError(
                            f"{name} at batch {b} generated {got} tokens for {len(outputs)} studies; "
                            f"expected {b * budget} (the budget was not forced).")
                    row[name].tokens += got
                    row[name].studies += b
            for name, cell in row.items():
                cell.peak_mib = peaks[name]
                cells.append(cell)
                print(f"batch {b:3d} {name:8s} {cell.tokens_per_s:9.1f} tok/s "
                      f"{cell.studies_per_h:10.0f} studies/h  peak {cell.peak_mib:8.0f} MiB  "
                      f"runs {', '.join(f'{s:.2f}' for s in cell.seconds)} s", flush=True)
        counter.restore()

    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        machine = f"{props.name} ({props.total_memory / 2**30:.0f} GiB)"
    else:
        machine = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), " \
                  f"{torch.get_num_threads()} torch threads"
    return {
        "device": device, "machine": machine, "size": size, "params": params,
        "dtype": base.info.extra["dtype"], "budget": budget, "rounds": args.rounds,
        "prompt_tokens": prompt_tokens, "image": source, "input_size": image.image.size,
        "prepare_ms": prepare_ms, "build_s": build_s, "load_s": load_s, "weights_mib": weights_mib,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "date": dt.date.today().isoformat(),
        "cells": [asdict(c) for c in cells],
    }


# --- report --------------------------------------------------------------------------------


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.0f} M"


def render(result: dict[str, Any]) -> str:
    """The docs section for one run, as markdown."""
    cells = [Cell(**c) for c in result["cells"]]
    by = {(c.batch, c.arm): c for c in cells}
    cuda = result["device"].startswith("cuda")
    mem = "peak GPU memory (MiB)" if cuda else "peak RSS (MiB)"
    lines = [
        "## Inference", "",
        (f"**Device: {result['device'].upper()}** — {result['machine']}. Model: random-weight Gemma 3 "
        f"(MedGemma's architecture) at **{_params(result['params'])} parameters** (`--size "
        f"{result['size']}`), {result['dtype']}, built offline from a config and loaded with "
        f"`load_vlm` ({result['load_s']:.0f} s; weights {result['weights_mib']:.0f} MiB). "
        f"One study = one chest radiograph ({result['image']}, prepared once to "
        f"{result['input_size'][0]}×{result['input_size'][1]}, {result['prompt_tokens']} prompt "
        f"tokens) with one `report` task of exactly **{result['budget']} new tokens**, greedy."),
        "",
        ("| batch | runtime tok/s | plain tok/s | runtime ÷ plain | runtime studies/h | "
         f"plain studies/h | s per call (median, runtime / plain) | runtime {mem} | plain {mem} |"),
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for b in sorted({c.batch for c in cells}):
        r, p = by[(b, "runtime")], by[(b, "plain")]
        lines.append(
            f"| {b} | {r.tokens_per_s:,.0f} | {p.tokens_per_s:,.0f} | "
            f"{r.tokens_per_s / p.tokens_per_s:.2f}× | {r.studies_per_h:,.0f} | {p.studies_per_h:,.0f} | "
            f"{statistics.median(r.seconds):.2f} / {statistics.median(p.seconds):.2f} | "
            f"{r.peak_mib:,.0f} | {p.peak_mib:,.0f} |")
    lines += [
        "",
        "*runtime*: `VLM.run_batch` with `batch_size` = B (chat template, left padding, `generate`, "
        "decoding, report parsing into typed results). *plain*: the same images and prompt through "
        "`processor.apply_chat_template`, `model.generate` and `batch_decode`, B studies per call, "
        "on the same loaded model. Both arms force the token budget the same way: "
        "`min_new_tokens` = `max_new_tokens` on the model's generation config (stop tokens masked "
        "until the budget), and a wrapper around `model.generate` checked that every call produced "
        "exactly B × budget tokens. tok/s counts generated tokens only; studies/h = studies ÷ "
        f"wall time. Per batch size: one untimed warm-up call per arm, then {result['rounds']} "
        "timed calls per arm, alternating arms and which goes first. Image preparation (window, "
        f"pad, resize: {result['prepare_ms']:.0f} ms per image) is outside the timing in both arms. "
        + ("Memory: `torch.cuda.max_memory_allocated` per cell (weights included)."
           if cuda else "Memory: the process's peak RSS (VmHWM, reset per cell)."),
        *(["", result["note"]] if result.get("note") else []),
        "",
        (f"torch {result['torch']}, transformers {result['transformers']}, "
         f"Python {result['python']}; {result['date']}."),
        "",
        "Reproduce: " + ("`python3 bench/inference.py --image RADIOGRAPH.dcm --rounds 8 --json "
                         "out.json` on the GPU machine (its image lacks transformers 5.23, pydicom "
                         "and pylibjpeg(-openjpeg): carry them as wheels), then `.venv/bin/python "
                         "bench/inference.py --from-json out.json --write-docs`."
                         if cuda else "`.venv/bin/python bench/inference.py --device cpu "
                         f"--size {result['size']} --write-docs`."),
    ]
    return "\n".join(lines)


def write_docs(section: str) -> None:
    """Replace (or append) the inference section of docs/BENCHMARKS.md, leaving the rest as is."""
    text = DOCS.read_text(encoding="utf-8") if DOCS.is_file() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        text = re.sub(re.escape(BEGIN) + r".*?" + re.escape(END), lambda _: block, text, flags=re.DOTALL)
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.write_text(text, encoding="utf-8")
    print(f"wrote the inference section of {DOCS}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    parser.add_argument("--size", default="auto", choices=["auto", *SIZES],
                        help="model size; auto: 4b on CUDA, 100m on CPU")
    parser.add_argument("--batches", default="1,4,16", help="comma-separated batch sizes")
    parser.add_argument("--new-tokens", type=int, default=64, help="forced token budget per study")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per arm and batch size")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="DICOM radiograph")
    parser.add_argument("--synthetic", action="store_true", help="use a synthetic frame")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--from-json", type=Path, help="render a saved run instead of measuring")
    parser.add_argument("--note", help="a paragraph to print under the table (kept in --json)")
    parser.add_argument("--write-docs", action="store_true",
                        help="write the table into docs/BENCHMARKS.md (Inference section)")
    args = parser.parse_args(argv)
    if args.new_tokens < 1 or args.rounds < 1:
        parser.error("--new-tokens and --rounds must be positive")

    if args.from_json:
        result = json.loads(args.from_json.read_text(encoding="utf-8"))
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        result = benchmark(args)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    if args.note:
        result["note"] = args.note
    section = render(result)
    print()
    print(section)
    if args.write_docs:
        write_docs(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
