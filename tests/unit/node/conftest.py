"""Fixtures of the node unit tests: a clean ``MEDNODE_*`` environment, a migrated SQLite index,
instances indexed the way the listener does, and a Celery app on an in-memory broker."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.header import parse_header
from node.config import ENV_PREFIX, Settings, load_settings
from storage.db import make_engine, make_session_factory, upgrade
from storage.index import IndexOutcome, LateSeriesCheck, index_instance
from storage.store import InstanceStore

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``MEDNODE_*`` variable of the developer's shell leaks into a test."""
    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)


@pytest.fixture
def store(tmp_path: Path) -> InstanceStore:
    return InstanceStore(tmp_path / "var" / "store")


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'var' / 'mednode.db'}")
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


@pytest.fixture
def settings_for(tmp_path: Path) -> Callable[..., Settings]:
    """``settings_for(**overrides)``: settings with ``data_dir`` in the test's temp dir."""

    def make(**overrides: object) -> Settings:
        overrides.setdefault("data_dir", tmp_path / "var")
        return load_settings(**overrides)

    return make


def make_dataset(study: str, series: str, number: int, modality: str = "CT",
                 sop_class: str = CT_IMAGE_STORAGE, **attributes: object) -> Dataset:
    """A small, valid Part 10 data set (4×4 pixels) of instance ``number`` of ``series``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = f"{series}.{number}"
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = f"{series}.{number}"
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    ds.InstanceNumber = number
    ds.SeriesNumber = 1
    ds.PatientName = "Test^Patient"
    ds.PatientID = "PID1"
    ds.Rows = ds.Columns = 4
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelRepresentation = 1
    ds.PixelData = bytes(range(32))
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def to_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


IndexFn = Callable[..., IndexOutcome]


@pytest.fixture
def index(sessions: sessionmaker[Session], store: InstanceStore) -> IndexFn:
    """``index(study, series, number, now=..., **attrs)``: write and index one instance as the
    listener's ingest does (real bytes, parsed header)."""

    def run(study: str, series: str, number: int, *, now: datetime | None = None,
            calling: str | None = "MODALITY", called: str | None = "MEDNODE",
            late_series_check: LateSeriesCheck | None = None, **attrs: object) -> IndexOutcome:
        data = to_bytes(make_dataset(study, series, number, **attrs))
        header, _ = parse_header(data)
        stored = store.write_instance(header.study_instance_uid, header.series_instance_uid,
                                      header.sop_instance_uid, data)
        with sessions() as session, session.begin():
            outcome, _ = index_instance(session, header, stored, calling_ae_title=calling, called_ae_title=called,
                                        now=now, late_series_check=late_series_check)
        return outcome

    return run


@pytest.fixture
def memory_celery(tmp_path: Path) -> Iterator[object]:
    """The mednode Celery app pointed at kombu's in-memory transport: sends succeed, no server."""
    from node.celery_app import app, configure_celery

    configure_celery(load_settings(data_dir=tmp_path / "var", broker_url="memory://"))
    for queue in ("inference.urgent", "inference", "delivery"):
        drain(app, queue)  # the in-memory broker is shared by every test of the process
    yield app


def drain(app: Any, queue: str) -> list[tuple[str, list[Any]]]:
    """Take every message out of ``queue`` of the in-memory broker: (task name, args) pairs."""
    sent = []
    with app.connection_for_read() as conn:
        simple = conn.SimpleQueue(queue)
        try:
            while True:
                message = simple.get(block=False)
                sent.append((message.headers["task"], list(message.payload[0])))
                message.ack()
        except simple.Empty:
            pass
        finally:
            simple.close()
    return sent

