"""The generalist-model stage of a job: DICOM images → prepared images → VLM tasks → SR objects.

This is where inference results meet DICOM: each prepared image keeps a reference to its source
instance and frame, so a box the model drew (normalised on the original frame) becomes a POLYLINE in
that instance's pixel coordinates. Narrative reports (one SR per report task and language), question
answers (one SR per language) and regions/labels (one TID 1500 SR) are written with ``dicom_io``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date
from typing import Any

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut

from dicom_io.clinical import read_clinical_context
from dicom_io.deidentify import (
    BurnedInPolicy,
    burned_in_text_reason,
    identifying_values,
    mask_outside,
    scrub_text,
    ultrasound_regions,
)
from dicom_io.equipment import AlgorithmInfo
from dicom_io.narrative_report import Comparison, build_narrative_report
from dicom_io.regions import ImageLabel, ImageRegion, build_region_report, viewer_geometry_problem
from dicom_io.slice_stack import SliceRef, number_of_frames, read_frame
from dicom_io.sr_common import InstanceReference, clean_text
from dicom_io.uids import derived_uid
from dicom_io.volume import read_dataset
from inference.errors import InvalidInputError, ModelNotConfiguredError, ModelServerUnavailableError
from inference.geometry import PreparedImage
from inference.results import (
    AnswerResult,
    Box,
    GroundedReportResult,
    LabelResult,
    RegionCaptionResult,
    RegionResult,
    ReportResult,
    TaskResult,
)
from inference.tasks import TaskSpec
from inference.vlm import VLMConfig, get_vlm
from inference.vlm.clinical import CONTEXT_TASKS, context_text
from inference.vlm.comparison import PriorStudy
from inference.vlm.runtime import VLM
from inference.vlm.server import ServerConfig, ServerVLM
from inference.vlm.volume_recipe import prepare_volume, slice_window, user_content
from node import jobs, metrics
from node.config import VLMSettings

log = logging.getLogger(__name__)

REPORT_SERIES_NUMBER = 9910
QA_SERIES_NUMBER = 9920
REGION_SERIES_NUMBER = 9930
#: At most this many single-frame images (views) of a 2D study go into one prompt.
MAX_VIEWS = 4
VOLUME_MODALITIES = {"CT", "MR", "PT"}
#: Written when the model's text is empty once control characters are removed.
NO_TEXT = "(the model returned no readable text)"


@dataclass(frozen=True)
class SourceFrame:
    """Which DICOM frame a prepared image was made from."""

    dataset: Dataset
    frame_number: int | None

    @property
    def sop_instance_uid(self) -> str:
        return str(self.dataset.SOPInstanceUID)


@dataclass(frozen=True)
class PriorInput:
    """What a rule with ``priors`` found of the patient's prior study, for the model and the SR.

    ``datasets`` are the prior images (one study, pixel data readable); empty when there is none,
    and ``reason`` then says why when it is not simply "none found".
    """

    datasets: tuple[Dataset, ...] = ()
    study_date: date | None = None
    report: str | None = None
    reason: str | None = None

    @property
    def comparison(self) -> Comparison:
        return Comparison(self.datasets, self.study_date, self.reason)


@dataclass(frozen=True)
class VLMOutput:
    kind: str
    dataset: Dataset
    summary: dict[str, Any]


def vlm_config(settings: VLMSettings) -> VLMConfig:
    if settings.path is None or settings.family is None:
        raise ModelNotConfiguredError("models.vlm needs a path and a family")
    return VLMConfig(
        path=str(settings.path),
        family=settings.family,
        dtype=settings.dtype,
        device=settings.device,
        trust_remote_code=settings.trust_remote_code,
        max_new_tokens=settings.max_new_tokens,
        batch_size=settings.batch_size,
        image_size=settings.image_size,
        name=settings.name,
        cpu_max_weights_mb=settings.cpu_max_weights_mb,
    )


#: One client per (server settings) in a process, like the warm in-process model.
_SERVER_CLIENTS: dict[ServerConfig, ServerVLM] = {}
_SERVER_CLIENTS_LOCK = threading.Lock()


def server_config(settings: VLMSettings) -> ServerConfig:
    if settings.server is None or settings.model is None or settings.family is None:
        raise ModelNotConfiguredError("models.vlm needs server, model and family for the server path")
    return ServerConfig(server=settings.server, model=settings.model, family=settings.family,
                        max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                        image_size=settings.image_size, name=settings.name,
                        timeout_s=settings.server_timeout_s)


def server_model(settings: VLMSettings) -> ServerVLM:
    """The process-wide client of the model server that ``settings.server`` names; the model
    name is checked against the server's list on first use."""
    cfg = server_config(settings)
    with _SERVER_CLIENTS_LOCK:  # a worker's job threads share one client
        if cfg not in _SERVER_CLIENTS:
            _SERVER_CLIENTS[cfg] = ServerVLM(cfg)
            log.info("vlm: using model %s on server %s", cfg.model, cfg.server)
        return _SERVER_CLIENTS[cfg]


