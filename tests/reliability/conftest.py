"""Fault tests: real ``mednode serve`` / ``mednode worker`` processes killed by PID and restarted on
the same data directory and ports, real peers (dcmtk, Orthanc, PostgreSQL, RabbitMQ).

Every test here is an integration test (each module sets ``pytestmark = pytest.mark.integration``,
and the hook below marks anything else under ``tests/reliability``), so with ``CI`` set a missing
peer fails instead of skipping (see ``tests/conftest.py``).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import make_engine, make_session_factory
from storage.models import Delivery, Instance, Job
from tests.integration.conftest import (  # noqa: F401  (fixtures re-exported for this package)
    REPO_ROOT,
    mednode_factory,
    node_env,
    postgres_url,
    rabbitmq_url,
)
from tests.peers import LOOPBACK, ManagedProcess, free_port

RELIABILITY_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under ``tests/reliability/`` as ``integration`` (CI turns skips into failures)."""
    for item in items:
        if RELIABILITY_DIR in Path(str(item.path)).parents:
            item.add_marker(pytest.mark.integration)


def kill_group(process: ManagedProcess) -> None:
    """SIGKILL ``process`` and its process group (the embedded worker and Celery pool children
    share it: ``ManagedProcess`` starts each process in its own session), by PID, and reap it."""
    pid = process.pid
    assert pid is not None, f"{process.name} was never started"
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.stop(timeout_s=10)  # reaps the killed PID (returns -9)


@dataclass
class NodeRun:
    """One mednode installation (data directory, ports, env) whose processes can be killed and
    started again: ``serve`` (listener, scheduler, web, embedded worker unless ``separate_worker``)
    and optionally a separate ``worker``."""

    data_dir: Path
    dicom_port: int
    web_port: int
    env: dict[str, str]
    database_url: str | None = None
    separate_worker: bool = False
    ae_title: str = "MEDNODE"
    serve: ManagedProcess | None = None
    worker: ManagedProcess | None = None
    history: list[ManagedProcess] = field(default_factory=list)
    _engine: Engine | None = None

    # -- processes ----------------------------------------------------------------------------
    def start_serve(self, extra_env: dict[str, str] | None = None, timeout_s: float = 120) -> float:
        """Start ``mednode serve``; return the seconds until its DICOM and web ports accepted."""
        started = time.monotonic()
        proc = ManagedProcess(
            [sys.executable, "-m", "node.cli", "serve"],
            log_dir=self.data_dir, name=f"serve-{len(self.history)}", env={**self.env, **(extra_env or {})},
            cwd=REPO_ROOT,
        )
        self.history.append(proc)
        self.serve = proc
        proc.start(port=self.dicom_port, timeout_s=timeout_s)
        proc.wait_for_port(self.web_port, timeout_s=timeout_s)
        return time.monotonic() - started

    def start_worker(self, extra_env: dict[str, str] | None = None) -> ManagedProcess:
        proc = ManagedProcess(
            [sys.executable, "-m", "node.cli", "worker"],
            log_dir=self.data_dir, name=f"worker-{len(self.history)}", env={**self.env, **(extra_env or {})},
            cwd=REPO_ROOT,
        )
        self.history.append(proc)
        self.worker = proc
        return proc.start()

    def kill_serve(self) -> None:
        assert self.serve is not None
        kill_group(self.serve)

    def kill_worker(self) -> None:
        assert self.worker is not None
        kill_group(self.worker)

    def stop(self) -> None:
        for proc in reversed(self.history):
            if proc.is_running:
                proc.stop(timeout_s=30)
            if proc.pid is not None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # leftover pool children of this group
                except ProcessLookupError:
                    pass
        if self._engine is not None:
            self._engine.dispose()

    def logs(self) -> str:
        return "\n".join(p.log_text() for p in self.history)

    # -- inspection ---------------------------------------------------------------------------
    @property
    def store_root(self) -> Path:
        return self.data_dir / "var" / "store"

    @property
    def sessions(self) -> sessionmaker[Session]:
        if self._engine is None:
            url = self.database_url or f"sqlite:///{self.data_dir / 'var' / 'mednode.db'}"
            self._engine = make_engine(url)
        return make_session_factory(self._engine)

    def jobs(self) -> list[Job]:
        with self.sessions() as session:
            return list(session.scalars(select(Job).order_by(Job.id)))

    def deliveries(self) -> list[Delivery]:
        with self.sessions() as session:
            return list(session.scalars(select(Delivery).order_by(Delivery.id)))

    def instance_rows(self) -> dict[str, str]:
        """SOP Instance UID -> stored path, from the index."""
        with self.sessions() as session:
            return {uid: path for uid, path in session.execute(select(Instance.sop_instance_uid, Instance.path))}

    def instance_count(self) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count(Instance.id))) or 0

    def instance_files(self) -> list[Path]:
        """Every regular file under ``store/instances`` (partials and dot files included)."""
        root = self.store_root / "instances"
        return sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else []

    def status(self) -> dict:
        return httpx.get(f"http://{LOOPBACK}:{self.web_port}/api/v1/status", timeout=10).json()

    def cli(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "node.cli", *args], env={**os.environ, **self.env}, cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )


NodeRunFactory = Callable[..., NodeRun]


@pytest.fixture
def node_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeRunFactory]:
    """Configure (not start) a mednode installation on free ports; everything is stopped by PID
    at teardown. Call ``start_serve()`` (and ``start_worker()`` with ``separate_worker=True``)."""
    runs: list[NodeRun] = []

    def make(
        destination: str | None = None,
        quiet_period_s: float = 2.0,
        database_url: str | None = None,
        broker_url: str | None = None,
        separate_worker: bool = False,
        extra_env: dict[str, str] | None = None,
    ) -> NodeRun:
        data_dir = tmp_path_factory.mktemp("mednode-rel")
        run = NodeRun(data_dir=data_dir, dicom_port=free_port(), web_port=free_port(), env={},
                      database_url=database_url, separate_worker=separate_worker)
        env = node_env(
            dicom_port=run.dicom_port, web_port=run.web_port, data_dir=data_dir / "var",
            quiet_period_s=quiet_period_s, destination=destination, database_url=database_url,
            broker_url=broker_url, separate_worker=separate_worker, extra_env=extra_env,
        )
        run.env = env
        runs.append(run)
        return run

    yield make
    for run in runs:
        run.stop()


def poll(predicate: Callable[[], object], timeout_s: float, interval_s: float = 0.2, what: str = "condition",
         on_timeout: Callable[[], str] | None = None) -> object:
    """Call ``predicate`` until truthy and return its value; TimeoutError (with ``on_timeout()``'s
    text, e.g. a log tail) after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    extra = f"\n{on_timeout()}" if on_timeout else ""
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}{extra}")
