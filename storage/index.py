"""Indexing received instances: Patient/Study/Series/Instance rows for one stored file."""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from dicom_io.header import InstanceHeader
from storage.models import Instance, Patient, Series, Study, StudyState, utcnow
from storage.store import StoredFile


class IndexOutcome(str, enum.Enum):
    NEW = "new"  #: first time this SOP Instance UID was seen
    UNCHANGED = "unchanged"  #: re-sent with identical bytes: nothing changes, the study stays as it is
    REPLACED = "replaced"  #: re-sent with other bytes: the row points at the new file


def patient_key(header: InstanceHeader) -> str:
    """The key a patient is filed under: PatientID qualified by its issuer."""
    return f"{header.patient_id or ''}^{header.issuer_of_patient_id or ''}"


def _get_or_create_study(session: Session, header: InstanceHeader, now: datetime) -> Study:
    study = session.scalar(
        select(Study).where(Study.study_instance_uid == header.study_instance_uid)
    )
    if study is not None:
        return study
    key = patient_key(header)
    patient = session.scalar(select(Patient).where(Patient.patient_key == key))
    if patient is None:
        patient = Patient(
            patient_key=key,
            patient_id=header.patient_id,
            patient_name=header.patient_name,
            patient_birth_date=header.patient_birth_date,
            patient_sex=header.patient_sex,
        )
        session.add(patient)
    study = Study(
        study_instance_uid=header.study_instance_uid,
        patient=patient,
        study_date=header.study_date,
        study_description=header.study_description,
        accession_number=header.accession_number,
        state=StudyState.RECEIVING,
        version=0,
        first_received_at=now,
        last_received_at=now,
    )
    session.add(study)
    session.flush()
    return study


def _get_or_create_series(session: Session, header: InstanceHeader, now: datetime) -> Series:
    series = session.scalar(
        select(Series).where(Series.series_instance_uid == header.series_instance_uid)
    )
    if series is not None:
        return series
    study = _get_or_create_study(session, header, now)
    series = Series(
        series_instance_uid=header.series_instance_uid,
        study_pk=study.id,
        modality=header.modality,
        body_part_examined=header.body_part_examined,
        series_description=header.series_description,
        series_number=header.series_number,
    )
    session.add(series)
    session.flush()
    return series


def index_instance(
    session: Session,
    header: InstanceHeader,
    stored: StoredFile,
    *,
    calling_ae_title: str | None,
    called_ae_title: str | None,
    now: datetime | None = None,
) -> tuple[IndexOutcome, str | None]:
    """Record one stored instance; the caller commits.

    A new or changed instance marks its study as receiving again (which reopens a study that was
    already complete, so a new job version follows); an identical re-send changes nothing.

    Returns
    -------
    tuple
        The outcome, and for a replaced instance the path of the file it replaced (for the
        caller to delete once the transaction committed).
    """
    now = now or utcnow()
    existing = session.scalar(
        select(Instance).where(Instance.sop_instance_uid == header.sop_instance_uid)
    )
    if existing is not None and existing.sha256 == stored.sha256 and existing.path == stored.relative_path:
        return IndexOutcome.UNCHANGED, None
    series = _get_or_create_series(session, header, now)
    if existing is None:
        session.add(
            Instance(
                sop_instance_uid=header.sop_instance_uid,
                series_pk=series.id,
                sop_class_uid=header.sop_class_uid,
                transfer_syntax_uid=header.transfer_syntax_uid,
                instance_number=header.instance_number,
                path=stored.relative_path,
                size_bytes=stored.size_bytes,
                sha256=stored.sha256,
                received_at=now,
            )
        )
        outcome, replaced = IndexOutcome.NEW, None
    else:
        replaced = existing.path
        existing.series_pk = series.id
        existing.sop_class_uid = header.sop_class_uid
        existing.transfer_syntax_uid = header.transfer_syntax_uid
        existing.instance_number = header.instance_number
        existing.path = stored.relative_path
        existing.size_bytes = stored.size_bytes
        existing.sha256 = stored.sha256
        existing.received_at = now
        outcome = IndexOutcome.REPLACED
    session.execute(
        update(Study)
        .where(Study.id == series.study_pk)
        .values(
            last_received_at=now,
            state=StudyState.RECEIVING,
            calling_ae_title=calling_ae_title,
            called_ae_title=called_ae_title,
        )
    )
    return outcome, replaced
