#!/usr/bin/env python3
"""Serving benchmark: reports through a running node, 1, 8 and 32 studies in flight.

A real ``mednode serve`` (embedded default: SQLite index, embedded broker and worker, temporary
data directory and YAML config) runs a generalist model, a tiny random-weight Gemma 3 of
MedGemma's architecture built offline (:mod:`bench.serving_model`; it never emits a stop token,
so every report is exactly ``--new-tokens`` tokens on every path). Two rules ask for a ``report``:

* **cr**: one chest radiograph (the shared CR, ``RG1_J2KI_chest_PA.dcm``, decoded from JPEG 2000,
  new UIDs per study);
* **ct**: an 85-slice CT series (the synthetic phantom of :mod:`tests.phantom`), which goes to the
  model as MedGemma 1.5 was trained: 85 slices in three HU windows, each followed by ``SLICE n``
  (:mod:`inference.vlm.volume_recipe`).

Studies are sent with ``storescu +sd`` (one association per study, at most ``--max-senders``
at a time) keeping N studies in flight (sent and not yet finished): a new one starts when one
finishes. A study is finished when its SR is stored: its result row is in the node's database
(the SR written to the node's store and indexed; the rules have no destination, so delivery to
a PACS is not part of the timing). Per study: latency from the last instance acknowledged
(``storescu`` exit) to the result row's ``created_at``; per level: studies/h = studies ÷ (first
send started → last SR stored).

Paths (``--paths``):

* ``inprocess``: the embedded worker runs the model itself (``models.vlm.path``);
* ``transformers``: ``models.vlm.server`` points at ``transformers serve --continuous-batching``
  on loopback, started here; the node runs ``--server-workers`` worker processes so that several
  studies reach the server at once;
* ``vllm``: the same against vLLM's CPU build, when ``--vllm-python`` (default:
  ``.venv-vllm/bin/python`` of this repository) exists; skipped otherwise.

Baseline, in the same run: the same model, the same prepared inputs (the node's own
``prepare_images`` on the same files, outside the timing) and the same token budget, one study at
a time through ``processor.apply_chat_template``, ``model.generate`` and ``batch_decode`` in this
process, before the node legs and again after them.

``--code LABEL=DIR[:PATHS]`` (repeatable) runs the node from another checkout too (e.g. the main
branch in a second worktree), so code before and after a change is measured in one run.

Usage::

    .venv/bin/python bench/serving.py                                   # all, this code
    .venv/bin/python bench/serving.py --paths inprocess --kinds cr --levels 1,8
    .venv/bin/python bench/serving.py --code before=../base:inprocess --code after=. --write-docs
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# run as a script, bench/ comes first on the path, and bench/inference.py would hide the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "bench"]
sys.path.insert(0, str(REPO_ROOT))

import yaml
from pydicom.uid import UID, generate_uid

from bench.ingest import machine, wait_until_idle
from bench.serving_model import IMAGE_SIZE, build_serving_gemma3, to_checkpoint_layout
from tests.peers import ManagedProcess, PeerError, find_tool, free_port, peer_env
from tests.shared_data import SHARED_DICOM

DOCS = REPO_ROOT / "docs" / "BENCHMARKS.md"
CR_SOURCE = SHARED_DICOM / "xr" / "RG1_J2KI_chest_PA.dcm"
PATHS = ("inprocess", "transformers", "vllm")
KINDS = ("cr", "ct")
PATH_LABELS = {"inprocess": "in-process (embedded worker)",
               "transformers": "server: `transformers serve --continuous-batching`",
               "vllm": "server: vLLM (CPU build)"}
KIND_LABELS = {"cr": "chest radiograph", "ct": "85-slice CT"}


# -- studies --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Study:
    kind: str
    uid: str
    directory: Path


def _uid(*parts: object) -> UID:
    return generate_uid(entropy_srcs=["mednode-bench-serving", *map(str, parts)])


def write_cr_studies(out: Path, first: int, count: int) -> list[Study]:
    """``count`` copies of the shared chest radiograph, each its own study (new UIDs).

    The source is JPEG 2000 (lossy); the copies are decoded once to Explicit VR Little Endian,
    since the node takes the sender's first lossless syntax of a context, and storescu cannot
    convert JPEG 2000 itself.
    """
    from pydicom import dcmread

    source = dcmread(CR_SOURCE)
    source.decompress()
    studies = []
    for number in range(first, first + count):
        ds = source.copy()
        ds.StudyInstanceUID = _uid("cr-study", number)
        ds.SeriesInstanceUID = _uid("cr-series", number)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid("cr-sop", number)
        ds.PatientName, ds.PatientID, ds.AccessionNumber = "Bench^Serving", "BENCH-SERVING", f"CR{number}"
        directory = out / f"cr{number:03d}"
        directory.mkdir(parents=True)
        ds.save_as(directory / "cr.dcm", enforce_file_format=True)
        studies.append(Study("cr", str(ds.StudyInstanceUID), directory))
    return studies


def write_ct_studies(out: Path, first: int, count: int, *, slices: int, side: int) -> list[Study]:
    """``count`` CT series of ``slices`` slices of ``side``² pixels (the phantom with noise)."""
    from tests.phantom import PhantomGeometry, make_ct_phantom, write_series

    spacing = 1.2 * 256 / side
    geometry = PhantomGeometry(rows=side, columns=side, pixel_spacing_mm=(spacing, spacing),
                               num_slices=slices, slice_spacing_mm=200.0 / slices)
    studies = []
    for number in range(first, first + count):
        uid = _uid("ct-study", number)
        datasets = make_ct_phantom(geometry=geometry, patient_name="Bench^Serving",
                                   patient_id="BENCH-SERVING", accession_number=f"CT{number}",
                                   study_instance_uid=uid, series_instance_uid=_uid("ct-series", number),
                                   frame_of_reference_uid=_uid("ct-frame", number), noise_hu_sd=10.0,
                                   seed=number)
        directory = out / f"ct{number:03d}"
        write_series(datasets, directory)
        studies.append(Study("ct", str(uid), directory))
    return studies


#: torch threads of every process that runs the model (``--threads``), the benchmark's included
THREADS = {"n": 1}
#: where the in-process model runs (``--device``, ``--dtype``), the baseline's too
PLACEMENT = {"device": "cpu", "dtype": "float32"}


def _threads_env() -> dict[str, str]:
    return {"OMP_NUM_THREADS": str(THREADS["n"]), "MKL_NUM_THREADS": str(THREADS["n"])}


# -- model servers --------------------------------------------------------------------------------
@contextmanager
def transformers_serve(model_dir: Path, work: Path) -> Iterator[str]:
    """``transformers serve --continuous-batching`` of ``model_dir`` on loopback (stopped by PID)."""
    executable = Path(sys.executable).with_name("transformers")
    if not executable.exists():
        raise PeerError(f"{executable} not found (transformers >= 5 installs it)")
    home = work / "hf-home"
    (home / "hub").mkdir(parents=True, exist_ok=True)  # /v1/models scans the cache: 500 without it
    port = free_port()
    server = ManagedProcess(
        [str(executable), "serve", str(model_dir), "--device", "cpu", "--host", "127.0.0.1",
         "--port", str(port), "--continuous-batching"],
        log_dir=work, name="transformers-serve",
        env={"HF_HOME": str(home), "HF_HUB_OFFLINE": "1", **_threads_env()})
    server.start(port=port, timeout_s=180)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop(timeout_s=30)


@contextmanager
def vllm_serve(python: Path, model_dir: Path, work: Path) -> Iterator[str]:
    """vLLM's OpenAI-compatible server (CPU build, its own venv) on loopback, float32 as in-process.

    vLLM loads the checkpoint layout real MedGemma checkpoints have (``vision_tower.vision_model.``),
    so it gets a renamed copy of ``model_dir``, served under ``model_dir``'s name. It binds its port
    before its engine is up: the start waits for ``/v1/models`` instead.
    """
    import httpx

    served = work / "model-vllm"
    shutil.copytree(model_dir, served)
    to_checkpoint_layout(served)
    port = free_port()
    server = ManagedProcess(
        [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(served),
         "--served-model-name", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
         "--max-model-len", "4096", "--dtype", "float32", "--enforce-eager"],
        log_dir=work, name="vllm",
        env={"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HOME": str(work / "hf"),
             "VLLM_CACHE_ROOT": str(work / "vllm-cache"), "VLLM_NO_USAGE_STATS": "1",
             "DO_NOT_TRACK": "1", "PYTHONPATH": "", **_threads_env()})
    server.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if not server.is_running:
                raise PeerError(f"vLLM exited; log {server.log_path}: {server.log_tail(300)}")
            try:
                if httpx.get(url + "/v1/models", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise PeerError(f"vLLM did not answer within 600 s; log {server.log_path}")
            time.sleep(1.0)
        yield url
    finally:
        server.stop(timeout_s=30)


def check_server_budget(url: str, model: str, study: Study, budget: int) -> None:
    """Ask the server for one report of ``study`` directly and check it generated ``budget`` tokens.

    Raises
    ------
    PeerError
        If the server's ``usage.completion_tokens`` is not ``budget``.
    """
    import httpx

    from inference.vlm.server import openai_content

    _, messages = _prepared_turn(Path(model), study, budget)
    body = {"model": model, "temperature": 0, "max_tokens": budget, "stream": False,
            "messages": [{"role": "user", "content": openai_content(messages[0]["content"])}]}
    answer = httpx.post(url + "/v1/chat/completions", json=body, timeout=300).json()
    got = (answer.get("usage") or {}).get("completion_tokens")
    if got != budget:
        raise PeerError(f"the server generated {got} tokens for a {study.kind} report, not {budget}")


# -- the node -------------------------------------------------------------------------------------
@dataclass
class Node:
    port: int
    db_path: Path


def node_config(work: Path, model: dict[str, Any], *, workers: int | None, quiet_period_s: float) -> Path:
    """The node's YAML: two report rules without destinations; ``workers`` None keeps the default."""
    tasks = [{"report": {"language": "en"}}]
    config: dict[str, Any] = {
        "ae_title": "MEDNODE", "dicom_host": "127.0.0.1", "dicom_port": free_port(),
        "web_host": "127.0.0.1", "web_port": free_port(), "data_dir": str(work / "data"),
        "quiet_period_s": quiet_period_s, "completion_poll_s": 0.2,
        "log_level": "WARNING", "destination": None,
        "models": {"vlm": model},
        "rules": [
            {"name": "cr-report", "match": {"modality": ["CR", "DX"]}, "tasks": tasks, "destinations": []},
            {"name": "ct-report", "match": {"modality": ["CT"]}, "tasks": tasks, "destinations": []},
        ],
    }
    if workers is not None:
        config["worker_concurrency"] = workers
    path = work / "mednode.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextmanager
