#!/usr/bin/env python3
"""Parallel ingest benchmark: N modalities sending at once, Orthanc and mednode side by side.

Each of N associations (``--associations 4,16``) sends its own CT study of ``--total / N``
instances (512×512 int16) with ``storescu +sd``, all at once; the wall time from the first send
to the last answer gives instances/s. Receivers, each fresh per run and runs interleaved:

- Orthanc (index + storage);
- ``mednode serve`` on a fresh PostgreSQL database (127.0.0.1:5432) with ``listener_processes``
  from ``--listener-processes 1,2`` (one port, ``SO_REUSEPORT``), no embedded worker (Orthanc runs
  none either); every instance is checked to be indexed after the run.

Every peer runs with ``TCP_NODELAY=1``. The machine, its load and the runs go into the output
(markdown), which ``--write-docs`` puts into docs/BENCHMARKS.md.

Usage::

    /work/main/.venv/bin/python bench/parallel_ingest.py --associations 4,16 --listener-processes 1,2
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import sqlalchemy

from bench.ingest import MB, _load, generate_study, machine, send_study, wait_until_idle
from bench.nodes import mednode_argv, node_env, node_process
from tests.peers import Orthanc, PeerError, free_port
from tests.peers.services import postgres_database

DOCS = REPO_ROOT / "docs" / "BENCHMARKS.md"
BEGIN = "<!-- BEGIN parallel ingest (written by bench/parallel_ingest.py --write-docs) -->"
END = "<!-- END parallel ingest -->"


@dataclass
class Studies:
    associations: int
    per_association: int
    dirs: list[Path]
    total_bytes: int

    @property
    def count(self) -> int:
        return self.associations * self.per_association


@dataclass
class Leg:
    name: str
    seconds: dict[int, list[float]] = field(default_factory=dict)
    error: str | None = None


def send_all(port: int, studies: Studies, called: str, timeout_s: float) -> float:
    """Send every study over its own association, all at once; return the wall time."""
    start = time.perf_counter()
    with ThreadPoolExecutor(len(studies.dirs)) as pool:
        list(pool.map(lambda d: send_study(port, d, called, timeout_s), studies.dirs))
    return time.perf_counter() - start


def run_orthanc(work: Path, studies: Studies, timeout_s: float) -> float:
    out = work / f"orthanc-{uuid.uuid4().hex[:6]}"
    with Orthanc(out) as orthanc:
        wait_until_idle()
        seconds = send_all(orthanc.dicom_port, studies, orthanc.aet, timeout_s)
        stored = int(orthanc.get("/statistics")["CountInstances"])
    shutil.rmtree(out, ignore_errors=True)
    if stored != studies.count:
        raise PeerError(f"Orthanc indexed {stored} of {studies.count} instances")
    return seconds


def run_mednode(work: Path, studies: Studies, timeout_s: float, listener_processes: int) -> float:
    out = work / f"mednode-{uuid.uuid4().hex[:6]}"
    dicom_port = free_port()
    with postgres_database() as url:
        env = node_env(out / "data", dicom_port=dicom_port, database_url=url, quiet_period_s=600,
                       embedded_worker=False, listener_processes=listener_processes)
        env["PYTHONPATH"] = str(REPO_ROOT)
        node = node_process(mednode_argv("serve"), env=env, log_dir=out, cwd=out)
        (out / "data").mkdir(parents=True, exist_ok=True)
        try:
            node.start(port=dicom_port, timeout_s=120)
            time.sleep(2.0 * listener_processes)  # the listener children bind the port beside serve
            wait_until_idle()
            seconds = send_all(dicom_port, studies, "MEDNODE", timeout_s)
            engine = sqlalchemy.create_engine(url)
            with engine.connect() as connection:
                stored = connection.execute(sqlalchemy.text("SELECT count(*) FROM instance")).scalar()
            engine.dispose()
        finally:
            node.stop(timeout_s=30)
            shutil.rmtree(out, ignore_errors=True)
    if stored != studies.count:
        raise PeerError(f"mednode indexed {stored} of {studies.count} instances")
    return seconds


def render(legs: dict[str, Leg], all_studies: list[Studies], repeats: int, load_before: str) -> str:
    lines = [
        ("N modalities sending at once: each association its own CT study (512×512 int16) with "
         f"`storescu +sd`, `TCP_NODELAY=1`; median of {repeats} runs on a fresh receiver each, runs "
         "of the receivers interleaved. mednode: PostgreSQL index, no embedded worker (Orthanc runs "
         "none either); `listener_processes` = P serve one port with `SO_REUSEPORT`."),
        "",
        "| receiver | associations × instances | inst/s | MB/s | mednode ÷ Orthanc (run by run, geometric mean) | runs (s) |",
        "|---|---|---|---|---|---|",
    ]
    for studies in all_studies:
        n = studies.associations
        orthanc = legs["orthanc"].seconds.get(n, [])
        for leg in legs.values():
            runs = leg.seconds.get(n, [])
            if not runs:
                lines.append(f"| {leg.name} | {n} × {studies.per_association} | – | – | – | {leg.error or 'not run'} |")
                continue
            rate = studies.count / statistics.median(runs)
            paired = "–"
            if leg.name != "orthanc" and len(orthanc) == len(runs):
                paired = f"{statistics.geometric_mean([o / s for o, s in zip(orthanc, runs, strict=True)]):.2f}×"
            lines.append(
                f"| {leg.name} | {n} × {studies.per_association} | {rate:.0f} | "
                f"{rate * studies.total_bytes / studies.count / MB:.0f} | {paired} | "
                f"{', '.join(f'{s:.2f}' for s in runs)} |"
            )
    lines += [
        "",
        (f"Machine: {machine()}; load average {load_before} before, {_load()} after; Python "
         f"{platform.python_version()}; {dt.date.today().isoformat()}. Shared with other work while "
         "measuring: treat differences under ~15 % as noise."),
    ]
    return "\n".join(lines)


def write_docs(section: str) -> None:
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    block = f"{BEGIN}\n{section}\n{END}"
    if BEGIN in text and END in text:
        text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
    else:
        text = text.rstrip("\n") + "\n\n## Parallel ingest (several modalities at once)\n\n" + block + "\n"
    DOCS.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--associations", default="4,16")
    parser.add_argument("--total", type=int, default=600, help="instances per run, split over the associations")
    parser.add_argument("--listener-processes", default="1,2")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--send-timeout-s", type=float, default=600.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.associations.split(",")]
    processes = [int(p) for p in args.listener_processes.split(",")]
    with tempfile.TemporaryDirectory(prefix="mednode-pbench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        all_studies = []
        for n in counts:
            per = args.total // n
            dirs = [work / f"n{n}" / f"study{i}" for i in range(n)]
            total = sum(generate_study(d, per, seed=1000 * n + i) for i, d in enumerate(dirs))
            all_studies.append(Studies(n, per, dirs, total))
        load_before = _load()
        legs = {"orthanc": Leg("orthanc")}
        for p in processes:
            legs[f"mednode P={p}"] = Leg(f"mednode P={p}")
        for run in range(args.repeats):
            for studies in all_studies:
                for name, leg in legs.items():
                    if leg.error:
                        continue
                    try:
                        if name == "orthanc":
                            seconds = run_orthanc(work, studies, args.send_timeout_s)
                        else:
                            seconds = run_mednode(work, studies, args.send_timeout_s, int(name.split("=")[1]))
                    except (PeerError, OSError, subprocess.TimeoutExpired, TimeoutError) as exc:
                        leg.error = "failed: " + str(exc).splitlines()[0][:120].replace("|", "/")
                        print(f"  {name} {studies.associations} assoc run {run + 1}: {exc}", file=sys.stderr)
                        continue
                    leg.seconds.setdefault(studies.associations, []).append(seconds)
                    print(f"  {name} {studies.associations} assoc run {run + 1}: "
                          f"{studies.count / seconds:.0f} inst/s", file=sys.stderr)
        section = render(legs, all_studies, args.repeats, load_before)
    print(section)
    if args.write_docs:
        write_docs(section)
    return 0 if all(not leg.error for leg in legs.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TCP_NODELAY", "1")
    sys.exit(main())
