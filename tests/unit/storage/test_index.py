"""Indexing received instances: new, unchanged and replaced outcomes, and reopening studies, on
SQLite and PostgreSQL (each has its own form of the one-statement insert of a new instance)."""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.header import parse_header
from storage.db import make_session_factory, upgrade
from storage.index import RETURNED_RESULT, IndexOutcome, index_instance, patient_key
from storage.models import (
    Instance,
    Job,
    JobState,
    Patient,
    Result,
    Series,
    SeriesOrigin,
    Study,
    StudyState,
    utcnow,
)
from storage.store import InstanceStore, StoredFile
from tests.deidentified import HASHED_BIRTH_DATE, LONG_ACCESSION, variant
from tests.shared_data import SHARED_DICOM
from tests.unit.storage.conftest import STUDY_UID, HeaderFactory


@pytest.fixture(params=["sqlite", "postgres"])
def sessions(request: pytest.FixtureRequest) -> sessionmaker[Session]:
    engine: Engine = request.getfixturevalue(f"{request.param}_engine")
    upgrade(engine)  # a no-op on the already migrated SQLite index
    return make_session_factory(engine)


@pytest.fixture
def store(tmp_path: Path) -> InstanceStore:
    return InstanceStore(tmp_path / "store")


def _index(sessions: sessionmaker[Session], store: InstanceStore, header, data: bytes, *, now=None,
           calling: str | None = "MODALITY", called: str | None = "MEDNODE") -> IndexOutcome:  # type: ignore[no-untyped-def]
    stored = store.write_instance(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid, data)
    with sessions() as session, session.begin():
        outcome, replaced = index_instance(session, header, stored, calling_ae_title=calling, called_ae_title=called,
                                           now=now)
    assert (replaced is not None) is (outcome in (IndexOutcome.REPLACED, IndexOutcome.DUPLICATE))
    return outcome


def _count(session: Session, model: type) -> int:
    return session.scalar(select(func.count()).select_from(model)) or 0


def _study(session: Session) -> Study:
    return session.scalars(select(Study).where(Study.study_instance_uid == STUDY_UID)).one()


def test_new_instance_creates_patient_study_series_instance(sessions, store, make_header: HeaderFactory) -> None:
    header = make_header(1)
    assert _index(sessions, store, header, b"instance one") is IndexOutcome.NEW

    with sessions() as session:
        assert [_count(session, m) for m in (Patient, Study, Series, Instance)] == [1, 1, 1, 1]
        study = _study(session)
        assert study.state is StudyState.RECEIVING
        assert study.version == 0
        assert study.calling_ae_title == "MODALITY" and study.called_ae_title == "MEDNODE"
        assert study.patient is not None and study.patient.patient_key == patient_key(header) == "PID1^"
        series = study.series[0]
        assert (series.series_instance_uid, series.modality, series.body_part_examined) == (
            header.series_instance_uid, "CT", "CHEST",
        )
        instance = session.scalars(select(Instance)).one()
        assert instance.sop_instance_uid == header.sop_instance_uid
        assert instance.path.startswith(f"instances/{STUDY_UID}/{header.series_instance_uid}/{header.sop_instance_uid}.")
        assert instance.size_bytes == len(b"instance one")
        assert instance.transfer_syntax_uid == header.transfer_syntax_uid
        assert instance.received_at.tzinfo is not None


