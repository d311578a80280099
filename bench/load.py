#!/usr/bin/env python3
"""Load benchmark: N modalities × M studies through the whole node, with 1 and 2 worker processes.

The production shape, started fresh for each configuration: a new PostgreSQL database and
RabbitMQ vhost on this machine, ``mednode serve`` (listener, completion, routing, web; no
embedded worker), one ``mednode worker --queues delivery`` and W ``mednode worker --queues
inference --concurrency 1`` processes (``--workers 1,2``), and a fresh Orthanc as the PACS every
result is sent to. Two pipelines, each with its rule:

* **CT** → the built-in CT analyzer (SEG + SR): the synthetic phantom of :mod:`tests.phantom`
  (``--ct-slices`` slices of ``--ct-side``² pixels);
* **CR** → a ``report`` by the tiny random-weight Gemma 3 of :mod:`bench.serving_model`, run in the
  worker (its reports are always ``--new-tokens`` tokens long): the shared chest radiograph.

N modalities (``--modalities``) send at once, each its M studies (``--studies``) one after the
other with ``storescu +sd`` (``TCP_NODELAY=1``), one association per study, kinds alternating.
Before the timed load each configuration runs one study of each kind per worker (the model loads
on first use in each worker) and waits for them.

Per study, from the node's own clock (``GET /api/v1/studies/{uid}`` → ``clock``, :mod:`node.clock`)
where it has one: instances/s in (the study's instances ÷ its ``storescu`` time); completion
latency (last instance → complete, quiet period included); queue wait (complete → queued →
started); model; the job's other stages (load, write, store); delivery (job end → last object
stored in Orthanc); end to end (the sender's last instance acknowledged → the node's record of the
last object stored in Orthanc). Each configuration's throughput is jobs/h: studies ÷ (first send →
last result stored in Orthanc), and the workers' own rate (first job started → last finished); every
result is checked in Orthanc at the end. The CPU seconds the inference workers, the rest of the node
and everything else on the machine used during the load (``/proc``) say how many cores the workers
actually got: on a shared machine that, not the worker count, may be what bounds the rate.

``--rss 200,2000`` measures instead the listener's memory while one CT study of each size (512²
int16, :func:`bench.ingest.generate_study`) is received over one association: the peak resident set
of ``mednode serve`` and of its ``mednode listen`` children (``--listener-processes``), sampled
from ``/proc``, each size on a fresh node.

Usage::

    /work/main/.venv/bin/python bench/load.py                          # 4 × 4 studies, 1 and 2 workers
    /work/main/.venv/bin/python bench/load.py --workers 1,2,4 --repeats 3 --write-docs
    /work/main/.venv/bin/python bench/load.py --rss 200,2000 --write-docs
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
# run as a script, bench/ comes first on the path, and bench/inference.py would hide the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != REPO_ROOT / "bench"]
sys.path.insert(0, str(REPO_ROOT))

import httpx
import yaml

from bench.ingest import (
    MB,
    _cpu_busy_idle,
    _load,
    generate_study,
    machine,
    send_study,
    wait_until_idle,
)
from bench.latency import Sampler, children, cmdline
from bench.nodes import mednode_argv, node_env, node_process
from bench.serving import Study, write_cr_studies, write_ct_studies
from bench.serving_model import build_serving_gemma3
from tests.peers import ManagedProcess, Orthanc, PeerError, free_port
from tests.peers.services import postgres_database, rabbitmq_vhost

DOCS = REPO_ROOT / "docs" / "BENCHMARKS.md"
BEGIN = "<!-- BEGIN load (written by bench/load.py --write-docs) -->"
END = "<!-- END load -->"
RSS_BEGIN = "<!-- BEGIN listener memory (written by bench/load.py --rss --write-docs) -->"
RSS_END = "<!-- END listener memory -->"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
DONE = {"delivered", "failed", "cancelled"}
#: what each kind's results must be in the PACS
EXPECTED = {"ct": ("SEG", "SR"), "cr": ("SR",)}


# -- the node ---------------------------------------------------------------------------------------
def node_config(work: Path, model_dir: Path, pacs: Orthanc, args: argparse.Namespace) -> Path:
    """The node's YAML: the two rules, the model, the PACS (ports and stores come from the env)."""
    config = {
        "completion_poll_s": 0.2,
        "destinations": {"pacs": {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}},
        "models": {"vlm": {"path": str(model_dir), "family": "medgemma", "device": "cpu", "dtype": "float32",
                           "max_new_tokens": args.new_tokens}},
        "rules": [
            {"name": "ct-analysis", "match": {"modality": ["CT"]}, "tasks": ["ct_analysis"],
             "destinations": ["pacs"]},
            {"name": "chest-xray", "match": {"modality": ["CR", "DX"]}, "tasks": [{"report": {"language": "en"}}],
             "destinations": ["pacs"], "requires_model": "vlm"},
        ],
    }
    path = work / "mednode.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@dataclass
