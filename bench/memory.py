#!/usr/bin/env python3
"""Peak memory of the CT analyzer job, stage by stage, in one process (issue 16, point 3).

A synthetic CT (``--counts`` slices of 512×512 int16, ``bench/ingest.py``'s generator) is run
through the inference worker's own code for the built-in CT analyzer rule, in a fresh Python
process per run that imports what an inference worker imports at start (``node.pipeline`` and its
warm-up): ``load_series_volume`` (files → volume), ``ct_analysis`` (the analyzer, the SEG, the SR)
and ``store_outputs`` (encoding both, writing them to a scratch store). Each stage's peak resident
set size is read from ``/proc/self/status`` (``VmHWM``, reset before the stage through
``/proc/self/clear_refs``), so short-lived peaks are not missed between samples as they can be
with ``bench/latency.py``'s 20 ms sampling of a running node.

``--code NAME=DIR`` runs the code of another tree (e.g. ``git worktree`` or ``git archive`` of
main) on the same study, alternating with this tree, for before/after in one run; the outputs of
each run (SEG PixelData, SR measurement values) are compared across codes.

``--enhanced`` also runs this tree on the same study converted into one Legacy Converted Enhanced
CT instance (highdicom's converter): the enhanced path (frames decoded one at a time from the file)
against the classic one, with the same outputs.

Usage::

    .venv/bin/python bench/memory.py --counts 300,1000
    .venv/bin/python bench/memory.py --counts 300 --enhanced --repeats 2
    .venv/bin/python bench/memory.py --counts 1000 --lungs --code before=/tmp/main-tree  # 3 segments
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

MB = 1_000_000

#: Runs inside the child process, with PYTHONPATH pointing at the code under test.
CHILD = r"""
import gc, hashlib, json, os, sys, time
from pathlib import Path
from types import SimpleNamespace

def status():
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields

def reset_peak():
    Path("/proc/self/clear_refs").write_text("5")

import node.pipeline as pipeline
pipeline.warm_up()
gc.collect()
baseline = status()["VmRSS"]
report = {"baseline": baseline, "stages": {}}

def measured(name, fn):
    def wrapper(*args, **kwargs):
        reset_peak()
        started = time.perf_counter()
        result = fn(*args, **kwargs)
        report["stages"][name] = {"peak": status()["VmHWM"], "after": status()["VmRSS"],
                                  "seconds": time.perf_counter() - started}
        return result
    return wrapper

pipeline.analyze_ct = measured("model", pipeline.analyze_ct)
pipeline.build_segmentation = measured("write SEG", pipeline.build_segmentation)
pipeline.build_volume_report = measured("write SR", pipeline.build_volume_report)

study_dir, scratch = Path(sys.argv[1]), Path(sys.argv[2])
paths = sorted(str(p) for p in study_dir.iterdir())

class Store:
    def absolute(self, relative):
        return Path(relative)
    def result_path(self, job_id, sop_uid):
        return f"{job_id}-{sop_uid}.dcm"
    def write(self, relative, data):
        target = scratch / relative
        target.write_bytes(data if isinstance(data, (bytes, bytearray, memoryview)) else b"".join(data))
        return SimpleNamespace(relative_path=relative, size_bytes=target.stat().st_size)