def test_more_instances_share_rows_and_patients_are_keyed_by_id_and_issuer(
    sessions, store, make_header: HeaderFactory
) -> None:
    _index(sessions, store, make_header(1), b"a")
    _index(sessions, store, make_header(2), b"b")
    other_series = make_header(3, series_instance_uid="1.2.826.0.1.3680043.8.498.1.2",
                               sop_instance_uid="1.2.826.0.1.3680043.8.498.1.2.1")
    _index(sessions, store, other_series, b"c")
    # another study of the same patient, and a study of a same-ID patient from another issuer
    _index(sessions, store, make_header(4, study_instance_uid="1.2.3.4", series_instance_uid="1.2.3.4.1",
                                        sop_instance_uid="1.2.3.4.1.1"), b"d")
    _index(sessions, store, make_header(5, study_instance_uid="1.2.3.5", series_instance_uid="1.2.3.5.1",
                                        sop_instance_uid="1.2.3.5.1.1", issuer_of_patient_id="OTHER"), b"e")

    with sessions() as session:
        assert [_count(session, m) for m in (Patient, Study, Series, Instance)] == [2, 3, 4, 5]
        assert sorted(session.scalars(select(Patient.patient_key))) == ["PID1^", "PID1^OTHER"]
        assert len(_study(session).series) == 2


def test_identical_resend_is_unchanged_and_touches_nothing(sessions, store, make_header: HeaderFactory) -> None:
    header = make_header(1)
    first_at = utcnow() - timedelta(minutes=5)
    _index(sessions, store, header, b"same bytes", now=first_at)

    outcome = _index(sessions, store, header, b"same bytes", now=utcnow(), calling="OTHER")

    assert outcome is IndexOutcome.UNCHANGED
    with sessions() as session:
        assert _count(session, Instance) == 1
        study = _study(session)
        assert study.last_received_at == first_at
        assert study.calling_ae_title == "MODALITY"
        assert session.scalars(select(Instance)).one().received_at == first_at


def test_resend_with_other_bytes_replaces_the_row(sessions, store, make_header: HeaderFactory) -> None:
    header = make_header(1)
    first_at = utcnow() - timedelta(minutes=5)
    _index(sessions, store, header, b"first bytes", now=first_at)
    with sessions() as session:
        first_path = session.scalars(select(Instance.path)).one()
    later = utcnow()

    stored = store.write_instance(STUDY_UID, header.series_instance_uid, header.sop_instance_uid,
                                  b"corrected, other bytes")
    with sessions() as session, session.begin():
        outcome, replaced = index_instance(session, header, stored, calling_ae_title=None, called_ae_title=None,
                                           now=later)

    assert outcome is IndexOutcome.REPLACED
    assert replaced == first_path != stored.relative_path  # for the caller to delete after commit
    with sessions() as session:
        instance = session.scalars(select(Instance)).one()
        assert instance.size_bytes == len(b"corrected, other bytes")
        assert store.read(instance.path) == b"corrected, other bytes"
        assert instance.received_at == later
        assert _study(session).last_received_at == later


def _complete(sessions: sessionmaker[Session]) -> None:
    """What the completion checker does to a study it routes."""
    with sessions() as session, session.begin():
        study = _study(session)
        study.state = StudyState.ROUTED
        study.version = 1
        study.completed_at = utcnow()


def test_new_instance_reopens_a_completed_study(sessions, store, make_header: HeaderFactory) -> None:
    _index(sessions, store, make_header(1), b"a")
    _complete(sessions)

    assert _index(sessions, store, make_header(2), b"b") is IndexOutcome.NEW

    with sessions() as session:
        study = _study(session)
        assert study.state is StudyState.RECEIVING
        assert study.version == 1  # the next completion makes version 2


def test_identical_resend_does_not_reopen_a_completed_study(sessions, store, make_header: HeaderFactory) -> None:
    _index(sessions, store, make_header(1), b"a")
    _index(sessions, store, make_header(2), b"b")
    _complete(sessions)

    assert _index(sessions, store, make_header(1), b"a") is IndexOutcome.UNCHANGED
    assert _index(sessions, store, make_header(2), b"b") is IndexOutcome.UNCHANGED

    with sessions() as session:
        assert _study(session).state is StudyState.ROUTED


