"""One node on five hosts, and hosts that die or drop off the network: Linux network namespaces
on one bridge, each process tree under its own host name.

- ``db``: PostgreSQL and RabbitMQ, started here (own data directories, ports 5432/5672 inside
  the namespace, so nothing meets the machine's servers);
- ``l1``, ``l2``: ``mednode serve`` (listener, completion, routing; ``embedded_worker: false``);
- ``w1``, ``w2``: ``mednode worker --queues inference,delivery``;
- the root namespace: Orthanc (the PACS) and the modalities (pynetdicom SCUs in this process).

The store is one directory every host uses under the same path, as an NFS volume would be.
Modalities send to both listeners at once; one listener host is killed mid-association (every
process of its namespace, SIGKILL), one worker host mid-job, and then, as the last studies are
sent, the first worker host seen running a job is cut off from everything (link down) for 30 s. A
modality whose C-STORE goes unanswered for a while has the listeners' stacks dumped into their
logs (SIGUSR1, :mod:`node.stacks`), counted in the figures. Checked at the end, with the figures printed:
every instance a modality got Success for is in the index and byte-equal on disk; Orthanc holds
exactly the result objects of one job per study; every study has exactly one delivered job.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.dsutils import encode
from sqlalchemy import create_engine, select, text
from sqlalchemy.orm import Session

from storage.models import Delivery, Instance, Job, JobState, Result, Study
from tests.integration.e2e import poll
from tests.peers import Orthanc, in_ci
from tests.peers.netns import POSTGRES_BIN, Host, NetnsLab, netns_available, start_postgres
from tests.peers.processes import find_tool
from tests.peers.rabbitmq import RABBITMQ_BIN, PrivateRabbitMQ
from tests.phantom import PhantomGeometry, make_ct_phantom

REPO_ROOT = Path(__file__).resolve().parents[2]
DICOM_PORT = 11112
SLICES = 20
GEOMETRY = PhantomGeometry(rows=128, columns=128, pixel_spacing_mm=(3.2, 3.2), slice_spacing_mm=10.0,
                           num_slices=SLICES)
LEASE_S = 5  #: short job leases: a dead worker's job runs again within seconds, not minutes
CUT_S = 30  #: how long a worker host is cut off (the issue's figure)
QUIET_S = 4
STALL_S = 10  #: a modality waiting this long for an answer has the listeners' stacks dumped


@dataclass
class Sent:
    """What one modality sent for one study, and what it was told."""

    study_uid: str
    datasets: list[Dataset]
    acked: dict[str, bytes] = field(default_factory=dict)  #: SOP UID → dataset bytes sent
    failovers: int = 0
    errors: list[str] = field(default_factory=list)
    answered_at: float = field(default_factory=time.monotonic)  #: the last answer or new association


def _send_study(sent: Sent, listeners: list[str], pause_s: float) -> None:
    """Send the study to ``listeners[0]``; whatever is not acknowledged when that association
    breaks goes again, in a new association, to the next listener (a modality's retry)."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for address in listeners:
        todo = [ds for ds in sent.datasets if ds.SOPInstanceUID not in sent.acked]
        if not todo:
            return
        sent.answered_at = time.monotonic()
        assoc = ae.associate(address, DICOM_PORT, ae_title="MEDNODE")
        if not assoc.is_established:
            sent.errors.append(f"{address}: association refused or failed")
            sent.failovers += 1
            continue
        try:
            for ds in todo:
                status = assoc.send_c_store(ds)
                sent.answered_at = time.monotonic()
                if status and status.Status == 0x0000:
                    sent.acked[ds.SOPInstanceUID] = encode(ds, False, True)
                else:
                    sent.errors.append(f"{address}: {ds.SOPInstanceUID}: {status.get('Status') if status else 'no answer'}")
                    break
                time.sleep(pause_s)
        except RuntimeError as exc:  # the association is gone (its peer died)
            sent.errors.append(f"{address}: {exc}")
        finally:
            if assoc.is_established:
                assoc.release()
        if len(sent.acked) < len(sent.datasets):
            sent.failovers += 1
    if len(sent.acked) < len(sent.datasets):
        sent.errors.append("not every instance was acknowledged by any listener")


def _watch_for_stalls(studies: list[Sent], threads: list[threading.Thread], listeners: list[Host],
                      stalls: list[str]) -> None:
    """While ``threads`` send ``studies``, dump the stacks of every process on the listener hosts
    (SIGUSR1, :mod:`node.stacks`) when a modality has had no answer for :data:`STALL_S`: the
    logs then show what the association it waits on is blocked on."""
    reported: set[str] = set()
    while any(t.is_alive() for t in threads):
        for s, thread in zip(studies, threads):
            waited = time.monotonic() - s.answered_at
            if thread.is_alive() and waited > STALL_S and s.study_uid not in reported:
                reported.add(s.study_uid)
                stalls.append(f"{s.study_uid}: no answer for {waited:.0f} s after {len(s.acked)} acknowledged")
                for host in listeners:
                    for pid in host.pids():
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(pid, signal.SIGUSR1)
        time.sleep(0.5)


def _study(n: int, tag: str) -> list[Dataset]:
    study = generate_uid()
    return make_ct_phantom(geometry=GEOMETRY, patient_id=f"MH-{tag}-{n}", study_instance_uid=study,
                           series_instance_uid=generate_uid(), frame_of_reference_uid=generate_uid(), seed=n)


def _dataset_bytes(data: bytes) -> bytes:
    """The data set of a DICOM file, after its preamble and File Meta group (PS3.10 7.1)."""
    assert data[128:132] == b"DICM"
    group_length = int.from_bytes(data[140:144], "little")
    return data[144 + group_length:]


def _takeover_s(logs: Path, killed: datetime) -> float | None:
    """Seconds from ``l1``'s death to ``l2`` running the scheduler, when ``l1`` ran it (the
    log lines' local-time stamps); None when ``l2`` had it already."""
    mark = "now runs the scheduler"
    if mark not in (logs / "l1-serve.log").read_text(errors="replace"):
        return None
    line = poll(lambda: next((line for line in (logs / "l2-serve.log").read_text(errors="replace").splitlines()
                              if mark in line), None), 60, what="l2 taking the scheduler over after l1's death")
    return round((datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f") - killed).total_seconds(), 2)


class Cluster:
    """The hosts, servers and node processes of one run."""

    def __init__(self, lab: NetnsLab, base: Path, logs: Path, orthanc: Orthanc, db_url: str, broker_url: str) -> None:
        self.lab, self.base, self.logs, self.orthanc = lab, base, logs, orthanc
        self.db_url, self.broker_url = db_url, broker_url
        self.data_dir = base / "shared" / "var"  # the volume every host mounts
        config = {"rules": [{"name": "ct", "match": {"modality": "CT"}, "tasks": ["ct_analysis"],
                             "destinations": ["default"]}]}
        self.config = base / "mednode.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.engine = create_engine(db_url)

    def env(self) -> dict[str, str]:
        return {
            "MEDNODE_DATABASE_URL": self.db_url,
            "MEDNODE_BROKER_URL": self.broker_url,
            "MEDNODE_DATA_DIR": str(self.data_dir),
            "MEDNODE_EMBEDDED_WORKER": "false",
            "MEDNODE_DICOM_HOST": "0.0.0.0",
            "MEDNODE_DICOM_PORT": str(DICOM_PORT),
            "MEDNODE_WEB_PORT": "8080",
            "MEDNODE_QUIET_PERIOD_S": str(QUIET_S),
            "MEDNODE_COMPLETION_POLL_S": "0.2",
            "MEDNODE_JOB_LEASE_S": str(LEASE_S),
            "MEDNODE_WORKER_CONCURRENCY": "2",
            "MEDNODE_DELIVERY__RETRY_INITIAL_S": "1",
            "MEDNODE_DESTINATION": f"{self.orthanc.aet}@{self.lab.gateway}:{self.orthanc.dicom_port}",
            "MEDNODE_LOG_LEVEL": "INFO",
            "PYTHONPATH": str(REPO_ROOT),
            "PYTHONUNBUFFERED": "1",
        }

    def serve(self, name: str) -> None:
        host = self.lab.hosts[name]
        log = self.logs / f"{name}-serve.log"
        process = host.start([sys.executable, "-m", "node.cli", "serve", "--config", str(self.config)], log,
                             env=self.env(), cwd=REPO_ROOT)
        host.wait_port(DICOM_PORT, timeout_s=120, process=process, log=log)

    def worker(self, name: str) -> None:
        host = self.lab.hosts[name]
        host.start([sys.executable, "-m", "node.cli", "worker", "--config", str(self.config),
                    "--queues", "inference,delivery"], self.logs / f"{name}-worker.log",
                   env=self.env(), cwd=REPO_ROOT)

    def jobs(self) -> list[Job]:
        with Session(self.engine) as session:
            return list(session.scalars(select(Job).order_by(Job.id)))

    def running_on(self, host: Host) -> Job | None:
        return next((j for j in self.jobs() if j.state is JobState.RUNNING and (j.worker or "").startswith(host.name + ":")), None)

    def wait(self, what: str, condition, timeout_s: float, poll_s: float = 0.05):  # type: ignore[no-untyped-def]
        return poll(condition, timeout_s, poll_s, what, on_timeout=self.state)

    def state(self) -> str:
        """The jobs and the tail of every host's log, for a wait that timed out."""
        logs = "\n".join(f"== {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted(self.logs.glob("*.log")))
        with Session(self.engine) as session:
            deliveries = [(d.id, d.result.job_pk, d.state.value, d.attempts, d.next_attempt_at and f"{d.next_attempt_at:%H:%M:%S}")
                          for d in session.scalars(select(Delivery).order_by(Delivery.id))]
        return f"jobs {[(j.id, j.state.value, j.worker, j.attempts) for j in self.jobs()]}\ndeliveries {deliveries}\n{logs}"


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    why = netns_available()
    missing = [t for t in ("Orthanc",) if shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin") is None]
    missing += [str(p) for p in (POSTGRES_BIN / "initdb", RABBITMQ_BIN / "rabbitmq-server") if not p.exists()]
    if why or missing:
        message = why or f"missing: {missing}"
        if in_ci():
            pytest.fail(f"CI must run the multi-host test: {message}")
        pytest.skip(message)
    find_tool("Orthanc")
    # world-readable, outside pytest's 0700 temp root: PostgreSQL runs as its own user
    base = Path(tempfile.mkdtemp(prefix="mednode-hosts-"))
    base.chmod(0o755)
    orthanc = Orthanc(tmp_path / "orthanc")
    try:
        with NetnsLab(base) as lab:
            db = lab.add_host("db")
            for name in ("l1", "l2", "w1", "w2"):
                lab.add_host(name)
            start_postgres(db, base / "pg" / "data")
            rabbit = PrivateRabbitMQ(base / "rabbitmq", host=db).start()
            with create_engine(f"postgresql+psycopg://postgres@{db.address}:5432/postgres",
                               isolation_level="AUTOCOMMIT").connect() as conn:
                conn.execute(text("CREATE DATABASE mednode"))
            orthanc.start()
            cluster = Cluster(lab, base, tmp_path, orthanc, f"postgresql+psycopg://postgres@{db.address}:5432/mednode", rabbit.url)
            try:
                yield cluster
            finally:
                cluster.engine.dispose()
    finally:
        orthanc.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_hosts_killed_and_cut_off_lose_nothing_and_do_each_study_once(cluster: Cluster) -> None:
    lab = cluster.lab
    l1, l2, w1, w2 = (lab.hosts[n] for n in ("l1", "l2", "w1", "w2"))
    t0 = time.monotonic()
    cluster.serve("l1")  # first alone: it migrates the schema
    cluster.serve("l2")
    cluster.worker("w1")
    cluster.worker("w2")
    figures: dict[str, object] = {"start_s": round(time.monotonic() - t0, 1)}
    sent: list[Sent] = []
    stalls: list[str] = []

    def send_all(studies: list[Sent], pause_s: float) -> list[threading.Thread]:
        threads = []
        for i, s in enumerate(studies):
            order = [l1.address, l2.address] if i % 2 == 0 else [l2.address, l1.address]
            threads.append(threading.Thread(target=_send_study, args=(s, order, pause_s)))
        for thread in threads:
            thread.start()
        threading.Thread(target=_watch_for_stalls, args=(studies, threads, [l1, l2], stalls), daemon=True).start()
        return threads

    # 1. a listener host dies mid-association; its modalities send the rest to the other one
    phase1 = [Sent((ds := _study(n, "A"))[0].StudyInstanceUID, ds) for n in range(4)]
    sent += phase1
    threads = send_all(phase1, pause_s=0.05)
    cluster.wait("l1 acknowledged a few instances", lambda: sum(len(s.acked) for s in phase1[::2]) >= 6, 60, 0.01)
    killed_at, killed_wall = time.monotonic(), datetime.now()
    figures["l1_processes_killed"] = l1.kill()
    in_flight = [s for s in phase1[::2] if len(s.acked) < SLICES]
    for thread in threads:
        thread.join(120)
    figures["l1_resent_all_s"] = round(time.monotonic() - killed_at, 2)
    assert in_flight, "the listener host was killed after its associations had ended"
    assert all(len(s.acked) == SLICES for s in phase1), [s.errors for s in phase1]
    figures["associations_broken"] = sum(s.failovers for s in phase1)
    figures["scheduler_moved_to_l2_s"] = _takeover_s(cluster.logs, killed_wall)
    cluster.serve("l1")  # the host comes back (its start-up repair clears only its own leftovers)

    # 2. a worker host dies mid-job; the job runs again once its lease has expired
    job = cluster.wait("a job running on w1", lambda: cluster.running_on(w1), 120, 0.02)
    killed_at = time.monotonic()
    figures["w1_processes_killed"] = w1.kill()
    figures["w1_job"] = job.id
    cluster.wait("w1's job done elsewhere", lambda: next((j for j in cluster.jobs() if j.id == job.id and j.state in (JobState.DELIVERING, JobState.DELIVERED)), None), 60)
    figures["w1_job_recovered_s"] = round(time.monotonic() - killed_at, 2)
    cluster.worker("w1")

    # 3. a worker host cut off from the broker and the database for 30 s mid-job: the first seen
    # running a job once these studies are being sent (a job takes about a second: waiting for one
    # on a given host after the last study is in may find every job done)
    phase3 = [Sent((ds := _study(n, "C"))[0].StudyInstanceUID, ds) for n in range(4)]
    sent += phase3
    threads = send_all(phase3, pause_s=0.0)
    job = cluster.wait("a job running on a worker host", lambda: cluster.running_on(w2) or cluster.running_on(w1),
                       120, 0.02)
    cut, other = (w2, w1) if (job.worker or "").startswith(w2.name + ":") else (w1, w2)
    cut.link(up=False)
    cut_at = time.monotonic()
    figures["cut_host_job"] = (cut.name.split("-")[0], job.id)
    try:  # the figure: whether (and when) another worker took the job over during the cut
        while time.monotonic() - cut_at < CUT_S:
            taken = next((j for j in cluster.jobs() if j.id == job.id and (j.worker or "").startswith(other.name + ":")), None)
            if taken is not None and "cut_job_taken_over_s" not in figures:
                figures["cut_job_taken_over_s"] = round(time.monotonic() - cut_at, 2)
            time.sleep(0.2)
    finally:
        cut.link(up=True)
    back_at = time.monotonic()
    for thread in threads:
        thread.join(120)
    assert all(len(s.acked) == SLICES for s in phase3), [s.errors for s in phase3]

    # everything settles: every study has a delivered job and nothing is left to do
    uids = {s.study_uid for s in sent}

    def settled() -> bool:
        jobs = cluster.jobs()
        with Session(cluster.engine) as session:
            by_pk = dict(session.execute(select(Study.id, Study.study_instance_uid)).all())
        done = {by_pk[j.study_pk] for j in jobs if j.state is JobState.DELIVERED}
        busy = [j for j in jobs if j.state not in (JobState.DELIVERED, JobState.SUPERSEDED, JobState.FAILED)]
        return done >= uids and not busy

    cluster.wait("every study delivered", settled, 120, 0.2)
    # the host is back: its worker lived through the cut and is connected again
    assert all(p.poll() is None for p in cut.processes), (cluster.logs / f"{cut.name.split('-')[0]}-worker.log").read_text()[-4000:]
    figures["settled_after_link_up_s"] = round(time.monotonic() - back_at, 2)
    time.sleep(2)  # a late, duplicate delivery by the cut-off host would land now

    # -- the figures and the checks --------------------------------------------------------
    store = cluster.data_dir / "store"
    lost: list[str] = []
    with Session(cluster.engine) as session:
        paths = dict(session.execute(select(Instance.sop_instance_uid, Instance.path)).all())
        study_of = dict(session.execute(select(Study.id, Study.study_instance_uid)).all())
        jobs = list(session.scalars(select(Job)))
        results = list(session.execute(select(Result.job_pk, Result.sop_instance_uid)).all())
    for s in sent:
        for sop, data in s.acked.items():
            path = paths.get(sop)
            if path is None or not (store / path).exists() or _dataset_bytes((store / path).read_bytes()) != data:
                lost.append(sop)
    per_study: dict[str, list[Job]] = {}
    for j in jobs:
        per_study.setdefault(study_of[j.study_pk], []).append(j)
    duplicates: dict[str, object] = {}
    result_sets = 0
    for uid in uids:
        delivered = [j for j in per_study.get(uid, []) if j.state is JobState.DELIVERED]
        assert len(delivered) == 1, f"study {uid}: jobs {[(j.id, j.state.value) for j in per_study.get(uid, [])]}"
        expected = {sop for pk, sop in results if pk == delivered[0].id}
        in_pacs = {i["SOPInstanceUID"] for i in cluster.orthanc.study_instances(uid)}
        result_sets += bool(in_pacs)
        if in_pacs != expected or not expected:
            duplicates[uid] = {"pacs": sorted(in_pacs), "job": sorted(expected)}
    states = [j.state.value for j in jobs]
    partials: dict[str, int] = {}
    for path in store.rglob("*.partial"):  # .<name>~<host>~<pid>~<token>.partial
        host_name = path.name.split("~")[1] if path.name.count("~") >= 3 else "?"
        partials[host_name] = partials.get(host_name, 0) + 1
    figures["partial_files_left"] = partials
    figures.update({
        "studies": len(uids), "instances_sent": sum(len(s.datasets) for s in sent),
        "instances_acked": sum(len(s.acked) for s in sent), "instances_indexed": len(paths),
        "acked_lost": len(lost), "jobs": len(jobs), "jobs_by_state": {x: states.count(x) for x in sorted(set(states))},
        "job_attempts": sorted(j.attempts for j in jobs), "result_sets_in_pacs": result_sets,
        "studies_with_duplicate_or_missing_results": len(duplicates),
        "stalled_associations": stalls,
        "total_s": round(time.monotonic() - t0, 1),
    })
    print(f"\nmulti-host figures: {figures}")
    for serve_log in sorted(cluster.logs.glob("l*-serve.log")) if stalls else []:  # what a stalled one waited on
        text = serve_log.read_text(errors="replace")
        print(f"== stacks in {serve_log.name}:\n{text[text.find('most recent call first') - 40:][:12000]}")
    for j in sorted(jobs, key=lambda j: j.id):
        print(f"  job {j.id}: {j.state.value}, attempts {j.attempts}, last worker {j.worker}, "
              f"started {j.started_at:%H:%M:%S.%f}, finished {j.finished_at:%H:%M:%S.%f}")
    assert not lost, f"acknowledged instances lost or changed: {lost[:5]} ({len(lost)})"
    assert not duplicates, duplicates
    assert result_sets == len(uids)
    assert JobState.FAILED.value not in states
