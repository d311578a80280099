"""Repair at start: instance files the index lost are indexed again; interrupted writes removed."""

from __future__ import annotations

import os
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.header import parse_header
from storage.index import index_instance
from storage.models import Instance, Series, Study, StudyState
from storage.reconcile import reindex_orphans, remove_lost_instances
from storage.store import InstanceStore

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.40", "1.2.826.0.1.3680043.8.498.40.1"


def _instance(number: int, description: str = "axial", series: str = SERIES) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{series}.{number}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, series
    ds.Modality, ds.SeriesDescription = "OT", description
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def store(tmp_path: Path) -> InstanceStore:
    return InstanceStore(tmp_path / "store")


def _received(store: InstanceStore, sessions: sessionmaker[Session], data: bytes, *, indexed: bool) -> str:
    """Write one instance as the listener does; index it only if ``indexed`` (else: crash)."""
    header, _ = parse_header(data)
    stored = store.write_instance(header.study_instance_uid, header.series_instance_uid, header.sop_instance_uid, data)
    if indexed:
        with sessions() as session, session.begin():
            index_instance(session, header, stored, calling_ae_title="X", called_ae_title="MEDNODE")
    return stored.relative_path


def _paths(sessions: sessionmaker[Session]) -> list[str]:
    with sessions() as session:
        return sorted(session.scalars(select(Instance.path)))


def test_files_without_rows_are_indexed(store: InstanceStore, sessions) -> None:
    kept = _received(store, sessions, _instance(1), indexed=True)
    lost = [_received(store, sessions, _instance(n), indexed=False) for n in (2, 3)]

    assert reindex_orphans(store, sessions) == 2

    assert _paths(sessions) == sorted([kept, *lost])
    with sessions() as session:
        assert session.scalars(select(Study)).one().state is StudyState.RECEIVING
    assert reindex_orphans(store, sessions) == 0  # idempotent


def test_interrupted_write_is_removed_and_invalid_files_left_alone(store: InstanceStore, sessions) -> None:
    torn = _received(store, sessions, _instance(1), indexed=False)
    full = store.absolute(torn)
    full.write_bytes(full.read_bytes()[:-7])  # the content no longer matches the digest in the name
    junk = store.write_instance(STUDY, SERIES, "1.2.3", b"not DICOM at all").relative_path

    assert reindex_orphans(store, sessions) == 0

    assert not full.exists()
    assert store.absolute(junk).exists()  # not an instance: kept for a person to look at
    assert _paths(sessions) == []


def test_an_old_version_whose_delete_was_interrupted_does_not_come_back(store: InstanceStore, sessions) -> None:
    """A re-sent, corrected instance replaced the row; the crash came before the old file was
    deleted. The old bytes must not replace the newer ones at the next start."""
    old = _received(store, sessions, _instance(1, "first"), indexed=True)
    new = _received(store, sessions, _instance(1, "corrected"), indexed=True)
    assert store.absolute(old).exists()  # what the crash left

    reindex_orphans(store, sessions)

    assert _paths(sessions) == [new]


def test_a_newer_version_whose_row_was_rolled_back_wins(store: InstanceStore, sessions) -> None:
    """Power loss rolled back the commit of a corrected re-send: its file is newer than the one
    the row points at, so it is indexed and the old file goes."""
    old = _received(store, sessions, _instance(1, "first"), indexed=True)
    os.utime(store.absolute(old), (1_000_000_000, 1_000_000_000))
    new = _received(store, sessions, _instance(1, "corrected"), indexed=False)

    assert reindex_orphans(store, sessions) == 1

    assert _paths(sessions) == [new]
    assert not store.absolute(old).exists()


@pytest.mark.parametrize("rule_runs_on_it", [False, True])
def test_a_late_series_found_at_start_reopens_its_study_only_if_a_rule_runs_on_it(
    store: InstanceStore, sessions, rule_runs_on_it: bool,  # type: ignore[no-untyped-def]
) -> None:
    """The repair asks the listener's late-series check, as the listener would have."""
    _received(store, sessions, _instance(1), indexed=True)
    with sessions() as session, session.begin():
        session.scalars(select(Study)).one().state = StudyState.ROUTED  # complete, results out
    late_series = f"{SERIES}.2"
    _received(store, sessions, _instance(1, series=late_series), indexed=False)
    asked: list[str] = []

    def check(session: Session, study_pk: int, header) -> str | None:  # type: ignore[no-untyped-def]
        asked.append(header.series_instance_uid)
        return None if rule_runs_on_it else "late series: no rule would run on it"

    assert reindex_orphans(store, sessions, check) == 1

    assert asked == [late_series]
    with sessions() as session:
        study = session.scalars(select(Study)).one()
        series = session.scalars(select(Series).where(Series.series_instance_uid == late_series)).one()
        assert study.state is (StudyState.RECEIVING if rule_runs_on_it else StudyState.ROUTED)
        assert series.late_at is not None
        assert series.held_reason == (None if rule_runs_on_it else "late series: no rule would run on it")


