#!/usr/bin/env python3
"""Latency benchmark: from a CT's last instance to its SEG and SR in the PACS, stage by stage.

A synthetic CT (``--counts``, default 300 and 1,000 slices of 512×512 int16, one series, generated
offline by ``bench/ingest.py``'s generator) is sent with ``storescu +sd`` over one association to a
fresh embedded ``mednode serve`` (SQLite, embedded broker, embedded workers) whose default rule runs
the built-in CT analyzer and sends SEG + SR to a fresh Orthanc. Once both objects are in Orthanc the
benchmark reads the node's own clock of the study (``GET /api/v1/studies/{uid}``, :mod:`node.clock`)
and prints it: last instance → complete, complete → queued, queued → started, load, model, write,
store, each delivery; the overhead is the total less the quiet period and the model.

While the study is processed the resident set size (RSS) of the inference worker and of the
listener (``mednode serve``'s own process) is sampled from ``/proc`` every ``--sample-ms``, and the
peak of each is reported per stage (the stage windows come from the node's clock).

``--baseline REF`` also runs the code of git commit REF (exported with ``git archive`` to a
temporary directory, run with the same interpreter) on the same study in the same run, alternating,
and reports its total from the outside (last instance sent → SEG and SR in Orthanc), as the node
before the clock has no stage breakdown to read.

Usage::

    .venv/bin/python bench/latency.py                                # 300 and 1,000 slices
    .venv/bin/python bench/latency.py --counts 300 --baseline 52859a5
    .venv/bin/python bench/latency.py --write-docs                   # update docs/BENCHMARKS.md
    .venv/bin/python bench/latency.py --counts 300 --studies-per-node 4 --baseline 170f28f
                                # the first job of a node, then those of a worker that has run jobs
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import httpx

from bench.ingest import generate_study, machine, send_study, study_uid_of, wait_until_idle
from bench.nodes import mednode_argv, node_env, node_process
from tests.peers import Orthanc, PeerError, free_port

DOCS = REPO_ROOT / "docs" / "BENCHMARKS.md"
BEGIN = "<!-- BEGIN latency (written by bench/latency.py --write-docs) -->"
END = "<!-- END latency -->"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
STAGES = ("last_instance_to_complete", "complete_to_queued", "queued_to_started", "load", "model", "write", "store")
MB = 1_000_000


# -- memory ------------------------------------------------------------------------------------------
def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return None


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except FileNotFoundError:
        return []


def inference_worker(serve_pid: int) -> int | None:
    """The embedded worker consuming ``inference`` (with its urgent slots, or beside an urgent
    worker of its own in earlier layouts; not delivery)."""
    for pid in children(serve_pid):
        argv = cmdline(pid)
        if "--queues" in argv and "inference" in argv[argv.index("--queues") + 1].split(","):
            return pid
    return None


class Sampler:
    """Samples the RSS of some processes every ``interval_s`` in a thread: (wall time, pid → bytes)."""

    def __init__(self, pids: dict[str, int], interval_s: float) -> None:
        self.pids = pids
        self.interval_s = interval_s
        self.samples: list[tuple[float, dict[str, int]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            now = time.time()
            values = {name: rss for name, pid in self.pids.items() if (rss := rss_bytes(pid)) is not None}
            self.samples.append((now, values))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def peak(self, name: str, start: float | None = None, end: float | None = None) -> int | None:
        values = [v[name] for t, v in self.samples
                  if name in v and (start is None or t >= start) and (end is None or t <= end)]
        return max(values) if values else None


# -- one run -----------------------------------------------------------------------------------------
@dataclass
class Run:
    code: str  #: "this branch" or the baseline ref
    count: int
    pixel_bytes: int
    job_no: int = 1  #: the study's place among those sent to the same node (``--studies-per-node``)
    send_s: float = 0.0
    #: last instance sent (storescu done) → SEG and SR both in Orthanc, from the outside
    outside_s: float | None = None
    clock: list[dict[str, Any]] = field(default_factory=list)
    peaks: dict[str, dict[str, int | None]] = field(default_factory=dict)
    error: str | None = None

    def stage(self, name: str) -> float | None:
        values = [s["seconds"] for s in self.clock if s["stage"] == name and s["seconds"] is not None]
        return sum(values) if values else None

    @property
    def deliveries(self) -> list[tuple[str, float]]:
        return [(s["detail"], s["seconds"]) for s in self.clock if s["stage"] == "delivery"]

    @property
    def total_s(self) -> float | None:
        """Last instance received → last object delivered, by the node's clock."""
        if not self.clock:
            return None
        after_job = max((s for _, s in self.deliveries), default=0.0)
        return sum(self.stage(s) or 0.0 for s in STAGES) + self.worker_other_s + after_job

    worker_other_s: float = 0.0  #: claim, result records and hand-offs inside the job's run


