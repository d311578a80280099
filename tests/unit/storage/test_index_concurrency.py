"""The first instances of a new patient, study and series indexed at once by many connections
(as by several listener processes or hosts) on PostgreSQL: every one is indexed, none fails on a
unique key, and each patient, study and series has one row."""

from __future__ import annotations

import threading
from pathlib import Path

from sqlalchemy import Engine, func, select

from storage.db import make_session_factory, upgrade
from storage.index import IndexOutcome, index_instance
from storage.models import Instance, Patient, Series, Study
from storage.store import InstanceStore
from tests.unit.storage.conftest import SERIES_UID, HeaderFactory

WRITERS = 12


def test_first_instances_of_a_new_study_race_without_failing(
    postgres_engine: Engine, tmp_path: Path, make_header: HeaderFactory
) -> None:
    upgrade(postgres_engine)
    sessions = make_session_factory(postgres_engine)
    store = InstanceStore(tmp_path / "store")
    # two series of one new study of one new patient, their first instances sent at once
    headers = [
        make_header(n) if n % 2 else make_header(n, series_instance_uid=f"{SERIES_UID}9",
                                                   sop_instance_uid=f"{SERIES_UID}9.{n}")
        for n in range(1, WRITERS + 1)
    ]
    stored = [store.write_instance(h.study_instance_uid, h.series_instance_uid, h.sop_instance_uid,
                                   f"instance {h.sop_instance_uid}".encode()) for h in headers]
    start = threading.Barrier(WRITERS)
    outcomes: list[object] = [None] * WRITERS

    def index(i: int) -> None:
        try:
            with sessions() as session, session.begin():
                session.connection()  # each writer on its own connection, open before the race
                start.wait()
                outcomes[i] = index_instance(session, headers[i], stored[i], calling_ae_title="MOD",
                                             called_ae_title="MEDNODE")[0]
        except Exception as exc:  # noqa: BLE001 (what a peer would get as 0xA700: recorded, asserted absent)
            outcomes[i] = exc

    threads = [threading.Thread(target=index, args=(i,)) for i in range(WRITERS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert outcomes == [IndexOutcome.NEW] * WRITERS
    with sessions() as session:
        counts = [session.scalar(select(func.count()).select_from(m)) for m in (Patient, Study, Series, Instance)]
    assert counts == [1, 1, 2, WRITERS]
