"""Several listener processes on one DICOM port (``listener_processes``, ``SO_REUSEPORT``) on the
real PostgreSQL: modalities sending one new study over parallel associations at once each get
Success for every instance, the associations are spread over the processes, and the study, its
series and patient have one row each."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import sqlalchemy

from tests.integration.conftest import MednodeFactory
from tests.peers.dcmtk import storescu
from tests.peers.ports import LOOPBACK
from tests.unit.node.conftest import make_dataset

PROCESSES = 3
ASSOCIATIONS = 8
PER_ASSOCIATION = 6
STUDY = "1.2.826.0.1.3680043.8.498.88"


def _listening_pids(port: int) -> set[int]:
    out = subprocess.run(["ss", "-ltnpH", f"sport = :{port}"], capture_output=True, text=True, check=True).stdout
    return {int(pid) for pid in re.findall(r"pid=(\d+)", out)}


def test_parallel_associations_over_several_listener_processes(
    tmp_path: Path, mednode_factory: MednodeFactory, postgres_url: str
) -> None:
    node = mednode_factory(database_url=postgres_url, quiet_period_s=300,
                           extra_env={"MEDNODE_LISTENER_PROCESSES": str(PROCESSES),
                                      "MEDNODE_EMBEDDED_WORKER": "false"})
    deadline = time.monotonic() + 90
    while len(_listening_pids(node.dicom_port)) < PROCESSES:
        assert time.monotonic() < deadline, f"listening: {_listening_pids(node.dicom_port)}"
        time.sleep(0.2)

    # one new study: each pair of associations sends the first instances of one new series
    batches = []
    for a in range(ASSOCIATIONS):
        folder = tmp_path / f"assoc{a}"
        folder.mkdir()
        series = f"{STUDY}.{a // 2 + 1}"
        for n in range(PER_ASSOCIATION):
            path = folder / f"{n}.dcm"
            make_dataset(STUDY, series, 1 + n + (a % 2) * PER_ASSOCIATION).save_as(path, enforce_file_format=True)
        batches.append(folder)
    with ThreadPoolExecutor(ASSOCIATIONS) as pool:
        sent = list(pool.map(lambda folder: storescu(LOOPBACK, node.dicom_port, sorted(folder.glob("*.dcm")), aet=f"MOD{folder.name[-1]}"),
                             batches))

    assert all(s.all_ok for s in sent), [s.describe() for s in sent if not s.all_ok]
    engine = sqlalchemy.create_engine(postgres_url)
    try:
        with engine.connect() as connection:
            counts = [connection.execute(sqlalchemy.text(f"SELECT count(*) FROM {t}")).scalar()
                      for t in ("patient", "study", "series", "instance")]
    finally:
        engine.dispose()
    assert counts == [1, 1, ASSOCIATIONS // 2, ASSOCIATIONS * PER_ASSOCIATION]
    accepted_by = set(re.findall(r"INFO +(\S+) node\.listener: association accepted", node.logs()))
    assert len(accepted_by) >= 2, accepted_by  # the kernel spread the associations over processes

    # an admin asks every listener process for its threads' stacks (node.stacks): each writes
    # them to its log and goes on listening (SIGUSR1's default action would end it)
    pids = _listening_pids(node.dicom_port)
    for pid in pids:  # one at a time: dumps written at once interleave in the shared log
        dumps = node.logs().count("Current thread")
        os.kill(pid, signal.SIGUSR1)
        deadline = time.monotonic() + 30
        while node.logs().count("Current thread") == dumps:
            assert time.monotonic() < deadline, node.state()
            time.sleep(0.1)
        time.sleep(0.3)  # the dump's other threads
    assert node.logs().count("in serve_forever") >= len(pids), node.state()
    assert "most recent call first" in node.logs()
    time.sleep(0.5)
    assert _listening_pids(node.dicom_port) == pids
    assert storescu(LOOPBACK, node.dicom_port, [batches[0] / "0.dcm"], aet="MOD0").all_ok
