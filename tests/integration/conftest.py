"""Fixtures that run mednode itself as real processes, and per-test PostgreSQL and RabbitMQ."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.databases import fresh_postgres_database
from tests.peers import LOOPBACK, ManagedProcess, PeerError, free_port, in_ci
from tests.peers.services import rabbitmq_vhost

REPO_ROOT = Path(__file__).resolve().parents[2]


def _unavailable(message: str) -> None:
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


@dataclass
class MednodeNode:
    """A running ``mednode serve`` (and optional separate ``mednode worker``) under test."""

    dicom_port: int
    web_port: int
    data_dir: Path
    env: dict[str, str]
    processes: list[ManagedProcess] = field(default_factory=list)
    ae_title: str = "MEDNODE"

    @property
    def web_url(self) -> str:
        return f"http://{LOOPBACK}:{self.web_port}"

    def logs(self) -> str:
        return "\n".join(p.log_text() for p in self.processes)

    def status(self) -> dict:
        return httpx.get(f"{self.web_url}/api/v1/status", timeout=10).json()

    def state(self, lines: int = 80) -> str:
        """The node's counts and the last ``lines`` of its processes' logs: what a poll that timed
        out shows (``e2e.poll(..., on_timeout=node.state)``)."""
        try:
            counts = json.dumps(self.status(), sort_keys=True)
        except (httpx.HTTPError, ValueError) as exc:
            counts = f"no status ({exc})"
        tail = "\n".join(self.logs().splitlines()[-lines:])
        return f"status {counts}\nlast {lines} log lines:\n{tail}"

    def cli(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, **self.env}
        return subprocess.run(
            [sys.executable, "-m", "node.cli", *args],
            env=env, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s, check=False,
        )

    def stop(self) -> None:
        for proc in reversed(self.processes):
            pgid = proc.pid
            proc.stop(timeout_s=30)
            if pgid is not None:
                # the worker's pool children share the session of the process we started
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except ProcessLookupError:
                    pass


MednodeFactory = Callable[..., MednodeNode]


def node_env(
    *,
    dicom_port: int,
    web_port: int,
    data_dir: Path,
    quiet_period_s: float,
    destination: str | None = None,
    database_url: str | None = None,
    broker_url: str | None = None,
    separate_worker: bool = False,
    extra_env: dict[str, str] | None = None,
) -> dict[str, str]:
    """The ``MEDNODE_*`` environment of a node under test: loopback, free ports, fast polling."""
    env = {
        "MEDNODE_DICOM_HOST": LOOPBACK,
        "MEDNODE_DICOM_PORT": str(dicom_port),
        "MEDNODE_WEB_PORT": str(web_port),
        "MEDNODE_DATA_DIR": str(data_dir),
        "MEDNODE_QUIET_PERIOD_S": str(quiet_period_s),
        "MEDNODE_COMPLETION_POLL_S": "0.2",
        "MEDNODE_LOG_LEVEL": "DEBUG",
        "MEDNODE_DELIVERY__RETRY_INITIAL_S": "1",
    }
    if destination:
        env["MEDNODE_DESTINATION"] = destination
    if database_url:
        env["MEDNODE_DATABASE_URL"] = database_url
    if broker_url:
        env["MEDNODE_BROKER_URL"] = broker_url
    if separate_worker:
        env["MEDNODE_EMBEDDED_WORKER"] = "false"
    env.update(extra_env or {})
    return env


@pytest.fixture
def mednode_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MednodeFactory]:
    """Start ``mednode serve`` as a subprocess on free ports, configured by ``MEDNODE_*`` env.

    ``separate_worker=True`` sets ``MEDNODE_EMBEDDED_WORKER=false`` and starts ``mednode worker``
    as its own process, as in the production layout.
    """
    nodes: list[MednodeNode] = []

    def start(
        destination: str | None = None,
        quiet_period_s: float = 2.0,
        database_url: str | None = None,
        broker_url: str | None = None,
        separate_worker: bool = False,
        extra_env: dict[str, str] | None = None,
        config: Path | None = None,
        web_port: int | None = None,
    ) -> MednodeNode:
        data_dir = tmp_path_factory.mktemp("mednode")
        node = MednodeNode(dicom_port=free_port(), web_port=web_port or free_port(), data_dir=data_dir, env={})
        env = node_env(
            dicom_port=node.dicom_port, web_port=node.web_port, data_dir=data_dir / "var",
            quiet_period_s=quiet_period_s, destination=destination, database_url=database_url,
            broker_url=broker_url, separate_worker=separate_worker, extra_env=extra_env,
        )
        node.env = env
        nodes.append(node)
        args = [sys.executable, "-m", "node.cli", "serve"]
        if config is not None:
            args += ["--config", str(config)]
        serve = ManagedProcess(args, log_dir=data_dir, name="serve", env=env, cwd=REPO_ROOT)
        node.processes.append(serve)
        serve.start(port=node.dicom_port, timeout_s=90)
        serve.wait_for_port(node.web_port, timeout_s=60)
        if separate_worker:
            worker_args = [sys.executable, "-m", "node.cli", "worker"]
            if config is not None:
                worker_args += ["--config", str(config)]
            worker = ManagedProcess(worker_args, log_dir=data_dir, name="worker", env=env, cwd=REPO_ROOT)
            node.processes.append(worker)
            worker.start()
        return node

    yield start
    for node in nodes:
        node.stop()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    with fresh_postgres_database("mednode_test") as url:
        yield url


@pytest.fixture
def rabbitmq_url() -> Iterator[str]:
    """A fresh RabbitMQ vhost (guest/guest) for one test, deleted afterwards."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(rabbitmq_vhost("mednode_test"))
        except PeerError as exc:
            _unavailable(str(exc))
        yield url
