#!/usr/bin/env python3
"""Model-server benchmark: vLLM's CPU build against ``transformers serve`` on the same tiny model.

Both servers run on loopback, one after the other, serving the same tiny random-weight Gemma 3
(MedGemma's architecture, :func:`tests.models.build_tiny_gemma3` with ``serving=True``, the
checkpoint vLLM loads), float32. For each server:

* **start**: seconds from launching the process to the first 200 on ``/v1/models``;
* **1 image**: one chest radiograph report request (the body mednode's
  :class:`inference.vlm.server.ServerVLM` sends: the prepared image as a PNG data URL, greedy,
  ``--new-tokens`` budget), ``--repeats`` times in a row; median and range of the wall time;
* **16 concurrent**: 16 such requests sent at once from 16 threads (one worker's batch of 16, or
  16 workers); wall time until the last answer, median over ``--repeats`` rounds.

The tokens each answer generated are reported (``usage.completion_tokens``): a random model may
stop before the budget, and it stops at the same place on both servers only when they decode
the same tokens. Sizes and times are of a tiny model: they show per-request overhead and
batching, not a real model's speed.

Usage::

    .venv/bin/python bench/model_servers.py                    # vLLM, transformers serve (+CB)
    .venv/bin/python bench/model_servers.py --servers vllm --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.tasks import parse_tasks
from inference.vlm.server import ServerConfig, ServerVLM
from tests.models import build_tiny_gemma3
from tests.peers.model_servers import transformers_serve, vllm_server
from tests.trained_models import RADIOGRAPHS, prepare_radiographs


def _server(kind: str, model_dir: Path, home: Path) -> AbstractContextManager[str]:
    if kind == "vllm":
        return vllm_server(model_dir, home)
    if kind == "transformers":
        return transformers_serve(model_dir, home)
    if kind == "transformers-cb":
        return transformers_serve(model_dir, home, continuous_batching=True)
    raise SystemExit(f"unknown server {kind!r}: use vllm, transformers, transformers-cb")


def _bodies(url: str, model: str, new_tokens: int) -> dict[str, object]:
    client = ServerVLM(ServerConfig(server=url, model=model, family="medgemma", max_new_tokens=new_tokens))
    images = prepare_radiographs(client, RADIOGRAPHS[:1])
    [unit] = client._units(0, images, parse_tasks([{"report": {"language": "en"}}])[0])
    body = client._body(unit)
    client.close()
    return body


def measure(kind: str, model_dir: Path, home: Path, *, new_tokens: int, repeats: int) -> dict[str, object]:
    started = time.perf_counter()
    with _server(kind, model_dir, home) as url:
        start_s = time.perf_counter() - started
        body = _bodies(url, str(model_dir), new_tokens)
        with httpx.Client(base_url=url + "/v1", timeout=300) as http:
            def one() -> tuple[float, int]:
                t0 = time.perf_counter()
                answer = http.post("/chat/completions", json=body)
                answer.raise_for_status()
                return time.perf_counter() - t0, int(answer.json()["usage"]["completion_tokens"])

            one()  # warm-up (first request compiles/caches paths on both servers)
            singles = [one() for _ in range(repeats)]
            rounds = []
            tokens16: list[int] = []
            with ThreadPoolExecutor(max_workers=16) as pool:
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    answers = list(pool.map(lambda _: one(), range(16)))
                    rounds.append(time.perf_counter() - t0)
                    tokens16 += [n for _, n in answers]
    times = [t for t, _ in singles]
    return {"server": kind, "start_s": start_s, "one_median_s": statistics.median(times),
            "one_min_s": min(times), "one_max_s": max(times),
            "one_tokens": sorted({n for _, n in singles}),
            "sixteen_median_s": statistics.median(rounds), "sixteen_min_s": min(rounds),
            "sixteen_max_s": max(rounds), "sixteen_tokens": sorted(set(tokens16))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", default="vllm,transformers,transformers-cb")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-model-servers-") as tmp:
        root = Path(tmp)
        model_dir = build_tiny_gemma3(root / "tiny-gemma3", serving=True)
        rows = [measure(kind, model_dir, root / kind, new_tokens=args.new_tokens, repeats=args.repeats)
                for kind in args.servers.split(",")]
    print(f"tiny Gemma 3 (serving build), float32, CPU; {args.new_tokens}-token budget; "
          f"{args.repeats} repeats after 1 warm-up")
    print("| server | start s | 1 image: median s (min-max) | tokens | 16 concurrent: median s (min-max) | tokens |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['server']} | {r['start_s']:.1f} | {r['one_median_s']:.3f} ({r['one_min_s']:.3f}-"
              f"{r['one_max_s']:.3f}) | {r['one_tokens']} | {r['sixteen_median_s']:.3f} "
              f"({r['sixteen_min_s']:.3f}-{r['sixteen_max_s']:.3f}) | {r['sixteen_tokens']} |")


if __name__ == "__main__":
    main()