def check_server_at_start(settings: VLMSettings | None) -> str | None:
    """At start-up, ask the model server (``models.vlm.server``) whether it serves ``models.vlm.model``.

    Returns a warning when the server does not answer (jobs wait and retry until it does), None
    when all is well or no server is configured.

    Raises
    ------
    ModelNotConfiguredError
        The server answers but does not serve the model (the message names models.vlm.model
        and the models it lists).
    """
    if settings is None or settings.server is None:
        return None
    try:
        server_model(settings).check_model()
    except ModelServerUnavailableError as exc:
        return f"{exc}; jobs that need it wait and retry until it answers"
    return None


def load_model(settings: VLMSettings | None) -> VLM:
    """The process-wide warm model for ``settings`` (loaded on first use, then reused); with
    ``models.vlm.server`` set, a client of that server instead."""
    if settings is None:
        raise ModelNotConfiguredError(
            "this rule asks for vision-language tasks but no model is configured "
            "(set models.vlm in the config, or MEDNODE_VLM_PATH and MEDNODE_VLM_FAMILY)"
        )
    if settings.server is not None:
        return server_model(settings)
    return get_vlm(vlm_config(settings), on_load=_loaded)


def _observe_batch(units: int, jobs: int, seconds: float) -> None:
    metrics.VLM_BATCH_SIZE.observe(units)
    metrics.VLM_BATCH_JOBS.observe(jobs)


def _loaded(vlm: VLM, seconds: float) -> None:
    """Once per model load in this process: the load metric, and the batch metrics hooked up."""
    metrics.MODEL_LOAD_SECONDS.labels(model=vlm.info.name).observe(seconds)
    vlm.batch_observer = _observe_batch
    log.info("loaded model %s (%s) in %.1f s on %s", vlm.info.name, vlm.info.family, seconds, vlm.device)


def _is_volume(datasets: list[Dataset]) -> bool:
    """A CT/MR/PT series of several slices (instances, or frames of one enhanced instance) that is
    not a localizer (its few projection-like images go in as views)."""
    first = datasets[0]
    if str(first.get("Modality", "")).upper() not in VOLUME_MODALITIES:
        return False
    if "LOCALIZER" in [str(v).upper() for v in (first.get("ImageType") or [])]:
        return False
    return len(datasets) > 1 or number_of_frames(first) > 1


PixelFilter = Callable[[Dataset, np.ndarray], np.ndarray]


