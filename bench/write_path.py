#!/usr/bin/env python3
"""The worker's own steps for a CT, side by side: this tree against a git commit (issue 16).

For the same synthetic CT (``bench/ingest.py``'s generator, read from the page cache) each code
runs, in its own process, alternating round by round: ``load`` (the files read, the sources'
copied attributes conformed and the volume assembled, as ``node.pipeline.load_series_volume``
does), then, on the built-in CT analyzer's masks, ``SEG`` (``dicom_io.seg.build_segmentation``),
``SR`` (``dicom_io.measurement_report.build_volume_report``) and ``encode`` (both written to bytes
as the store does). The analyzer runs untimed; each process runs all steps twice and reports
the second pass (a worker that has run a job before). Each process also times a plain
highdicom call on the same masks (the masks stacked on the last axis, one
``highdicom.seg.Segmentation``), which the issue asks the SEG to match, and prints a digest of
its SEG and SR with their creation dates and times (and highdicom's random Dimension
Organization UID) left out, so that the codes' outputs can be compared.

Usage::

    .venv/bin/python bench/write_path.py --baseline 0307d45 --counts 300 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
STEPS = ("load", "SEG", "SR", "encode", "plain highdicom SEG")


def _digest(data: bytes) -> str:
    """SHA-256 of a data set's elements less dates, times and the Dimension Organization UID."""
    import pydicom

    def norm(ds: Any) -> list[Any]:
        out: list[Any] = []
        for element in ds:
            if element.VR in ("DA", "TM", "DT") or element.keyword == "DimensionOrganizationUID":
                continue
            if element.VR == "SQ":
                out.append((element.tag, [norm(item) for item in element.value]))
            elif isinstance(element.value, bytes):
                out.append((element.tag, hashlib.sha256(element.value).hexdigest()))
            else:
                out.append((element.tag, repr(element.value)))
        return out

    return hashlib.sha256(repr(norm(pydicom.dcmread(BytesIO(data)))).encode()).hexdigest()[:16]


def child(study: Path) -> None:
    """One code's steps on ``study`` (run with that code first on ``sys.path``)."""
    here = Path(__file__).resolve().parent  # bench/inference.py would shadow the package
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    from node.pipeline import warm_up

    warm_up()
    paths = sorted(study.iterdir())
    result: dict[str, Any] = {}
    for _ in range(2):  # the second pass is timed: a worker that has run a job before
        result = _steps(paths)
    print(json.dumps(result))


def _steps(paths: list[Path]) -> dict[str, Any]:
    import highdicom as hd
    import numpy as np

    from dicom_io.measurement_report import StructureMeasurement, build_volume_report
    from dicom_io.seg import algorithm_identification, build_segmentation
    from dicom_io.source_header import conform_copied_attributes
    from dicom_io.volume import load_volume, read_dataset
    from inference.builtin.ct_analyzer import analyze_ct
    from node.pipeline import CT_ANALYZER

    seconds: dict[str, float] = {}

    started = time.perf_counter()
    datasets = conform_copied_attributes([read_dataset(p) for p in paths], purpose="bench")
    volume = load_volume(datasets)
    seconds["load"] = time.perf_counter() - started

    found = [s for s in analyze_ct(volume.pixels, volume.spacing_mm).structures if not s.is_empty]
    masks = {s.label: s.mask for s in found}

    started = time.perf_counter()
    seg = build_segmentation(volume, masks, series_instance_uid="2.25.1", sop_instance_uid="2.25.2",
                             series_number=9901, algorithm=CT_ANALYZER)
    seconds["SEG"] = time.perf_counter() - started

    started = time.perf_counter()
    measurements = [StructureMeasurement(label=s.label, segment_number=i, volume_ml=s.volume_ml, mean_hu=s.mean_hu)
                    for i, s in enumerate(found, start=1)]
    sr = build_volume_report(volume, seg, measurements, series_instance_uid="2.25.3", sop_instance_uid="2.25.4",
                             series_number=9902, algorithm=CT_ANALYZER)
    seconds["SR"] = time.perf_counter() - started

    started = time.perf_counter()
    encoded = []
    for dataset in (seg, sr):
        buffer = BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        encoded.append(buffer.getvalue())
    seconds["encode"] = time.perf_counter() - started

    started = time.perf_counter()
    stacked = np.stack([np.asarray(m, dtype=bool) for m in masks.values()], axis=-1)
    anatomy = hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure")
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=number, segment_label=label, segmented_property_category=anatomy,
            segmented_property_type=anatomy, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm_identification(CT_ANALYZER))
        for number, label in enumerate(masks, start=1)]
    hd.seg.Segmentation(
        source_images=volume.datasets, pixel_array=stacked, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid="2.25.5", series_number=1, sop_instance_uid="2.25.6",
        instance_number=1, manufacturer="bench", manufacturer_model_name="bench", software_versions="1",
        device_serial_number="1", omit_empty_frames=True)
    seconds["plain highdicom SEG"] = time.perf_counter() - started

    return {"seconds": seconds, "frames": int(seg.NumberOfFrames), "seg": _digest(encoded[0]),
            "sr": _digest(encoded[1])}


def run_child(code_dir: Path, study: Path) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(code_dir)}
    done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", str(study)], cwd=code_dir,
                          env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{code_dir}: the steps failed:\n{done.stderr[-3000:]}")
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", default="0307d45", help="git commit to compare with")
    parser.add_argument("--counts", type=lambda s: [int(v) for v in s.split(",")], default=[300])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    if args.child is not None:
        child(args.child)
        return 0
    sys.path.insert(0, str(REPO_ROOT))
    from bench.ingest import generate_study

    work = Path(tempfile.mkdtemp(prefix="mednode-write-path-"))
    try:
        baseline = work / "baseline"
        baseline.mkdir()
        archive = subprocess.run(["git", "-C", str(REPO_ROOT), "archive", args.baseline], capture_output=True,
                                 check=True)
        subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
        codes = [(args.baseline, baseline), ("this tree", REPO_ROOT)]
        for count in args.counts:
            study = work / f"ct{count}"
            generate_study(study, count)
            runs: dict[str, list[dict[str, Any]]] = {code: [] for code, _ in codes}
            for round_ in range(args.rounds):
                for code, code_dir in codes:
                    runs[code].append(run_child(code_dir, study))
                    print(f"{count} slices, round {round_ + 1}, {code}: "
                          f"{json.dumps(runs[code][-1]['seconds'])}", file=sys.stderr, flush=True)
            print(f"\n{count} slices ({runs['this tree'][0]['frames']} SEG frames), {args.rounds} rounds, "
                  f"load average {os.getloadavg()[0]:.1f}; seconds, runs (median):\n")
            print("| step | " + " | ".join(code for code, _ in codes) + " | after ÷ before |")
            print("|---|" + "---|" * len(codes) + "---|")
            for step in STEPS:
                medians = [statistics.median(r["seconds"][step] for r in runs[code]) for code, _ in codes]
                cells = [", ".join(f"{r['seconds'][step]:.2f}" for r in runs[code]) + f" ({m:.2f})"
                         for (code, _), m in zip(codes, medians, strict=True)]
                print(f"| {step} | " + " | ".join(cells) + f" | {medians[1] / medians[0]:.2f} |")
            same = {kind: len({r[kind] for rs in runs.values() for r in rs}) == 1 for kind in ("seg", "sr")}
            print(f"\nSame SEG in every run of both codes: {same['seg']}; same SR: {same['sr']} "
                  "(creation dates and times and the Dimension Organization UID left out).")
            shutil.rmtree(study, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
