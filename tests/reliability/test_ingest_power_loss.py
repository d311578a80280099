"""A listener process dies while an instance's file syncs and its row has already committed.

On PostgreSQL the row of a new instance commits while its file's ``fdatasync`` runs
(:class:`node.ingest.Ingestor`); Success waits for both. Here a real ingesting process is held
inside that sync (the disk never answers) and SIGKILLed once its row is committed, on a real
PostgreSQL; then the store is left as a power loss could leave it, and the start-up repair of
``mednode serve`` runs (:func:`node.service.prepare`'s order). Whatever the loss did, the
acknowledged instance stays, the unacknowledged one either stays whole (the process died, the
kernel kept the file) or leaves nothing, and its re-send is taken.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from node.ingest import Ingestor
from storage.db import make_engine, make_session_factory, upgrade
from storage.index import IndexOutcome
from storage.models import Instance
from storage.reconcile import reindex_orphans, remove_lost_instances
from storage.store import PARTIAL_SUFFIX, InstanceStore
from tests.integration.conftest import REPO_ROOT

pytestmark = pytest.mark.integration

STUDY, SERIES = "1.2.826.0.1.3680043.8.498.91", "1.2.826.0.1.3680043.8.498.91.1"

#: Ingests the first instance (acknowledged), then the second with a sync that never returns.
CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from node.ingest import Ingestor
    from storage import store as store_module
    from storage.db import make_engine, make_session_factory
    from storage.store import InstanceStore
    url, root, first, second = sys.argv[1:]
    ingestor = Ingestor(InstanceStore(Path(root)), make_session_factory(make_engine(url)))
    ingestor.ingest(Path(first).read_bytes(), calling_ae_title="CT", called_ae_title="MEDNODE")
    print("acknowledged", flush=True)
    store_module._sync_data = lambda fd: time.sleep(3600)  # the power goes before the disk answers
    ingestor.ingest(Path(second).read_bytes(), calling_ae_title="CT", called_ae_title="MEDNODE")
    print("acknowledged", flush=True)
""")


def _instance(number: int) -> bytes:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{SERIES}.{number}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = STUDY, SERIES, "CT"
    ds.InstanceNumber, ds.Rows, ds.Columns = number, 4, 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit, ds.PixelRepresentation, ds.SamplesPerPixel = 15, 1, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(32)
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


@pytest.fixture
def engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    upgrade(engine)
    yield engine
    engine.dispose()


def _paths(sessions: sessionmaker[Session]) -> dict[str, str]:
    with sessions() as session:
        return {r.sop_instance_uid: r.path for r in session.scalars(select(Instance))}


def _killed_inside_the_sync(postgres_url: str, store: InstanceStore, sessions: sessionmaker[Session],
                            tmp_path: Path) -> str:
    """Run the child until instance 2's row is committed, SIGKILL it; return that row's path."""
    files = []
    for number in (1, 2):
        files.append(tmp_path / f"{number}.dcm")
        files[-1].write_bytes(_instance(number))
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, postgres_url, str(store.root), *map(str, files)],
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "acknowledged"
        deadline = time.monotonic() + 30
        while f"{SERIES}.2" not in _paths(sessions):
            assert time.monotonic() < deadline, "instance 2's row was never committed"
            assert child.poll() is None, "the child exited"
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert child.stdout.read() == ""  # instance 2 was never acknowledged
    return _paths(sessions)[f"{SERIES}.2"]


def _power_loss(store: InstanceStore, relative: str, what: str) -> None:
    """Leave the store as a power loss before the sync returned could."""
    target = store.absolute(relative)
    [marker] = target.parent.glob(f".{target.name}*{PARTIAL_SUFFIX}")
    if what == "torn":  # names and size written, the data never
        target.write_bytes(bytes(target.stat().st_size))
    elif what == "name lost":
        target.unlink()
    elif what == "both names lost":
        target.unlink()
        marker.unlink()


@pytest.mark.parametrize("what", ["process killed only", "torn", "name lost", "both names lost"])
def test_a_crash_inside_the_sync_loses_nothing_acknowledged_and_leaves_nothing_torn(
    postgres_url: str, engine: Engine, tmp_path: Path, what: str
) -> None:
    store, sessions = InstanceStore(tmp_path / "store"), make_session_factory(engine)
    relative = _killed_inside_the_sync(postgres_url, store, sessions, tmp_path)
    acknowledged = _paths(sessions)[f"{SERIES}.1"]
    _power_loss(store, relative, what)

    # node.service.prepare, as `mednode serve` starts
    restarted = InstanceStore(store.root)
    removed = remove_lost_instances(restarted, sessions)
    restarted.remove_partials()
    reindex_orphans(restarted, sessions)

    paths = _paths(sessions)
    assert paths[f"{SERIES}.1"] == acknowledged and restarted.name_matches_content(
        acknowledged, restarted.read(acknowledged))
    on_disk = sorted(p.relative_to(store.root).as_posix() for p in store.root.rglob("*") if p.is_file())
    assert on_disk == sorted(paths.values())  # every file has its row, every row its file
    for path in on_disk:
        assert restarted.name_matches_content(path, restarted.read(path))
    # the kernel kept the file whole: it stays; a whole file that lost its name gets it back
    # from its partial name (the sync may have returned with the name not yet durable)
    kept = what in ("process killed only", "name lost")
    if kept:
        assert (removed, paths[f"{SERIES}.2"]) == (0, relative)
    else:
        assert removed == 1 and f"{SERIES}.2" not in paths

    # the peer sends instance 2 again, to the restarted listener
    again = Ingestor(restarted, sessions).ingest(_instance(2), calling_ae_title="CT", called_ae_title="MEDNODE")
    expected = IndexOutcome.UNCHANGED if kept else IndexOutcome.NEW
    assert again.outcome is expected and _paths(sessions)[f"{SERIES}.2"] == relative