def test_a_resend_with_other_bytes_after_completion_keeps_the_file_held(
    sessions, store, make_header: HeaderFactory
) -> None:
    # a PACS re-sending a study in another transfer syntax: same SOP Instance UIDs, other bytes
    _index(sessions, store, make_header(1), b"a")
    _complete(sessions)
    with sessions() as session:
        held = session.scalars(select(Instance.path)).one()
    resent = store.write_instance(STUDY_UID, make_header(1).series_instance_uid, make_header(1).sop_instance_uid,
                                  b"a, in another transfer syntax")

    with sessions() as session, session.begin():
        outcome, obsolete = index_instance(session, make_header(1), resent, calling_ae_title="PACS",
                                           called_ae_title="MEDNODE")

    assert outcome is IndexOutcome.DUPLICATE
    assert obsolete == resent.relative_path != held  # the caller deletes the duplicate
    with sessions() as session:
        assert session.scalars(select(Instance.path)).one() == held
        study = _study(session)
        assert study.state is StudyState.ROUTED and study.calling_ae_title == "MODALITY"


def test_naive_datetimes_are_refused(sessions, store, make_header: HeaderFactory) -> None:
    from datetime import datetime

    header = make_header(1)
    stored = StoredFile(store.instance_path(STUDY_UID, header.series_instance_uid, header.sop_instance_uid, "0" * 64), 1,
                        "0" * 64)
    with pytest.raises(Exception, match="naive datetime"), sessions() as session, session.begin():
        index_instance(session, header, stored, calling_ae_title=None, called_ae_title=None,
                       now=datetime(2024, 1, 1))


def test_a_new_instance_of_a_known_series_takes_two_statements(sessions, store, make_header: HeaderFactory) -> None:
    # the hot path of every C-STORE: one INSERT … SELECT … ON CONFLICT DO NOTHING and the study's
    # UPDATE; if a dialect or SQLAlchemy change breaks it, indexing still works but slower
    _index(sessions, store, make_header(1), b"a")
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement.split()[0].upper())

    engine = sessions.kw["bind"]
    event.listen(engine, "before_cursor_execute", count)
    try:
        assert _index(sessions, store, make_header(2), b"b") is IndexOutcome.NEW
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert statements == ["INSERT", "UPDATE"]
    with sessions() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == make_header(2).sop_instance_uid)).one()
        assert (row.series.series_instance_uid, row.instance_number, row.size_bytes) == (make_header(2).series_instance_uid, 2, 1)
        assert _study(session).last_received_at is not None


@pytest.mark.parametrize("name", ["hashed", "garbled", "latin1", "gb18030", "iso2022-ir87"])
def test_deidentified_and_non_conformant_headers_are_indexed(sessions, store, name: str) -> None:
    """A hash in Patient's Birth Date or a 56-character Accession Number is not indexed (each
    column is as wide as its VR allows: PostgreSQL refused the whole instance); the rest is."""
    path = SHARED_DICOM / "ct" / "dcmqi_ct3slice" / "01.dcm"
    if not path.exists():
        pytest.skip(f"sample {path} is missing")
    source = variant(pydicom.dcmread(path), name)
    buffer = BytesIO()
    source.save_as(buffer, enforce_file_format=True)
    header, _ = parse_header(buffer.getvalue())
    assert HASHED_BIRTH_DATE not in (header.patient_birth_date or "")
    assert header.accession_number != LONG_ACCESSION
    assert _index(sessions, store, header, buffer.getvalue()) is IndexOutcome.NEW
    with sessions() as session:
        study = session.scalars(select(Study).where(Study.study_instance_uid == header.study_instance_uid)).one()
        assert study.accession_number == (None if name in ("hashed", "latin1") else header.accession_number)
        assert _count(session, Instance) == 1


# -- what comes back: own results, derived objects, late series (issue 12) ---------------------
SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR
SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"
RESULT_SERIES = "1.2.826.0.1.3680043.8.498.9"