def prepare_images(
    vlm: VLM, series: dict[str, list[Dataset]], *, slices_per_series: int | None = None,
    pixel_filter: PixelFilter | None = None,
) -> tuple[list[PreparedImage], list[SourceFrame]]:
    """Prepare the images of a study for the model, keeping where each came from.

    A CT/MR series contributes up to ``slices_per_series`` slices (default: the family's
    ``max_slices``, 85 for MedGemma) ordered along the slice normal and sampled as the family was
    trained (:func:`inference.vlm.volume_recipe.prepare_volume`); only the sampled slices are
    decoded, so ``series`` may hold headers read without pixel data (``stop_before_pixels``).
    Other series (CR, DX, ...) contribute their first frames, up to :data:`MAX_VIEWS` in all.

    Raises
    ------
    InvalidInputError
        If the study holds no image the model can read.
    """
    images: list[PreparedImage] = []
    sources: list[SourceFrame] = []
    max_slices = slices_per_series or vlm.family.max_slices
    for datasets in series.values():
        if not datasets:
            continue
        if _is_volume(datasets):
            for image, ref in prepare_volume(vlm, datasets, max_slices=max_slices):
                images.append(image)
                sources.append(SourceFrame(ref.dataset, ref.frame_number))
            continue
        for ds in datasets:
            if len(images) >= MAX_VIEWS or ("PixelData" not in ds and not getattr(ds, "filename", None)):
                continue
            frames = number_of_frames(ds)
            pixels = read_frame(ds, 0 if frames > 1 else None)
            if pixel_filter is not None:
                pixels = pixel_filter(ds, np.asarray(pixels))
            photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
            if photometric.startswith("MONOCHROME"):
                pixels = apply_modality_lut(pixels, ds)
            images.append(vlm.prepare(np.asarray(pixels), photometric=photometric,
                                      window=slice_window(SliceRef(ds, None, None))))
            sources.append(SourceFrame(ds, 1 if frames > 1 else None))
    if not images:
        raise InvalidInputError("the study holds no image the model can read")
    return images, sources


def _region(box: Box, sources: list[SourceFrame], *, finding: str, site: str | None,
            text: str | None) -> ImageRegion | None:
    source = sources[box.image_index]
    columns, rows = int(source.dataset.Columns), int(source.dataset.Rows)
    x0, y0, x1, y1 = box.to_pixels(columns, rows)
    x0, x1 = max(0.0, x0), min(float(columns), x1)
    y0, y1 = max(0.0, y0), min(float(rows), y1)
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        log.info("dropped a degenerate box on %s", source.sop_instance_uid)
        return None
    return ImageRegion(
        sop_instance_uid=source.sop_instance_uid,
        frame_number=source.frame_number,
        box_xyxy=(x0, y0, x1, y1),
        finding=finding,
        finding_site=site,
        probability=box.probability,
        text=text,
    )


def regions_and_labels(
    results: Sequence[TaskResult], sources: list[SourceFrame]
) -> tuple[list[ImageRegion], list[ImageLabel]]:
    """Turn boxes and labels of any task kind into what the TID 1500 writer takes."""
    regions: list[ImageRegion | None] = []
    labels: list[ImageLabel] = []
    for result in results:
        if isinstance(result, LabelResult):
            labels.append(ImageLabel(name=result.label, state=result.state, probability=result.probability))
        elif isinstance(result, RegionResult):
            grounding = result.task.kind == "ground"
            for box in result.boxes:
                regions.append(_region(
                    box, sources,
                    finding="Finding" if grounding else (box.label or result.query),
                    site=result.query if grounding else None,
                    text=box.text,
                ))
        elif isinstance(result, RegionCaptionResult):
            regions.append(_region(result.box, sources, finding=result.box.label or "Finding",
                                   site=None, text=result.caption))
        elif isinstance(result, GroundedReportResult):
            for sentence in result.sentences:
                for box in sentence.boxes:
                    regions.append(_region(box, sources, finding=box.label or "Finding", site=None,
                                           text=sentence.text))
    return [r for r in regions if r is not None], labels


def _summary_box(region: ImageRegion) -> dict[str, Any]:
    return {"sop_instance_uid": region.sop_instance_uid, "frame": region.frame_number,
            "box_xyxy": [round(v, 2) for v in region.box_xyxy], "finding": region.finding,
            "finding_site": region.finding_site, "probability": region.probability, "text": region.text}


