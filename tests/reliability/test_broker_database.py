"""The production configuration (PostgreSQL, RabbitMQ, separate worker) loses its connections.

The machine-wide PostgreSQL and RabbitMQ servers are shared with other tests, so they are not
restarted; instead the node's own connections are cut, which is what a server restart looks like
from the node: ``pg_terminate_backend`` on every backend of the test's database, and
``rabbitmqctl close_all_connections --vhost <test vhost>``. Cut during a 150-instance association,
while a job waits in the queue, and while it runs: no acknowledged instance and no queued job is
lost, and the node keeps working.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import sqlalchemy

from storage.models import DeliveryState, JobState
from tests.databases import POSTGRES_ADMIN_URL
from tests.peers import LOOPBACK, StoreSCP, find_tool, parse_storescu_output, peer_env, storescu
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series
from tests.reliability.conftest import NodeRunFactory, poll

pytestmark = pytest.mark.integration

N_INSTANCES = 150
GEOMETRY = PhantomGeometry(rows=128, columns=128, pixel_spacing_mm=(2.4, 2.4), slice_spacing_mm=2.0,
                           num_slices=N_INSTANCES)


class Cutter:
    """Cuts the node's connections to its database and its broker vhost."""

    def __init__(self, database_url: str, broker_url: str) -> None:
        self.database = urlsplit(database_url).path.lstrip("/")
        self.vhost = urlsplit(broker_url).path.lstrip("/")
        self.admin = sqlalchemy.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
        self.rabbitmqctl = shutil.which("rabbitmqctl") or find_tool("rabbitmqctl")
        self.pg_cuts = 0
        self.pg_backends_killed = 0
        self.broker_cuts = 0

    def cut_database(self) -> int:
        with self.admin.connect() as conn:
            killed = conn.execute(
                sqlalchemy.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :db AND pid <> pg_backend_pid()"
                ),
                {"db": self.database},
            ).scalar_one()
        self.pg_cuts += 1
        self.pg_backends_killed += int(killed)
        return int(killed)

    def cut_broker(self) -> None:
        done = subprocess.run(
            [self.rabbitmqctl, "close_all_connections", "--vhost", self.vhost, "reliability test: cut"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        assert done.returncode == 0, done.stderr
        self.broker_cuts += 1

    def broker_connections(self) -> int:
        done = subprocess.run(
            [self.rabbitmqctl, "list_connections", "-q", "--no-table-headers", "vhost"],
            capture_output=True, text=True, timeout=60, check=False,
        )
        return sum(1 for line in done.stdout.splitlines() if line.strip() == self.vhost)

    def close(self) -> None:
        self.admin.dispose()


def test_database_and_broker_connections_cut_lose_nothing(
    node_run: NodeRunFactory, postgres_url: str, rabbitmq_url: str, tmp_path: Path, dcmtk
) -> None:  # type: ignore[no-untyped-def]
    datasets = make_ct_phantom(geometry=GEOMETRY)
    files = write_series(datasets, tmp_path / "ct")
    uid_of = {str(p): str(ds.SOPInstanceUID) for p, ds in zip(files, datasets)}
    cutter = Cutter(postgres_url, rabbitmq_url)
    receiver = StoreSCP(tmp_path / "received").start()
    try:
        node = node_run(
            destination=f"{receiver.aet}@{LOOPBACK}:{receiver.port}", quiet_period_s=4.0,
            database_url=postgres_url, broker_url=rabbitmq_url, separate_worker=True,
            extra_env={"MEDNODE_JOB_LEASE_S": "6"},
        )
        node.start_serve()  # no worker yet: the job will wait in the queue

        # 1. cut the database (three times) and the broker while 150 instances arrive
        out_path = tmp_path / "storescu.log"
        with open(out_path, "wb") as out:
            sender = subprocess.Popen(
                [find_tool("storescu"), "-v", "--no-halt", "-aet", "PACS", "-aec", node.ae_title, LOOPBACK,
                 str(node.dicom_port), *map(str, files)],
                stdout=out, stderr=subprocess.STDOUT, env=peer_env(), stdin=subprocess.DEVNULL,
            )
            broker = threading.Thread(target=cutter.cut_broker)
            broker.start()
            while sender.poll() is None and cutter.pg_cuts < 3:
                time.sleep(0.15)
                cutter.cut_database()
            sender.wait(timeout=300)
            broker.join()
        statuses = parse_storescu_output(out_path.read_text(errors="replace"))
        acknowledged = {uid_of[s.path] for s in statuses if s.ok}
        refused = [s for s in statuses if not s.ok]
        assert len(statuses) == N_INSTANCES
        assert all("OutOfResources" in s.status for s in refused), refused[:3]  # 0xA700, retry later
        rows = node.instance_rows()
        assert acknowledged <= rows.keys(), f"{len(acknowledged - rows.keys())} acknowledged instance(s) lost"
        # the PACS re-sends what was refused
        if refused:
            again = storescu(LOOPBACK, node.dicom_port, [s.path for s in refused], aet="PACS",
                             called=node.ae_title)
            assert again.all_ok, again.describe()
        assert node.instance_count() == N_INSTANCES

        # 2. the job is queued in RabbitMQ; cut both again before any worker takes it
        poll(lambda: [(j.state, j.enqueued_at is not None) for j in node.jobs()] == [(JobState.QUEUED, True)],
             120, 0.3, "the job queued", on_timeout=lambda: node.serve.log_tail())
        cutter.cut_broker()
        cutter.cut_database()
        assert node.status()["jobs"]["queued"] == 1  # the node answers through a new connection

        # 3. a worker starts, takes the job; cut the database while it runs
        worker = node.start_worker()
        poll(lambda: [j.state for j in node.jobs()][-1:] != [JobState.QUEUED], 120, 0.1, "the job taken",
             on_timeout=worker.log_tail)
        cutter.cut_database()
        cutter.cut_broker()
        poll(lambda: node.jobs() and node.jobs()[-1].state in (JobState.DELIVERED, JobState.FAILED), 300, 0.5,
             "the job delivered", on_timeout=lambda: worker.log_tail() + node.serve.log_tail())
        jobs = node.jobs()
        assert jobs[-1].state is JobState.DELIVERED, jobs[-1].reason
        assert all(j.state in (JobState.DELIVERED, JobState.SUPERSEDED) for j in jobs)
        assert [d.state for d in node.deliveries()] == [DeliveryState.DELIVERED] * 2
        assert len(receiver.received()) == 2

        # the node still takes new instances and reconnected to the broker
        again = storescu(LOOPBACK, node.dicom_port, files[:3], aet="PACS", called=node.ae_title)
        assert again.all_ok, again.describe()
        assert cutter.broker_connections() >= 1
        print(
            f"\nRELIABILITY broker-database: sent={N_INSTANCES} acknowledged_first_pass={len(acknowledged)} "
            f"refused_0xA700={len(refused)} indexed_after_resend={node.instance_count()} "
            f"pg_cuts={cutter.pg_cuts} pg_backends_killed={cutter.pg_backends_killed} "
            f"broker_cuts={cutter.broker_cuts} jobs={[(j.study_version, j.state.value, j.attempts) for j in jobs]} "
            f"delivered_objects={len(receiver.received())}"
        )
    finally:
        receiver.stop()
        cutter.close()