class Node:
    dicom_port: int
    web_url: str
    serve: ManagedProcess
    workers: list[ManagedProcess]


def _env(base: dict[str, str]) -> dict[str, str]:
    """A node process's environment: ``base`` with this checkout first on the path, the model
    offline, and one torch thread per process (W workers on W cores, not W × all cores)."""
    return {**base, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


@contextmanager
def running_node(work: Path, config: Path, *, database_url: str, broker_url: str | None, workers: int,
                 quiet_period_s: float, listener_processes: int) -> Iterator[Node]:
    """``mednode serve`` without embedded worker, a delivery worker and ``workers`` inference
    workers (``broker_url`` None and ``workers`` 0: the listener alone)."""
    dicom_port, web_port = free_port(), free_port()
    base = node_env(work / "data", dicom_port=dicom_port, web_port=web_port, database_url=database_url,
                    broker_url=broker_url, quiet_period_s=quiet_period_s, embedded_worker=False,
                    listener_processes=listener_processes, log_level="INFO")
    (work / "data").mkdir(parents=True, exist_ok=True)
    serve = node_process(mednode_argv("serve", "--config", str(config)), env=_env(base), log_dir=work, cwd=work)
    procs = [node_process(mednode_argv("worker", "--config", str(config), "--queues", "delivery",
                                       "--concurrency", "1"), env=_env(base), log_dir=work, name="delivery",
                          cwd=work)] if workers else []
    procs += [node_process(mednode_argv("worker", "--config", str(config), "--queues", "inference",
                                        "--concurrency", "1"), env=_env(base), log_dir=work,
                           name=f"inference-{n}", cwd=work) for n in range(workers)]
    try:
        serve.start(port=dicom_port, timeout_s=180)
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + 240
        for proc in procs:  # Celery says "ready." once it consumes
            while " ready." not in proc.log_text():
                if not proc.is_running:
                    raise PeerError(f"{proc.name} exited: {proc.log_tail(1500)}")
                if time.monotonic() > deadline:
                    raise PeerError(f"{proc.name} not ready within 240 s: {proc.log_tail(1500)}")
                time.sleep(0.5)
        time.sleep(1.0 * (listener_processes - 1))  # listener children bind the port beside serve
        yield Node(dicom_port, f"http://127.0.0.1:{web_port}", serve, procs)
    finally:
        for proc in procs:
            proc.stop(timeout_s=30)
        serve.stop(timeout_s=30)


# -- one study's figures ---------------------------------------------------------------------------
def _unix(value: str | None) -> float | None:
    if value is None:
        return None
    moment = dt.datetime.fromisoformat(value)
    return (moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)).timestamp()


@dataclass
class StudyRun:
    kind: str
    uid: str
    instances: int
    modality_number: int
    send_s: float = 0.0
    acked_at: float = 0.0  #: Unix time the sender's last instance was acknowledged (storescu exit)
    state: str | None = None
    stages: dict[str, float] = field(default_factory=dict)
    delivered_at: float | None = None  #: the node's record of its last object stored in the PACS
    started_at: float | None = None
    finished_at: float | None = None
    reason: str | None = None

    @property
    def end_to_end_s(self) -> float | None:
        return None if self.delivered_at is None else self.delivered_at - self.acked_at