def write_outputs(
    results: Sequence[TaskResult], sources: list[SourceFrame], *, job_key: str, algorithm: AlgorithmInfo,
    amendment: jobs.Amendment | None = None, comparison: Comparison | None = None,
    comparison_summary: dict[str, Any] | None = None,
) -> list[VLMOutput]:
    """Build the SR objects for one job's model results (reproducible UIDs from ``job_key``).

    With ``amendment``, each SR names the previous version's SR of the same slot (report index,
    answer language, regions) and its Series Description says its version. With ``comparison``
    (a rule with ``priors``), the narrative SRs have a Comparison section and reference the prior
    images; ``comparison_summary`` goes into their summaries.
    """
    compared = {"comparison": comparison_summary} if comparison_summary else {}
    version = amendment.version if amendment else None

    def previous(*slot: str) -> list[InstanceReference]:
        return amendment.predecessors(*slot) if amendment else []

    source_datasets = list({s.sop_instance_uid: s.dataset for s in sources}.values())
    outputs: list[VLMOutput] = []
    model = {"name": algorithm.name, "version": algorithm.version, "family": algorithm.family}
    reports = [r for r in results if isinstance(r, ReportResult)]
    for index, report in enumerate(reports):
        findings = (clean_text(report.findings).strip() or clean_text(report.raw_text).strip()
                    or NO_TEXT)
        sr = build_narrative_report(
            source_datasets, findings=findings, impression=report.impression, language=report.language,
            series_instance_uid=derived_uid(job_key, "report", str(index), "series"),
            sop_instance_uid=derived_uid(job_key, "report", str(index), "instance"),
            series_number=REPORT_SERIES_NUMBER + index, algorithm=algorithm,
            previous_versions=previous("report", str(index)), version=version, comparison=comparison,
        )
        outputs.append(VLMOutput("report", sr, {"model": model, "language": report.language,
                                                "findings": findings, "impression": report.impression,
                                                **compared}))
    answers: dict[str, list[AnswerResult]] = {}
    for result in results:
        if isinstance(result, AnswerResult):
            answers.setdefault(result.language, []).append(result)
    for index, (language, items) in enumerate(sorted(answers.items())):
        pairs = [(a.question, clean_text(a.answer).strip() or NO_TEXT) for a in items]
        intro = "Answers of the model to the questions asked." if language == "en" else "模型对所提问题的回答。"
        sr = build_narrative_report(
            source_datasets, findings=intro, impression=None, language=language, questions_answers=pairs,
            series_instance_uid=derived_uid(job_key, "vqa", language, "series"),
            sop_instance_uid=derived_uid(job_key, "vqa", language, "instance"),
            series_number=QA_SERIES_NUMBER + index, algorithm=algorithm,
            previous_versions=previous("vqa", language), version=version, comparison=comparison,
        )
        outputs.append(VLMOutput("vqa", sr, {"model": model, "language": language,
                                             "answers": [{"question": q, "answer": a} for q, a in pairs],
                                             **compared}))
    regions, labels = regions_and_labels(results, sources)
    if regions or labels:
        language = next((getattr(r, "language", None) for r in results if getattr(r, "language", None)), "en")
        sr = build_region_report(
            source_datasets, regions, labels,
            series_instance_uid=derived_uid(job_key, "regions", "series"),
            sop_instance_uid=derived_uid(job_key, "regions", "instance"),
            series_number=REGION_SERIES_NUMBER, algorithm=algorithm, language=language,
            previous_versions=previous("regions"), version=version,
        )
        warnings = [w for w in map(viewer_geometry_problem, source_datasets) if w]
        outputs.append(VLMOutput("regions", sr, {
            "model": model,
            **({"viewer_warnings": warnings} if warnings else {}),
            "labels": [{"name": lb.name, "state": lb.state, "probability": lb.probability} for lb in labels],
            "boxes": [_summary_box(r) for r in regions],
        }))
    return outputs


def prompt_layout(content: list[dict[str, object]], image_roles: dict[int, str]) -> list[str]:
    """A user turn's content as the job records it: ``image:<role>`` per image (``prior`` or
    ``current``, told apart by object identity), ``text:<text>`` per text."""
    return [f"image:{image_roles.get(id(part['image']), '?')}" if part["type"] == "image"
            else f"text:{part['text']}" for part in content]


