"""The machine's PostgreSQL and RabbitMQ for tests and benchmarks: a fresh database or vhost
each, removed afterwards."""

from __future__ import annotations

import shutil
import subprocess
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

from tests.peers.processes import PeerError

POSTGRES_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
RABBITMQ_HOST = "127.0.0.1:5672"


@contextmanager
def postgres_database(prefix: str = "mednode_bench") -> Iterator[str]:
    """A fresh database on the machine's PostgreSQL (127.0.0.1:5432, trust auth); yields its URL
    and drops it afterwards, whoever still holds connections."""
    import sqlalchemy

    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    admin = sqlalchemy.create_engine(POSTGRES_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with admin.connect() as connection:
            connection.execute(sqlalchemy.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@contextmanager
def rabbitmq_vhost(prefix: str = "mednode_bench") -> Iterator[str]:
    """A fresh vhost on the machine's RabbitMQ (127.0.0.1:5672, guest/guest); yields the broker
    URL and deletes the vhost afterwards.

    Raises
    ------
    PeerError
        If ``rabbitmqctl`` is missing or refuses.
    """
    ctl = shutil.which("rabbitmqctl") or shutil.which("rabbitmqctl", path="/usr/sbin:/usr/local/sbin")
    if ctl is None:
        raise PeerError("rabbitmqctl not found: RabbitMQ must run at 127.0.0.1:5672")
    vhost = f"{prefix}_{uuid.uuid4().hex[:10]}"

    def run(*args: str) -> None:
        done = subprocess.run([ctl, *args], capture_output=True, text=True, timeout=60, check=False)
        if done.returncode != 0:
            raise PeerError(f"rabbitmqctl {' '.join(args)} failed: {done.stderr.strip()[-500:]}")

    run("add_vhost", vhost)
    try:
        run("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        yield f"amqp://guest:guest@{RABBITMQ_HOST}/{vhost}"
    finally:
        subprocess.run([ctl, "delete_vhost", vhost], capture_output=True, timeout=60, check=False)
