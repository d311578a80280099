"""Indexing received instances: Patient/Study/Series/Instance rows for one stored file."""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Insert, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
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


_INSTANCE_COLUMNS = (
    "series_pk", "sop_class_uid", "transfer_syntax_uid", "instance_number", "path", "size_bytes",
    "sha256", "received_at",
)
# Statements of the per-instance hot path, built once (building them per call costs more than
# SQLite takes to commit the row) and run on the session's connection as plain Core statements:
# through ``Session.execute`` the UPDATEs would also search the identity map for rows to
# synchronise, which tripled the time of indexing an instance.
_FIND_INSTANCE = select(Instance.id, Instance.sha256, Instance.path).where(
    Instance.sop_instance_uid == bindparam("uid")
)
_FIND_SERIES = select(Series.id, Series.study_pk).where(Series.series_instance_uid == bindparam("uid"))
_INSERT_INSTANCE = insert(Instance)
_UPDATE_INSTANCE = (
    update(Instance)
    .where(Instance.id == bindparam("instance_pk"))
    .values({c: bindparam(c) for c in _INSTANCE_COLUMNS})
)
_NEW_INSTANCE_COLUMNS = ("sop_instance_uid", *_INSTANCE_COLUMNS[1:])


def _insert_if_new(dialect_insert: Callable[..., sqlite.Insert | postgresql.Insert]) -> Insert:
    """``INSERT INTO instance … SELECT <the series' id>, <values> … ON CONFLICT DO NOTHING``.

    One statement for the common case (a new instance of a series already indexed) that would
    otherwise take three: find the instance, find the series, insert. It inserts nothing when the
    instance exists or its series does not yet; then the full path runs.
    """
    columns = Instance.__table__.c
    values = [bindparam(name, type_=columns[name].type) for name in _NEW_INSTANCE_COLUMNS]
    source = select(Series.id, *values).where(Series.series_instance_uid == bindparam("series_uid"))
    return (
        dialect_insert(Instance)
        .from_select(["series_pk", *_NEW_INSTANCE_COLUMNS], source)
        .on_conflict_do_nothing(index_elements=["sop_instance_uid"])
        # the inserted row count is how the caller knows; psycopg reports it only when asked
        .execution_options(preserve_rowcount=True)
    )


#: by dialect name; another dialect takes the full path every time
_INSERT_IF_NEW = {"sqlite": _insert_if_new(sqlite.insert), "postgresql": _insert_if_new(postgresql.insert)}
_TOUCH_STUDY_OF_SERIES = (
    update(Study)
    .where(
        Study.id
        == select(Series.study_pk).where(Series.series_instance_uid == bindparam("series_uid")).scalar_subquery()
    )
    .values(
        last_received_at=bindparam("now"),
        state=StudyState.RECEIVING,
        calling_ae_title=bindparam("calling"),
        called_ae_title=bindparam("called"),
    )
)
_TOUCH_STUDY = (
    update(Study)
    .where(Study.id == bindparam("study_pk"))
    .values(
        last_received_at=bindparam("now"),
        state=StudyState.RECEIVING,
        calling_ae_title=bindparam("calling"),
        called_ae_title=bindparam("called"),
    )
)


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
    connection = session.connection()
    values = {
        "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "instance_number": header.instance_number,
        "path": stored.relative_path,
        "size_bytes": stored.size_bytes,
        "sha256": stored.sha256,
        "received_at": now,
    }
    insert_if_new = _INSERT_IF_NEW.get(connection.dialect.name)
    if insert_if_new is not None:
        inserted = connection.execute(insert_if_new, {
            **values, "sop_instance_uid": header.sop_instance_uid, "series_uid": header.series_instance_uid,
        })
        if inserted.rowcount == 1:
            connection.execute(_TOUCH_STUDY_OF_SERIES, {
                "series_uid": header.series_instance_uid, "now": now,
                "calling": calling_ae_title, "called": called_ae_title,
            })
            return IndexOutcome.NEW, None
    # seen before, or the first instance of a new series
    existing = connection.execute(_FIND_INSTANCE, {"uid": header.sop_instance_uid}).first()
    if existing is not None and existing.sha256 == stored.sha256 and existing.path == stored.relative_path:
        return IndexOutcome.UNCHANGED, None
    keys = connection.execute(_FIND_SERIES, {"uid": header.series_instance_uid}).first()
    if keys is None:
        created = _get_or_create_series(session, header, now)
        series_pk, study_pk = created.id, created.study_pk
    else:
        series_pk, study_pk = keys.id, keys.study_pk
    values["series_pk"] = series_pk
    if existing is None:
        connection.execute(_INSERT_INSTANCE, {**values, "sop_instance_uid": header.sop_instance_uid})
        outcome, replaced = IndexOutcome.NEW, None
    else:
        connection.execute(_UPDATE_INSTANCE, {**values, "instance_pk": existing.id})
        outcome, replaced = IndexOutcome.REPLACED, existing.path
    connection.execute(
        _TOUCH_STUDY,
        {"study_pk": study_pk, "now": now, "calling": calling_ae_title, "called": called_ae_title},
    )
    return outcome, replaced
