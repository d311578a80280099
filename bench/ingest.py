#!/usr/bin/env python3
"""Ingest benchmark: how fast do dcmtk storescp, Orthanc and mednode take one CT study?

The same generated study (default 500 CT instances of 512x512 int16, one series) is sent with
``storescu +sd`` over one association to each receiver in turn, ``--repeats`` times, on a
fresh receiver every time; the median of each receiver is reported in instances/s and MB/s
(1 MB = 10**6 bytes of DICOM files), with mednode's ratio to Orthanc and to storescp.

Each receiver is measured warm: after it starts, the send waits until the machine's CPUs are
idle (:func:`wait_until_idle`), since ``mednode serve`` starts its embedded workers, which import
torch, as its DICOM port opens.

With ``--idle-associations N`` each receiver also holds N idle associations (a Verification
context each, opened by a pynetdicom SCU in another process before the send and released after
it), as a PACS node does while modalities keep their associations open; storescp, which serves
one association at a time, is then not run.

Every peer runs with ``TCP_NODELAY=1``: without it dcmtk's Nagle stall (~40 ms per C-STORE
response) dominates and the benchmark measures that instead of the receivers.

The mednode leg also measures the time from the last instance received to the SR arriving in
the destination PACS (an Orthanc), minus the configured quiet period: what completion,
routing, the queue, inference, SR building and delivery add after the study is complete.

Usage::

    .venv/bin/python bench/ingest.py                      # all legs, 3 repeats
    .venv/bin/python bench/ingest.py --legs storescp,orthanc --repeats 5
    .venv/bin/python bench/ingest.py --legs orthanc,mednode --idle-associations 3
    .venv/bin/python bench/ingest.py --write-docs         # update docs/BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

from bench.nodes import node_env, node_process
from tests.peers import (
    Orthanc,
    PeerError,
    StoreSCP,
    find_tool,
    free_port,
    peer_env,
)

DOCS = REPO_ROOT / "docs" / "BENCHMARKS.md"
BEGIN = "<!-- BEGIN ingest (written by bench/ingest.py --write-docs) -->"
END = "<!-- END ingest -->"
LEGS = ("storescp", "orthanc", "mednode")
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
MB = 1_000_000


# -- the study -----------------------------------------------------------------------------------
def generate_study(out_dir: Path, count: int, size: int = 512, seed: int = 20240501) -> int:
    """Write ``count`` CT instances of one series to ``out_dir``; return their total bytes.

    Content is a water cylinder with a denser core plus per-slice noise, in HU stored as int16
    with RescaleIntercept 0, so every slice differs and the files are realistic in size.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    radius = np.hypot(yy - size / 2, xx - size / 2)
    base = np.full((size, size), -1000, dtype=np.int16)
    base[radius < size * 0.42] = 40
    base[radius < size * 0.12] = 700
    study_uid = generate_uid(entropy_srcs=["mednode-bench-study", str(seed)])
    series_uid = generate_uid(entropy_srcs=["mednode-bench-series", str(seed)])
    frame_uid = generate_uid(entropy_srcs=["mednode-bench-frame", str(seed)])
    spacing_mm, thickness_mm = 0.7, 1.0
    total = 0
    for index in range(count):
        sop_uid = generate_uid(entropy_srcs=["mednode-bench-instance", str(seed), str(index)])
        pixels = base + rng.integers(-30, 31, size=(size, size), dtype=np.int16)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = sop_uid
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = frame_uid
        ds.Modality = "CT"
        ds.PatientName = "Bench^Ingest"
        ds.PatientID = "BENCH-INGEST"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyDate = ds.SeriesDate = "20240501"
        ds.StudyTime = ds.SeriesTime = "120000"
        ds.AccessionNumber = "BENCH1"
        ds.ReferringPhysicianName = ""
        ds.StudyID = "1"
        ds.SeriesNumber = 1
        ds.InstanceNumber = index + 1
        ds.BodyPartExamined = "CHEST"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.Manufacturer = "mednode-bench"
        ds.ImagePositionPatient = [
            -size * spacing_mm / 2,
            -size * spacing_mm / 2,
            index * thickness_mm,
        ]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [spacing_mm, spacing_mm]
        ds.SliceThickness = thickness_mm
        ds.KVP = 120
        ds.PositionReferenceIndicator = ""
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = 0
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
        ds.PixelData = pixels.tobytes()
        path = out_dir / f"ct{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def study_uid_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


