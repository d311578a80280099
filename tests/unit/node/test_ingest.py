"""The ingestor acknowledges an instance only once its file is on disk and its row committed;
a failure on either side leaves neither behind."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.errors import InvalidInstanceError
from node import ingest as ingest_module
from node.ingest import Ingestor
from storage import store as store_module
from storage.errors import StorageFullError
from storage.index import IndexOutcome
from storage.models import Instance
from storage.store import InstanceStore

from .conftest import make_dataset, to_bytes

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.1", "1.2.826.0.1.3680043.8.498.1.1"


def _files(store: InstanceStore) -> list[Path]:
    return [p for p in store.root.rglob("*") if p.is_file()]


def _rows(sessions: sessionmaker[Session]) -> int:
    with sessions() as session:
        return int(session.scalar(select(func.count()).select_from(Instance)) or 0)


def test_instance_is_stored_indexed_and_a_resend_changes_nothing(
    store: InstanceStore, sessions: sessionmaker[Session]
) -> None:
    data = to_bytes(make_dataset(STUDY, SERIES, 1))
    ingestor = Ingestor(store, sessions)

    first = ingestor.ingest(data, calling_ae_title="PACS", called_ae_title="MEDNODE")
    again = ingestor.ingest(data, calling_ae_title="PACS", called_ae_title="MEDNODE")

    assert (first.outcome, again.outcome) == (IndexOutcome.NEW, IndexOutcome.UNCHANGED)
    with sessions() as session:
        path = session.scalar(select(Instance.path))
    assert path is not None and store.read(path) == data
    assert [p.relative_to(store.root).as_posix() for p in _files(store)] == [path]


def test_index_failure_leaves_no_file(
    store: InstanceStore, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    def database_gone(*args: object, **kwargs: object) -> None:
        raise OperationalError("INSERT", {}, Exception("server closed the connection"))

    monkeypatch.setattr(ingest_module, "index_instance", database_gone)
    with pytest.raises(OperationalError):
        Ingestor(store, sessions).ingest(
            to_bytes(make_dataset(STUDY, SERIES, 1)), calling_ae_title=None, called_ae_title=None
        )
    assert _files(store) == []


def test_an_instance_refused_after_its_write_started_leaves_nothing(
    store: InstanceStore, sessions: sessionmaker[Session]
) -> None:
    # valid UIDs name the file and start the write; the short Pixel Data is found only after
    data = to_bytes(make_dataset(STUDY, SERIES, 1, Rows=8))  # 8×4 pixels need 64 bytes, 32 sent
    with pytest.raises(InvalidInstanceError, match="truncated"):
        Ingestor(store, sessions).ingest(data, calling_ae_title=None, called_ae_title=None)
    assert (_files(store), _rows(sessions)) == ([], 0)


def test_disk_full_at_sync_rolls_the_row_back(
    store: InstanceStore, sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_space(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "_sync_data", no_space)
    with pytest.raises(StorageFullError):
        Ingestor(store, sessions).ingest(
            to_bytes(make_dataset(STUDY, SERIES, 1)), calling_ae_title=None, called_ae_title=None
        )
    assert (_files(store), _rows(sessions)) == ([], 0)


def test_replaced_instance_points_at_the_new_file_and_the_old_one_goes(
    store: InstanceStore, sessions: sessionmaker[Session]
) -> None:
    ingestor = Ingestor(store, sessions)
    ingestor.ingest(to_bytes(make_dataset(STUDY, SERIES, 1)), calling_ae_title=None, called_ae_title=None)
    changed = to_bytes(make_dataset(STUDY, SERIES, 1, SeriesDescription="corrected"))

    result = ingestor.ingest(changed, calling_ae_title=None, called_ae_title=None)

    assert result.outcome == IndexOutcome.REPLACED
    with sessions() as session:
        path = session.scalar(select(Instance.path))
    assert path is not None and store.read(path) == changed
    assert len(_files(store)) == 1 and _rows(sessions) == 1


def test_a_resend_in_another_syntax_after_completion_keeps_the_held_file(
    store: InstanceStore, sessions: sessionmaker[Session]
) -> None:
    from pydicom.uid import ImplicitVRLittleEndian

    from storage.models import Study, StudyState

    ingestor = Ingestor(store, sessions)
    first = to_bytes(make_dataset(STUDY, SERIES, 1))
    ingestor.ingest(first, calling_ae_title=None, called_ae_title=None)
    with sessions() as session, session.begin():
        session.scalars(select(Study)).one().state = StudyState.ROUTED  # as completion leaves it
    ds = make_dataset(STUDY, SERIES, 1)
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    resent = to_bytes(ds)
    assert resent != first

    result = ingestor.ingest(resent, calling_ae_title=None, called_ae_title=None)

    assert result.outcome == IndexOutcome.DUPLICATE
    [held] = _files(store)
    assert held.read_bytes() == first  # the duplicate's file is gone, the held one stays
    with sessions() as session:
        assert session.scalars(select(Study)).one().state is StudyState.ROUTED