def screen_for_remote(series: dict[str, list[Dataset]], policy: BurnedInPolicy) -> set[str]:
    """Check the images bound for a remote model server for burned-in text.

    Returns the SOP Instance UIDs to send masked to their ultrasound regions (``policy`` mask).

    Raises
    ------
    InvalidInputError
        For an image that may carry burned-in text and cannot be masked (or ``policy`` refuse).
    """
    masked: set[str] = set()
    for datasets in series.values():
        for ds in datasets:
            reason = burned_in_text_reason(ds)
            if reason is None:
                continue
            if policy == "mask" and ultrasound_regions(ds) and not _is_volume(datasets):
                masked.add(str(ds.SOPInstanceUID))
                continue
            advice = ("set models.vlm.burned_in_text: mask to send ultrasound masked to its image regions"
                      if policy == "refuse" else "it states no ultrasound regions to mask it to")
            raise InvalidInputError(f"instance {ds.SOPInstanceUID} is not sent to the remote model server: "
                                    f"{reason}; {advice}")
    return masked


def mask_filter(masked: set[str]) -> PixelFilter:
    """Pixels of the instances in ``masked`` with everything outside their ultrasound regions black."""
    def apply(ds: Dataset, pixels: np.ndarray) -> np.ndarray:
        return mask_outside(pixels, ultrasound_regions(ds)) if str(ds.SOPInstanceUID) in masked else pixels
    return apply


def priors_for_remote(priors: PriorInput, series: dict[str, list[Dataset]]) -> tuple[PriorInput, int, int]:
    """The prior as a remote server may see it: images that may carry burned-in text left out,
    identifiers of both studies removed from the report. Returns it, the images left out and the
    number of identifiers removed."""
    kept = tuple(ds for ds in priors.datasets if burned_in_text_reason(ds) is None)
    report, removed = priors.report, 0
    if report:
        values = identifying_values([*(ds for d in series.values() for ds in d), *priors.datasets])
        report, removed = scrub_text(report, values)
    return (PriorInput(kept, priors.study_date, report, priors.reason),
            len(priors.datasets) - len(kept), removed)


def prepare_prior(vlm: VLM, priors: PriorInput, *, slices_per_series: int | None) -> PriorStudy | None:
    """The prior study as the prompt shows it (its images prepared like the current ones)."""
    if not priors.datasets:
        return None if not priors.report else PriorStudy((), priors.study_date.isoformat()
                                                          if priors.study_date else None, priors.report)
    images, _ = prepare_images(vlm, {"prior": list(priors.datasets)}, slices_per_series=slices_per_series)
    return PriorStudy(tuple(images), priors.study_date.isoformat() if priors.study_date else None,
                      priors.report)


def with_clinical_context(series: dict[str, list[Dataset]], specs: list[TaskSpec]) -> list[TaskSpec]:
    """The tasks with the study's age, sex and request reason as their prompts' first line
    (:mod:`dicom_io.clinical`; never a name or an ID), in each task's language — reports and
    questions only (:data:`inference.vlm.clinical.CONTEXT_TASKS`)."""
    first = next((datasets[0] for datasets in series.values() if datasets), None)
    if first is None:
        return specs
    context = read_clinical_context(first)
    return [replace(spec, clinical_context=context_text(context, spec.language)) if spec.kind in CONTEXT_TASKS
            else spec for spec in specs]


def context_for_remote(specs: list[TaskSpec], series: dict[str, list[Dataset]]) -> tuple[list[TaskSpec], int]:
    """The tasks with every identifier of the study's headers removed from their clinical context
    (a request's reason is typed by hand and may quote an accession number or a physician's name,
    which :func:`dicom_io.clinical.read_clinical_context` does not know); returns them and the
    number of identifiers removed."""
    values = identifying_values(ds for datasets in series.values() for ds in datasets)
    out, removed = [], 0
    for spec in specs:
        if spec.clinical_context:
            text, count = scrub_text(spec.clinical_context, values)
            spec, removed = replace(spec, clinical_context=text), removed + count
        out.append(spec)
    return out, removed


