"""Response and request schemas of ``/api/v1``: separate from the table models on purpose.

Only :class:`PatientOut` carries patient attributes (name, ID, birth date, sex, accession number),
and the routers fill it only for a logged-in caller. Other patient-derived fields (study and
series dates and descriptions, body parts, job reasons, on-demand questions, result summaries,
timeline details) are ``None`` — and ``patient_data_hidden`` true — for a caller who may not
see them (:mod:`node.web.access`); what remains is UIDs, states, counts and times.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from storage.index import RETURNED_RESULT
from storage.models import Delivery, Job, Patient, Result, Series, SeriesOrigin, Study


class _Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class PatientOut(_Out):
    """Patient fields: present in responses only for logged-in callers."""

    patient_id: str | None
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    accession_number: str | None

    @classmethod
    def of(cls, study: Study) -> PatientOut:
        patient: Patient | None = study.patient
        return cls(
            patient_id=patient.patient_id if patient else None,
            patient_name=patient.patient_name if patient else None,
            patient_birth_date=patient.patient_birth_date if patient else None,
            patient_sex=patient.patient_sex if patient else None,
            accession_number=study.accession_number,
        )


class DeliveryOut(_Out):
    id: int
    destination: str
    state: str
    attempts: int
    last_error: str | None
    created_at: datetime
    last_attempt_at: datetime | None
    delivered_at: datetime | None

    @classmethod
    def of(cls, delivery: Delivery) -> DeliveryOut:
        return cls(
            id=delivery.id, destination=delivery.destination, state=delivery.state.value,
            attempts=delivery.attempts, last_error=delivery.last_error, created_at=delivery.created_at,
            last_attempt_at=delivery.last_attempt_at, delivered_at=delivery.delivered_at,
        )


class ResultOut(_Out):
    id: int
    job_id: int
    kind: str
    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    size_bytes: int
    summary: dict[str, Any] | None
    created_at: datetime
    deliveries: list[DeliveryOut]
    #: PNG key images with the SEG overlay and SR boxes drawn (``/api/v1/jobs/{id}/key-images``)
    key_images_url: str

    #: the summary (report and answer text, findings) is left out for this caller
    patient_data_hidden: bool = False

    @classmethod
    def of(cls, result: Result, *, patient_data: bool = True) -> ResultOut:
        return cls(
            id=result.id, job_id=result.job_pk, kind=result.kind, sop_class_uid=result.sop_class_uid,
            sop_instance_uid=result.sop_instance_uid, series_instance_uid=result.series_instance_uid,
            size_bytes=result.size_bytes, summary=result.summary if patient_data else None,
            created_at=result.created_at, patient_data_hidden=not patient_data,
            deliveries=[DeliveryOut.of(d) for d in result.deliveries],
            key_images_url=f"/api/v1/jobs/{result.job_pk}/key-images",
        )


class JobOut(_Out):
    id: int
    study_instance_uid: str
    study_version: int
    rule_name: str
    tasks: list[Any]
    series_uids: list[Any]
    destinations: list[Any]
    priority: int
    state: str
    attempts: int
    reason: str | None
    on_demand: bool
    worker: str | None
    created_at: datetime
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    #: seconds since the job was created (queued) or started (running); total run time when done
    age_s: float | None
    results: list[ResultOut]
    #: reason, task options (an on-demand question) and result summaries are left out for this caller
    patient_data_hidden: bool = False

    @classmethod
    def of(cls, job: Job, now: datetime, *, with_results: bool = True, patient_data: bool = True) -> JobOut:
        if job.finished_at is not None and job.started_at is not None:
            age = (job.finished_at - job.started_at).total_seconds()
        elif job.started_at is not None:
            age = (now - job.started_at).total_seconds()
        else:
            age = (now - job.created_at).total_seconds()
        return cls(
            id=job.id, study_instance_uid=job.study.study_instance_uid, study_version=job.study_version,
            rule_name=job.rule_name,
            tasks=list(job.tasks) if patient_data else [_task_name(t) for t in job.tasks],
            series_uids=list(job.series_uids),
            destinations=list(job.destinations), priority=job.priority, state=job.state.value,
            attempts=job.attempts, reason=job.reason if patient_data else None, on_demand=job.on_demand,
            worker=job.worker, created_at=job.created_at, enqueued_at=job.enqueued_at,
            started_at=job.started_at, finished_at=job.finished_at, age_s=round(age, 3),
            results=[ResultOut.of(r, patient_data=patient_data) for r in job.results] if with_results else [],
            patient_data_hidden=not patient_data,
        )


def _task_name(task: Any) -> Any:
    """A task without its options (an on-demand task's options hold the question asked)."""
    return next(iter(task), "?") if isinstance(task, dict) else task


class SeriesOut(_Out):
    series_instance_uid: str
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    series_number: int | None
    instance_count: int
    #: ``acquired``, ``mednode_result`` (returned by a PACS), ``derived`` (another node's, a reader's)
    origin: str = "acquired"
    #: what the dashboard shows for the origin, e.g. "mednode result, returned by PACS"
    origin_label: str = "acquired"
    #: set when the series arrived after its study was complete
    late_at: datetime | None = None
    #: why the series did not reopen (or keep receiving) its study; None when it did
    held_reason: str | None = None

    @classmethod
    def of(cls, series: Series, instance_count: int, *, patient_data: bool = True) -> SeriesOut:
        origin = SeriesOrigin(series.origin)
        label = {SeriesOrigin.ACQUIRED: "late series" if series.late_at else "acquired",
                 SeriesOrigin.MEDNODE_RESULT: RETURNED_RESULT,
                 SeriesOrigin.DERIVED: "derived object"}[origin]
        return cls(
            series_instance_uid=series.series_instance_uid, modality=series.modality,
            body_part_examined=series.body_part_examined if patient_data else None,
            series_description=series.series_description if patient_data else None,
            series_number=series.series_number, instance_count=instance_count,
            origin=origin.value, origin_label=label, late_at=series.late_at,
            # the reason quotes routing's view of the series (its body part, say): patient-derived
            held_reason=series.held_reason if patient_data else None,
        )


class StudySummaryOut(_Out):
    study_instance_uid: str
    study_date: str | None
    study_description: str | None
    state: str
    version: int
    modalities: list[str]
    series_count: int
    instance_count: int
    calling_ae_title: str | None
    called_ae_title: str | None
    first_received_at: datetime
    last_received_at: datetime
    completed_at: datetime | None
    latest_job_state: str | None
    #: only for logged-in callers; ``null`` otherwise
    patient: PatientOut | None = None
    #: study date and description (and in a study: series descriptions, body parts, job reasons,
    #: result summaries, timeline details) are left out for this caller: log in to see them
    patient_data_hidden: bool = False


class StudyListOut(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[StudySummaryOut]


class TimelineEventOut(BaseModel):
    at: datetime
    event: str
    detail: str | None
    since_previous_s: float | None
    since_start_s: float
    job_id: int | None


class StageTimeOut(BaseModel):
    """One stage of the study's clock (:mod:`node.clock`): from its last instance to its results."""

    #: ``last_instance_to_complete``, ``complete_to_queued``, ``queued_to_started``, ``load``,
    #: ``model``, ``write``, ``store``, ``delivery``
    stage: str
    #: None when not measured (the job has not got there, or a retry overwrote a moment)
    seconds: float | None
    job_id: int | None
    #: for a delivery: which object to which destination
    detail: str | None = None


class StudyOut(StudySummaryOut):
    route_reason: str | None
    #: why the study counted as complete (quiet period, required series, max wait, by hand)
    completion_reason: str | None = None
    series: list[SeriesOut]
    timeline: list[TimelineEventOut]
    #: where the time from the last instance to the results went, stage by stage (latest version)
    clock: list[StageTimeOut] = Field(default_factory=list)
    jobs: list[JobOut]


class StatusOut(BaseModel):
    instances: int
    studies: dict[str, int]
    jobs: dict[str, int]
    deliveries: dict[str, int]
    queue_depth: dict[str, int] = Field(default_factory=dict)
    oldest_queued_age_s: float | None = None


class ActionOut(BaseModel):
    ok: bool = True
    job: JobOut


class CompletedOut(BaseModel):
    """A study completed by hand: its new version, state, why, and the jobs routing made."""

    ok: bool = True
    study_instance_uid: str
    version: int
    state: str
    completion_reason: str | None
    jobs: list[int]


class PriorityIn(BaseModel):
    priority: int = Field(ge=0, le=9, description="0 (lowest) to 9 (highest)")


class RerunIn(BaseModel):
    rule: str = Field(min_length=1, max_length=100)


AskKind = Literal["vqa", "report", "classify", "ground", "detect", "grounded_report"]


class AskIn(BaseModel):
    """An on-demand question or task on a stored study."""

    kind: AskKind = "vqa"
    #: the question (vqa), phrase (ground), comma-separated labels (classify) or findings (detect)
    text: str | None = Field(default=None, max_length=2000)
    language: str = Field(default="en", pattern=r"^[a-z]{2,3}(-[A-Za-z0-9]{1,8})*$")
    #: also send the SR answer to the default destination
    send_to_pacs: bool = False


class RuleCheckOut(BaseModel):
    rule: str
    matched: bool
    selected: bool
    series_uids: list[str]
    reasons: list[str]
    tasks: list[Any]
    priority: int
    destinations: list[str]


class DryRunOut(BaseModel):
    study_instance_uid: str
    source: Literal["stored", "upload"]
    checks: list[RuleCheckOut]
    #: the rules routing would pick, in order (first match wins unless ``continue``)
    selected: list[str]


class RuleOut(BaseModel):
    name: str
    match: dict[str, Any]
    tasks: list[Any]
    priority: int
    destinations: list[str]
    quiet_period_s: float | None
    continue_matching: bool


class DestinationOut(BaseModel):
    name: str
    #: ``dimse`` (C-STORE to ae_title@host:port) or ``dicomweb`` (STOW-RS to url)
    kind: Literal["dimse", "dicomweb"] = "dimse"
    ae_title: str | None = None
    host: str | None = None
    port: int | None = None
    used_by: list[str]
    calling_ae_title: str | None = None  #: the AE title mednode calls it with
    tls: bool = False
    url: str | None = None  #: a DICOMweb archive's service root
    auth: str | None = None  #: a DICOMweb archive's authentication: none, basic, bearer (never the secret)


class EchoOut(BaseModel):
    name: str
    destination: str
    ok: bool
    status: int | None
    latency_ms: float
    error: str | None


class WorkerOut(BaseModel):
    name: str
    queues: list[str]
    active: list[dict[str, Any]]
    reserved: int
    concurrency: int | None
    model: str | None = None
    #: where the model runs (``cpu``, ``cuda:0``); None before the first job loads it
    device: str | None = None
    #: prompts per generate call, shared by the jobs the worker runs at once
    batch_size: int | None = None
    #: GPU memory the worker's models hold (torch allocated / reserved); None on a CPU
    gpu_memory_mb: float | None = None
    gpu_memory_reserved_mb: float | None = None
    #: job slots kept for urgent jobs beside ``concurrency`` (:mod:`node.urgent_slots`)
    urgent_slots: int | None = None
    stats: dict[str, Any] = Field(default_factory=dict)


class WorkersOut(BaseModel):
    ok: bool
    error: str | None
    workers: list[WorkerOut]


class KeyImageOut(BaseModel):
    index: int
    sop_instance_uid: str
    frame: int
    url: str
    segments: list[str]
    boxes: list[str]
