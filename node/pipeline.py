"""The pipeline of one job, on one screen: load → select series → volume → infer → write → store.

``run_job`` and ``deliver`` are plain functions over a :class:`~node.context.NodeContext`; the
Celery tasks in :mod:`node.tasks` are thin shells around them, so the whole flow is testable
in-process.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Self

import numpy as np
from pydicom.dataset import Dataset
from sqlalchemy.exc import OperationalError

from dicom_io.equipment import AlgorithmInfo
from dicom_io.errors import DicomIOError
from dicom_io.measurement_report import StructureMeasurement, build_volume_report
from dicom_io.rejection_note import build_rejection_note
from dicom_io.seg import build_segmentation
from dicom_io.slice_stack import frame_plane, number_of_frames
from dicom_io.source_header import conform_copied_attributes
from dicom_io.sr_common import InstanceReference, versioned_description
from dicom_io.uids import derived_uid
from dicom_io.volume import SeriesAccumulator, Volume, load_volume, read_dataset
from inference.builtin.ct_analyzer import ANALYZER_NAME, ANALYZER_VERSION, analyze_ct
from inference.errors import (
    InferenceError,
    InvalidInputError,
    ModelNotConfiguredError,
    ModelOutOfMemoryError,
    ModelServerUnavailableError,
)
from inference.monai_bundle import MonaiBundle
from node import audit, clock, jobs, metrics
from node.config import BUNDLE_MODALITIES, CT_ANALYSIS_MODALITIES, plan_tasks
from node.context import NodeContext
from node.failures import failure_reason
from node.preloaded import HOLD_AFTER_DUE_S, key_of, process_preloaded
from node.prior_stage import job_priors, rule_priors
from node.vlm_stage import read_series, run_vlm_tasks
from node.volume_budget import MB, VolumeBudget, memory_limit_bytes, process_budget, resident_bytes
from storage.errors import StorageError
from storage.store import InstanceStore

log = logging.getLogger(__name__)

CT_ANALYZER = AlgorithmInfo(name=ANALYZER_NAME, version=ANALYZER_VERSION, family="builtin")
#: Series numbers of mednode's outputs: high, so viewers list them after the source series.
SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
BUNDLE_SERIES_NUMBER = 9940
REJECTION_SERIES_NUMBER = 9990
#: Values longer than this (Pixel Data) are read when the volume decodes them, not with the header.
_DEFER_PIXELS_BYTES = 64 * 1024
#: A volume job's peak memory above the worker's baseline, in multiples of its series' int16 pixel
#: bytes, reserved from the worker's volume memory budget: the built-in CT analyzer measured
#: 1.9x at 300 and 1,000 slices (bench/memory.py, docs/BENCHMARKS.md); a bundle also holds a
#: float32 copy of the volume and its network's activations (not measured: an estimate)
CT_ANALYSIS_PEAK_FACTOR = 2.0
BUNDLE_PEAK_FACTOR = 4.0


class TransientError(RuntimeError):
    """A failure worth retrying (database or disk unavailable for a moment)."""


@dataclass(frozen=True)
class Output:
    """A DICOM object a task produced, before it is stored."""

    kind: str
    dataset: Dataset
    summary: dict[str, Any]
    #: None for every destination of the job, else the ones it is meant for
    destinations: tuple[str, ...] | None = None


def _version(amendment: jobs.Amendment | None) -> int | None:
    return amendment.version if amendment else None


def _predecessors(amendment: jobs.Amendment | None, *slot: str) -> list[InstanceReference]:
    return amendment.predecessors(*slot) if amendment else []


def _timed(stage: str, started: float, job_key: str) -> None:
    elapsed = clock.timed(stage, started)
    metrics.STAGE_DURATION.labels(stage=stage).observe(elapsed)
    log.info("%s: %s took %.2f s", job_key, stage, elapsed)


def warm_up() -> None:
    """Load, at worker start, the tables of the standard the first job would otherwise load
    itself: highdicom's module and IOD maps, read to check the attributes a result copies from
    its CT sources (~0.5 s on a 2-core machine, in the first job's load stage)."""
    from pydicom.uid import CTImageStorage

    from dicom_io.source_header import copied_attributes

    copied_attributes(CTImageStorage)


class _RunningJobs:
    """How many jobs this process runs now: a read-ahead is made only by an idle worker."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.count = 0

    @contextmanager
    def one(self) -> Iterator[None]:
        with self._lock:
            self.count += 1
        try:
            yield
        finally:
            with self._lock:
                self.count -= 1


RUNNING_JOBS = _RunningJobs()


# -- stages ---------------------------------------------------------------------------------------
def _is_single_frame(header: Dataset) -> bool:
    """Whether ``header`` is a classic single-frame image (not an enhanced one, even of one frame)."""
    return number_of_frames(header) == 1 and "PerFrameFunctionalGroupsSequence" not in header


def _one_frame_a_position(headers: list[Dataset]) -> bool:
    """Whether the frames of enhanced instances each have a position of their own (to 0.01 mm);
    True for single-frame instances, whose duplicates :func:`dicom_io.volume.load_volume` reports."""
    if _is_single_frame(headers[0]):
        return True
    seen: set[tuple[float, ...]] = set()
    for header in headers:
        for index in range(number_of_frames(header)):
            _, position = frame_plane(header, index)
            if position is None:
                continue
            key = tuple(round(v, 2) for v in position)
            if key in seen:
                return False
            seen.add(key)
    return True


def select_series(store: InstanceStore, instance_paths: Mapping[str, Sequence[str]],
                  modalities: tuple[str, ...]) -> tuple[str, int]:
    """The largest (most frames) of a job's series (``instance_paths``: series UID → stored
    paths) of one of ``modalities``, single-frame or enhanced (multi-frame) alike, and its pixels'
    bytes in int16: Rows × Columns × Number of Frames × 2 summed over its instances.

    A classic series has one frame of one size per instance, so its first header tells them all; an
    enhanced (multi-frame) CT or MR instance may hold a whole volume, so each one's header is read.

    Raises
    ------
    InvalidInputError
        If the job's series hold no series of that modality.
    """
    candidates = []
    for series_uid, paths in instance_paths.items():
        first = read_dataset(store.absolute(paths[0]), stop_before_pixels=True) if paths else None
        if first is None or str(first.get("Modality", "")).upper() not in modalities:
            continue
        headers = ([first] * len(paths) if number_of_frames(first) == 1 else
                   [first] + [read_dataset(store.absolute(p), stop_before_pixels=True) for p in paths[1:]])
        frames = [number_of_frames(h) for h in headers]
        pixel_bytes = sum(int(h.get("Rows", 0) or 0) * int(h.get("Columns", 0) or 0) * n * 2
                          for h, n in zip(headers, frames, strict=True))
        # an enhanced series with several frames at one position (4D: phases, diffusion
        # directions, echoes) is no volume load_volume can build: any other series goes first
        candidates.append((_one_frame_a_position(headers), sum(frames), series_uid, pixel_bytes))
    if not candidates:
        raise InvalidInputError(f"the study has no {'/'.join(modalities)} series for this rule")
    *_, series_uid, pixel_bytes = max(candidates)
    return series_uid, pixel_bytes


class _NotWanted(Exception):
    """A read-ahead given up: a job of another series started meanwhile."""


def read_volume(store: InstanceStore, paths: Sequence[str], purpose: str,
                keep_going: Callable[[], bool] | None = None, held: SeriesAccumulator | None = None) -> Volume:
    """Read the instances at ``paths`` into a volume whose headers are fit to be copied into
    results (``purpose`` names the warning about what is left empty); ``keep_going``, asked
    before each file, stops a read-ahead that is no longer wanted (:class:`_NotWanted`). With
    ``held`` (single-frame images read ahead), only the files it lacks are read, and the volume
    is stacked in its buffer (:meth:`dicom_io.volume.SeriesAccumulator.volume`: the volume
    :func:`dicom_io.volume.load_volume` makes of the same files)."""
    if held is not None:
        read_slices(store, paths, held, keep_going)
        return held.volume(paths, lambda datasets: conform_copied_attributes(datasets, purpose=purpose))
    store.prefetch(paths)  # the disk reads the series while the headers are parsed
    # headers now, each slice's pixels read while it is decoded into the volume and then dropped:
    # the series' encoded pixels and the volume are never in memory side by side
    datasets = []
    for path in paths:
        if keep_going is not None and not keep_going():
            raise _NotWanted
        datasets.append(read_dataset(store.absolute(path), defer_size=_DEFER_PIXELS_BYTES))
    datasets = conform_copied_attributes(datasets, purpose=purpose)
    return load_volume(datasets, release_pixel_data=True)


def read_slices(store: InstanceStore, paths: Sequence[str], held: SeriesAccumulator,
                keep_going: Callable[[], bool] | None = None) -> int:
    """Decode into ``held`` the single-frame images of ``paths`` it lacks, each file's Pixel Data
    let go once decoded; return how many were read."""
    missing = [path for path in paths if path not in held]
    store.prefetch(missing)
    for path in missing:
        if keep_going is not None and not keep_going():
            raise _NotWanted
        held.add(path, read_dataset(store.absolute(path), defer_size=_DEFER_PIXELS_BYTES), release_pixel_data=True)
    return len(missing)


def load_series_volume(ctx: NodeContext, job: jobs.ClaimedJob, modalities: tuple[str, ...],
                       series_uid: str | None = None) -> Volume:
    """Read ``series_uid`` (by default the largest matched series of one of ``modalities``) into a
    volume, or take it from this worker's read-ahead of exactly its files (:mod:`node.preloaded`).

    Raises
    ------
    InvalidInputError
        If the job's series hold no series of that modality.
    """
    if series_uid is None:
        series_uid, _ = select_series(ctx.store, job.instance_paths, modalities)
    started = time.perf_counter()
    paths = job.instance_paths[series_uid]
    ahead = process_preloaded().take(key_of(series_uid, paths), job.key)
    if isinstance(ahead, Volume):
        volume = ahead
        log.info("%s: series %s was read ahead (%d instances)", job.key, series_uid, len(paths))
    else:
        if ahead is not None:
            log.info("%s: %d of the %d instances of series %s were read ahead", job.key,
                     sum(path in ahead for path in paths), len(paths), series_uid)
        # once per job, so one warning names what is left empty in all its results
        volume = read_volume(ctx.store, paths, purpose=f"job {job.id}", held=ahead)
    _timed("load_volume", started, job.key)
    return volume


def preload_series(ctx: NodeContext, study_uid: str, series_uids: Sequence[str],
                   modalities: tuple[str, ...], due_in_s: float = 0.0, *, while_receiving: bool = False) -> str:
    """See :func:`_preload_series`; counts its outcome in ``mednode_volume_preloads_total``."""
    outcome = _preload_series(ctx, study_uid, series_uids, modalities, due_in_s, while_receiving)
    metrics.VOLUME_PRELOADS.labels(outcome=outcome.split(":")[0]).inc()
    return outcome


def _preload_series(ctx: NodeContext, study_uid: str, series_uids: Sequence[str],
                    modalities: tuple[str, ...], due_in_s: float, while_receiving: bool) -> str:
    """Read ahead, into this worker's slot (:mod:`node.preloaded`), the series a volume job of
    ``study_uid`` over ``series_uids`` would load, while the study is still quiet (for another
    ``due_in_s``) or, ``while_receiving``, still arriving; return what happened, for the log and
    ``mednode_volume_preloads_total``.

    Only an idle worker reads ahead (no job running in this process, no read-ahead of another
    series held), and only a study still receiving (a complete one's job is already queued, and
    reads its series itself); a series larger than the volume memory budget is left to its job.
    A series of single-frame images is held as slices, and a later hint reads only the files
    that arrived since; an enhanced (multi-frame) series is read as one volume, once quiet.
    """
    if RUNNING_JOBS.count:
        return "skipped: the worker is busy"
    with ctx.sessions() as session:
        instance_paths = jobs.receiving_study_paths(session, study_uid, series_uids)
    if not instance_paths:
        return "skipped: the study is no longer receiving"
    try:
        series_uid, pixel_bytes = select_series(ctx.store, instance_paths, modalities)
    except InvalidInputError:
        return "skipped: no such series"
    limit_mb = ctx.settings.volume_memory_budget_mb
    if limit_mb is not None and pixel_bytes > limit_mb * 1024 * 1024:
        return "skipped: larger than the volume memory budget"
    budget = volume_budget(ctx)
    if budget.held_bytes or budget.waiting:
        return "skipped: the worker is busy"
    room = _worker_memory(budget)
    if room is not None and room[0] + pixel_bytes > room[1]:
        return "skipped: larger than this worker can hold"
    paths = instance_paths[series_uid]
    slices = _is_single_frame(read_dataset(ctx.store.absolute(paths[0]), stop_before_pixels=True))
    if while_receiving and not slices:
        return "skipped: a multi-frame series is read once its study is quiet"
    reading = process_preloaded().begin(key_of(series_uid, paths), f"series {series_uid}",
                                        hold_s=max(due_in_s, 0.0) + HOLD_AFTER_DUE_S, slices=slices,
                                        study=study_uid)
    if reading is None:
        return "skipped: a read-ahead is held or running"
    result: Volume | SeriesAccumulator | None = None
    started = time.perf_counter()
    try:
        # the bytes being read, while they are read; held afterwards, they are dropped before any
        # other volume job of this worker loads its series
        if slices:
            # reserved for the series' slices so far and twice as many: their pages are touched
            # only as slices are written (a series still arriving grows into it)
            held = reading.held or SeriesAccumulator(capacity=max(2 * len(paths), 1024))
            new_bytes = pixel_bytes * sum(path not in held for path in paths) // len(paths)
            with budget.reserve(new_bytes, f"read-ahead of series {series_uid}"):
                count = read_slices(ctx.store, paths, held, keep_going=lambda: reading.wanted)
                if not while_receiving:  # quiet: stacked now, so that its job finds the volume made
                    held.volume(paths, lambda datasets: conform_copied_attributes(
                        datasets, purpose=f"series {series_uid} (read ahead)"))
            result = held
        else:
            with budget.reserve(pixel_bytes, f"read-ahead of series {series_uid}"):
                result = read_volume(ctx.store, paths, purpose=f"series {series_uid} (read ahead)",
                                     keep_going=lambda: reading.wanted)
            count = len(paths)
    except _NotWanted:
        return "stopped: a job of another series started"
    finally:
        reading.done(result)
    log.info("read ahead series %s of study %s: %d instances in %.2f s (%d of the series so far)",
             series_uid, study_uid, count, time.perf_counter() - started, len(paths))
    return "read"


def volume_budget(ctx: NodeContext) -> VolumeBudget:
    """The volume memory budget of this worker process (``volume_memory_budget_mb``)."""
    limit_mb = ctx.settings.volume_memory_budget_mb
    return process_budget(None if limit_mb is None else limit_mb * 1024 * 1024)


def reserve_volume(ctx: NodeContext, series_uid: str, pixel_bytes: int, factor: float,
                   job_key: str) -> AbstractContextManager[float]:
    """Reserve a volume job's estimated peak (``factor`` × the series' int16 pixel bytes) from the
    worker's volume memory budget, after checking that it can fit in this worker at all.

    Raises
    ------
    InvalidInputError
        When the peak beside the worker's own memory exceeds what the worker can hold
        (:func:`memory_limit_bytes`): loading it would get the worker killed for memory, with
        every job running in it.
    """
    peak = int(factor * pixel_bytes)
    budget = volume_budget(ctx)
    room = _worker_memory(budget)
    if room is not None and room[0] + peak > room[1]:
        raise InvalidInputError(
            f"series {series_uid} needs about {peak // MB:,} MB to process ({factor:g}× its "
            f"{pixel_bytes // MB:,} MB of int16 pixels) beside the worker's own {room[0] // MB:,} MB, "
            f"more than the {room[1] // MB:,} MB this worker can hold (its machine's memory or its "
            "container's limit); run this rule on a worker with more memory (a model queue of "
            "its own), or split the series")
    return budget.reserve(peak, job_key)


def _worker_memory(budget: VolumeBudget) -> tuple[int, int] | None:
    """This worker's own memory (without the volumes its budget holds; a read-ahead it holds
    counts as its own, which errs on the safe side) and the most it can hold; None when the
    limit cannot be read."""
    limit = memory_limit_bytes()
    if limit is None:
        return None
    return max(0, resident_bytes() - budget.held_bytes), limit


def ct_analysis(volume: Volume, job_key: str, amendment: jobs.Amendment | None = None) -> list[Output]:
    """Run the built-in CT analyzer and write its SEG and TID 1500 SR (naming, when ``amendment``
    is given, the SR they replace and their version)."""
    started = time.perf_counter()
    analysis = analyze_ct(volume.pixels, volume.spacing_mm)
    _timed("ct_analyzer", started, job_key)
    # the SEG and SR need the masks, the geometry and the headers: the pixels go before the
    # SEG's one byte a voxel and segment is allocated
    volume.release_pixels()
    found = [s for s in analysis.structures if not s.is_empty]
    if not found:
        raise InvalidInputError("the CT analyzer found no structure (body, lungs, bone) in the series")
    started = time.perf_counter()
    seg = build_segmentation(
        volume,
        {s.label: s.packed_mask for s in found},
        series_instance_uid=derived_uid(job_key, "seg", "series"),
        sop_instance_uid=derived_uid(job_key, "seg", "instance"),
        series_number=SEG_SERIES_NUMBER,
        algorithm=CT_ANALYZER,
        series_description=versioned_description("mednode CT structures", _version(amendment)),
    )
    _timed("write_seg", started, job_key)
    started = time.perf_counter()
    measurements = [
        StructureMeasurement(label=s.label, segment_number=i, volume_ml=s.volume_ml, mean_hu=s.mean_hu)
        for i, s in enumerate(found, start=1)
    ]
    sr = build_volume_report(
        volume,
        seg,
        measurements,
        series_instance_uid=derived_uid(job_key, "sr", "series"),
        sop_instance_uid=derived_uid(job_key, "sr", "instance"),
        series_number=SR_SERIES_NUMBER,
        algorithm=CT_ANALYZER,
        previous_versions=_predecessors(amendment, "sr"),
        version=_version(amendment),
    )
    _timed("write_sr", started, job_key)
    summary = {
        "algorithm": f"{CT_ANALYZER.name} {CT_ANALYZER.version}",
        "structures": [
            {"label": m.label, "segment_number": m.segment_number,
             "volume_ml": round(m.volume_ml, 3), "mean_hu": round(m.mean_hu, 2)}
            for m in measurements
        ],
    }
    return [Output("seg", seg, summary), Output("sr", sr, summary)]


def run_tasks(ctx: NodeContext, job: jobs.ClaimedJob) -> list[Output]:
    """Run every task of the job's rule and return the objects they produced."""
    plan = plan_tasks(job.tasks)
    specs = list(plan.model_tasks)
    outputs: list[Output] = []
    if plan.ct_analysis:
        series_uid, pixel_bytes = select_series(ctx.store, job.instance_paths, CT_ANALYSIS_MODALITIES)
        with reserve_volume(ctx, series_uid, pixel_bytes, CT_ANALYSIS_PEAK_FACTOR, job.key):
            volume = load_series_volume(ctx, job, CT_ANALYSIS_MODALITIES, series_uid)
            outputs.extend(ct_analysis(volume, job.key, job.amendment))
            del volume
    for index, name in enumerate(plan.bundles):
        path = ctx.settings.models.bundles.get(name)
        if path is None:
            raise ModelNotConfiguredError(f"segmentation bundle {name!r} is not in models.bundles")
        series_uid, pixel_bytes = select_series(ctx.store, job.instance_paths, BUNDLE_MODALITIES)
        with reserve_volume(ctx, series_uid, pixel_bytes, BUNDLE_PEAK_FACTOR, job.key):
            volume = load_series_volume(ctx, job, BUNDLE_MODALITIES, series_uid)
            bundle = load_bundle(path, ctx.settings.models.bundle_device)
            outputs.extend(bundle_segmentation(bundle, volume, job.key, series_offset=2 * index,
                                               amendment=job.amendment))
            del volume
    if specs:
        vlm_settings = ctx.settings.models.vlm
        if vlm_settings is None:
            raise ModelNotConfiguredError(
                f"tasks {[s.kind for s in specs]} need a vision-language model and none is configured "
                "(set models.vlm in the config, or MEDNODE_VLM_PATH and MEDNODE_VLM_FAMILY)"
            )
        started = time.perf_counter()
        series = {uid: conform_copied_attributes(datasets, purpose=f"job {job.id}")
                  for uid, datasets in read_series(job.instance_paths, ctx.store.absolute).items()}
        clock.timed("read_series", started)
        priors_rule = rule_priors(ctx, job)
        try:
            started = time.perf_counter()
            priors = job_priors(ctx, job, series, priors_rule) if priors_rule else None
            if priors_rule:
                clock.timed("priors", started)  # the clock's load stage: C-FIND, C-GET, reading them

            def audit_send(detail: str) -> None:
                audit.record(ctx.sessions, audit.SYSTEM_ACTOR, audit.SENT_TO_MODEL, job.study_instance_uid,
                             f"job {job.id}: {detail}")
            started = time.perf_counter()
            produced_outputs = run_vlm_tasks(vlm_settings, series, specs, job_key=job.key, amendment=job.amendment,
                                             priors=priors, audit_send=audit_send, priority=job.priority)
            clock.timed("vlm", started)  # the clock's model stage: image preparation, model, SR writing
            for produced in produced_outputs:
                outputs.append(Output(produced.kind, produced.dataset, produced.summary))
        finally:
            if priors_rule:
                ctx.store.remove_area(ctx.store.prior_area(job.id))
    outputs.extend(rejection_notes(ctx, job))
    return outputs