def running_node(code: Path, work: Path, config: Path) -> Iterator[Node]:
    """``mednode serve --config`` from the checkout ``code`` (its own code first on the path)."""
    settings = yaml.safe_load(config.read_text())
    (work / "data").mkdir(parents=True, exist_ok=True)
    process = ManagedProcess([sys.executable, "-m", "node.cli", "serve", "--config", str(config)],
                             log_dir=work, name="mednode", cwd=code,
                             env={"PYTHONPATH": str(code), "HF_HUB_OFFLINE": "1", **_threads_env()})
    for key in [k for k in process.env if k.startswith("MEDNODE_")]:
        del process.env[key]  # the developer's own settings must not leak into the benchmark
    process.start(port=settings["dicom_port"], timeout_s=180)
    try:
        yield Node(settings["dicom_port"], work / "data" / "mednode.db")
    finally:
        process.stop(timeout_s=60)


def stored_results(db_path: Path) -> dict[str, float]:
    """Study Instance UID → when its first result row was stored (Unix time)."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
        rows = db.execute(
            "SELECT s.study_instance_uid, MIN(r.created_at) FROM result r JOIN job j ON r.job_pk = j.id "
            "JOIN study s ON j.study_pk = s.id GROUP BY s.study_instance_uid").fetchall()
    return {uid: _unix(created) for uid, created in rows}


def _unix(value: object) -> float:
    when = dt.datetime.fromisoformat(str(value))
    return (when if when.tzinfo else when.replace(tzinfo=dt.UTC)).timestamp()


def job_times(db_path: Path) -> dict[str, tuple[float, float]]:
    """Study Instance UID → (job created, job started) of its first job (Unix time)."""
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
        rows = db.execute(
            "SELECT s.study_instance_uid, j.created_at, j.started_at FROM job j "
            "JOIN study s ON j.study_pk = s.id WHERE j.started_at IS NOT NULL ORDER BY j.id").fetchall()
    out: dict[str, tuple[float, float]] = {}
    for uid, created, started in rows:
        out.setdefault(uid, (_unix(created), _unix(started)))
    return out


def failed_jobs(db_path: Path) -> list[str]:
    with sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=5) as db:
        rows = db.execute("SELECT id, reason FROM job WHERE state = 'failed'").fetchall()
    return [f"job {job_id}: {reason}" for job_id, reason in rows]


#: a sender where dcmtk is not installed (a GPU machine): pynetdicom, one association per study
_PYNETDICOM_SEND = """
import sys
from pathlib import Path
from pydicom import dcmread
from pynetdicom import AE
host, port, folder = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
datasets = [dcmread(f) for f in sorted(folder.iterdir())]
ae = AE(ae_title="BENCH")
for ds in datasets:
    ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