def _when(value: str) -> float:
    moment = dt.datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=dt.UTC)
    return moment.timestamp()


def run_once(code_dir: Path, code: str, studies: list[tuple[Path, str]], count: int, work: Path,
             args: argparse.Namespace) -> list[Run]:
    """Start a fresh node and Orthanc for ``code`` and send it ``studies`` (directory, Study
    Instance UID) one after the other, each once the previous one's results are in Orthanc: one
    :class:`Run` per study (the node's first job, then a worker that has run jobs before)."""
    results = [Run(code=code, count=count, pixel_bytes=count * 512 * 512 * 2, job_no=k + 1)
               for k in range(len(studies))]
    out = Path(tempfile.mkdtemp(prefix="latency-", dir=work))
    with Orthanc(out / "pacs", aet="PACS") as pacs:
        dicom_port, web_port = free_port(), free_port()
        env = node_env(out / "data", dicom_port=dicom_port, web_port=web_port,
                       quiet_period_s=args.quiet_period_s,
                       destination=f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}", log_level="INFO")
        env["PYTHONPATH"] = str(code_dir)
        node = node_process(mednode_argv("serve"), env=env, log_dir=out, cwd=code_dir)
        (out / "data").mkdir(parents=True, exist_ok=True)
        result = results[0]
        try:
            node.start(port=dicom_port, timeout_s=180)
            assert node.pid is not None
            deadline = time.monotonic() + 180
            while (worker := inference_worker(node.pid)) is None and time.monotonic() < deadline:
                time.sleep(0.5)
            if worker is None:
                raise PeerError("the embedded inference worker did not start")
            _wait_ready(out / "mednode.log", deadline)
            for result, (study_dir, study_uid) in zip(results, studies, strict=True):
                wait_until_idle(max_s=args.idle_max_s)
                with Sampler({"worker": worker, "listener": node.pid}, args.sample_ms / 1000) as sampler:
                    result.send_s = send_study(dicom_port, study_dir, "MEDNODE", args.send_timeout_s)
                    sent = time.monotonic()
                    _wait_for_results(pacs, study_uid, sent + args.quiet_period_s + args.timeout_s)
                    result.outside_s = time.monotonic() - sent
                    try:  # a baseline with the clock (issue 16's first point) is read the same way
                        study = _study(f"http://127.0.0.1:{web_port}", study_uid, deadline=time.monotonic() + 30)
                    except (KeyError, httpx.HTTPError):
                        study = None
                    if study is not None:
                        result.clock = study["clock"]
                        result.peaks = _peaks(sampler, study)
                        job = study["jobs"][0]
                        run_s = _when(job["finished_at"]) - _when(job["started_at"])
                        result.worker_other_s = max(0.0, run_s - sum(result.stage(s) or 0 for s in
                                                                     ("load", "model", "write", "store")))
                    else:
                        result.peaks = {"whole run": {"worker": sampler.peak("worker"),
                                                      "listener": sampler.peak("listener")}}
        except Exception as exc:  # noqa: BLE001 (one failed run is reported, the others go on)
            result.error = f"{type(exc).__name__}: {exc}"
            print(f"  {code} {count}: {result.error}\n{node.log_tail(3000)}", file=sys.stderr)
        finally:
            node.stop(timeout_s=30)
            if args.keep_logs is not None and (out / "mednode.log").exists():
                args.keep_logs.mkdir(parents=True, exist_ok=True)
                shutil.copy(out / "mednode.log", args.keep_logs / f"mednode-{count}-{code.replace(' ', '_')}-{out.name}.log")
    shutil.rmtree(out, ignore_errors=True)
    return results


def _wait_ready(log: Path, deadline: float) -> None:
    """Until the inference worker says it is ready (it imports torch after the port opens)."""
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        # "mednode-inference-<pid>@host ready." (or "mednode-inference.urgent-inference-…" for a
        # worker that also takes the urgent queues on its urgent slots)
        if re.search(r"mednode-(?:[\w.]+-)?inference-\d+@\S+ ready\.", text):
            return
        time.sleep(0.5)
    raise PeerError("the inference worker never became ready")