def rejection_notes(ctx: NodeContext, job: jobs.ClaimedJob) -> list[Output]:
    """IOCM rejection notes withdrawing the amended version's objects from the destinations that
    opted in (``rejection_notes: true``) and hold them.

    A note references only what its destinations received (an IOCM archive may refuse a note
    about objects it never had), so destinations that received different objects get different
    notes; usually there is one. A superseded rejection note is not rejected again.
    """
    amendment = job.amendment
    if amendment is None:
        return []
    groups: dict[tuple[str, ...], list[str]] = {}
    for text in job.destinations:
        destination = ctx.settings.find_destination(text)
        if destination is None or not destination.rejection_notes:
            continue
        held = tuple(sorted(r.sop_instance_uid for r in amendment.previous_results
                            if r.kind != "rejection" and text in r.delivered_to))
        if held:
            groups.setdefault(held, []).append(text)
    by_uid = {r.sop_instance_uid: r for r in amendment.previous_results}
    outputs = []
    for index, (uids, destinations) in enumerate(sorted(groups.items())):
        slot = ("rejection",) if index == 0 else ("rejection", str(index))
        try:
            rejected = [read_dataset(ctx.store.absolute(by_uid[uid].path), stop_before_pixels=True) for uid in uids]
        except (OSError, DicomIOError) as exc:  # e.g. removed by retention: the new results still go out
            log.warning("%s: no rejection note for %s: the superseded objects cannot be read (%s)",
                        job.key, destinations, type(exc).__name__)
            continue
        note = build_rejection_note(
            rejected,
            series_instance_uid=derived_uid(job.key, *slot, "series"),
            sop_instance_uid=derived_uid(job.key, *slot, "instance"),
            series_number=REJECTION_SERIES_NUMBER,
            series_description=f"mednode rejected v{amendment.previous_version} results",
            description=(f"Results of version {amendment.previous_version} replaced by version "
                         f"{amendment.version} after more images of the study arrived."),
        )
        summary = {"rejects": list(uids), "superseded_version": amendment.previous_version,
                   "reason": "Rejected for Quality Reasons"}
        outputs.append(Output("rejection", note, summary, destinations=tuple(destinations)))
    return outputs