assoc = ae.associate(host, port, ae_title="MEDNODE")
if not assoc.is_established:
    sys.exit("association refused or aborted")
failed = [ds for ds in datasets if getattr(assoc.send_c_store(ds), "Status", 0xFFFF) != 0]
assoc.release()
sys.exit(f"{len(failed)} instance(s) refused" if failed else 0)
"""


def _storescu(node: Node, study: Study) -> subprocess.Popen[bytes]:
    try:
        # -R: one presentation context per file's SOP class and transfer syntax
        command = [find_tool("storescu"), "-aet", "BENCH", "-aec", "MEDNODE", "-R", "+sd", "127.0.0.1",
                   str(node.port), str(study.directory)]
    except PeerError:
        command = [sys.executable, "-c", _PYNETDICOM_SEND, "127.0.0.1", str(node.port), str(study.directory)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=peer_env())


@dataclass
class Level:
    """One (code, path, kind, in-flight) measurement."""

    code: str
    path: str
    kind: str
    in_flight: int
    studies: int
    wall_s: float = 0.0
    latency_s: list[float] = field(default_factory=list)
    #: per study: last instance acknowledged → job created (quiet period, completion, routing),
    #: job created → started (queue), started → SR stored (the worker: images, model, SR)
    to_job_s: list[float] = field(default_factory=list)
    queued_s: list[float] = field(default_factory=list)
    working_s: list[float] = field(default_factory=list)
    #: one-at-a-time seconds per study, measured just before this level (node idle)
    baseline_s: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def per_hour(self) -> float:
        return self.studies / self.wall_s * 3600 if self.wall_s else 0.0


def drive(node: Node, studies: list[Study], in_flight: int, *, max_senders: int,
          timeout_s: float) -> tuple[float, list[float], list[tuple[float, float, float]]]:
    """Send ``studies`` keeping ``in_flight`` of them unfinished.

    Returns
    -------
    (float, list of float, list of (float, float, float))
        Seconds from the first send to the last SR stored; per study, the latency (last instance
        acknowledged → SR stored) and its three stages (→ job created, → job started, → SR stored).


    Raises
    ------
    PeerError
        If a send fails, a job fails, or not every SR is stored within ``timeout_s``.
    """
    pending = list(studies)
    sending: dict[subprocess.Popen[bytes], Study] = {}
    acked: dict[str, float] = {}
    ack_time: dict[str, float] = {}
    stored_at: dict[str, float] = {}
    latencies: dict[str, float] = {}
    started = time.time()
    last_stored = started
    last_poll = 0.0
    while len(latencies) < len(studies):
        now = time.time()
        if now - started > timeout_s:
            raise PeerError(f"{len(latencies)} of {len(studies)} SRs stored after {timeout_s:.0f} s")
        while pending and len(sending) < max_senders and len(sending) + len(acked) < in_flight:
            study = pending.pop(0)
            sending[_storescu(node, study)] = study
        for process, study in list(sending.items()):
            if process.poll() is None:
                continue
            del sending[process]
            if process.returncode != 0:
                err = process.stderr.read().decode(errors="replace")[-500:] if process.stderr else ""
                raise PeerError(f"storescu exited {process.returncode}: {err}")
            acked[study.uid] = ack_time[study.uid] = time.time()
        if now - last_poll >= 0.1 and acked:
            last_poll = now
            stored = stored_results(node.db_path)
            for uid in [u for u in acked if u in stored]:
                latencies[uid] = stored[uid] - acked.pop(uid)
                stored_at[uid] = stored[uid]
                last_stored = max(last_stored, stored[uid])
            failed = failed_jobs(node.db_path)
            if failed:
                raise PeerError("failed: " + "; ".join(failed)[:300])
        time.sleep(0.02)
    jobs = job_times(node.db_path)
    stages = []
    for study in studies:
        created, begun = jobs[study.uid]
        stages.append((created - ack_time[study.uid], begun - created, stored_at[study.uid] - begun))
    return last_stored - started, [latencies[s.uid] for s in studies], stages


# -- baseline -------------------------------------------------------------------------------------
_TURNS: dict[tuple[Path, str], tuple[Any, list[dict[str, Any]]]] = {}


def _prepared_turn(model_dir: Path, study: Study, budget: int) -> tuple[Any, list[dict[str, Any]]]:
    """The loaded model and the one user turn the node builds for ``study`` (cached per kind)."""
    from dicom_io.volume import read_dataset
    from inference.tasks import TaskSpec
    from inference.vlm import VLMConfig, get_vlm
    from inference.vlm.volume_recipe import user_content
    from node.vlm_stage import prepare_images

    key = (model_dir, study.kind)
    if key not in _TURNS:
        vlm = get_vlm(VLMConfig(path=str(model_dir), family="medgemma", device=PLACEMENT["device"],
                                dtype=PLACEMENT["dtype"], max_new_tokens=budget, batch_size=1))
        datasets = [read_dataset(p) for p in sorted(study.directory.glob("*.dcm"))]
        images, _ = prepare_images(vlm, {study.uid: datasets})
        task = TaskSpec(kind="report", language="en", max_new_tokens=budget)
        content = user_content(images, vlm.family.prompt(task), slice_recipe=vlm.family.slice_recipe,
                               language="en")
        _TURNS[key] = (vlm, [{"role": "user", "content": content}])
    return _TURNS[key]


def baseline(model_dir: Path, study: Study, budget: int, repeats: int) -> list[float]:
    """Seconds per study of plain one-at-a-time generation (one untimed warm-up first).

    Raises
    ------
    RuntimeError
        If a call did not generate exactly ``budget`` tokens.
    """
    import torch

    vlm, messages = _prepared_turn(model_dir, study, budget)
    processor, model = vlm.processor, vlm.model
    seconds = []
    for attempt in range(repeats + 1):
        start = time.perf_counter()
        inputs = processor.apply_chat_template(
            [messages], add_generation_prompt=True, tokenize=True, return_dict=True,
            return_tensors="pt", processor_kwargs={"padding": True}).to(vlm.device, dtype=vlm.dtype)
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=budget, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        processor.batch_decode(new.cpu(), skip_special_tokens=True)
        elapsed = time.perf_counter() - start
        if new.shape[1] != budget:
            raise RuntimeError(f"plain generate made {new.shape[1]} tokens, not {budget}")
        if attempt:
            seconds.append(elapsed)
    return seconds


# -- report ---------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _reference(level: Level, base: dict[str, float]) -> float:
    """One-at-a-time studies/h measured just before the level (else the run's)."""
    return 3600 / statistics.median(level.baseline_s) if level.baseline_s else base.get(level.kind, 0.0)


def _ratio(level: Level, base: dict[str, float]) -> float:
    return level.per_hour / _reference(level, base)


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.1f}" if values else "–"