def read_study(client: httpx.Client, run: StudyRun) -> bool:
    """Fill ``run`` from the node's API; True once its job has ended (delivered, failed…)."""
    answer = client.get(f"/api/v1/studies/{run.uid}")
    if answer.status_code == 404:
        return False
    answer.raise_for_status()
    study = answer.json()
    jobs = [j for j in study["jobs"] if not j["on_demand"]]
    if not jobs:
        return False
    job = jobs[-1]
    run.state, run.reason = job["state"], job["reason"]
    if run.state not in DONE:
        return False
    stages: dict[str, float] = {}
    for item in study["clock"]:
        if item["seconds"] is not None and item["stage"] != "delivery":
            stages[item["stage"]] = stages.get(item["stage"], 0.0) + item["seconds"]
    deliveries = [s["seconds"] for s in study["clock"] if s["stage"] == "delivery" and s["seconds"] is not None]
    if deliveries:
        stages["delivery"] = max(deliveries)
    run.stages = stages
    delivered = [_unix(d["delivered_at"]) for r in job["results"] for d in r["deliveries"] if d["delivered_at"]]
    run.delivered_at = max((d for d in delivered if d is not None), default=None)
    run.started_at, run.finished_at = _unix(job["started_at"]), _unix(job["finished_at"])
    return True


def drive(node: Node, senders: list[list[Study]], timeout_s: float, instances: dict[str, int]) -> tuple[
        list[StudyRun], float]:
    """Each list of ``senders`` sent by its own thread, study after study; wait until every job has
    ended. Returns the studies and the Unix time the first send started.

    Raises
    ------
    PeerError
        If a send fails or not every job ends within ``timeout_s``.
    """
    runs = [StudyRun(s.kind, s.uid, instances[s.uid], n) for n, studies in enumerate(senders) for s in studies]
    by_uid = {r.uid: r for r in runs}
    errors: list[str] = []

    def send(studies: list[Study]) -> None:
        for study in studies:
            try:
                by_uid[study.uid].send_s = send_study(node.dicom_port, study.directory, "MEDNODE", timeout_s)
            except (PeerError, OSError) as exc:
                errors.append(str(exc)[:300])
                return
            by_uid[study.uid].acked_at = time.time()

    started = time.time()
    threads = [threading.Thread(target=send, args=(s,), daemon=True) for s in senders]
    for thread in threads:
        thread.start()
    pending = set(by_uid)
    with httpx.Client(base_url=node.web_url, timeout=30) as client:
        while pending:
            if errors:
                raise PeerError("a send failed: " + errors[0])
            if time.time() - started > timeout_s:
                raise PeerError(f"{len(runs) - len(pending)} of {len(runs)} studies done after {timeout_s:.0f} s")
            for uid in [u for u in pending if by_uid[u].acked_at]:
                if read_study(client, by_uid[uid]):
                    pending.discard(uid)
            time.sleep(0.3)
    for thread in threads:
        thread.join()
    return runs, started


def check_pacs(pacs: Orthanc, runs: list[StudyRun]) -> list[str]:
    """What is missing in the PACS: each CT study's SEG and SR, each CR study's SR."""
    missing = []
    for run in runs:
        classes = {str(r.get("SOPClassUID", "")) for r in pacs.find_instances(run.uid)}
        have = {"SEG"} if SEG_CLASS in classes else set()
        have |= {"SR"} if any(c.startswith(SR_PREFIX) for c in classes) else set()
        missing += [f"{run.kind} {run.uid[-8:]}: no {k}" for k in EXPECTED[run.kind] if k not in have]
    return missing


def cpu_seconds(pid: int | None) -> float:
    """CPU seconds (user + system) a process and its waited-for children have used so far."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError, TypeError):
        return 0.0
    return sum(int(v) for v in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(node: Node) -> dict[str, float]:
    """CPU seconds so far of the inference workers, the rest of the node, the whole machine."""
    busy = _cpu_busy_idle()[0] / os.sysconf("SC_CLK_TCK")
    return {"workers": sum(cpu_seconds(p.pid) for p in node.workers if p.name.startswith("inference")),
            "node": cpu_seconds(node.serve.pid) + sum(cpu_seconds(p.pid) for p in node.workers
                                                      if not p.name.startswith("inference")),
            "machine": busy, "wall": time.monotonic()}


# -- one configuration -----------------------------------------------------------------------------
@dataclass
class Config:
    workers: int
    repeat: int
    runs: list[StudyRun] = field(default_factory=list)
    wall_s: float = 0.0  #: first send → last object stored in the PACS
    load_before: str = ""
    load_after: str = ""
    error: str | None = None

    sent_s: float = 0.0  #: first send → last instance acknowledged
    #: cores used on average over the wall time: the inference workers, the rest of the node
    #: (serve, delivery worker), and everything else on the machine (Orthanc, senders, other work)
    cores: dict[str, float] = field(default_factory=dict)

    @property
    def per_hour(self) -> float:
        return len(self.runs) / self.wall_s * 3600 if self.wall_s else 0.0

    @property
    def busy_per_hour(self) -> float:
        """Studies ÷ (first job started → last job finished): the workers' own rate."""
        starts = [r.started_at for r in self.runs if r.started_at]
        ends = [r.finished_at for r in self.runs if r.finished_at]
        return len(self.runs) / (max(ends) - min(starts)) * 3600 if starts and ends else 0.0

    @property
    def instances_per_s(self) -> float:
        return sum(r.instances for r in self.runs) / self.sent_s if self.sent_s else 0.0


