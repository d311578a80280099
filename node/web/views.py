"""From index rows to response schemas, shared by the JSON API and the HTML pages.

This is where patient fields are attached or left out: only :func:`study_summary` and
:func:`study_detail` may set ``patient``, and only when the caller is logged in; other
patient-derived fields only when :attr:`node.web.access.Access.patient_data` allows.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy.orm import Session

from node import clock, queries
from node.context import NodeContext
from node.web import imaging
from node.web.access import Access
from node.web.schemas import (
    JobOut,
    KeyImageOut,
    PatientOut,
    SeriesOut,
    StageTimeOut,
    StudyOut,
    StudySummaryOut,
    TimelineEventOut,
)
from storage.models import Job, Series, Study

_CACHE = imaging.KeyImageCache()


def study_summary(row: queries.StudyRow, access: Access) -> StudySummaryOut:
    study = row.study
    shown = access.patient_data
    return StudySummaryOut(
        study_instance_uid=study.study_instance_uid, study_date=study.study_date if shown else None,
        study_description=study.study_description if shown else None, state=study.state.value,
        version=study.version,
        modalities=list(row.modalities), series_count=row.series_count, instance_count=row.instance_count,
        calling_ae_title=study.calling_ae_title, called_ae_title=study.called_ae_title,
        first_received_at=study.first_received_at, last_received_at=study.last_received_at,
        completed_at=study.completed_at,
        latest_job_state=row.latest_job_state.value if row.latest_job_state else None,
        patient=PatientOut.of(study) if access.identity else None,
        patient_data_hidden=not shown,
    )


def study_detail(session: Session, study: Study, access: Access, now: datetime) -> StudyOut:
    counts = queries.series_instance_counts(session, study)
    row = queries.StudyRow(
        study=study,
        modalities=tuple(sorted({s.modality for s in study.series if s.modality})),
        series_count=len(study.series), instance_count=sum(counts.values()),
        latest_job_state=study.jobs[-1].state if study.jobs else None,
    )
    summary = study_summary(row, access)
    shown = access.patient_data
    timeline = [TimelineEventOut(**vars(e)) for e in queries.study_timeline(study)]
    if not shown:  # details quote job reasons, which can quote attribute values
        timeline = [e.model_copy(update={"detail": None}) for e in timeline]
    return StudyOut(
        **summary.model_dump(),
        route_reason=study.route_reason,
        completion_reason=study.completion_reason,
        series=[SeriesOut.of(s, counts.get(s.series_instance_uid, 0), patient_data=shown) for s in study.series],
        timeline=timeline,
        clock=[StageTimeOut(**vars(s)) for s in clock.study_clock(study)],
        jobs=[JobOut.of(j, now, patient_data=shown) for j in sorted(study.jobs, key=lambda j: j.id, reverse=True)],
    )


def result_uids(job: Job) -> list[str]:
    """The SOP Instance UIDs of a job's results (what an audit row names)."""
    return [r.sop_instance_uid for r in job.results]


def _fallback_frames(session: Session, job: Job) -> list[tuple[str, int]]:
    """The middle instance of the largest series the job read (what a question was asked about)."""
    from sqlalchemy import select

    from storage.models import Instance

    best: list[tuple[int | None, int, str]] = []
    for series_uid in job.series_uids:
        rows = session.execute(
            select(Instance.instance_number, Instance.id, Instance.sop_instance_uid)
            .join(Series, Series.id == Instance.series_pk)
            .where(Series.series_instance_uid == series_uid)
        ).all()
        if len(rows) > len(best):
            best = [(r[0], r[1], r[2]) for r in rows]
    if not best:
        return []
    best.sort(key=lambda r: (r[0] if r[0] is not None else 0, r[1]))
    return [(best[len(best) // 2][2], 1)]


def job_images(session: Session, ctx: NodeContext, job: Job) -> imaging.JobImages:
    """The key images of ``job`` (cached on its result files).

    Raises
    ------
    imaging.KeyImageError
        If a result file is missing or unreadable.
    """
    files = [imaging.ResultFile(r.kind, r.sop_class_uid, ctx.store.absolute(r.path)) for r in job.results]
    key = ("plan", job.id, tuple((str(f.path), r.size_bytes) for f, r in zip(files, job.results)),
           tuple(job.series_uids))
    for f in files:
        if not Path(f.path).is_file():
            raise imaging.KeyImageError(f"result file of job {job.id} is missing from the store")
    return _CACHE.plan(key, lambda: imaging.plan_job_images(files, _fallback_frames(session, job)))


def key_images_out(session: Session, ctx: NodeContext, job: Job) -> list[KeyImageOut]:
    plan = job_images(session, ctx, job)
    out = []
    for index, image in enumerate(plan.images):
        out.append(KeyImageOut(
            index=index, sop_instance_uid=image.sop_instance_uid, frame=image.frame,
            url=f"/api/v1/jobs/{job.id}/key-images/{index}.png",
            segments=[plan.segment_labels.get(n, f"segment {n}") for n, m in sorted(image.masks.items()) if m.any()],
            boxes=[b.label for b in image.boxes],
        ))
    return out


def key_image_png(session: Session, ctx: NodeContext, job: Job, index: int) -> bytes | None:
    """PNG of key image ``index`` of ``job``; None when there is no such image.

    Raises
    ------
    imaging.KeyImageError
        If the source instance is no longer stored or cannot be decoded.
    """
    plan = job_images(session, ctx, job)
    if not 0 <= index < len(plan.images):
        return None
    image = plan.images[index]
    paths = queries.instance_paths(session, [image.sop_instance_uid])
    if image.sop_instance_uid not in paths:
        raise imaging.KeyImageError(f"source instance {image.sop_instance_uid} is not stored on this node")
    source = ctx.store.absolute(paths[image.sop_instance_uid])
    key = ("png", job.id, index, image.sop_instance_uid, image.frame,
           tuple((r.path, r.size_bytes) for r in job.results))

    def build() -> bytes:
        from pydicom import dcmread

        try:
            ds = dcmread(source)
            return imaging.render_key_image(ds, image, plan.segment_labels)
        except (OSError, ValueError, AttributeError, RuntimeError) as exc:
            raise imaging.KeyImageError(f"cannot draw {image.sop_instance_uid}: {exc}") from exc

    return _CACHE.png(key, build)
