"""The listener process is SIGKILLed in the middle of a 300-instance association.

Whatever got a Success status must be on disk and in the index after the restart; nothing
half-written may be visible (every instance file under the store has an index row and holds the
bytes its name promises); the PACS re-sends the association, and the study completes and is
processed exactly once.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from storage.models import DeliveryState, JobState
from storage.store import PARTIAL_SUFFIX, InstanceStore
from tests.peers import LOOPBACK, StoreSCP, find_tool, parse_storescu_output, peer_env, storescu
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series
from tests.reliability.conftest import NodeRunFactory, poll

pytestmark = pytest.mark.integration

N_INSTANCES = 300
#: The node is killed once this many instance files exist (a third of the association).
KILL_AFTER_FILES = 100
GEOMETRY = PhantomGeometry(rows=128, columns=128, pixel_spacing_mm=(2.4, 2.4), slice_spacing_mm=1.0,
                           num_slices=N_INSTANCES)
#: Long enough that the study cannot complete between the kill and the re-send (restart included).
QUIET_PERIOD_S = 30.0


def _count_files(directory: Path) -> int:
    try:
        return sum(1 for _ in os.scandir(directory))
    except FileNotFoundError:
        return 0


def test_listener_killed_mid_association_loses_nothing_acknowledged(
    node_run: NodeRunFactory, tmp_path: Path, dcmtk
) -> None:  # type: ignore[no-untyped-def]
    datasets = make_ct_phantom(geometry=GEOMETRY)
    files = write_series(datasets, tmp_path / "ct300")
    uid_of = {str(p): str(ds.SOPInstanceUID) for p, ds in zip(files, datasets)}
    study_uid, series_uid = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)
    receiver = StoreSCP(tmp_path / "received").start()
    try:
        node = node_run(destination=f"{receiver.aet}@{LOOPBACK}:{receiver.port}", quiet_period_s=QUIET_PERIOD_S)
        node.start_serve()
        series_dir = node.store_root / "instances" / study_uid / series_uid

        # one association of 300 instances; SIGKILL the serve process group a third of the way in
        out_path = tmp_path / "storescu.log"
        with open(out_path, "wb") as out:
            sender = subprocess.Popen(
                [find_tool("storescu"), "-v", "-aet", "PACS", "-aec", node.ae_title, LOOPBACK,
                 str(node.dicom_port), *map(str, files)],
                stdout=out, stderr=subprocess.STDOUT, env=peer_env(), stdin=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + 120
            while _count_files(series_dir) < KILL_AFTER_FILES and sender.poll() is None:
                assert time.monotonic() < deadline, "the association never got going"
                time.sleep(0.002)
            assert sender.poll() is None, "storescu finished before the kill: the test proves nothing"
            node.kill_serve()
            files_at_kill = _count_files(series_dir)
            sender.wait(timeout=60)
        statuses = parse_storescu_output(out_path.read_text(errors="replace"))
        acknowledged = {uid_of[s.path] for s in statuses if s.ok}
        assert 0 < len(acknowledged) < N_INSTANCES, f"{len(acknowledged)} acknowledged"
        assert sender.returncode != 0

        restart_s = node.start_serve()

        # every acknowledged instance is indexed, and its file is whole
        store = InstanceStore(node.store_root)
        rows = node.instance_rows()
        missing = acknowledged - rows.keys()
        assert not missing, f"{len(missing)} acknowledged instance(s) lost, e.g. {sorted(missing)[:3]}"
        for sop_uid, relative in rows.items():
            data = store.read(relative)
            assert store.name_matches_content(relative, data), f"{relative}: content does not match its name"
            assert pydicom.dcmread(store.absolute(relative)).SOPInstanceUID == sop_uid
        # nothing half-written or unindexed is visible after start
        on_disk = {str(p.relative_to(node.store_root)) for p in node.instance_files()}
        assert not [p for p in on_disk if p.endswith(PARTIAL_SUFFIX) or Path(p).name.startswith(".")]
        assert on_disk == set(rows.values()), f"unindexed files: {sorted(on_disk - set(rows.values()))[:3]}"
        # written but never acknowledged (the in-flight instance) may be indexed: at most a few
        assert len(rows) - len(acknowledged) <= 2, (len(rows), len(acknowledged))

        # the PACS re-sends the whole association: what was stored is unchanged, the rest arrives
        resent = storescu(LOOPBACK, node.dicom_port, files, aet="PACS", called=node.ae_title)
        assert resent.all_ok, resent.describe()
        assert node.instance_count() == N_INSTANCES

        def delivered() -> bool:
            jobs = node.jobs()
            return bool(jobs) and all(j.state in (JobState.DELIVERED, JobState.FAILED) for j in jobs)

        poll(delivered, 240, 0.5, "the study's job delivered", on_timeout=lambda: node.serve.log_tail())
        jobs = node.jobs()
        assert [(j.state, j.study_version, j.attempts) for j in jobs] == [(JobState.DELIVERED, 1, 1)], \
            [(j.state, j.study_version, j.attempts, j.reason) for j in jobs]
        deliveries = node.deliveries()
        assert [d.state for d in deliveries] == [DeliveryState.DELIVERED] * 2
        received = [pydicom.dcmread(p) for p in receiver.received()]
        assert sorted(ds.Modality for ds in received) == ["SEG", "SR"]
        print(
            f"\nRELIABILITY listener-kill: sent={N_INSTANCES} acknowledged={len(acknowledged)} "
            f"files_at_kill={files_at_kill} indexed_after_restart={len(rows)} restart_s={restart_s:.1f} "
            f"after_resend={node.instance_count()} jobs={len(jobs)} delivered_objects={len(received)}"
        )
    finally:
        receiver.stop()