class Studies:
    """Every study the run sends, written up front, handed out in order (each is sent once)."""

    def __init__(self, work: Path, args: argparse.Namespace, configs: int) -> None:
        per_config = args.modalities * args.studies + 2 * max(args.workers)
        kinds = args.mix
        need = {k: per_config * configs for k in kinds}
        self.queues: dict[str, list[Study]] = {}
        if "ct" in kinds:
            self.queues["ct"] = write_ct_studies(work / "studies", 0, need["ct"], slices=args.ct_slices,
                                                 side=args.ct_side)
        if "cr" in kinds:
            self.queues["cr"] = write_cr_studies(work / "studies", 0, need["cr"])
        self.instances = {s.uid: len(list(s.directory.glob("*.dcm"))) for q in self.queues.values() for s in q}
        self.bytes = {s.uid: sum(p.stat().st_size for p in s.directory.glob("*.dcm"))
                      for q in self.queues.values() for s in q}
        self.kind = {s.uid: kind for kind, q in self.queues.items() for s in q}

    def median_mb(self, kind: str) -> float:
        sizes = [b for uid, b in self.bytes.items() if self.kind[uid] == kind]
        return statistics.median(sizes) / MB if sizes else 0.0

    def take(self, kind: str) -> Study:
        return self.queues[kind].pop(0)


def run_config(work: Path, model_dir: Path, studies: Studies, workers: int, repeat: int,
               args: argparse.Namespace) -> Config:
    result = Config(workers, repeat)
    out = work / f"w{workers}-r{repeat}"
    out.mkdir(parents=True)
    try:
        with ExitStack() as stack:
            database = stack.enter_context(postgres_database("mednode_load"))
            broker = stack.enter_context(rabbitmq_vhost("mednode_load"))
            pacs = stack.enter_context(Orthanc(out / "pacs", aet="PACS"))
            config = node_config(out, model_dir, pacs, args)
            node = stack.enter_context(running_node(
                out, config, database_url=database, broker_url=broker, workers=workers,
                quiet_period_s=args.quiet_period_s, listener_processes=args.listener_processes))
            # warm-up: one study of each kind per worker, all at once (the model loads in each)
            warm = [[studies.take(kind)] for kind in args.mix for _ in range(workers)]
            drive(node, warm, args.timeout_s, studies.instances)
            wait_until_idle(max_s=args.idle_max_s)
            senders = [[studies.take(args.mix[(m + s) % len(args.mix)]) for s in range(args.studies)]
                       for m in range(args.modalities)]
            result.load_before = _load()
            before = cpu_snapshot(node)
            result.runs, started = drive(node, senders, args.timeout_s, studies.instances)
            result.load_after = _load()
            after = cpu_snapshot(node)
            failed = [f"{r.kind} {r.state}: {r.reason}" for r in result.runs if r.state != "delivered"]
            if failed:
                raise PeerError("jobs not delivered: " + "; ".join(failed)[:300])
            missing = check_pacs(pacs, result.runs)
            if missing:
                raise PeerError("results missing in the PACS: " + "; ".join(missing)[:300])
            result.wall_s = max(r.delivered_at or 0.0 for r in result.runs) - started
            result.sent_s = max(r.acked_at for r in result.runs) - started
            spent = {k: after[k] - before[k] for k in before}
            seconds = spent.pop("wall")
            result.cores = {k: v / seconds for k, v in spent.items()}
            result.cores["others"] = result.cores.pop("machine") - result.cores["workers"] - result.cores["node"]
    except (PeerError, OSError, httpx.HTTPError) as exc:
        result.error = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
        logs = sorted(out.glob("*.log"))
        tails = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in logs)
        print(f"workers={workers} run {repeat + 1}: {exc}\n{tails}", file=sys.stderr)
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return result