def _record_result(sessions: sessionmaker[Session], sop_uid: str, series_uid: str) -> None:
    """A job of the study with one result, as ``node.jobs.record_results`` leaves it."""
    with sessions() as session, session.begin():
        study = _study(session)
        job = Job(study_pk=study.id, study_version=1, rule_name="ct", tasks=["ct_analysis"], series_uids=[],
                  destinations=[], state=JobState.DELIVERED)
        session.add(job)
        session.flush()
        session.add(Result(job_pk=job.id, kind="sr", sop_class_uid=SR_STORAGE, sop_instance_uid=sop_uid,
                           series_instance_uid=series_uid, path=f"results/{job.id}/{sop_uid}.dcm", size_bytes=1))


def _series(session: Session, uid: str) -> Series:
    return session.scalars(select(Series).where(Series.series_instance_uid == uid)).one()


def _result_header(make_header: HeaderFactory, number: int, **changes: object):  # type: ignore[no-untyped-def]
    return make_header(number, sop_class_uid=changes.pop("sop_class_uid", SR_STORAGE), modality="SR",
                       series_instance_uid=RESULT_SERIES, sop_instance_uid=f"{RESULT_SERIES}.{number}", **changes)


@pytest.mark.parametrize("known_by", ["sop_instance_uid", "series_instance_uid", "manufacturer"])
def test_a_returned_result_is_stored_and_never_reopens(sessions, store, make_header: HeaderFactory,
                                                       known_by: str) -> None:
    _index(sessions, store, make_header(1), b"a")
    _complete(sessions)
    if known_by == "sop_instance_uid":
        _record_result(sessions, f"{RESULT_SERIES}.1", "1.2.3.999")
    elif known_by == "series_instance_uid":
        _record_result(sessions, "1.2.3.999.1", RESULT_SERIES)
    returned = _result_header(make_header, 1, manufacturer="mednode" if known_by == "manufacturer" else "ACME")

    assert _index(sessions, store, returned, b"the SR, back from the PACS", calling="PACS") is IndexOutcome.NEW

    with sessions() as session:
        study = _study(session)
        assert study.state is StudyState.ROUTED and study.calling_ae_title == "MODALITY"
        series = _series(session, RESULT_SERIES)
        assert series.origin is SeriesOrigin.MEDNODE_RESULT
        assert series.held_reason == RETURNED_RESULT
        assert series.late_at is None  # never counts as late
        assert _count(session, Instance) == 2  # stored and indexed all the same


def test_a_returned_result_in_a_receiving_study_does_not_extend_its_quiet_period(
    sessions, store, make_header: HeaderFactory
) -> None:
    first_at = utcnow() - timedelta(minutes=1)
    _index(sessions, store, make_header(1), b"a", now=first_at)
    _index(sessions, store, _result_header(make_header, 1, manufacturer="mednode"), b"sr")
    _index(sessions, store, _result_header(make_header, 2, sop_class_uid=SEG_STORAGE, manufacturer="mednode"), b"seg")

    with sessions() as session:
        assert _study(session).last_received_at == first_at
        assert _series(session, RESULT_SERIES).origin is SeriesOrigin.MEDNODE_RESULT


def test_derived_objects_after_completion_are_held_but_not_while_receiving(
    sessions, store, make_header: HeaderFactory
) -> None:
    _index(sessions, store, make_header(1), b"a")
    dose = make_header(2, sop_class_uid=SR_STORAGE, modality="SR", series_instance_uid="1.2.3.7",
                       sop_instance_uid="1.2.3.7.1")
    _index(sessions, store, dose, b"dose report, part of the acquisition")
    _complete(sessions)
    # a radiologist's key objects and another node's SR: a new series, and a new instance of an old one
    ko = make_header(3, sop_class_uid="1.2.840.10008.5.1.4.1.1.88.59", modality="KO",
                     series_instance_uid="1.2.3.8", sop_instance_uid="1.2.3.8.1")
    _index(sessions, store, ko, b"key objects")
    _index(sessions, store, dataclasses.replace(dose, sop_instance_uid="1.2.3.7.2"), b"another SR")

    with sessions() as session:
        assert _study(session).state is StudyState.ROUTED
        assert (_series(session, "1.2.3.7").origin, _series(session, "1.2.3.7").held_reason) == (
            SeriesOrigin.DERIVED, None)
        ko_series = _series(session, "1.2.3.8")
        assert ko_series.origin is SeriesOrigin.DERIVED and ko_series.held_reason is not None
        assert ko_series.late_at is None
        assert _count(session, Instance) == 4