_BUNDLES: dict[tuple[str, str], MonaiBundle] = {}
#: jobs run as threads of one inference worker: one load per bundle, however many ask at once
_BUNDLES_LOCK = threading.Lock()


def load_bundle(path: Path, device: str) -> MonaiBundle:
    """The process-wide loaded MONAI bundle at ``path`` (loaded on first use, then kept warm)."""
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    key = (str(path), device)
    with _BUNDLES_LOCK:
        if key not in _BUNDLES:
            started = time.perf_counter()
            _BUNDLES[key] = MonaiBundle.load(Path(path), device=device)
            metrics.MODEL_LOAD_SECONDS.labels(model=_BUNDLES[key].name or Path(path).name).observe(
                time.perf_counter() - started
            )
        return _BUNDLES[key]


def bundle_segmentation(bundle: MonaiBundle, volume: Volume, job_key: str, *, series_offset: int = 0,
                        amendment: jobs.Amendment | None = None) -> list[Output]:
    """Segment ``volume`` with a MONAI bundle and write its SEG and TID 1500 SR (volume per label,
    mean HU on CT)."""
    started = time.perf_counter()
    # bundles were written for float32 volumes (load_volume's dtype before int16 HU): the same input
    pixels = volume.pixels.astype(np.float32, copy=False)
    masks = bundle.segment(pixels, volume.spacing_mm, affine_lps=volume.affine)
    _timed("monai_bundle", started, job_key)
    found = {label: mask for label, mask in masks.items() if mask.any()}
    if not found:
        raise InvalidInputError(f"bundle {bundle.name or bundle.bundle_dir.name} found none of {sorted(masks)}")
    name = bundle.name or bundle.bundle_dir.name
    algorithm = AlgorithmInfo(name=name, version=bundle.version or "unversioned", family="monai-bundle")
    seg = build_segmentation(
        volume, found,
        series_instance_uid=derived_uid(job_key, "bundle", name, "seg", "series"),
        sop_instance_uid=derived_uid(job_key, "bundle", name, "seg", "instance"),
        series_number=BUNDLE_SERIES_NUMBER + series_offset, algorithm=algorithm,
        series_description=versioned_description(f"mednode {name}", _version(amendment)),
    )
    voxel_ml = volume.voxel_volume_ml
    is_ct = volume.modality.upper() == "CT"
    measurements = [
        StructureMeasurement(
            label=label, segment_number=number, volume_ml=float(mask.sum()) * voxel_ml,
            mean_hu=float(pixels[mask].mean()) if is_ct else math.nan,
        )
        for number, (label, mask) in enumerate(found.items(), start=1)
    ]
    sr = build_volume_report(
        volume, seg, measurements,
        series_instance_uid=derived_uid(job_key, "bundle", name, "sr", "series"),
        sop_instance_uid=derived_uid(job_key, "bundle", name, "sr", "instance"),
        series_number=BUNDLE_SERIES_NUMBER + series_offset + 1, algorithm=algorithm,
        previous_versions=_predecessors(amendment, "bundle", name, "sr"), version=_version(amendment),
    )
    summary = {
        "algorithm": f"{name} {bundle.version}".strip(),
        "structures": [
            {"label": m.label, "segment_number": m.segment_number, "volume_ml": round(m.volume_ml, 3),
             **({"mean_hu": round(m.mean_hu, 2)} if is_ct else {})}
            for m in measurements
        ],
    }
    return [Output("seg", seg, summary), Output("sr", sr, summary)]