# -- report ------------------------------------------------------------------------------------------
def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def _mp(values: list[float]) -> str:
    """``median / p95``."""
    if not values:
        return "–"
    return f"{statistics.median(values):.2f} / {_pct(values, 95):.2f}"


#: the columns of the per-stage table: label → the figure of one study
COLUMNS: dict[str, Any] = {
    "inst/s in": lambda r: r.instances / r.send_s if r.send_s else None,
    "completion (quiet incl.)": lambda r: r.stages.get("last_instance_to_complete"),
    "queue wait": lambda r: r.stages.get("complete_to_queued", 0.0) + r.stages.get("queued_to_started", 0.0),
    "model": lambda r: r.stages.get("model"),
    "load + write + store": lambda r: sum(r.stages.get(s, 0.0) for s in ("load", "write", "store")),
    "delivery": lambda r: r.stages.get("delivery"),
    "end to end": lambda r: r.end_to_end_s,
}


def render(configs: list[Config], studies: Studies, args: argparse.Namespace, params: int) -> str:
    lines = [
        (f"{args.modalities} modalities × {args.studies} studies at once (each modality its studies one after "
         f"the other, `storescu +sd`, `TCP_NODELAY=1`), kinds alternating: **CT** ({args.ct_slices} slices of "
         f"{args.ct_side}² phantom → built-in analyzer → SEG + SR) and **CR** (the shared chest radiograph → "
         f"`report` by a random-weight Gemma 3 of {params / 1e6:.1f} M parameters, exactly {args.new_tokens} "
         f"new tokens, in the worker, float32). Production shape per configuration, all fresh: PostgreSQL "
         f"database, RabbitMQ vhost, `mednode serve` (listener_processes {args.listener_processes}, no embedded "
         f"worker, quiet period {args.quiet_period_s:g} s), one delivery worker, W `mednode worker --queues "
         f"inference --concurrency 1` processes (one torch thread each), Orthanc as the PACS; one study of each "
         f"kind per worker first as a warm-up (not counted). Configurations alternate ({args.repeats} run(s) "
         f"each)."),
        "",
        ("| workers | run | studies | jobs/h | ÷ 1 worker (same run) | wall s (first send → last result in PACS) "
         "| jobs/h while the workers ran (first job started → last finished) | ÷ 1 worker "
         "| inst/s in (all senders: first send → last ack) | cores used: inference workers / rest of the node "
         "/ everything else | load avg before → after |"),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    ones = {c.repeat: c for c in configs if c.workers == min(args.workers) and not c.error}
    for c in configs:
        if c.error:
            lines.append(f"| {c.workers} | {c.repeat + 1} | – | – | – | failed: {c.error.replace('|', '/')} | – | – "
                         "| – | – | – |")
            continue
        base = ones.get(c.repeat)
        ratio = f"{c.per_hour / base.per_hour:.2f}×" if base and base.per_hour else "–"
        busy = f"{c.busy_per_hour / base.busy_per_hour:.2f}×" if base and base.busy_per_hour else "–"
        cores = " / ".join(f"{c.cores[k]:.2f}" for k in ("workers", "node", "others")) if c.cores else "–"
        lines.append(f"| {c.workers} | {c.repeat + 1} | {len(c.runs)} | {c.per_hour:,.0f} | {ratio} | "
                     f"{c.wall_s:.1f} | {c.busy_per_hour:,.0f} | {busy} | {c.instances_per_s:.0f} | "
                     f"{cores} | {c.load_before} → {c.load_after} |")
    for workers in [w for w in args.workers if w != min(args.workers)]:
        pairs = [(c, ones[c.repeat]) for c in configs if c.workers == workers and not c.error and c.repeat in ones]
        if pairs:
            wall = statistics.geometric_mean([c.per_hour / b.per_hour for c, b in pairs])
            busy = statistics.geometric_mean([c.busy_per_hour / b.busy_per_hour for c, b in pairs])
            lines += ["", (f"{min(args.workers)} → {workers} workers, geometric mean over {len(pairs)} run(s): "
                           f"**{wall:.2f}×** jobs/h (first send → last result), {busy:.2f}× while the workers ran.")]
    lines += ["", ("Per study, seconds (inst/s: instances per second), median / p95 over the runs of each "
                   "configuration, from the node's clock (`GET /api/v1/studies/{uid}` → `clock`); end to end is "
                   "the sender's last instance acknowledged → the node's record of the last result stored in "
                   "Orthanc:"), "",
              "| workers | kind | studies | " + " | ".join(COLUMNS) + " |",
              "|---|---|---|" + "---|" * len(COLUMNS)]
    for workers in args.workers:
        for kind in args.mix:
            runs = [r for c in configs if c.workers == workers and not c.error for r in c.runs if r.kind == kind]
            if not runs:
                continue
            cells = []
            for fn in COLUMNS.values():
                values = [v for v in map(fn, runs) if v is not None]
                cells.append(_mp(values) if fn is not COLUMNS["inst/s in"] else
                             (f"{statistics.median(values):.0f} / {_pct(values, 95):.0f}" if values else "–"))
            lines.append(f"| {workers} | {kind.upper()} | {len(runs)} | " + " | ".join(cells) + " |")
    lines += ["", (f"A CT study is {studies.median_mb('ct'):.0f} MB ({args.ct_slices} files); a CR study one "
                   f"file of {studies.median_mb('cr'):.0f} MB (uncompressed). Machine: {machine()}; Python {platform.python_version()}; "
                   f"{dt.date.today().isoformat()}; shared with other work while measuring.")]
    return "\n".join(lines)


# -- listener memory ---------------------------------------------------------------------------------
@dataclass
class Memory:
    count: int
    study_mb: float
    send_s: float = 0.0
    idle_mb: dict[str, float] = field(default_factory=dict)  #: before the send, per process
    peak_mb: dict[str, float] = field(default_factory=dict)  #: during the send and 2 s after
    error: str | None = None


def listener_pids(serve_pid: int) -> dict[str, int]:
    """``serve`` and its ``mednode listen`` children."""
    pids = {"serve": serve_pid}
    for n, pid in enumerate(p for p in children(serve_pid) if "listen" in cmdline(p)):
        pids[f"listen {n + 1}"] = pid
    return pids


def run_memory(work: Path, count: int, args: argparse.Namespace) -> Memory:
    study = work / f"ct{count}"
    size = generate_study(study, count)
    result = Memory(count, size / MB)
    out = work / f"rss-{count}"
    try:
        with ExitStack() as stack:
            database = stack.enter_context(postgres_database("mednode_rss"))
            config = out / "mednode.yaml"
            out.mkdir(parents=True, exist_ok=True)
            config.write_text(yaml.safe_dump({"rules": [{"name": "none", "match": {"modality": ["MR"]},
                                                         "tasks": ["ct_analysis"], "destinations": []}]}))
            node = stack.enter_context(running_node(
                out, config, database_url=database, broker_url=None, workers=0,
                quiet_period_s=600, listener_processes=args.listener_processes))
            assert node.serve.pid is not None
            wait_until_idle(max_s=args.idle_max_s)
            pids = listener_pids(node.serve.pid)
            with Sampler(pids, args.sample_ms / 1000) as sampler:
                time.sleep(1.0)
                result.idle_mb = {n: (sampler.peak(n) or 0) / MB for n in pids}
                sent = time.time()
                result.send_s = send_study(node.dicom_port, study, "MEDNODE", args.timeout_s)
                time.sleep(2.0)
            result.peak_mb = {n: (sampler.peak(n, start=sent) or 0) / MB for n in pids}
    except (PeerError, OSError) as exc:
        result.error = str(exc).splitlines()[0][:300]
        print(f"rss {count}: {exc}", file=sys.stderr)
        for log in sorted(out.glob("*.log")):  # the node's own account, before its directory goes
            print(f"--- {log.name} (last 3,000 characters):\n{log.read_text(errors='replace')[-3000:]}",
                  file=sys.stderr)
    finally:
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(study, ignore_errors=True)
    return result


def render_memory(results: list[Memory], args: argparse.Namespace, load_before: str) -> str:
    names = list(dict.fromkeys(n for r in results for n in r.peak_mb))
    lines = [
        (f"One CT study (512×512 int16 slices, `bench/ingest.py`'s generator) over one association (`storescu "
         f"+sd`, `TCP_NODELAY=1`) to a fresh `mednode serve` (PostgreSQL, listener_processes "
         f"{args.listener_processes}, no worker, completion not due), each size on its own node, in one run; "
         f"resident set size of each listener process from /proc every {args.sample_ms} ms (MB = 10⁶ bytes): "
         f"idle before the send, and the peak from the first instance to 2 s after the last."),
        "",
        "| instances | study MB | inst/s | " + " | ".join(f"{n}: idle → peak" for n in names) + " | growth |",
        "|---|---|---|" + "---|" * len(names) + "---|",
    ]
    for r in results:
        if r.error:
            lines.append(f"| {r.count} | {r.study_mb:,.0f} | failed: {r.error.replace('|', '/')} |")
            continue
        growth = sum(r.peak_mb.get(n, 0) - r.idle_mb.get(n, 0) for n in names)
        lines.append(f"| {r.count} | {r.study_mb:,.0f} | {r.count / r.send_s:.0f} | "
                     + " | ".join(f"{r.idle_mb.get(n, 0):.0f} → {r.peak_mb.get(n, 0):.0f}" for n in names)
                     + f" | {growth:+.0f} MB |")
    lines += ["", (f"Machine: {machine()}; load average {load_before} before, {_load()} after; Python "
                   f"{platform.python_version()}; {dt.date.today().isoformat()}; shared with other work.")]
    return "\n".join(lines)


# -- main --------------------------------------------------------------------------------------------
def write_docs(begin: str, end: str, title: str, section: str, command: str) -> None:
    block = f"{begin}\n## {title}\n\n{section}\n\nReproduce: `{command}`.\n{end}"
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.write_text(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ints = lambda s: [int(v) for v in s.split(",")]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modalities", type=int, default=4, help="senders at once")
    parser.add_argument("--studies", type=int, default=4, help="studies each sender sends, one after the other")
    parser.add_argument("--workers", type=ints, default=[1, 2], help="inference worker processes per configuration")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--mix", type=lambda s: s.split(","), default=["ct", "cr"], help="kinds, alternating")
    parser.add_argument("--ct-slices", type=int, default=64)
    parser.add_argument("--ct-side", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256, help="report length (tokens)")
    parser.add_argument("--quiet-period-s", type=float, default=2.0)
    parser.add_argument("--listener-processes", type=int, default=1)
    parser.add_argument("--timeout-s", type=float, default=600.0)
    parser.add_argument("--idle-max-s", type=float, default=20.0,
                        help="longest wait for an idle machine before a load (then it starts anyway)")
    parser.add_argument("--rss", type=ints, default=None,
                        help="instead: the listener's memory receiving one CT study of each of these sizes")
    parser.add_argument("--sample-ms", type=int, default=20)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--write-docs", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mednode-load-", dir=args.work))
    command = "/work/main/.venv/bin/python bench/load.py " + " ".join(sys.argv[1:] if argv is None else argv)
    try:
        if args.rss:
            load_before = _load()
            memory = [run_memory(work, count, args) for count in args.rss]
            section = render_memory(memory, args, load_before)
            print(section)
            if args.write_docs:
                write_docs(RSS_BEGIN, RSS_END, "Listener memory with study size", section, command)
            return 1 if any(m.error for m in memory) else 0
        import torch

        torch.set_num_threads(1)
        model_dir = build_serving_gemma3(work / "model", size="tiny")
        params = sum(t.numel() for t in __import__("safetensors.torch", fromlist=["load_file"]).load_file(
            str(next(model_dir.glob("*.safetensors")))).values())
        studies = Studies(work, args, len(args.workers) * args.repeats)
        configs = []
        for repeat in range(args.repeats):
            for workers in args.workers:
                print(f"workers={workers} run {repeat + 1}", file=sys.stderr, flush=True)
                config = run_config(work, model_dir, studies, workers, repeat, args)
                configs.append(config)
                if not config.error:
                    print(f"  {config.per_hour:,.0f} jobs/h, {config.wall_s:.1f} s", file=sys.stderr, flush=True)
        section = render(configs, studies, args, params)
        print(section)
        if args.write_docs:
            write_docs(BEGIN, END, "Load: N modalities through the whole node, 1 → 2 workers", section, command)
        return 1 if any(c.error for c in configs) else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TCP_NODELAY", "1")
    raise SystemExit(main())