def render(result: dict[str, Any]) -> str:
    levels = [Level(**{k: v for k, v in row.items()}) for row in result["levels"]]
    base = {kind: 3600 / statistics.median(s) for kind, s in result["baseline_s"].items() if s}
    codes = list(dict.fromkeys(lv.code for lv in levels))
    in_flight = sorted({lv.in_flight for lv in levels})
    workers = ", ".join(f"{c} {result.get('default_workers', {}).get(c, '?')}" for c in codes)
    revisions = ", ".join(f"{c} = {result['code_revisions'].get(c, '?')}" for c in codes)
    lines = [
        "## " + (result.get("title") or f"Serving: studies through the node ({result.get('size', 'tiny')} model)"),
        "",
        ((f"**Device: {result['gpu']}** (in-process model and baseline; host {result['machine']})"
          if result.get("gpu") and str(result.get("device", "cpu")).startswith("cuda")
          else f"**Device: CPU** — {result['machine']}, shared with other work")
         + f". Model: random-weight Gemma 3 "
         f"(MedGemma's architecture), {result['params'] / 1e6:.1f} M parameters, "
         f"{result.get('dtype', 'float32')}, built offline "
         f"(`bench/serving_model.py`; its stop tokens never win, so every report is exactly "
         f"**{result['budget']} new tokens**, greedy, on every path). Studies: a chest radiograph "
         f"(the shared CR, 1841×1955, sent uncompressed, {IMAGE_SIZE}² input, {result['prompt_tokens'].get('cr', '?')} prompt tokens) "
         f"or an 85-slice CT ({result['ct_side']}² phantom, 85 slices in three HU windows, each then "
         f"`SLICE n`: {result['prompt_tokens'].get('ct', '?')} prompt tokens), one `report` each. "
         f"`mednode serve` on the embedded default (SQLite, embedded broker and worker), quiet period "
         f"{result['quiet_period_s']:g} s; {result.get('threads', 1)} torch thread(s) in every process that runs "
         f"the model (`OMP_NUM_THREADS`, the baseline's too); studies sent with `storescu`, one association each, at most "
         f"{result['max_senders']} at a time; *in flight* = sent and SR not yet stored."),
        "",
        ("| code | path | study | in flight | studies | studies/h | one-at-a-time studies/h | "
         "node ÷ one-at-a-time | latency p50 / p90 / max (s) | medians: to job / queued / working (s) |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for lv in levels:
        label = PATH_LABELS.get(lv.path, lv.path)
        if lv.error:
            lines.append(f"| {lv.code} | {label} | {lv.kind} | {lv.in_flight} | {lv.studies} | – | – | – | "
                         f"{lv.error} | |")
            continue
        ratio = f"{_ratio(lv, base):.2f}×" if lv.kind in base or lv.baseline_s else "–"
        lines.append(
            f"| {lv.code} | {label} | {lv.kind} | {lv.in_flight} | {lv.studies} | {lv.per_hour:,.0f} | "
            f"{_reference(lv, base):,.0f} | {ratio} | {_pct(lv.latency_s, 50):.1f} / {_pct(lv.latency_s, 90):.1f} / "
            f"{max(lv.latency_s):.1f} | {_median(lv.to_job_s)} / {_median(lv.queued_s)} / "
            f"{_median(lv.working_s)} |")
    lines += ["", "Node ÷ one-at-a-time, side by side (target: ≥ 3× at 8 in flight):", "",
              "| path | study | code | " + " | ".join(f"{n} in flight" for n in in_flight) + " |",
              "|---|---|---|" + "---|" * len(in_flight)]
    for path in dict.fromkeys(lv.path for lv in levels):
        for kind in dict.fromkeys(lv.kind for lv in levels):
            for code in codes:
                cells = {lv.in_flight: lv for lv in levels if (lv.path, lv.kind, lv.code) == (path, kind, code)}
                if not cells:
                    continue
                row = [f"{_ratio(cells[n], base):.2f}×" if n in cells and not cells[n].error
                       and (kind in base or cells[n].baseline_s) else "–" for n in in_flight]
                lines.append(f"| {PATH_LABELS.get(path, path)} | {kind} | {code} | {' | '.join(row)} |")
    lines.append("")
    for kind, secs in result["baseline_s"].items():
        if secs:
            lines.append(f"One-at-a-time `generate` ({KIND_LABELS[kind]}), before and after all legs: "
                         f"{base[kind]:,.0f} studies/h "
                         f"({statistics.median(secs):.2f} s per study, median of {len(secs)}: "
                         f"{', '.join(f'{s:.2f}' for s in secs)}).")
    lines += [
        "",
        ("*node ÷ one-at-a-time*: the node's studies/h ÷ those of a plain loop over the same model in "
         "the benchmark's process: `processor.apply_chat_template`, `model.generate`, `batch_decode`, "
         "one study per call, on the same prepared inputs (the node's own `prepare_images` on the same "
         "files, outside the timing) and the same budget, measured right before each level while the "
         f"node idles ({result.get('baseline_repeats', 3)} calls after a warm-up; each level's ratio is "
         "against its own, since this machine's speed drifts by 2-3× within minutes). The node's figures include everything the node does: receiving and indexing, "
         "the quiet period, routing, the queue, reading and preparing the images (85 CT slices), generation, the SR written and indexed. *studies/h*: "
         "studies ÷ (first send started → last SR stored). *latency*: last instance acknowledged "
         "(`storescu` done) → result row stored in the node's database (`result.created_at`); "
         "it includes the quiet period. Its stages, from the job row: *to job* (last instance → "
         "job created: quiet period, completion check, routing), *queued* (→ a worker starts it), "
         "*working* (→ SR stored: reading and preparing the images, the model, the SR). One warm-up "
         "study per kind (untimed) loads the model first. In-process, `worker_concurrency` is "
         + (f"{result['workers']} (`--workers`)" if result.get("workers") else
            "each code's default (" + workers + ")") + f"; server paths: {result['server_workers']}, so that several "
         f"studies are at the server at once. `models.vlm.batch_size`: {result.get('batch_size', 8)}."),
        *(["", result["note"]] if result.get("note") else []),
        "",
        (f"Code: {revisions}. "
         f"torch {result['torch']}, transformers {result['transformers']}, Python {result['python']}; "
         f"load average {result['load_before']} before, {result['load_after']} after; {result['date']}."),
        "",
        f"Reproduce: `.venv/bin/python bench/serving.py {result.get('argv', '')}`.",
    ]
    return "\n".join(lines)


def write_docs(section: str, name: str) -> None:
    """Replace (or append) the section ``name`` of docs/BENCHMARKS.md, leaving the rest as is."""
    begin = f"<!-- BEGIN {name} (written by bench/serving.py --write-docs) -->"
    end = f"<!-- END {name} -->"
    text = DOCS.read_text(encoding="utf-8") if DOCS.is_file() else "# Benchmarks\n"
    block = f"{begin}\n{section}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.write_text(text, encoding="utf-8")
    print(f"wrote the {name} section of {DOCS}", file=sys.stderr)


# -- main -----------------------------------------------------------------------------------------
def _default_workers(code: Path) -> int | None:
    """``worker_concurrency``'s default in the checkout ``code``."""
    done = subprocess.run(
        [sys.executable, "-c", ("from node.config import Settings; "
         "print(Settings.model_fields['worker_concurrency'].default)")],
        capture_output=True, text=True, check=False, cwd=code, env={**os.environ, "PYTHONPATH": str(code)})
    return int(done.stdout.strip()) if done.stdout.strip().isdigit() else None


def _revision(code: Path) -> str:
    done = subprocess.run(["git", "-C", str(code), "log", "-1", "--format=%h %s"], capture_output=True,
                          text=True, check=False)
    dirty = subprocess.run(["git", "-C", str(code), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return (done.stdout.strip()[:60] or "?") + (" (uncommitted changes)" if dirty else "")


def _load() -> str:
    return f"{os.getloadavg()[0]:.1f}"


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import torch
    import transformers

    THREADS["n"] = args.threads
    PLACEMENT.update(device=args.device, dtype=args.dtype)
    torch.set_num_threads(args.threads)
    model_dir = build_serving_gemma3(work / "model", size=args.size, dtype=args.dtype,
                                     device=args.device if args.device.startswith("cuda") else "cpu")
    params = _params(model_dir)
    counts = args.studies  # in flight -> studies sent at that level
    levels = list(counts)
    need = 1 + sum(counts.values())  # a warm-up study, then each level's; every leg has a fresh node
    per_kind = {}
    for kind in args.kinds:
        if kind == "cr":
            per_kind[kind] = write_cr_studies(work / "studies", 0, need)
        else:
            per_kind[kind] = write_ct_studies(work / "studies", 0, need, slices=85, side=args.ct_side)
    print(f"model {params / 1e6:.1f} M parameters; {sum(map(len, per_kind.values()))} studies written",
          file=sys.stderr)

    result: dict[str, Any] = {
        "machine": machine(), "params": params, "budget": args.new_tokens, "ct_side": args.ct_side,
        "quiet_period_s": args.quiet_period_s, "max_senders": args.max_senders,
        "server_workers": args.server_workers, "threads": args.threads, "size": args.size,
        "workers": args.workers, "device": args.device, "dtype": args.dtype,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "baseline_repeats": args.baseline_repeats, "batch_size": args.batch_size, "levels": [], "baseline_s": {k: [] for k in args.kinds},
        "prompt_tokens": {}, "load_before": _load(),
        "code_revisions": {label: _revision(path) for label, path, _ in args.codes},
        "default_workers": {label: _default_workers(path) for label, path, _ in args.codes},
        "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "date": dt.date.today().isoformat(),
        "argv": " ".join(sys.argv[1:]),
    }

    def run_baseline() -> None:
        for kind in args.kinds:
            study = per_kind[kind][0]
            vlm, messages = _prepared_turn(model_dir, study, args.new_tokens)
            inputs = vlm.processor.apply_chat_template([messages], add_generation_prompt=True,
                                                       tokenize=True, return_dict=True, return_tensors="pt")
            result["prompt_tokens"][kind] = int(inputs["input_ids"].shape[1])
            seconds = baseline(model_dir, study, args.new_tokens, args.baseline_repeats)
            result["baseline_s"][kind] += seconds
            print(f"baseline {kind}: {', '.join(f'{s:.2f}' for s in seconds)} s per study", file=sys.stderr)

    run_baseline()
    for label, code, only in args.codes:
        for path in [p for p in args.paths if only is None or p in only]:
            cursor = dict.fromkeys(args.kinds, 0)
            leg = work / f"{label}-{path}"
            leg.mkdir(parents=True)
            try:
                with _model_server(path, args, model_dir, leg) as server:
                    if server is not None:
                        for kind in args.kinds:
                            check_server_budget(server, str(model_dir), per_kind[kind][0], args.new_tokens)
                        model = {"server": server, "model": str(model_dir), "family": "medgemma",
                                 "image_size": IMAGE_SIZE, "max_new_tokens": args.new_tokens,
                                 "batch_size": args.batch_size}
                        workers = args.server_workers
                    else:
                        model = {"path": str(model_dir), "family": "medgemma", "device": args.device,
                                 "dtype": args.dtype, "max_new_tokens": args.new_tokens,
                                 "batch_size": args.batch_size}
                        workers = args.workers  # None: the code's own default, what the node does
                    config = node_config(leg, model, workers=workers, quiet_period_s=args.quiet_period_s)
                    with running_node(code, leg, config) as node:
                        for kind in args.kinds:
                            warm = per_kind[kind][cursor[kind]]
                            cursor[kind] += 1
                            drive(node, [warm], 1, max_senders=1, timeout_s=args.timeout_s)
                            wait_until_idle(max_s=10)
                            for n in levels:
                                studies = per_kind[kind][cursor[kind]:cursor[kind] + counts[n]]
                                cursor[kind] += counts[n]
                                level = Level(label, path, kind, n, len(studies))
                                wait_until_idle(max_s=10)
                                level.baseline_s = baseline(model_dir, per_kind[kind][0], args.new_tokens,
                                                            args.baseline_repeats)
                                try:
                                    level.wall_s, level.latency_s, stages = drive(
                                        node, studies, n, max_senders=args.max_senders,
                                        timeout_s=args.timeout_s)
                                    level.to_job_s, level.queued_s, level.working_s = (
                                        [list(x) for x in zip(*stages, strict=True)])
                                except PeerError as exc:
                                    level.error = str(exc).splitlines()[0][:200].replace("|", "/")
                                result["levels"].append(asdict(level))
                                print(f"{label} {path} {kind} x{n}: "
                                      + (level.error or f"{level.per_hour:,.0f} studies/h, latency p50 "
                                         f"{_pct(level.latency_s, 50):.1f} s"), file=sys.stderr)
            except (PeerError, OSError, subprocess.TimeoutExpired) as exc:
                why = str(exc).splitlines()[0][:200].replace("|", "/") if str(exc) else type(exc).__name__
                print(f"{label} {path}: {why}", file=sys.stderr)
                for kind in args.kinds:
                    for n in levels:
                        if not any(r["code"] == label and r["path"] == path and r["kind"] == kind
                                   and r["in_flight"] == n for r in result["levels"]):
                            result["levels"].append(asdict(Level(label, path, kind, n, 0, error=why)))
    run_baseline()
    result["load_after"] = _load()
    return result


@contextmanager
def _model_server(path: str, args: argparse.Namespace, model_dir: Path, work: Path) -> Iterator[str | None]:
    if path == "inprocess":
        yield None
    elif path == "transformers":
        with transformers_serve(model_dir, work) as url:
            yield url
    else:
        with vllm_serve(args.vllm_python, model_dir, work) as url:
            yield url


def _params(model_dir: Path) -> int:
    import math

    from safetensors import safe_open

    total = 0
    for file in model_dir.glob("*.safetensors"):
        with safe_open(str(file), "pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not iterable)
                total += math.prod(tensors.get_slice(name).get_shape())
    return total


def _studies(text: str) -> dict[int, int]:
    out = {}
    for item in text.split(","):
        in_flight, _, count = item.partition(":")
        out[int(in_flight)] = int(count or in_flight)
        if out[int(in_flight)] < 1 or int(in_flight) < 1:
            raise argparse.ArgumentTypeError(f"in flight and studies must be positive: {item!r}")
    return out


def _code(text: str) -> tuple[str, Path, list[str] | None]:
    label, _, rest = text.partition("=")
    directory, _, paths = (rest or label).partition(":")
    path = Path(directory).resolve()
    if not (path / "node" / "cli.py").is_file():
        raise argparse.ArgumentTypeError(f"{path} is not a mednode checkout (no node/cli.py)")
    only = [p for p in paths.split(",") if p] or None
    if only and set(only) - set(PATHS):
        raise argparse.ArgumentTypeError(f"paths after ':' are from {', '.join(PATHS)}")
    return (label if rest else path.name), path, only


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default="inprocess,transformers,vllm",
                        help=f"comma-separated, from {', '.join(PATHS)} (vllm only with --vllm-python)")
    parser.add_argument("--kinds", default="cr,ct", help="comma-separated: cr (radiograph), ct (85 slices)")
    parser.add_argument("--studies", type=_studies, default=_studies("1:3,8:16,32:32"),
                        help="in-flight levels and the studies sent at each, IN_FLIGHT:STUDIES,...")
    parser.add_argument("--new-tokens", type=int, default=256, help="report length (forced)")
    parser.add_argument("--size", default="tiny", choices=["tiny", "small", "medium", "4b"], help="model size")
    parser.add_argument("--device", default="cpu", help="models.vlm.device in-process (cuda on a GPU)")
    parser.add_argument("--dtype", default="float32", help="models.vlm.dtype in-process (bfloat16 on a GPU)")
    parser.add_argument("--workers", type=int,
                        help="worker_concurrency in-process (default: the code's own default)")
    parser.add_argument("--ct-side", type=int, default=256, help="CT slice rows and columns")
    parser.add_argument("--batch-size", type=int, default=8, help="models.vlm.batch_size")
    parser.add_argument("--server-workers", type=int, default=8,
                        help="worker_concurrency of the node on the server paths")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (OMP_NUM_THREADS) of the node, the servers and the baseline")
    parser.add_argument("--quiet-period-s", type=float, default=1.0)
    parser.add_argument("--max-senders", type=int, default=4, help="storescu associations at a time")
    parser.add_argument("--baseline-repeats", type=int, default=3, help="timed plain calls, each time")
    parser.add_argument("--timeout-s", type=float, default=900.0, help="per level")
    parser.add_argument("--code", dest="codes", type=_code, action="append",
                        help="LABEL=DIR[:PATHS]: run the node from this checkout (repeatable; PATHS: "
                             "only these of --paths); default: this checkout, every path")
    parser.add_argument("--vllm-python", type=Path, default=REPO_ROOT / ".venv-vllm" / "bin" / "python")
    parser.add_argument("--workdir", type=Path, help="where the temporary directory goes")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--from-json", type=Path, help="render a saved run instead of measuring")
    parser.add_argument("--note", help="a paragraph to print under the table (kept in --json)")
    parser.add_argument("--write-docs", action="store_true", help="write the section into docs/BENCHMARKS.md")
    parser.add_argument("--section", default="serving",
                        help="its name in the markers, e.g. serving-small for a second run beside it")
    parser.add_argument("--title", help="the section's heading (default: by model size)")
    args = parser.parse_args(argv)
    args.paths = [p for p in args.paths.split(",") if p]
    args.kinds = [k for k in args.kinds.split(",") if k]
    if set(args.paths) - set(PATHS) or set(args.kinds) - set(KINDS):
        parser.error(f"--paths from {PATHS}, --kinds from {KINDS}")
    if "vllm" in args.paths and not args.vllm_python.exists():
        print(f"vllm: {args.vllm_python} not found, that path is skipped", file=sys.stderr)
        args.paths.remove("vllm")
    args.codes = args.codes or [("this", REPO_ROOT, None)]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.from_json:
        result = json.loads(args.from_json.read_text(encoding="utf-8"))
    else:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        with tempfile.TemporaryDirectory(prefix="mednode-bench-serving-", dir=args.workdir) as tmp:
            result = measure(args, Path(tmp))
        if args.json:
            args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")
    if args.note:
        result["note"] = args.note
    if args.title:
        result["title"] = args.title
    section = render(result)
    print(section)
    if args.write_docs:
        write_docs(section, args.section)
    return 0 if not any(row["error"] for row in result["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