ctx = SimpleNamespace(store=Store())
job = SimpleNamespace(instance_paths={"series": paths}, id=1, key="job-1", amendment=None)
volume = measured("load", pipeline.load_series_volume)(ctx, job, ("CT",))
outputs = pipeline.ct_analysis(volume, job.key)
stored = measured("store", pipeline.store_outputs)(ctx, job.id, outputs)
report["whole job peak"] = max(s["peak"] for s in report["stages"].values())
seg = next(o.dataset for o in outputs if o.kind == "seg")
report["seg_pixel_sha256"] = hashlib.sha256(bytes(seg.PixelData)).hexdigest()
report["seg_frames"] = int(seg.NumberOfFrames)
report["measurements"] = next(o.summary for o in outputs if o.kind == "sr")["structures"]
report["files"] = [str(scratch / r.path) for r in stored]
print("RESULT " + json.dumps(report))
"""


def run_child(code_dir: Path, study_dir: Path, scratch: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MEDNODE_")}
    env["PYTHONPATH"] = str(code_dir)
    proc = subprocess.run([sys.executable, "-c", CHILD, str(study_dir), str(scratch)], env=env, check=False,
                          cwd=code_dir, capture_output=True, text=True)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return dict(json.loads(line[len("RESULT "):]))
    raise RuntimeError(f"the run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def dciodvfy(path: str) -> str:
    if shutil.which("dciodvfy") is None:
        return "dciodvfy not installed"
    proc = subprocess.run(["dciodvfy", "-new", path], check=False, capture_output=True, text=True)
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]
    return f"{len(errors)} errors" + (f": {errors[:3]}" if errors else "")


def add_lungs(study: Path) -> None:
    """Two air cylinders (-850 HU) inside the generator's water cylinder, in every slice: the
    analyzer then finds body, lungs and bone, as in a chest CT (three SEG segments)."""
    import numpy as np
    import pydicom

    for path in sorted(study.iterdir()):
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array.copy()
        size = pixels.shape[0]
        yy, xx = np.mgrid[:size, :size]
        for cx in (0.32 * size, 0.68 * size):
            pixels[np.hypot(yy - size / 2, xx - cx) < 0.11 * size] = -850
        ds.PixelData = pixels.tobytes()
        ds.save_as(path)


def to_enhanced(study: Path, out_dir: Path) -> Path:
    """``study``'s series as one Legacy Converted Enhanced CT instance in ``out_dir``."""
    import highdicom as hd
    import pydicom

    out_dir.mkdir()
    classic = [pydicom.dcmread(p) for p in sorted(study.iterdir())]
    enhanced = hd.legacy.LegacyConvertedEnhancedCTImage(
        classic, series_instance_uid=hd.UID(), series_number=2, sop_instance_uid=hd.UID(), instance_number=1)
    del classic
    enhanced.save_as(out_dir / "enhanced.dcm", enforce_file_format=True)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    from bench.ingest import generate_study, machine

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", type=lambda s: [int(v) for v in s.split(",")], default=[300, 1000])
    parser.add_argument("--code", action="append", default=[], help="NAME=DIR: also run this tree")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--lungs", action="store_true",
                        help="add two air-filled lungs (-850 HU) inside the body: three segments, not two")
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--enhanced", action="store_true",
                        help="also run this tree on the study as one Legacy Converted Enhanced CT instance")
    args = parser.parse_args(argv)
    codes = [(name, Path(path).resolve()) for name, _, path in (c.partition("=") for c in args.code)]
    codes.append(("this tree", REPO_ROOT))
    work = Path(tempfile.mkdtemp(prefix="mednode-memory-", dir=args.work))
    rows = []
    try:
        for count in args.counts:
            study = work / f"ct{count}"
            generate_study(study, count)
            if args.lungs:
                add_lungs(study)
            pixel_bytes = count * 512 * 512 * 2
            runs = [(name, code_dir, study) for name, code_dir in codes]
            if args.enhanced:
                runs.append(("this tree, enhanced", REPO_ROOT, to_enhanced(study, work / f"ct{count}-enhanced")))
            digests = {}
            for repeat in range(args.repeats):
                for name, code_dir, study_dir in runs:
                    scratch = work / f"out-{name.replace(' ', '_')}-{count}-{repeat}"
                    scratch.mkdir()
                    print(f"{count} slices, {name}, run {repeat + 1}", file=sys.stderr, flush=True)
                    report = run_child(code_dir, study_dir, scratch)
                    checks = "; ".join(f"{kind} {dciodvfy(f)}" for kind, f in zip(("SEG", "SR"), report["files"]))
                    digests[name] = (report["seg_pixel_sha256"], json.dumps(report["measurements"]))
                    rows.append((count, name, pixel_bytes, report, checks))
                    shutil.rmtree(scratch, ignore_errors=True)
            same = len(set(digests.values())) == 1
            print(f"{count} slices: SEG PixelData and SR measurements identical across codes: {same}",
                  file=sys.stderr)
            if not same:
                for name, value in digests.items():
                    print(f"  {name}: {value}", file=sys.stderr)
            shutil.rmtree(study, ignore_errors=True)
            shutil.rmtree(work / f"ct{count}-enhanced", ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    stages = ["load", "model", "write SEG", "write SR", "store"]
    print("| slices | code | int16 pixels MB | baseline MB | " + " | ".join(f"{s} peak MB (s)" for s in stages)
          + " | job peak MB | ÷ int16 pixels | (peak − baseline) ÷ int16 pixels |")
    print("|---|---|---|---|" + "---|" * len(stages) + "---|---|---|")
    for count, name, pixel_bytes, report, _ in rows:
        peak, base = report["whole job peak"], report["baseline"]
        cells = [f"{report['stages'][s]['peak'] / MB:,.0f} ({report['stages'][s]['seconds']:.1f})" for s in stages]
        print(f"| {count} | {name} | {pixel_bytes / MB:,.0f} | {base / MB:,.0f} | " + " | ".join(cells)
              + f" | {peak / MB:,.0f} | {peak / pixel_bytes:.2f}× | {(peak - base) / pixel_bytes:.2f}× |")
    for count, name, _, report, checks in rows:
        print(f"- {count} {name}: SEG {report['seg_frames']} frames, sha256 {report['seg_pixel_sha256'][:12]}; "
              f"{report['measurements']}; dciodvfy: {checks}")
    print(f"\nMachine: {machine()}; load average {os.getloadavg()[0]:.1f} after; Python {sys.version.split()[0]}.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