def run_vlm_tasks(
    settings: VLMSettings | None, series: dict[str, list[Dataset]], specs: list[TaskSpec], *, job_key: str,
    amendment: jobs.Amendment | None = None, priors: PriorInput | None = None,
    audit_send: Callable[[str], None] | None = None, priority: int = 0,
) -> list[VLMOutput]:
    """Load (or reuse) the model, run ``specs`` on the study's images, write the SR objects.

    With ``priors`` (a rule with ``priors``), the prior study goes into the prompts of whole-study
    tasks as the family reads comparisons, the narrative SRs say what was compared, and their
    summaries record the prompt layout of the first such task (``comparison.prompt``).

    With a remote model server (``models.vlm.remote``), what leaves is de-identified first
    (:func:`screen_for_remote`, :func:`priors_for_remote`, :func:`context_for_remote`) and ``audit_send`` is called, before
    the first request, with what goes where (counts and the server, never patient data).

    ``priority`` (the job's, 0-9): its prompts go into the shared ``generate`` calls before those
    of lower-priority jobs running in the same worker.
    """
    vlm = load_model(settings)
    assert settings is not None  # load_model raised otherwise
    remote = settings.server is not None and settings.remote
    pixel_filter, masked, dropped, redacted = None, set(), 0, 0
    if remote:
        masked = screen_for_remote(series, settings.burned_in_text)
        pixel_filter = mask_filter(masked) if masked else None
        if priors is not None:
            priors, dropped, redacted = priors_for_remote(priors, series)
    specs = with_clinical_context(series, specs)
    if remote:
        specs, scrubbed = context_for_remote(specs, series)
        redacted += scrubbed
    images, sources = prepare_images(vlm, series, slices_per_series=settings.slices_per_series,
                                     pixel_filter=pixel_filter)
    prior = prepare_prior(vlm, priors, slices_per_series=settings.slices_per_series) if priors else None
    if remote and audit_send is not None:
        audit_send(f"{len(images)} image(s) ({len(masked)} masked to ultrasound regions), "
                   f"{len(prior.images) if prior else 0} prior image(s) ({dropped} left out: burned-in text), "
                   f"{redacted} identifier(s) removed from prompt text, tasks "
                   f"{','.join(dict.fromkeys(s.kind for s in specs))} -> {settings.server} ({settings.model})")
    log.info("vlm input: %d image(s), %d of them volume slices, %d prior image(s)", len(images),
             sum(1 for image in images if image.volume_modality), len(prior.images) if prior else 0)
    started = time.perf_counter()
    results = vlm.run(images, specs, prior=prior, priority=priority)
    metrics.STAGE_DURATION.labels(stage="vlm").observe(time.perf_counter() - started)
    algorithm = AlgorithmInfo(name=vlm.info.name, version=vlm.info.version, family=vlm.info.family)
    summary = None
    if priors is not None:
        summary = {"text": priors.comparison.text(), "prior_images": [str(ds.SOPInstanceUID) for ds in priors.datasets],
                   "prior_study_instance_uid": str(priors.datasets[0].StudyInstanceUID) if priors.datasets else None,
                   "prior_study_date": priors.study_date.isoformat() if priors.study_date else None,
                   "prior_report": priors.report is not None}
        compared = next((s for s in specs if s.kind in ("report", "vqa", "classify")), None)
        if prior is not None and compared is not None:
            roles = {**{id(i.image): "prior" for i in prior.images}, **{id(i.image): "current" for i in images}}
            item = (compared.questions or compared.labels or ("",))[0]
            content = user_content(images, vlm.family.prompt(compared, item=item),
                                   slice_recipe=vlm.family.slice_recipe, language=compared.language,
                                   prior=prior, comparison=vlm.family.comparison)
            summary["prompt"] = prompt_layout(content, roles)
    return write_outputs(results, sources, job_key=job_key, algorithm=algorithm, amendment=amendment,
                         comparison=priors.comparison if priors else None, comparison_summary=summary)


def read_series(paths: dict[str, list[str]], absolute: Any) -> dict[str, list[Dataset]]:
    """Read the header of every instance of the job's series, without pixel data.

    Each dataset keeps the file it came from (``filename``): :func:`prepare_images` decodes only
    the slices it samples, so a 2,000-slice CT never sits in memory whole.
    """
    return {uid: [read_dataset(absolute(p), stop_before_pixels=True) for p in files]
            for uid, files in paths.items() if files}