def store_outputs(ctx: NodeContext, job_id: int, outputs: list[Output]) -> list[jobs.ResultObject]:
    """Write each output to the store (atomically) and describe it for the index."""
    started = time.perf_counter()
    stored = []
    for output in outputs:
        buffer = BytesIO()
        output.dataset.save_as(buffer, enforce_file_format=True)
        sop_uid = str(output.dataset.SOPInstanceUID)
        written = ctx.store.write(ctx.store.result_path(job_id, sop_uid), buffer.getvalue())
        stored.append(
            jobs.ResultObject(
                kind=output.kind,
                sop_class_uid=str(output.dataset.SOPClassUID),
                sop_instance_uid=sop_uid,
                series_instance_uid=str(output.dataset.SeriesInstanceUID),
                path=written.relative_path,
                size_bytes=written.size_bytes,
                summary=output.summary,
                destinations=output.destinations,
            )
        )
    _timed("store", started, f"job {job_id}")
    return stored


class _Lease:
    """Renews a running job's lease in the background so the sweep knows its worker is alive."""

    def __init__(self, ctx: NodeContext, job_id: int, lease_s: float = jobs.LEASE_S) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ctx, job_id, lease_s), daemon=True)

    def _run(self, ctx: NodeContext, job_id: int, lease_s: float) -> None:
        while not self._stop.wait(lease_s / 3):
            try:
                jobs.renew_lease(ctx.sessions, job_id, lease_s=lease_s)
            except OperationalError:
                log.warning("could not renew the lease of job %d", job_id)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# -- entry points ---------------------------------------------------------------------------------