def _wait_for_results(pacs: Orthanc, study_uid: str, deadline: float) -> None:
    while time.monotonic() < deadline:
        classes = {str(r.get("SOPClassUID", "")) for r in pacs.find_instances(study_uid)}
        if SEG_CLASS in classes and any(c.startswith(SR_PREFIX) for c in classes):
            return
        time.sleep(0.05)
    raise PeerError("no SEG and SR in the PACS in time")


def _study(url: str, study_uid: str, deadline: float) -> dict[str, Any]:
    """The study once its clock has both deliveries (Orthanc may hold them a moment before the
    node has recorded the second one)."""
    while True:
        study = httpx.get(f"{url}/api/v1/studies/{study_uid}", timeout=30).json()
        if sum(1 for s in study["clock"] if s["stage"] == "delivery") >= 2 or time.monotonic() > deadline:
            return dict(study)
        time.sleep(0.2)


def _peaks(sampler: Sampler, study: dict[str, Any]) -> dict[str, dict[str, int | None]]:
    """Peak RSS of worker and listener per stage window, from the node's own moments."""
    job = study["jobs"][0]
    seconds = {s["stage"]: s["seconds"] or 0.0 for s in study["clock"]}
    last = _when(study["last_received_at"])
    windows: dict[str, tuple[float, float]] = {"receiving": (sampler.samples[0][0], last)}
    windows["waiting (complete → started)"] = (last, _when(job["started_at"]))
    start = _when(job["started_at"])
    for stage in ("load", "model", "write", "store"):
        windows[stage] = (start, start + seconds.get(stage, 0.0))
        start += seconds.get(stage, 0.0)
    windows["delivery"] = (_when(job["finished_at"]), sampler.samples[-1][0])
    return {name: {"worker": sampler.peak("worker", a, b), "listener": sampler.peak("listener", a, b)}
            for name, (a, b) in windows.items()}


