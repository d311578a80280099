"""The ingestor on PostgreSQL: a new instance of a known series is indexed by one statement that
commits itself, after its file's sync, and leaves the index as the full path does; a failed
statement leaves no file, a lost connection leaves the (synced) file for a re-send."""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, event, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from node import ingest as ingest_module
from node.ingest import Ingestor
from storage import store as store_module
from storage.db import make_session_factory, upgrade
from storage.errors import StorageFullError
from storage.index import IndexOutcome
from storage.models import Instance, Series, Study, StudyState
from storage.store import InstanceStore

from .conftest import make_dataset, to_bytes

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.7", "1.2.826.0.1.3680043.8.498.7.1"


@pytest.fixture
def pg_sessions(postgres_engine: Engine) -> sessionmaker[Session]:
    upgrade(postgres_engine)
    return make_session_factory(postgres_engine)


def _files(store: InstanceStore) -> list[Path]:
    return [p for p in store.root.rglob("*") if p.is_file()]


def _ingest(ingestor: Ingestor, number: int, calling: str = "CT1", **attributes: object) -> IndexOutcome:
    data = to_bytes(make_dataset(STUDY, SERIES, number, **attributes))
    return ingestor.ingest(data, calling_ae_title=calling, called_ae_title="MEDNODE").outcome