# -- one send -----------------------------------------------------------------------------------
def _cpu_busy_idle() -> tuple[int, int]:
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, idle


def wait_until_idle(max_s: float = 120.0, busy_below: float = 0.15, window_s: float = 1.0) -> float:
    """Wait until the machine's CPUs are mostly idle for ``window_s``; return the seconds waited.

    A receiver is measured warm: ``mednode serve`` starts its embedded workers (which import
    torch) as the DICOM port opens, and Orthanc loads its plugins; sending at once would time
    their start-up, not their ingest. The disk is synced first, so that what an earlier leg left
    (deleted files to discard, dirty pages) is not paid for by the next receiver's first syncs.
    Returns after ``max_s`` whatever the load (Linux only; elsewhere it returns at once).
    """
    os.sync()
    if not Path("/proc/stat").exists():
        return 0.0
    start = time.monotonic()
    while time.monotonic() - start < max_s:
        busy0, idle0 = _cpu_busy_idle()
        time.sleep(window_s)
        busy1, idle1 = _cpu_busy_idle()
        total = (busy1 - busy0) + (idle1 - idle0)
        if total and (busy1 - busy0) / total < busy_below:
            break
    return time.monotonic() - start


def send_study(port: int, study_dir: Path, called: str, timeout_s: float) -> float:
    """Send the directory over one association with storescu; return the wall time in seconds.

    Raises
    ------
    PeerError
        If storescu exits non-zero (a refused or failed instance).
    """
    argv = [
        find_tool("storescu"),
        "-aet",
        "BENCH",
        "-aec",
        called,
        "+sd",
        "127.0.0.1",
        str(port),
        str(study_dir),
    ]
    start = time.perf_counter()
    done = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        env=peer_env(),
        timeout=timeout_s,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise PeerError(
            f"storescu to {called} exited {done.returncode}: {(done.stdout + done.stderr)[-2000:]}"
        )
    return elapsed


_IDLE_SCU = """
import sys
from pynetdicom import AE
port, called, count = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
scu = AE(ae_title="IDLE")
scu.add_requested_context("1.2.840.10008.1.1")
held = [scu.associate("127.0.0.1", port, ae_title=called) for _ in range(count)]
print(sum(a.is_established for a in held), flush=True)
sys.stdin.read()  # until the benchmark closes our stdin
for assoc in held:
    if assoc.is_established:
        assoc.release()
"""


