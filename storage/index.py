"""Indexing received instances: Patient/Study/Series/Instance rows for one stored file."""

from __future__ import annotations

import enum
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import (
    Connection,
    Insert,
    Select,
    bindparam,
    case,
    delete,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from dicom_io.equipment import names_mednode
from dicom_io.header import InstanceHeader
from dicom_io.sop_classes import is_derived_object
from storage.models import (
    Base,
    Instance,
    Patient,
    Result,
    Series,
    SeriesOrigin,
    Study,
    StudyState,
    utcnow,
)
from storage.store import StoredFile


class IndexOutcome(str, enum.Enum):
    NEW = "new"  #: first time this SOP Instance UID was seen
    UNCHANGED = "unchanged"  #: re-sent with identical bytes: nothing changes, the study stays as it is
    REPLACED = "replaced"  #: re-sent with other bytes while its study receives: the row points at the new file
    #: re-sent with other bytes (another transfer syntax, say) after its study completed: the file
    #: held stays and the study stays complete, as a SOP Instance UID names one content (PS3.3
    #: C.12.1.1.1) and a PACS re-sending what it holds must not make a second set of results
    DUPLICATE = "duplicate"


#: ``Series.held_reason`` of mednode's own results returned by a PACS (the dashboard shows it)
RETURNED_RESULT = "mednode result, returned by PACS"
DERIVED_AFTER_COMPLETION = "derived object received after the study was complete"

#: For the first instance of an image series that arrives after its study was complete: given the
#: session, the study's primary key and that instance's header, return None when some rule would
#: run on the series (it reopens the study), else why not (it is stored and the study stays
#: complete). The node passes one built from its routing rules; storage knows no rules.
LateSeriesCheck = Callable[[Session, int, InstanceHeader], str | None]


def patient_key(header: InstanceHeader) -> str:
    """The key a patient is filed under: PatientID qualified by its issuer."""
    return f"{header.patient_id or ''}^{header.issuer_of_patient_id or ''}"


def _insert_unless_present(session: Session, model: type[Base], key: str, values: dict[str, object]) -> bool:
    """Insert a row unless one with the same unique ``key`` exists; return whether this inserted it.

    Several listener processes (or hosts) receive the first instances of one new patient, study or
    series at once: each tries the insert and the losers take the winner's row, so none answers
    0xA700 for a unique key. PostgreSQL and SQLite do it in one statement (``INSERT … ON CONFLICT
    DO NOTHING``: on PostgreSQL a peer's uncommitted insert of the key makes it wait for that
    transaction, then do nothing); another database inserts in a savepoint and takes the unique
    violation for "present".
    """
    connection = session.connection()
    dialect_insert = _DIALECT_INSERTS.get(connection.dialect.name)
    if dialect_insert is not None:
        statement = (
            dialect_insert(model).values(values).on_conflict_do_nothing(index_elements=[key])
            .execution_options(preserve_rowcount=True)
        )
        return bool(connection.execute(statement).rowcount)
    try:
        with session.begin_nested():
            session.connection().execute(insert(model).values(values))
    except IntegrityError:
        return False
    return True


def _get_or_create_study(session: Session, header: InstanceHeader, now: datetime) -> Study:
    find = select(Study).where(Study.study_instance_uid == header.study_instance_uid)
    study = session.scalar(find)
    if study is not None:
        return study
    key = patient_key(header)
    _insert_unless_present(session, Patient, "patient_key", {
        "patient_key": key,
        "patient_id": header.patient_id,
        "patient_name": header.patient_name,
        "patient_birth_date": header.patient_birth_date,
        "patient_sex": header.patient_sex,
    })
    patient_pk = session.scalar(select(Patient.id).where(Patient.patient_key == key))
    _insert_unless_present(session, Study, "study_instance_uid", {
        "study_instance_uid": header.study_instance_uid,
        "patient_pk": patient_pk,
        "study_date": header.study_date,
        "study_description": header.study_description,
        "accession_number": header.accession_number,
        "state": StudyState.RECEIVING,
        "version": 0,
        "first_received_at": now,
        "last_received_at": now,
        "receiving_since": now,
    })
    # this statement's snapshot sees the row, whoever inserted it (PostgreSQL reads committed)
    return session.scalars(find).one()


def is_returned_result(session: Session, header: InstanceHeader) -> bool:
    """Whether mednode wrote this instance: its SOP Instance or Series Instance UID is a result's,
    or it is a derived object (mednode writes only SR and SEG) whose Manufacturer names mednode:
    results of an index since wiped, or of another mednode. Images are never taken for results
    by their Manufacturer alone (a test phantom, or a scanner, may name anything there)."""
    if names_mednode(header.manufacturer) and is_derived_object(header.sop_class_uid):
        return True
    found = session.connection().execute(_FIND_RESULT, {
        "sop_uid": header.sop_instance_uid, "series_uid": header.series_instance_uid,
    }).first()
    return found is not None


def _classify_series(
    session: Session, header: InstanceHeader, study: Study, now: datetime, late_series_check: LateSeriesCheck | None
) -> tuple[SeriesOrigin, datetime | None, str | None]:
    """Origin, late time and held reason of a series whose first instance is ``header``."""
    if is_returned_result(session, header):
        return SeriesOrigin.MEDNODE_RESULT, None, RETURNED_RESULT
    complete = study.state != StudyState.RECEIVING
    if is_derived_object(header.sop_class_uid):
        return SeriesOrigin.DERIVED, None, DERIVED_AFTER_COMPLETION if complete else None
    if not complete:
        return SeriesOrigin.ACQUIRED, None, None
    held = late_series_check(session, study.id, header) if late_series_check is not None else None
    return SeriesOrigin.ACQUIRED, now, held


def _create_series(
    session: Session, header: InstanceHeader, now: datetime, late_series_check: LateSeriesCheck | None
) -> tuple[int, int, bool, bool] | None:
    """Create the series of ``header`` (and its study and patient when new). Return its primary
    key, its study's, whether new instances of it wake the study (it is not held) and whether the
    study was complete before — or None when another connection created the series first (then
    read it as an existing series)."""
    study = _get_or_create_study(session, header, now)
    origin, late_at, held_reason = _classify_series(session, header, study, now, late_series_check)
    created = _insert_unless_present(session, Series, "series_instance_uid", {
        "series_instance_uid": header.series_instance_uid,
        "study_pk": study.id,
        "modality": header.modality,
        "body_part_examined": header.body_part_examined,
        "series_description": header.series_description,
        "series_number": header.series_number,
        "origin": origin,
        "late_at": late_at,
        "held_reason": held_reason,
    })
    if not created:
        return None
    series_pk = session.connection().execute(_FIND_SERIES, {"uid": header.series_instance_uid}).one().id
    return series_pk, study.id, held_reason is None, study.state != StudyState.RECEIVING


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
_FIND_SERIES = (
    select(Series.id, Series.study_pk, Series.held_reason, Study.state)
    .join(Study, Study.id == Series.study_pk)
    .where(Series.series_instance_uid == bindparam("uid"))
)
_FIND_RESULT = (
    select(Result.id)
    .where(or_(Result.sop_instance_uid == bindparam("sop_uid"), Result.series_instance_uid == bindparam("series_uid")))
    .limit(1)
)
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


#: ``INSERT … ON CONFLICT`` builders by dialect name
_DIALECT_INSERTS: dict[str, Callable[..., sqlite.Insert | postgresql.Insert]] = {
    "sqlite": sqlite.insert, "postgresql": postgresql.insert,
}
#: by dialect name; another dialect takes the full path every time
_INSERT_IF_NEW = {"sqlite": _insert_if_new(sqlite.insert), "postgresql": _insert_if_new(postgresql.insert)}
# what a new instance does to its study: receiving (again), since when, and from whom; the CASE
# sees the row as it was before the UPDATE (both SQLite and PostgreSQL evaluate SET so)
_TOUCH_VALUES = {
    "last_received_at": bindparam("now"),
    "receiving_since": case((Study.state == StudyState.RECEIVING, Study.receiving_since), else_=bindparam("now")),
    "state": StudyState.RECEIVING,
    "calling_ae_title": bindparam("calling"),
    "called_ae_title": bindparam("called"),
}
# a held series (a returned result, a late series no rule runs on…) touches nothing: the
# condition rides in the subquery, so the hot path stays one statement
_TOUCH_STUDY_OF_SERIES = (
    update(Study)
    .where(
        Study.id
        == select(Series.study_pk)
        .where(Series.series_instance_uid == bindparam("series_uid"), Series.held_reason.is_(None))
        .scalar_subquery()
    )
    .values(_TOUCH_VALUES)
)
_TOUCH_STUDY = update(Study).where(Study.id == bindparam("study_pk")).values(_TOUCH_VALUES)


def _new_instance_at_once() -> Select[int]:
    """PostgreSQL: ``WITH new AS (INSERT … ON CONFLICT DO NOTHING RETURNING series_pk), touched AS
    (UPDATE study … WHERE id = <the series' study, unless held>) SELECT count(*) FROM new``.

    The common case of :func:`index_instance` (its two statements) as one statement: run on a
    connection in autocommit mode it is also its own transaction, so indexing a new instance of a
    known series takes two round trips to the server (the pool's ping, the statement) instead of
    five (the ping, ``BEGIN``, the insert, the update, ``COMMIT``). A data-modifying ``WITH`` runs once and to the end
    whether or not the main query reads it (PostgreSQL docs, 7.8.4), and the update's subquery
    reads the insert's ``RETURNING``: nothing inserted, nothing touched.
    """
    new = _INSERT_IF_NEW["postgresql"].returning(Instance.series_pk).cte("new_instance")
    study_of_new = (
        select(Series.study_pk).where(Series.id == new.c.series_pk, Series.held_reason.is_(None)).scalar_subquery()
    )
    touched = update(Study).where(Study.id == study_of_new).values(_TOUCH_VALUES).returning(Study.id).cte("touched")
    return select(func.count()).select_from(new).add_cte(touched)


#: by dialect name: dialects that can run :func:`index_new_instance` (data-modifying ``WITH``)
_NEW_INSTANCE_AT_ONCE = {"postgresql": _new_instance_at_once()}


def _instance_values(header: InstanceHeader, stored: StoredFile, now: datetime) -> dict[str, object]:
    """An instance row's values from its header and file (the statements' bound parameters)."""
    return {
        "sop_class_uid": header.sop_class_uid,
        "transfer_syntax_uid": header.transfer_syntax_uid,
        "instance_number": header.instance_number,
        "path": stored.relative_path,
        "size_bytes": stored.size_bytes,
        "sha256": stored.sha256,
        "received_at": now,
    }


def unindex_instance(connection: Connection, sop_instance_uid: str, relative_path: str) -> int:
    """Delete an instance's row while it names the file ``relative_path``; return how many rows
    went (0 or 1). On a connection in autocommit mode the delete is committed when this returns.
    For a row committed while its file's sync ran, when that sync then failed
    (:class:`node.ingest.Ingestor`)."""
    return connection.execute(_UNINDEX, {"uid": sop_instance_uid, "path": relative_path}).rowcount


_UNINDEX = (
    delete(Instance)
    .where(Instance.sop_instance_uid == bindparam("uid"), Instance.path == bindparam("path"))
    .execution_options(preserve_rowcount=True)
)


def indexes_at_once(dialect_name: str) -> bool:
    """Whether :func:`index_new_instance` can run on this dialect."""
    return dialect_name in _NEW_INSTANCE_AT_ONCE


def index_new_instance(
    connection: Connection,
    header: InstanceHeader,
    stored: StoredFile,
    *,
    calling_ae_title: str | None,
    called_ae_title: str | None,
    now: datetime | None = None,
) -> bool:
    """Index a new image instance of a series already indexed, in one statement; return whether
    it did (else nothing changed: run :func:`index_instance`).

    What :func:`index_instance` does for :attr:`IndexOutcome.NEW` instances of a known series —
    the row, and its study touched unless the series is held — as one statement
    (:func:`_new_instance_at_once`). On a connection in autocommit mode the row is committed (and,
    with PostgreSQL's ``synchronous_commit`` on, durable) when this returns. Derived objects
    (SR, SEG…), new series and instances seen before return False: they take the full path.
    Only for dialects where :func:`indexes_at_once` holds.
    """
    if is_derived_object(header.sop_class_uid):
        return False
    now = now or utcnow()
    inserted = connection.execute(_NEW_INSTANCE_AT_ONCE[connection.dialect.name], {
        **_instance_values(header, stored, now),
        "sop_instance_uid": header.sop_instance_uid,
        "series_uid": header.series_instance_uid,
        "now": now,
        "calling": calling_ae_title,
        "called": called_ae_title,
    }).scalar_one()
    return bool(inserted)


def index_instance(
    session: Session,
    header: InstanceHeader,
    stored: StoredFile,
    *,
    calling_ae_title: str | None,
    called_ae_title: str | None,
    now: datetime | None = None,
    late_series_check: LateSeriesCheck | None = None,
) -> tuple[IndexOutcome, str | None]:
    """Record one stored instance; the caller commits.

    A new instance marks its study as receiving (which reopens a study that was already complete,
    so a new job version follows) — unless its series is held: mednode's own results returned by
    a PACS, derived objects (SR, KO, PR, SEG…) that arrive after completion, and late image series
    that ``late_series_check`` says no rule would run on are stored and indexed, and leave the
    study as it is. Which of these a series is, is decided once, at its first instance
    (:attr:`Series.origin`, :attr:`Series.held_reason`); instances of derived SOP Classes are also
    looked up among the results one by one. Images of a series already indexed take one
    statement plus the study's touch, as before.

    An identical re-send changes nothing; a re-send with other bytes replaces the file while the
    study receives, and is dropped (:attr:`IndexOutcome.DUPLICATE`) once it is complete.

    Returns
    -------
    tuple
        The outcome, and the path of a file no row points at any more (the one replaced, or the
        duplicate just written), for the caller to delete once the transaction committed.
    """
    now = now or utcnow()
    connection = session.connection()
    values = _instance_values(header, stored, now)
    derived = is_derived_object(header.sop_class_uid)
    insert_if_new = _INSERT_IF_NEW.get(connection.dialect.name)
    touch = {"now": now, "calling": calling_ae_title, "called": called_ae_title}
    if insert_if_new is not None and not derived:
        inserted = connection.execute(insert_if_new, {
            **values, "sop_instance_uid": header.sop_instance_uid, "series_uid": header.series_instance_uid,
        })
        if inserted.rowcount == 1:
            connection.execute(_TOUCH_STUDY_OF_SERIES, {"series_uid": header.series_instance_uid, **touch})
            return IndexOutcome.NEW, None
    # seen before, the first instance of a new series, or a derived object
    existing = connection.execute(_FIND_INSTANCE, {"uid": header.sop_instance_uid}).first()
    if existing is not None and existing.sha256 == stored.sha256 and existing.path == stored.relative_path:
        return IndexOutcome.UNCHANGED, None
    keys = connection.execute(_FIND_SERIES, {"uid": header.series_instance_uid}).first()
    created = _create_series(session, header, now, late_series_check) if keys is None else None
    if created is None and keys is None:  # another connection created the series meanwhile
        keys = connection.execute(_FIND_SERIES, {"uid": header.series_instance_uid}).one()
    if created is not None:
        series_pk, study_pk, wakes, complete = created
    else:
        assert keys is not None
        series_pk, study_pk = keys.id, keys.study_pk
        complete = keys.state != StudyState.RECEIVING
        wakes = keys.held_reason is None and not (derived and complete)
        if wakes and derived and existing is None and is_returned_result(session, header):
            wakes = False
    if existing is not None and complete:
        return IndexOutcome.DUPLICATE, stored.relative_path
    values["series_pk"] = series_pk
    if existing is None:
        if not _insert_unless_present(session, Instance, "sop_instance_uid",
                                      {**values, "sop_instance_uid": header.sop_instance_uid}):
            # the same instance, indexed by another connection since it was looked up: index it
            # again against that row (unchanged, replaced or duplicate)
            return index_instance(session, header, stored, calling_ae_title=calling_ae_title,
                                  called_ae_title=called_ae_title, now=now, late_series_check=late_series_check)
        outcome, obsolete = IndexOutcome.NEW, None
    else:
        connection.execute(_UPDATE_INSTANCE, {**values, "instance_pk": existing.id})
        outcome, obsolete = IndexOutcome.REPLACED, existing.path
    if wakes:
        connection.execute(_TOUCH_STUDY, {"study_pk": study_pk, **touch})
    return outcome, obsolete
