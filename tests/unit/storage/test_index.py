"""Indexing received instances: new, unchanged and replaced outcomes, and reopening studies, on
SQLite and PostgreSQL (each has its own form of the one-statement insert of a new instance)."""

from __future__ import annotations

from datetime import timedelta
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import Engine, event, func, select
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.header import parse_header
from storage.db import make_session_factory, upgrade
from storage.index import IndexOutcome, index_instance, patient_key
from storage.models import Instance, Patient, Series, Study, StudyState, utcnow
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
    assert (replaced is not None) is (outcome is IndexOutcome.REPLACED)
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


def test_replaced_instance_reopens_a_completed_study(sessions, store, make_header: HeaderFactory) -> None:
    _index(sessions, store, make_header(1), b"a")
    _complete(sessions)

    assert _index(sessions, store, make_header(1), b"a, corrected") is IndexOutcome.REPLACED

    with sessions() as session:
        assert _study(session).state is StudyState.RECEIVING


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