# -- report --------------------------------------------------------------------------------------------
def _s(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def _mb(value: int | None) -> str:
    return "–" if value is None else f"{value / MB:,.0f}"


def _label(run: Run, args: argparse.Namespace) -> str:
    return f"{run.code}, job {run.job_no}" if args.studies_per_node > 1 else run.code


def render(runs: list[Run], args: argparse.Namespace, study_bytes: dict[int, int]) -> str:
    lines = []
    mine = [r for r in runs if r.clock and not r.error]
    if mine:
        lines += ["The node's own clock (seconds; `GET /api/v1/studies/{uid}` → `clock`), in the order run:", "",
                  ("| code | slices | study MB | last instance → complete | complete → queued | queued → started | load "
                  "| model | write | store | job's other work | deliveries (from job end) | total | overhead "
                  "(total − quiet − model) |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in mine:
            total = r.total_s
            overhead = None if total is None else total - args.quiet_period_s - (r.stage("model") or 0.0)
            deliveries = ", ".join(f"{d.split()[0]} {s:.2f}" for d, s in r.deliveries)
            lines.append(
                f"| {_label(r, args)} | {r.count} | {study_bytes[r.count] / MB:,.0f} | "
                + " | ".join(_s(r.stage(s)) for s in STAGES)
                + f" | {_s(r.worker_other_s)} | {deliveries} | {_s(total)} | **{_s(overhead)}** |")
        lines += ["", ("Peak RSS per stage (MB; worker = the embedded inference worker, listener = `mednode "
                  "serve`'s own process; 3× the series' int16 pixels is the memory target):"), ""]
        stages = list(mine[0].peaks)
        lines += ["| code | slices | int16 pixels MB | 3× | " + " | ".join(f"worker: {s}" for s in stages)
                  + " | listener peak |",
                  "|---|---|---|---|" + "---|" * len(stages) + "---|"]
        for r in mine:
            listener = max((v["listener"] or 0) for v in r.peaks.values())
            lines.append(f"| {_label(r, args)} | {r.count} | {r.pixel_bytes / MB:,.0f} | {3 * r.pixel_bytes / MB:,.0f} | "
                         + " | ".join(_mb(r.peaks[s]["worker"]) for s in stages) + f" | {_mb(listener)} |")
    outside = [r for r in runs if not r.error]
    if args.baseline:
        lines += ["", (f"From the outside, same run, alternating (storescu done → SEG and SR in Orthanc, "
                  f"minus the {args.quiet_period_s:g} s quiet period; seconds):"), "",
                  "| slices | code | runs | median |", "|---|---|---|---|"]
        for count in args.counts:
            for code in (args.baseline, "this branch"):
                values = sorted(r.outside_s - args.quiet_period_s for r in outside
                                if r.count == count and r.code == code and r.outside_s is not None)
                if values:
                    lines.append(f"| {count} | {code} | {', '.join(f'{v:.2f}' for v in values)} | "
                                 f"{values[len(values) // 2]:.2f} |")
        # receiving is the node's too: a read-ahead while instances arrive competes with it
        lines += ["", "Sending the study (storescu start → done, seconds):", "",
                  "| slices | code | runs | median |", "|---|---|---|---|"]
        for count in args.counts:
            for code in (args.baseline, "this branch"):
                sends = sorted(r.send_s for r in outside if r.count == count and r.code == code)
                if sends:
                    lines.append(f"| {count} | {code} | {', '.join(f'{v:.2f}' for v in sends)} | "
                                 f"{sends[len(sends) // 2]:.2f} |")
    failed = [r for r in runs if r.error]
    for r in failed:
        lines.append(f"\nRun failed: {r.code}, {r.count} slices: {r.error}")
    load = os.getloadavg()
    lines += ["", (f"Conditions: synthetic CT of 512×512 int16 slices (bench/ingest.py's generator), sent with "
              f"`storescu +sd` over one association (`TCP_NODELAY=1`) to a fresh embedded `mednode serve` "
              f"(SQLite, embedded broker, embedded workers), quiet period {args.quiet_period_s:g} s, the "
              f"built-in CT analyzer rule, SEG + SR to a fresh Orthanc; sent once the inference worker was "
              f"ready and the machine idle; RSS sampled every {args.sample_ms} ms from /proc. Machine: "
              f"{machine()}; load average {load[0]:.1f} after; Python {sys.version.split()[0]}; "
              f"{dt.date.today().isoformat()}. Other work shared the machine: differences under ~15 % are noise.")]
    return "\n".join(lines)


def write_docs(section: str) -> None:
    block = (f"{BEGIN}\n## Latency: last instance → results in the PACS\n\n{section}\n\nReproduce: "
             f"`.venv/bin/python bench/latency.py --write-docs`.\n{END}")
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.write_text(text)


def export(ref: str, into: Path) -> Path:
    """The tree of git commit ``ref`` in ``into`` (``git archive``: no worktree, no checkout)."""
    into.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", ref], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=lambda s: [int(v) for v in s.split(",")], default=[300, 1000])
    parser.add_argument("--quiet-period-s", type=float, default=2.0)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--baseline", help="also run this git commit (before/after in one run)")
    parser.add_argument("--studies-per-node", type=int, default=1,
                        help="send this many different studies (of each count) to each fresh node, one after "
                             "the other: the first job of a node, then jobs of a worker that has run some")
    parser.add_argument("--sample-ms", type=int, default=20)
    parser.add_argument("--idle-max-s", type=float, default=120.0,
                        help="longest wait for an idle machine before each send (then it sends anyway)")
    parser.add_argument("--timeout-s", type=float, default=600.0, help="for the results, after the quiet period")
    parser.add_argument("--send-timeout-s", type=float, default=600.0)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--keep-logs", type=Path, default=None, help="copy each run's node log into this directory")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="mednode-latency-", dir=args.work))
    runs: list[Run] = []
    study_bytes: dict[int, int] = {}
    try:
        codes = [("this branch", REPO_ROOT)]
        if args.baseline:
            codes.insert(0, (args.baseline, export(args.baseline, work / "baseline")))
        for count in args.counts:
            studies = []
            for k in range(args.studies_per_node):
                study_dir = work / f"ct{count}-{k}"
                study_bytes[count] = generate_study(study_dir, count, seed=20240501 + k)
                studies.append((study_dir, study_uid_of(next(iter(sorted(study_dir.iterdir()))))))
            for repeat in range(args.repeats):
                for code, code_dir in codes:
                    print(f"{count} slices, {code}, run {repeat + 1}", file=sys.stderr, flush=True)
                    runs.extend(run_once(code_dir, code, studies, count, work, args))
            for study_dir, _ in studies:
                shutil.rmtree(study_dir, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    section = render(runs, args, study_bytes)
    print(section)
    if args.write_docs:
        write_docs(section)
    return 1 if any(r.error for r in runs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
