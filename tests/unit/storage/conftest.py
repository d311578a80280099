"""Fixtures of the storage tests: a migrated SQLite index and instance headers made to order
(a fresh PostgreSQL database: ``postgres_engine`` of ``tests/unit/conftest.py``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.header import InstanceHeader
from storage.db import make_engine, make_session_factory, upgrade

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.1.1"


@pytest.fixture
def sqlite_engine(tmp_path: Path) -> Iterator[Engine]:
    """A file SQLite index migrated to head with ``storage.db.upgrade`` (as the node does)."""
    engine = make_engine(f"sqlite:///{tmp_path / 'index' / 'mednode.db'}")
    upgrade(engine)
    yield engine
    engine.dispose()


@pytest.fixture
def sessions(sqlite_engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(sqlite_engine)


HeaderFactory = Callable[..., InstanceHeader]


@pytest.fixture
def make_header() -> HeaderFactory:
    """``make_header(n, **changes)``: the header of instance ``n`` of one CT series."""

    def make(number: int = 1, **changes: object) -> InstanceHeader:
        header = InstanceHeader(
            sop_class_uid=CT_IMAGE_STORAGE,
            sop_instance_uid=f"{SERIES_UID}.{number}",
            study_instance_uid=STUDY_UID,
            series_instance_uid=SERIES_UID,
            transfer_syntax_uid=EXPLICIT_VR_LE,
            modality="CT",
            body_part_examined="CHEST",
            series_description="axial",
            series_number=1,
            instance_number=number,
            study_description="CT chest",
            study_date="20240101",
            accession_number="ACC1",
            patient_id="PID1",
            issuer_of_patient_id=None,
            patient_name="Doe^Jane",
            patient_birth_date="19700101",
            patient_sex="F",
        )
        return dataclasses.replace(header, **changes)  # type: ignore[arg-type]

    return make