@pytest.mark.parametrize("rule_runs", [True, False])
def test_a_late_series_reopens_only_if_the_check_says_a_rule_runs(
    sessions, store, make_header: HeaderFactory, rule_runs: bool
) -> None:
    _index(sessions, store, make_header(1), b"a")
    _complete(sessions)
    asked: list[tuple[int, str]] = []

    def check(session: Session, study_pk: int, header) -> str | None:  # type: ignore[no-untyped-def]
        asked.append((study_pk, header.series_instance_uid))
        return None if rule_runs else "late series: no rule would run on it"

    late = [make_header(n, series_instance_uid="1.2.3.6", sop_instance_uid=f"1.2.3.6.{n}") for n in (1, 2)]
    reopened_at = utcnow()
    stored = store.write_instance(STUDY_UID, "1.2.3.6", "1.2.3.6.1", b"late 1")
    with sessions() as session, session.begin():
        assert index_instance(session, late[0], stored, calling_ae_title="MODALITY", called_ae_title="MEDNODE",
                              now=reopened_at, late_series_check=check)[0] is IndexOutcome.NEW
    _index(sessions, store, late[1], b"late 2")  # the fast path: no check, the series decides

    assert len(asked) == 1
    with sessions() as session:
        study = _study(session)
        series = _series(session, "1.2.3.6")
        assert series.origin is SeriesOrigin.ACQUIRED and series.late_at == reopened_at
        assert _count(session, Instance) == 3
        if rule_runs:
            assert study.state is StudyState.RECEIVING and series.held_reason is None
            assert study.receiving_since == reopened_at  # the max-wait clock restarts
        else:
            assert study.state is StudyState.ROUTED and series.held_reason == "late series: no rule would run on it"


def test_receiving_since_is_kept_while_a_study_receives(sessions, store, make_header: HeaderFactory) -> None:
    started = utcnow() - timedelta(minutes=3)
    _index(sessions, store, make_header(1), b"a", now=started)
    _index(sessions, store, make_header(2), b"b", now=started + timedelta(minutes=1))
    _index(sessions, store, make_header(3, series_instance_uid="1.2.3.5", sop_instance_uid="1.2.3.5.1"), b"c")

    with sessions() as session:
        study = _study(session)
        assert study.receiving_since == started and study.last_received_at > started + timedelta(minutes=1)


def test_derived_objects_take_the_full_path(sessions, store, make_header: HeaderFactory) -> None:
    # each SR, SEG… is looked up among the results; images of a known series are not
    _index(sessions, store, make_header(1), b"a")
    _index(sessions, store, _result_header(make_header, 1), b"sr 1")
    statements: list[str] = []

    def count(conn, cursor, statement, *args) -> None:  # type: ignore[no-untyped-def]
        statements.append(statement.split()[0].upper())

    engine = sessions.kw["bind"]
    event.listen(engine, "before_cursor_execute", count)
    try:
        _index(sessions, store, _result_header(make_header, 2), b"sr 2")
    finally:
        event.remove(engine, "before_cursor_execute", count)
    assert statements[:2] == ["SELECT", "SELECT"] and "INSERT" in statements


def test_an_image_naming_mednode_as_manufacturer_is_not_taken_for_a_result(
    sessions, store, make_header: HeaderFactory
) -> None:
    _index(sessions, store, make_header(1, manufacturer="mednode"), b"a phantom made by mednode's tests")

    with sessions() as session:
        assert _series(session, make_header(1).series_instance_uid).origin is SeriesOrigin.ACQUIRED