def test_another_hosts_writes_in_progress_are_neither_indexed_nor_removed(store: InstanceStore, sessions) -> None:
    indexed = _received(store, sessions, _instance(1), indexed=True)
    target = store.root / indexed.replace(".dcm", "9.dcm")
    other_host = InstanceStore(store.root, host="listener-b.example.org")
    half = other_host.partial_path(target)
    half.write_bytes(_instance(2)[:40])  # another host is writing it right now

    assert reindex_orphans(store, sessions) == 0
    assert store.remove_partials() == 0
    assert half.read_bytes() == _instance(2)[:40]
    assert _paths(sessions) == [indexed]


def test_another_hosts_file_whose_sync_it_has_not_seen_return_is_left_to_it(store: InstanceStore, sessions) -> None:
    """A whole file under its own name, still linked to another host's partial name: that host
    is storing it (its sync runs, its row is not in, it may yet refuse the instance and remove
    the file). This host's start-up leaves it alone; once the writer unlinks its mark, the file is
    an orphan like any other."""
    indexed = _received(store, sessions, _instance(1), indexed=True)
    theirs = _received(store, sessions, _instance(2), indexed=False)
    other_host = InstanceStore(store.root, host="listener-b.example.org")
    mark = other_host.partial_path(store.absolute(theirs))
    os.link(store.absolute(theirs), mark)

    assert remove_lost_instances(store, sessions) == 0
    assert store.remove_partials() == 0
    assert reindex_orphans(store, sessions) == 0
    assert _paths(sessions) == [indexed]
    assert mark.exists() and store.absolute(theirs).exists()

    mark.unlink()  # its sync returned and the writer went away before its row: an orphan now
    assert reindex_orphans(store, sessions) == 1
    assert _paths(sessions) == sorted([indexed, theirs])


def _unconfirmed(store: InstanceStore, relative: str) -> Path:
    """What a crash before the file's sync returned leaves: its partial name, still linked to it
    (storage.store.InstanceStore.begin_instance), naming this host and this process id (a
    predecessor's, as far as the store can tell)."""
    target = store.absolute(relative)
    marker = store.partial_path(target)
    os.link(target, marker)
    return marker


@pytest.mark.parametrize("listed_once", [False, True])
def test_rows_of_files_a_power_loss_lost_or_tore_are_removed(store: InstanceStore, sessions, listed_once: bool) -> None:
    """On PostgreSQL a new instance's row commits while its file syncs; a power loss before the
    sync returned may leave the row with a torn or missing file. Never acknowledged: the row goes,
    and every other row and file stays. ``listed_once``: as ``mednode serve`` starts, the store's
    partial files listed in one walk for this and for remove_partials."""
    acknowledged = _received(store, sessions, _instance(1), indexed=True)
    whole = _received(store, sessions, _instance(2), indexed=True)
    whole_marker = _unconfirmed(store, whole)  # a crash of the process alone: the file is whole
    torn = _received(store, sessions, _instance(3), indexed=True)
    _unconfirmed(store, torn)
    data = store.read(torn)
    store.absolute(torn).write_bytes(data[:-16] + bytes(16))  # the right size, the end never written
    name_lost = _received(store, sessions, _instance(4), indexed=True)
    _unconfirmed(store, name_lost)
    store.absolute(name_lost).unlink()  # the file's name lost, its partial name kept, whole
    name_lost_torn = _received(store, sessions, _instance(6), indexed=True)
    torn_marker = _unconfirmed(store, name_lost_torn)
    store.absolute(name_lost_torn).unlink()  # the name lost, and the bytes under the partial name torn
    torn_marker.write_bytes(torn_marker.read_bytes()[:-16] + bytes(16))
    all_lost = _received(store, sessions, _instance(5), indexed=True)
    store.absolute(all_lost).unlink()  # both names lost: nothing marks it

    partials = store.partial_files() if listed_once else None
    assert remove_lost_instances(store, sessions, partials) == 3
    assert store.remove_partials(partials) == 0  # every mark settled: none left to remove, none counted

    assert _paths(sessions) == sorted([acknowledged, whole, name_lost])
    assert store.read(whole) and not store.absolute(torn).exists()
    assert store.name_matches_content(name_lost, store.read(name_lost))  # its name given back
    assert not store.absolute(name_lost_torn).exists()
    assert not whole_marker.exists() and list(store.root.rglob("*.partial")) == []
    assert remove_lost_instances(store, sessions) == 0  # idempotent
    assert reindex_orphans(store, sessions) == 0


def test_a_store_that_is_not_there_costs_no_row(store: InstanceStore, sessions, tmp_path: Path) -> None:
    """A shared store not mounted at start looks empty: that is no power loss, and every row stays."""
    indexed = [_received(store, sessions, _instance(n), indexed=True) for n in (1, 2)]
    unmounted = InstanceStore(tmp_path / "empty mount point")

    assert remove_lost_instances(unmounted, sessions) == 0
    assert _paths(sessions) == sorted(indexed)