def test_a_new_instance_of_a_known_series_takes_one_statement_committed_while_its_file_syncs(
    postgres_engine: Engine, pg_sessions: sessionmaker[Session], store: InstanceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingestor = Ingestor(store, pg_sessions)
    assert _ingest(ingestor, 1) is IndexOutcome.NEW  # a new series: the full path
    order: list[str] = []
    statement_ran = threading.Event()

    def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        order.append(f"statement {statement.split()[0]}")
        statement_ran.set()

    sync_data = store_module._sync_data

    def slow_sync(fd: int) -> None:  # a slow disk: the statement must not wait for it
        statement_ran.wait(timeout=5)
        sync_data(fd)
        order.append("synced")

    monkeypatch.setattr(store_module, "_sync_data", slow_sync)
    commits: list[object] = []
    assert ingestor._at_once is not None
    for engine in (postgres_engine, ingestor._at_once):  # the one statement has its own (unpinged) pool
        event.listen(engine, "after_cursor_execute", record)
        event.listen(engine, "commit", commits.append)

    assert _ingest(ingestor, 2, calling="CT2") is IndexOutcome.NEW
    # one statement (WITH … INSERT … UPDATE … SELECT) committed by itself while the sync ran, and
    # the ingest returned (Success) only after both; no BEGIN/COMMIT
    assert order == ["statement WITH", "synced"]
    assert commits == []
    assert not list(store.root.rglob("*.partial"))  # the mark of an unconfirmed sync is gone
    with pg_sessions() as session:
        study = session.scalars(select(Study)).one()
        rows = session.scalars(select(Instance).order_by(Instance.instance_number)).all()
    assert [r.instance_number for r in rows] == [1, 2]
    assert study.calling_ae_title == "CT2" and study.last_received_at == rows[1].received_at
    assert [p.relative_to(store.root).as_posix() for p in sorted(_files(store))] == sorted(r.path for r in rows)
    # a re-send changes nothing, and takes the full path
    assert _ingest(ingestor, 2, calling="CT2") is IndexOutcome.UNCHANGED


def test_one_statement_reopens_a_complete_study_and_leaves_a_held_series_alone(
    pg_sessions: sessionmaker[Session], store: InstanceStore
) -> None:
    ingestor = Ingestor(store, pg_sessions)
    _ingest(ingestor, 1)
    since = datetime(2020, 1, 1, tzinfo=UTC)
    with pg_sessions() as session, session.begin():
        study = session.scalars(select(Study)).one()
        study.state, study.receiving_since, study.version = StudyState.ROUTED, since, 1
    assert _ingest(ingestor, 2) is IndexOutcome.NEW  # a late instance of an image series
    with pg_sessions() as session:
        study = session.scalars(select(Study)).one()
    assert study.state == StudyState.RECEIVING and study.receiving_since != since

    with pg_sessions() as session, session.begin():
        study = session.scalars(select(Study)).one()
        study.state, study.receiving_since = StudyState.ROUTED, since
        session.scalars(select(Series)).one().held_reason = "held for the test"
    assert _ingest(ingestor, 3) is IndexOutcome.NEW
    with pg_sessions() as session:
        study = session.scalars(select(Study)).one()
        count = len(session.scalars(select(Instance)).all())
    assert (study.state, study.receiving_since, count) == (StudyState.ROUTED, since, 3)


def _failing_statement(invalidated: bool) -> Any:
    def fail(*_args: object, **_kwargs: object) -> bool:
        raise OperationalError("WITH new_instance …", {}, Exception("server gone"),
                               connection_invalidated=invalidated)
    return fail


def test_a_failed_statement_leaves_no_file(
    pg_sessions: sessionmaker[Session], store: InstanceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingestor = Ingestor(store, pg_sessions)
    _ingest(ingestor, 1)
    before = _files(store)
    monkeypatch.setattr(ingest_module, "index_new_instance", _failing_statement(invalidated=False))
    with pytest.raises(OperationalError):
        _ingest(ingestor, 2)
    assert _files(store) == before


def test_a_connection_lost_during_the_statement_keeps_the_synced_file_for_a_resend(
    pg_sessions: sessionmaker[Session], store: InstanceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingestor = Ingestor(store, pg_sessions)
    _ingest(ingestor, 1)
    with monkeypatch.context() as patch:
        patch.setattr(ingest_module, "index_new_instance", _failing_statement(invalidated=True))
        with pytest.raises(OperationalError):
            _ingest(ingestor, 2)  # the statement may have committed: its file must stay
    assert len(_files(store)) == 2
    assert _ingest(ingestor, 2) is IndexOutcome.NEW  # the re-send takes the file as it is
    assert len(_files(store)) == 2


def _sync_failing_after_the_commit(ingestor: Ingestor, monkeypatch: pytest.MonkeyPatch, error: int,
                                   then: Callable[[], object] = lambda: None) -> None:
    """The next file's sync fails, once the statement indexing it has committed (autocommit, on
    the one statement's own pool), after ``then()``."""
    committed = threading.Event()
    assert ingestor._at_once is not None
    event.listen(ingestor._at_once, "after_cursor_execute", lambda *_args: committed.set())

    def failing(_fd: int) -> None:
        assert committed.wait(timeout=5), "the statement did not run while the file synced"
        then()
        raise OSError(error, os.strerror(error))

    monkeypatch.setattr(store_module, "_sync_data", failing)


def _rows(pg_sessions: sessionmaker[Session]) -> list[int | None]:
    with pg_sessions() as session:
        return sorted(r.instance_number for r in session.scalars(select(Instance)))


@pytest.mark.parametrize(("error", "raised"), [(errno.EIO, OSError), (errno.ENOSPC, StorageFullError)])
def test_a_sync_that_fails_after_the_row_committed_takes_the_row_back_out(
    postgres_engine: Engine, pg_sessions: sessionmaker[Session], store: InstanceStore, monkeypatch: pytest.MonkeyPatch,
    error: int, raised: type[Exception],
) -> None:
    ingestor = Ingestor(store, pg_sessions)
    _ingest(ingestor, 1)
    with monkeypatch.context() as patch:
        _sync_failing_after_the_commit(ingestor, patch, error)
        with pytest.raises(raised):
            _ingest(ingestor, 2)  # the peer is answered a failure: nothing of instance 2 stays
    assert _rows(pg_sessions) == [1]
    assert len(_files(store)) == 1 and not list(store.root.rglob("*.partial"))
    assert _ingest(ingestor, 2) is IndexOutcome.NEW  # the peer's re-send
    assert _rows(pg_sessions) == [1, 2]


def _drop_other_connections(engine: Engine) -> None:
    """What a database restart does to every pooled connection."""
    with engine.connect() as connection:
        connection.execute(text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                "WHERE datname = current_database() AND pid <> pg_backend_pid()"))


def test_the_row_is_taken_back_out_on_a_new_connection_when_the_server_dropped_the_pooled_one(
    postgres_engine: Engine, pg_sessions: sessionmaker[Session], store: InstanceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    ingestor = Ingestor(store, pg_sessions)
    try:
        _ingest(ingestor, 1)
        with monkeypatch.context() as patch:
            _sync_failing_after_the_commit(ingestor, patch, errno.EIO,
                                           then=lambda: _drop_other_connections(postgres_engine))
            with pytest.raises(OSError):
                _ingest(ingestor, 2)
        assert _rows(pg_sessions) == [1]  # the delete failed once on the dropped connection, then ran
        assert len(_files(store)) == 1 and not list(store.root.rglob("*.partial"))
    finally:
        ingestor.close()


def test_a_row_that_cannot_be_taken_back_is_mended_by_the_resend(
    postgres_engine: Engine, pg_sessions: sessionmaker[Session], store: InstanceStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The sync failed after the commit and the database went away before the row could be
    deleted: the row names a file that is removed. The peer's re-send writes it again at the
    path the row names (the same bytes, the same name)."""
    ingestor = Ingestor(store, pg_sessions)
    _ingest(ingestor, 1)
    with monkeypatch.context() as patch:
        _sync_failing_after_the_commit(ingestor, patch, errno.EIO)
        patch.setattr(ingest_module, "unindex_instance", _failing_statement(invalidated=True))
        with pytest.raises(OSError):
            _ingest(ingestor, 2)
    assert _rows(pg_sessions) == [1, 2] and len(_files(store)) == 1
    assert _ingest(ingestor, 2) is IndexOutcome.UNCHANGED
    with pg_sessions() as session:
        paths = set(session.scalars(select(Instance.path)))
    assert {p.relative_to(store.root).as_posix() for p in _files(store)} == paths


def test_a_connection_the_server_dropped_is_replaced_once_and_the_instance_indexed(
    postgres_engine: Engine, pg_sessions: sessionmaker[Session], store: InstanceStore
) -> None:
    ingestor = Ingestor(store, pg_sessions)
    try:
        _ingest(ingestor, 1)
        assert _ingest(ingestor, 2) is IndexOutcome.NEW  # the one statement's pool holds a connection
        with postgres_engine.connect() as connection:  # what a server restart does to it
            killed = connection.execute(text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar_one()
        assert killed >= 1
        assert _ingest(ingestor, 3) is IndexOutcome.NEW  # not pinged: fails once, runs again
        assert _ingest(ingestor, 4) is IndexOutcome.NEW
        with pg_sessions() as session:
            assert len(session.scalars(select(Instance)).all()) == 4
        assert len(_files(store)) == 4
    finally:
        ingestor.close()
