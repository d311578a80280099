#!/usr/bin/env python3
"""Batch-1 decoding in-process: eager ``generate`` against a static KV cache with CUDA graphs.

What bounds one study's report on a GPU is batch-1 decoding: every new token reads all of the
decoder's weights once, so the ceiling is memory bandwidth ÷ weight bytes (Gemma 3 4B in bf16 on
an H100: about 430 tok/s; ``shared/notes/serving.md``). Eager transformers ``generate`` reached
22 tok/s there (``docs/BENCHMARKS.md``, Inference), bound by kernel launches. This script measures
the same model three ways, on the same prepared chest radiograph and prompt, loaded once through
the product's loader (:func:`inference.vlm.load_vlm`):

* ``eager``: ``generate`` with the default dynamic cache (what a worker does today);
* ``static``: ``cache_implementation="static"``, not compiled (``disable_compile=True``);
* ``graphs``: ``cache_implementation="static"`` with transformers' compilation of the decoding
  step (``CompileConfig(mode="reduce-overhead")``: ``torch.compile`` with CUDA graphs). On a CPU
  the same compilation runs without graphs (``--device cpu`` only checks the script).

Decoding speed is separated from the prompt: each arm times a call of 1 new token (the prefill)
and calls of ``--new-tokens`` tokens; decode tok/s = (N − 1) ÷ (t_N − t_1), medians over
``--rounds``. Every call is forced to its budget (``min_new_tokens``) and checked.

The ceiling: bytes read per decoding step = the language model's weights (the output head
included; the vision tower does not run while decoding), ceiling tok/s = bandwidth ÷ bytes,
with the bandwidth measured here (a device-to-device copy of 2 GiB: bytes read + written ÷ time)
and, when the device is known, its data-sheet figure.

Usage::

    python3 bench/decode.py --json out.json                         # GPU machine: 4B shapes, bf16
    .venv/bin/python bench/decode.py --device cpu --size tiny --new-tokens 16 --rounds 1   # check
    .venv/bin/python bench/decode.py --from-json out.json --write-docs   # render here
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# run as a script, bench/ comes first on the path, and bench/inference.py would hide the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "bench"]
sys.path.insert(0, str(REPO_ROOT))

DOCS = REPO_ROOT / "docs" / "BENCHMARKS.md"
BEGIN = "<!-- BEGIN decode (written by bench/decode.py --write-docs) -->"
END = "<!-- END decode -->"
ARMS = ("eager", "static", "graphs")
#: Data-sheet memory bandwidth (GB/s) by device name fragment, most specific first.
DATASHEET_GBS = {"H200": 4800.0, "H100 NVL": 3900.0, "H100 PCIe": 2000.0, "H100": 3350.0,
                 "A100-SXM4-80GB": 2039.0, "A100": 1555.0, "L40S": 864.0, "L4": 300.0}


def measured_bandwidth_gbs(device: str, gib: float) -> float:
    """Device-memory bandwidth from a copy of ``gib`` GiB: (read + written bytes) ÷ time, best of 5."""
    import torch

    n = int(gib * 2**30) // 2
    src = torch.empty(n, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync(device)
        start = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    del src, dst
    return 2 * n * 2 / best / 1e9


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def decoder_bytes(model: Any) -> int:
    """Bytes of the weights every decoding step reads: the language model and its output head."""
    language = model.model.language_model
    seen = {id(p) for p in language.parameters()}
    total = sum(p.numel() * p.element_size() for p in language.parameters())
    head = model.get_output_embeddings().weight
    if id(head) not in seen:
        total += head.numel() * head.element_size()
    return total


def measure(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers
    from transformers import CompileConfig

    from bench.inference import build_gemma3, load_frame
    from inference.tasks import TaskSpec
    from inference.vlm import VLMConfig, load_vlm
    from inference.vlm.volume_recipe import user_content

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    size = args.size if args.size != "auto" else ("4b" if device.startswith("cuda") else "tiny")
    budget = args.new_tokens
    with tempfile.TemporaryDirectory(prefix="mednode-bench-decode-") as tmp:
        model_dir, params = build_gemma3(Path(tmp) / f"gemma3-{size}", size, device=device)
        vlm = load_vlm(VLMConfig(path=str(model_dir), family="medgemma", device=device,
                                 max_new_tokens=budget, batch_size=1))
    model: Any = vlm.model
    frame, photometric, window, source = load_frame(None if args.synthetic else args.image)
    image = vlm.prepare(frame, photometric=photometric, window=window)
    task = TaskSpec(kind="report", language="en", max_new_tokens=budget)
    content = user_content([image], vlm.family.prompt(task), slice_recipe=False, language="en")
    inputs = vlm.processor.apply_chat_template(  # type: ignore[attr-defined]
        [[{"role": "user", "content": content}]], add_generation_prompt=True, tokenize=True,
        return_dict=True, return_tensors="pt").to(device, dtype=vlm.dtype)
    prompt_tokens = int(inputs["input_ids"].shape[1])
    pad = vlm.tokenizer.pad_token_id

    def options(arm: str) -> dict[str, Any]:
        if arm == "eager":
            return {}
        if arm == "static":
            return {"cache_implementation": "static", "disable_compile": True}
        compile_config = CompileConfig(mode="reduce-overhead", fullgraph=False)
        if not device.startswith("cuda"):
            # check the path on a CPU (no graphs there); transformers' own switch for that
            setattr(compile_config, "_compile_all_devices", True)  # noqa: B010
        return {"cache_implementation": "static", "compile_config": compile_config}

    def call(arm: str, tokens: int) -> float:
        _sync(device)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                 pad_token_id=pad, **options(arm))
        _sync(device)
        elapsed = time.perf_counter() - start
        if out.shape[1] - prompt_tokens != tokens:
            raise RuntimeError(f"{arm}: {out.shape[1] - prompt_tokens} new tokens, not {tokens}")
        return elapsed

    rows: dict[str, dict[str, Any]] = {}
    for arm in args.arms:
        started = time.perf_counter()
        call(arm, budget)  # warm-up: compilation and graph capture happen here
        warmup_s = time.perf_counter() - started
        prefill = [call(arm, 1) for _ in range(args.rounds)]
        full = [call(arm, budget) for _ in range(args.rounds)]
        decode_s = statistics.median(full) - statistics.median(prefill)
        rows[arm] = {"warmup_s": warmup_s, "prefill_s": prefill, "full_s": full,
                     "decode_tok_s": (budget - 1) / decode_s if decode_s > 0 else float("nan")}
        print(f"{arm:7s} decode {rows[arm]['decode_tok_s']:8.1f} tok/s  prefill "
              f"{statistics.median(prefill) * 1000:7.1f} ms  first call {warmup_s:.1f} s", flush=True)

    weights = decoder_bytes(model)
    bandwidth = measured_bandwidth_gbs(device, args.copy_gib)
    if device.startswith("cuda"):
        name = torch.cuda.get_device_properties(0).name
        machine = f"{name} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB)"
        sheet = next((gbs for key, gbs in DATASHEET_GBS.items() if key in name), None)
    else:
        machine = f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()})"
        sheet = None
    return {
        "device": device, "machine": machine, "size": size, "params": params, "dtype": str(vlm.dtype),
        "budget": budget, "rounds": args.rounds, "prompt_tokens": prompt_tokens, "image": source,
        "decoder_bytes": weights, "bandwidth_gbs": bandwidth, "datasheet_gbs": sheet, "arms": rows,
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "date": dt.date.today().isoformat(),
    }


def _params(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def render(result: dict[str, Any]) -> str:
    weights_gb = result["decoder_bytes"] / 1e9
    ceiling = result["bandwidth_gbs"] / weights_gb
    sheet = result.get("datasheet_gbs")
    sheet_ceiling = sheet / weights_gb if sheet else None
    lines = [
        "## Batch-1 decoding: eager, static cache, CUDA graphs",
        "",
        (f"**Device: {result['device'].upper()}** — {result['machine']}. Random-weight Gemma 3 "
         f"(`--size {result['size']}`, {_params(result['params'])} parameters, {result['dtype']}), "
         f"loaded with `load_vlm`; one chest radiograph ({result['image']}, {result['prompt_tokens']} "
         f"prompt tokens), a `report` forced to {result['budget']} new tokens, greedy, batch 1. "
         f"A decoding step reads {weights_gb:.2f} GB of weights (language model and output head); "
         f"copy bandwidth measured here {result['bandwidth_gbs']:,.0f} GB/s → ceiling "
         f"**{ceiling:,.0f} tok/s**"
         + (f" (data sheet {sheet:,.0f} GB/s → {sheet_ceiling:,.0f} tok/s)." if sheet_ceiling else ".")),
        "",
        "| arm | decode tok/s | ÷ ceiling | ceiling ÷ this | prefill (ms, median) | first call (s) |",
        "|---|---|---|---|---|---|",
    ]
    for arm, row in result["arms"].items():
        rate = row["decode_tok_s"]
        lines.append(f"| {arm} | {rate:,.1f} | {rate / ceiling:.1%} | {ceiling / rate:.1f}× | "
                     f"{statistics.median(row['prefill_s']) * 1000:,.0f} | {row['warmup_s']:.1f} |")
    lines += [
        "",
        ("*eager*: `generate` with the dynamic cache, as a worker runs today. *static*: "
         "`cache_implementation=\"static\"`, not compiled. *graphs*: the same with transformers' "
         "compiled decoding step (`CompileConfig(mode=\"reduce-overhead\")`: `torch.compile` with "
         "CUDA graphs; on a CPU, compiled without graphs). Decode tok/s = (N − 1) ÷ (median time of "
         f"N tokens − median time of 1 token), {result['rounds']} call(s) each, after one untimed call "
         "(*first call*: where compilation and graph capture happen). Target (issue 13): within 2× "
         "of the ceiling."),
        "",
        (f"torch {result['torch']}, transformers {result['transformers']}, Python {result['python']}; "
         f"{result['date']}."),
        "",
        ("Reproduce: `python3 bench/decode.py --json out.json` on the GPU machine, then "
         "`.venv/bin/python bench/decode.py --from-json out.json --write-docs`."),
    ]
    return "\n".join(lines)


def write_docs(section: str) -> None:
    """Replace (or append) the decode section of docs/BENCHMARKS.md, leaving the rest as is."""
    text = DOCS.read_text(encoding="utf-8") if DOCS.is_file() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.write_text(text, encoding="utf-8")
    print(f"wrote the decode section of {DOCS}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    from bench.inference import DEFAULT_IMAGE, SIZES

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cuda or cpu")
    parser.add_argument("--size", default="auto", choices=["auto", *SIZES],
                        help="model size; auto: 4b on CUDA, tiny on CPU (a check of the script)")
    parser.add_argument("--new-tokens", type=int, default=256, help="forced tokens per call")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per arm and length")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {', '.join(ARMS)}")
    parser.add_argument("--image", type=Path, default=DEFAULT_IMAGE, help="DICOM radiograph")
    parser.add_argument("--synthetic", action="store_true", help="use a synthetic frame")
    parser.add_argument("--copy-gib", type=float, default=2.0, help="size of the bandwidth copy")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--from-json", type=Path, help="render a saved run instead of measuring")
    parser.add_argument("--write-docs", action="store_true", help="write the section into docs/BENCHMARKS.md")
    args = parser.parse_args(argv)
    args.arms = [a for a in args.arms.split(",") if a]
    if set(args.arms) - set(ARMS) or args.new_tokens < 2 or args.rounds < 1:
        parser.error(f"--arms from {ARMS}; --new-tokens >= 2; --rounds >= 1")
    if args.from_json:
        result = json.loads(args.from_json.read_text(encoding="utf-8"))
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        result = measure(args)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    section = render(result)
    print()
    print(section)
    if args.write_docs:
        write_docs(section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
