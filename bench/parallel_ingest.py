#!/usr/bin/env python3
"""Parallel ingest benchmark: N modalities sending at once, Orthanc and mednode side by side.

Each of N associations (``--associations 1,4,16``) sends its own CT study of ``--total / N``
instances (512×512 int16) with ``storescu +sd``, all at once; the wall time from the first send
to the last answer gives instances/s. Receivers, each fresh per run and runs interleaved:

- dcmtk ``storescp`` writing files (no index, no sync; without ``--fork`` it serves the
  associations one after another);
- Orthanc (index + storage);
- ``mednode serve`` on a fresh PostgreSQL database (127.0.0.1:5432) with ``listener_processes``
  from ``--listener-processes 1,2`` (one port, ``SO_REUSEPORT``), and with ``--sqlite`` also on
  the embedded SQLite index (one process), no embedded worker (Orthanc runs none either); every
  instance is checked to be indexed after the run. ``--code NAME=PATH`` adds mednode legs run
  from another checkout (e.g. the code before a change, in a ``git worktree``), so that before
  and after are measured in the same run.

Every peer runs with ``TCP_NODELAY=1``. The machine, its load and the runs go into the output
(markdown), which ``--write-docs`` puts into docs/BENCHMARKS.md.

Usage::

    /work/main/.venv/bin/python bench/parallel_ingest.py --associations 1,4,16 --listener-processes 1,2
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
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import sqlalchemy

from bench.ingest import MB, _load, generate_study, machine, send_study, wait_until_idle
from bench.nodes import mednode_argv, node_env, node_process
from tests.peers import Orthanc, PeerError, StoreSCP, free_port
from tests.peers.services import postgres_database

DOCS = REPO_ROOT / "docs" / "BENCHMARKS.md"
BEGIN = "<!-- BEGIN parallel ingest (written by bench/parallel_ingest.py --write-docs) -->"
END = "<!-- END parallel ingest -->"
#: Longest wait for the machine to go idle before each send (``--idle-wait-s``): on a machine
#: other work keeps busy, a long wait only stretches the run.
IDLE_WAIT_S = 120.0


@dataclass
class Options:
    idle_wait_s: float = IDLE_WAIT_S


OPTIONS = Options()


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
    kind: str = "orthanc"  #: orthanc, storescp or mednode
    processes: int = 1  #: mednode's listener_processes
    sqlite: bool = False  #: mednode on its embedded SQLite index instead of PostgreSQL
    code: Path = REPO_ROOT  #: the checkout mednode runs from
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
        wait_until_idle(OPTIONS.idle_wait_s)
        seconds = send_all(orthanc.dicom_port, studies, orthanc.aet, timeout_s)
        stored = int(orthanc.get("/statistics")["CountInstances"])
    shutil.rmtree(out, ignore_errors=True)
    if stored != studies.count:
        raise PeerError(f"Orthanc indexed {stored} of {studies.count} instances")
    return seconds


def run_storescp(work: Path, studies: Studies, timeout_s: float) -> float:
    out = work / f"storescp-{uuid.uuid4().hex[:6]}"
    with StoreSCP(out / "in", log_dir=out, aet="STORESCP") as scp:
        wait_until_idle(OPTIONS.idle_wait_s)
        seconds = send_all(scp.port, studies, "STORESCP", timeout_s)
        received = len(scp.received())
    shutil.rmtree(out, ignore_errors=True)
    if received != studies.count:
        raise PeerError(f"storescp wrote {received} of {studies.count} files")
    return seconds


def run_mednode(work: Path, studies: Studies, timeout_s: float, leg: Leg) -> float:
    out = work / f"mednode-{uuid.uuid4().hex[:6]}"
    dicom_port = free_port()
    with ExitStack() as stack:
        url = (f"sqlite:///{out / 'data' / 'mednode.db'}" if leg.sqlite
               else stack.enter_context(postgres_database()))
        env = node_env(out / "data", dicom_port=dicom_port, database_url=url, quiet_period_s=600,
                       embedded_worker=False, listener_processes=leg.processes)
        env["PYTHONPATH"] = str(leg.code)
        node = node_process(mednode_argv("serve"), env=env, log_dir=out, cwd=out)
        (out / "data").mkdir(parents=True, exist_ok=True)
        try:
            node.start(port=dicom_port, timeout_s=120)
            time.sleep(2.0 * leg.processes)  # the listener children bind the port beside serve
            wait_until_idle(OPTIONS.idle_wait_s)
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


def _paired(runs: list[float], reference: list[float]) -> str:
    """This leg's speed ÷ the reference's, run by run (geometric mean); '–' without pairs."""
    if not runs or len(runs) != len(reference):
        return "–"
    return f"{statistics.geometric_mean([r / s for r, s in zip(reference, runs, strict=True)]):.2f}×"


def render(legs: dict[str, Leg], all_studies: list[Studies], repeats: int, load_before: str,
           load_during: list[float]) -> str:
    codes = sorted({str(leg.code) for leg in legs.values() if leg.kind == "mednode"})
    lines = [
        ("N modalities sending at once: each association its own CT study (512×512 int16) with "
         f"`storescu +sd`, `TCP_NODELAY=1`; median of {repeats} runs on a fresh receiver each, runs "
         "of the receivers interleaved. mednode: no embedded worker (Orthanc runs none either); "
         "`listener_processes` = P serve one port with `SO_REUSEPORT`; PostgreSQL index unless "
         "the leg says SQLite. storescp: no `--fork`, so it serves the associations one after another."),
        "",
        "| receiver | associations × instances | inst/s | MB/s | ÷ Orthanc | ÷ storescp | runs (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for studies in all_studies:
        n = studies.associations
        orthanc = next((leg.seconds.get(n, []) for leg in legs.values() if leg.kind == "orthanc"), [])
        storescp = next((leg.seconds.get(n, []) for leg in legs.values() if leg.kind == "storescp"), [])
        for leg in legs.values():
            runs = leg.seconds.get(n, [])
            if not runs:
                lines.append(f"| {leg.name} | {n} × {studies.per_association} | – | – | – | – | {leg.error or 'not run'} |")
                continue
            rate = studies.count / statistics.median(runs)
            lines.append(
                f"| {leg.name} | {n} × {studies.per_association} | {rate:.0f} | "
                f"{rate * studies.total_bytes / studies.count / MB:.0f} | "
                f"{_paired(runs, orthanc) if leg.kind != 'orthanc' else '–'} | "
                f"{_paired(runs, storescp) if leg.kind != 'storescp' else '–'} | "
                f"{', '.join(f'{s:.2f}' for s in runs)} |"
            )
    during = f"{min(load_during):.1f}–{max(load_during):.1f}" if load_during else "?"
    lines += [
        "",
        ("÷ Orthanc, ÷ storescp: this leg's speed over the other's, run by run (the runs of one round "
         "are back to back), geometric mean."),
        "",
        (f"Machine: {machine()}; load average {load_before} before, {during} at the sends, {_load()} "
         f"after; Python {platform.python_version()}; {dt.date.today().isoformat()}. Shared with "
         "other work while measuring: treat differences under ~15 % as noise."
         + (f" mednode code: {', '.join(codes)}." if len(codes) > 1 else "")),
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
    parser.add_argument("--associations", default="1,4,16")
    parser.add_argument("--total", type=int, default=600, help="instances per run, split over the associations")
    parser.add_argument("--listener-processes", default="1,2")
    parser.add_argument("--sqlite", action="store_true", help="also run mednode on its embedded SQLite index")
    parser.add_argument("--no-storescp", action="store_true")
    parser.add_argument("--code", action="append", default=[], metavar="NAME=PATH",
                        help="also run mednode's legs from this checkout, labelled NAME")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--send-timeout-s", type=float, default=600.0)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--idle-wait-s", type=float, default=IDLE_WAIT_S,
                        help="longest wait for an idle machine before each send")
    parser.add_argument("--write-docs", action="store_true")
    args = parser.parse_args(argv)
    OPTIONS.idle_wait_s = args.idle_wait_s
    counts = [int(n) for n in args.associations.split(",")]
    processes = [int(p) for p in args.listener_processes.split(",")]
    codes: list[tuple[str, Path]] = [("", REPO_ROOT)]
    for item in args.code:
        label, _, path = item.partition("=")
        codes.append((f"{label} ", Path(path).resolve()))
    legs = {"orthanc": Leg("orthanc", "orthanc")}
    if not args.no_storescp:
        legs["storescp"] = Leg("storescp", "storescp")
    for label, code in codes:
        for p in processes:
            legs[f"{label}mednode P={p}"] = Leg(f"{label}mednode P={p}", "mednode", p, code=code)
        if args.sqlite:
            legs[f"{label}mednode SQLite"] = Leg(f"{label}mednode SQLite", "mednode", 1, sqlite=True, code=code)
    load_during: list[float] = []
    with tempfile.TemporaryDirectory(prefix="mednode-pbench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        all_studies = []
        for n in counts:
            per = args.total // n
            dirs = [work / f"n{n}" / f"study{i}" for i in range(n)]
            total = sum(generate_study(d, per, seed=1000 * n + i) for i, d in enumerate(dirs))
            all_studies.append(Studies(n, per, dirs, total))
        load_before = _load()
        for run in range(args.repeats):
            for studies in all_studies:
                for name, leg in legs.items():
                    if leg.error:
                        continue
                    load_during.append(os.getloadavg()[0])
                    try:
                        if leg.kind == "orthanc":
                            seconds = run_orthanc(work, studies, args.send_timeout_s)
                        elif leg.kind == "storescp":
                            seconds = run_storescp(work, studies, args.send_timeout_s)
                        else:
                            seconds = run_mednode(work, studies, args.send_timeout_s, leg)
                    except (PeerError, OSError, subprocess.TimeoutExpired, TimeoutError) as exc:
                        leg.error = "failed: " + str(exc).splitlines()[0][:120].replace("|", "/")
                        print(f"  {name} {studies.associations} assoc run {run + 1}: {exc}", file=sys.stderr)
                        continue
                    leg.seconds.setdefault(studies.associations, []).append(seconds)
                    print(f"  {name} {studies.associations} assoc run {run + 1}: "
                          f"{studies.count / seconds:.0f} inst/s (load {os.getloadavg()[0]:.1f})", file=sys.stderr)
        section = render(legs, all_studies, args.repeats, load_before, load_during)
    print(section)
    if args.write_docs:
        write_docs(section)
    return 0 if all(not leg.error for leg in legs.values()) else 1


if __name__ == "__main__":
    os.environ.setdefault("TCP_NODELAY", "1")
    sys.exit(main())