@contextmanager
def idle_associations(port: int, called: str, count: int) -> Iterator[None]:
    """Hold ``count`` idle associations to the receiver (from another process) while inside.

    Raises
    ------
    PeerError
        If not all of them could be established.
    """
    if count <= 0:
        yield
        return
    holder = subprocess.Popen(
        [sys.executable, "-c", _IDLE_SCU, str(port), called, str(count)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None
        established = int(holder.stdout.readline() or 0)
        if established != count:
            raise PeerError(f"only {established} of {count} idle associations were accepted")
        time.sleep(1.0)  # let both ends settle into idling
        yield
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        try:
            holder.wait(timeout=30)
        except subprocess.TimeoutExpired:
            holder.kill()
            holder.wait()


@dataclass
class LegResult:
    """Timings of one receiver over all repeats."""

    name: str
    seconds: list[float] = field(default_factory=list)
    sr_latency_s: list[float] = field(default_factory=list)
    error: str | None = None
    note: str = ""


@dataclass
class Context:
    study_dir: Path
    study_uid: str
    count: int
    total_bytes: int
    work: Path
    quiet_period_s: float
    sr_timeout_s: float
    send_timeout_s: float
    idle_associations: int = 0
    orthanc_version: str = ""
    load_before: str = ""


# -- receivers ----------------------------------------------------------------------------------
def run_storescp(ctx: Context, run: int) -> tuple[float, float | None]:
    if ctx.idle_associations:
        raise PeerError("not run: storescp serves one association at a time")
    out = ctx.work / f"storescp-{run}"
    with StoreSCP(out / "in", log_dir=out, aet="STORESCP") as scp:
        wait_until_idle()
        seconds = send_study(scp.port, ctx.study_dir, "STORESCP", ctx.send_timeout_s)
        received = len(scp.received())
    shutil.rmtree(out, ignore_errors=True)
    if received != ctx.count:
        raise PeerError(f"storescp wrote {received} of {ctx.count} files")
    return seconds, None


def run_orthanc(ctx: Context, run: int) -> tuple[float, float | None]:
    out = ctx.work / f"orthanc-{run}"
    with Orthanc(out) as orthanc:
        ctx.orthanc_version = str(orthanc.get("/system").get("Version", ""))
        wait_until_idle()
        with idle_associations(orthanc.dicom_port, orthanc.aet, ctx.idle_associations):
            seconds = send_study(orthanc.dicom_port, ctx.study_dir, orthanc.aet, ctx.send_timeout_s)
        stored = int(orthanc.get("/statistics")["CountInstances"])
    shutil.rmtree(out, ignore_errors=True)
    if stored != ctx.count:
        raise PeerError(f"Orthanc indexed {stored} of {ctx.count} instances")
    return seconds, None


def run_mednode(ctx: Context, run: int) -> tuple[float, float | None]:
    """Send to ``mednode serve`` (destination: a fresh Orthanc) and time the SR coming back."""
    out = ctx.work / f"mednode-{run}"
    executable = REPO_ROOT / ".venv" / "bin" / "mednode"
    if not executable.exists():
        raise PeerError(f"{executable} not found: run `make venv` first")
    with Orthanc(out / "pacs", aet="PACS") as pacs:
        dicom_port = free_port()
        env = node_env(
            out / "data",
            dicom_port=dicom_port,
            database_url=f"sqlite:///{out / 'data' / 'mednode.db'}",
            quiet_period_s=ctx.quiet_period_s,
            destination=f"{pacs.aet}@127.0.0.1:{pacs.dicom_port}",
        )
        node = node_process([str(executable), "serve"], env=env, log_dir=out, cwd=out)
        (out / "data").mkdir(parents=True, exist_ok=True)
        try:
            node.start(port=dicom_port, timeout_s=120)
            wait_until_idle()
            with idle_associations(dicom_port, "MEDNODE", ctx.idle_associations):
                seconds = send_study(dicom_port, ctx.study_dir, "MEDNODE", ctx.send_timeout_s)
                received_at = time.monotonic()
            latency = _wait_for_sr(pacs, ctx, received_at)
        finally:
            node.stop(timeout_s=30)
    shutil.rmtree(out, ignore_errors=True)
    return seconds, latency


def _wait_for_sr(pacs: Orthanc, ctx: Context, received_at: float) -> float | None:
    """Poll the PACS for an SR of the study; return seconds after the last instance, less quiet."""
    deadline = received_at + ctx.quiet_period_s + ctx.sr_timeout_s
    while time.monotonic() < deadline:
        for row in pacs.find_instances(ctx.study_uid):
            if str(row.get("SOPClassUID", "")).startswith(SR_PREFIX):
                return time.monotonic() - received_at - ctx.quiet_period_s
        time.sleep(0.05)
    print(
        f"  mednode: no SR in the PACS within {ctx.quiet_period_s + ctx.sr_timeout_s:.0f} s",
        file=sys.stderr,
    )
    return None


RUNNERS: dict[str, Callable[[Context, int], tuple[float, float | None]]] = {
    "storescp": run_storescp,
    "orthanc": run_orthanc,
    "mednode": run_mednode,
}


# -- report -------------------------------------------------------------------------------------
def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    models = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    cpu = models[0] if models else cpu
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{cores} cores (nproc), {cpu}, {platform.system()} {platform.release()}"


def _load() -> str:
    """The 1-minute load average (how busy the shared machine was), or '?' off Linux."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "?"


def dcmtk_version() -> str:
    done = subprocess.run(
        [find_tool("storescu"), "--version"], capture_output=True, text=True, check=False
    )
    match = re.search(r"v(\d+\.\d+\.\d+)", done.stdout)
    return match[1] if match else "?"


def median(values: list[float]) -> float:
    return statistics.median(values)


def render(results: dict[str, LegResult], ctx: Context, repeats: int) -> str:
    mb = ctx.total_bytes / MB
    rate = {name: ctx.count / median(r.seconds) for name, r in results.items() if r.seconds}

    def ratio(name: str, ref: str) -> str:
        if name not in rate or ref not in rate:
            return "–"
        return f"{rate[name] / rate[ref]:.2f}×"

    idle = (
        f" while {ctx.idle_associations} other associations to the receiver were open and idle"
        if ctx.idle_associations else ""
    )
    lines = [
        (
            f"{ctx.count} CT instances of 512×512 int16 ({mb:.0f} MB), one series, sent with "
            f"`storescu +sd` over one association{idle}, `TCP_NODELAY=1`; median of {repeats} runs "
            "on a fresh receiver each, sent once the receiver has started and the machine is idle "
            "again, after a disk sync (runs of the receivers interleaved)."
        ),
        "",
        "| receiver | inst/s | MB/s | mednode ÷ this | runs (s) |",
        "|---|---|---|---|---|",
    ]
    labels = {
        "storescp": "dcmtk storescp → disk",
        "orthanc": f"Orthanc {ctx.orthanc_version} (index + storage)".replace("  ", " "),
        "mednode": "mednode serve (durable store + SQLite index, embedded worker)",
    }
    for name in LEGS:
        result = results.get(name, LegResult(name))
        if result.seconds:
            runs = ", ".join(f"{s:.2f}" for s in result.seconds)
            lines.append(
                f"| {labels[name]} | {rate[name]:.0f} | {rate[name] * mb / ctx.count:.0f} | "
                f"{ratio('mednode', name) if name != 'mednode' else '1.00×'} | {runs} |"
            )
        else:
            lines.append(f"| {labels[name]} | – | – | – | {result.error or 'not run'} |")
    node = results.get("mednode")
    orthanc = results.get("orthanc")
    lines.append("")
    if node and orthanc and node.seconds and len(node.seconds) == len(orthanc.seconds):
        paired = [o / n for o, n in zip(orthanc.seconds, node.seconds, strict=True)]
        geometric = statistics.geometric_mean(paired)
        runs = ", ".join(f"{r:.2f}" for r in paired)
        summary = f"geometric mean **{geometric:.2f}×**"
        lines += [f"mednode ÷ Orthanc run by run (each pair back to back): {runs}; {summary}.", ""]
    if node and node.sr_latency_s:
        values = ", ".join(f"{s:.1f}" for s in node.sr_latency_s)
        lines.append(
            f"Last instance received → SR stored in the PACS, minus the quiet period "
            f"({ctx.quiet_period_s:g} s): median **{median(node.sr_latency_s):.1f} s** "
            f"(runs: {values})."
        )
    else:
        lines.append(
            "Last instance received → SR stored in the PACS, minus the quiet period: "
            "TODO (not measured in this run)."
        )
    lines += [
        "",
        (
            f"Machine: {machine()}; load average {ctx.load_before} before, {_load()} after; "
            f"dcmtk {dcmtk_version()}; Python {platform.python_version()}; "
            f"{dt.date.today().isoformat()}. The machine was shared with other work while measuring, "
            "so treat differences under ~15 % as noise."
        ),
    ]
    return "\n".join(lines)


def write_docs(section: str) -> None:
    """Replace the ingest section of docs/BENCHMARKS.md (or add it), leaving the rest as is."""
    block = (
        f"{BEGIN}\n## Ingest\n\n{section}\n\nReproduce: `.venv/bin/python bench/ingest.py "
        f"--write-docs`.\n{END}"
    )
    text = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    DOCS.write_text(text)


# -- main ---------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=500, help="instances in the study")
    parser.add_argument("--repeats", type=int, default=3, help="runs per receiver (median)")
    parser.add_argument(
        "--legs", default=",".join(LEGS), help=f"comma-separated receivers, from {', '.join(LEGS)}"
    )
    parser.add_argument(
        "--quiet-period-s",
        type=float,
        default=2.0,
        help="mednode's completion quiet period (MEDNODE_QUIET_PERIOD_S)",
    )
    parser.add_argument(
        "--sr-timeout-s",
        type=float,
        default=600.0,
        help="how long to wait for the SR after the quiet period",
    )
    parser.add_argument("--send-timeout-s", type=float, default=600.0)
    parser.add_argument(
        "--idle-associations",
        type=int,
        default=0,
        help="idle associations each receiver holds open during the send (storescp is then not run)",
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where to put the study and receivers (default: a temp dir)",
    )
    parser.add_argument(
        "--write-docs", action="store_true", help="update the ingest section of docs/BENCHMARKS.md"
    )
    args = parser.parse_args(argv)
    legs = [leg.strip() for leg in args.legs.split(",") if leg.strip()]
    unknown = set(legs) - set(LEGS)
    if unknown:
        parser.error(f"unknown legs {sorted(unknown)}; choose from {', '.join(LEGS)}")
    args.legs = legs
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mednode-bench-", dir=args.workdir) as tmp:
        work = Path(tmp)
        study_dir = work / "study"
        started = time.perf_counter()
        total = generate_study(study_dir, args.count)
        print(
            f"generated {args.count} instances ({total / MB:.0f} MB) in "
            f"{time.perf_counter() - started:.1f} s",
            file=sys.stderr,
        )
        ctx = Context(
            study_dir=study_dir,
            study_uid=study_uid_of(min(study_dir.iterdir())),
            count=args.count,
            total_bytes=total,
            work=work,
            quiet_period_s=args.quiet_period_s,
            sr_timeout_s=args.sr_timeout_s,
            send_timeout_s=args.send_timeout_s,
            idle_associations=args.idle_associations,
            load_before=_load(),
        )
        results = {leg: LegResult(leg) for leg in args.legs}
        for run in range(args.repeats):
            for leg in args.legs:
                result = results[leg]
                if result.error:
                    continue
                try:
                    seconds, latency = RUNNERS[leg](ctx, run)
                except (PeerError, OSError, subprocess.TimeoutExpired, TimeoutError) as exc:
                    # Keep the other receivers' numbers; this leg is reported as failed.
                    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
                    why = lines[0][:100] + (f" … {lines[-1][:100]}" if len(lines) > 1 else "")
                    result.error = "failed: " + why.replace("|", "/")
                    print(f"  {leg} run {run + 1}: {exc}", file=sys.stderr)
                    continue
                result.seconds.append(seconds)
                if latency is not None:
                    result.sr_latency_s.append(latency)
                print(
                    f"  {leg} run {run + 1}: {args.count / seconds:.0f} inst/s"
                    + (f", SR after {latency:.1f} s" if latency is not None else ""),
                    file=sys.stderr,
                )
        section = render(results, ctx, args.repeats)
    print(section)
    if args.write_docs:
        write_docs(section)
        print(f"updated {DOCS}", file=sys.stderr)
    return 0 if all(r.seconds for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