def _retry_or_give_up(ctx: NodeContext, job: jobs.ClaimedJob, exc: Exception) -> list[int]:
    """Put the job back for a retry and raise :class:`TransientError`, or fail it after its last attempt."""
    if job.attempt >= ctx.settings.job_max_attempts:
        jobs.fail_job(ctx.sessions, job.id, f"gave up after {job.attempt} attempts: {type(exc).__name__}: {exc}")
        return []
    jobs.release_for_retry(ctx.sessions, job.id, f"{type(exc).__name__}: {exc}")
    raise TransientError(str(exc)) from exc


def run_job(ctx: NodeContext, job_id: int) -> list[int]:
    """Run job ``job_id`` if it is there to run; return the ids of deliveries to enqueue.

    Permanent problems (bad input, no model, invalid output) fail the job with the reason.

    Raises
    ------
    TransientError
        When the database or the store failed in a way worth retrying; the job is back in
        ``queued`` and the caller schedules the retry.
    """
    job = jobs.claim(ctx.sessions, job_id, lease_s=ctx.settings.job_lease_s)
    if job is None:
        log.info("job %d is not runnable now (done, running elsewhere or superseded)", job_id)
        return []
    if job.attempt > ctx.settings.job_max_attempts:
        # each earlier attempt ended with its worker gone (lease expired): a study that kills the
        # worker (out of memory, a crash in the model) must not take the queue down forever
        jobs.fail_job(ctx.sessions, job.id, f"gave up after {job.attempt - 1} attempts: the worker died "
                      "while running the job each time (out of memory, or a crash in the model?)")
        return []
    log.info("job %d running (attempt %d, rule %s, study %s)", job.id, job.attempt, job.rule_name,
             job.study_instance_uid)
    started = time.perf_counter()
    try:
        with RUNNING_JOBS.one(), _Lease(ctx, job.id, ctx.settings.job_lease_s), clock.measuring() as stages:
            outputs = run_tasks(ctx, job)
            results = store_outputs(ctx, job.id, outputs)
    except (ModelServerUnavailableError, ModelOutOfMemoryError) as exc:  # before InferenceError:
        return _retry_or_give_up(ctx, job, exc)  # down, slow or out of GPU memory: worth a retry
    except (InferenceError, DicomIOError, ValueError, KeyError) as exc:
        jobs.fail_job(ctx.sessions, job.id, failure_reason(exc))
        return []
    except (OperationalError, StorageError, OSError) as exc:
        return _retry_or_give_up(ctx, job, exc)
    except Exception as exc:  # noqa: BLE001 (boundary: record why, never leave the job running)
        # the stack, without the message (it may quote an attribute value); the reason has it redacted
        log.error("job %d failed with %s:\n%s", job.id, type(exc).__name__,
                  "".join(traceback.format_tb(exc.__traceback__)).rstrip())
        jobs.fail_job(ctx.sessions, job.id, failure_reason(exc))
        return []
    metrics.JOB_DURATION.observe(time.perf_counter() - started)
    for stage, seconds in stages.seconds.items():
        clock.observe(stage, seconds)
    delivery_ids = jobs.record_results(ctx.sessions, job.id, results, stage_s=stages.rounded())
    log.info("job %d wrote %d object(s); %d deliveries", job.id, len(results), len(delivery_ids))
    return delivery_ids
