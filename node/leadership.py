"""Which ``mednode serve`` process runs the scheduler: the one holding a PostgreSQL advisory lock.

Several ``serve`` processes (on one host or several) may share one PostgreSQL index; completion
rounds, the lost-work sweep and retention must run in one of them at a time, or their rounds
collide and roll back. The process that holds the session-level advisory lock
:data:`SCHEDULER_LOCK_KEY` on a connection of its own is the leader; when it dies its connection
closes and PostgreSQL releases the lock, so another process takes it at its next round.

Leadership is for efficiency, not correctness: completion still locks the study rows it completes
(``FOR UPDATE SKIP LOCKED``) and every job transition is conditional, so two leaders for a moment
(say, after a network cut the old one has not yet noticed) do no harm.

With SQLite the node is one embedded process, which leads trivially.
"""

from __future__ import annotations

import logging
import os
import socket

from sqlalchemy import Connection, Engine, create_engine, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

log = logging.getLogger(__name__)

#: The advisory lock key of the scheduler (an arbitrary 64-bit constant: "mednode" in ASCII).
SCHEDULER_LOCK_KEY = 0x6D65646E6F6465
#: TCP keepalive on the lock's connection, set on the server's side of it: a leader whose host
#: died (no FIN ever comes) loses the lock after about idle + interval × count seconds.
KEEPALIVE_IDLE_S = 10
KEEPALIVE_INTERVAL_S = 5
KEEPALIVE_COUNT = 3


class Leadership:
    """Asks, each round, whether this process is the one that runs the scheduler.

    Parameters
    ----------
    engine
        The index's engine; only its URL is used (the lock lives on a connection of its own,
        outside the pool, so no pooled session can release it by accident).
    key
        The advisory lock key.
    """

    def __init__(self, engine: Engine, key: int = SCHEDULER_LOCK_KEY) -> None:
        self.key = key
        self._trivial = engine.dialect.name != "postgresql"
        self._engine: Engine | None = None
        if not self._trivial:
            self._engine = create_engine(engine.url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
        self._connection: Connection | None = None
        self._leading = False

    @property
    def identity(self) -> str:
        return f"{socket.gethostname()}:{os.getpid()}"

    def is_leader(self) -> bool:
        """Whether this process holds the lock now; tries to take it when nobody holds it.

        A lost connection counts as lost leadership (PostgreSQL released the lock with it); the
        next call connects again and tries again. Never raises for a database that is down.
        """
        if self._trivial:
            return True
        try:
            if self._connection is None:
                self._connection = self._connect()
            if self._leading:
                self._connection.execute(text("SELECT 1"))  # the lock lives as long as this session
                return True
            taken = bool(self._connection.execute(text("SELECT pg_try_advisory_lock(:key)"), {"key": self.key}).scalar())
        except DBAPIError as exc:
            self._drop(f"its database connection failed ({type(exc.orig).__name__})")
            return False
        if taken:
            self._leading = True
            log.info("this process (%s) now runs the scheduler (advisory lock %#x)", self.identity, self.key)
        return taken

    def _connect(self) -> Connection:
        assert self._engine is not None
        connection = self._engine.connect()
        for name, value in (("tcp_keepalives_idle", KEEPALIVE_IDLE_S),
                            ("tcp_keepalives_interval", KEEPALIVE_INTERVAL_S),
                            ("tcp_keepalives_count", KEEPALIVE_COUNT)):
            connection.execute(text(f"SET {name} = {int(value)}"))
        return connection

    def _drop(self, why: str) -> None:
        if self._leading:
            log.warning("this process (%s) no longer runs the scheduler: %s", self.identity, why)
        self._leading = False
        if self._connection is not None:
            try:
                self._connection.close()
            except DBAPIError:
                pass
            self._connection = None

    def release(self) -> None:
        """Give the lock up (at shutdown), so another process takes over at once."""
        if self._connection is not None and self._leading:
            try:
                self._connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": self.key})
            except DBAPIError:
                pass
        was_leading, self._leading = self._leading, False
        if self._connection is not None:
            self._connection.close()
            self._connection = None
        if self._engine is not None:
            self._engine.dispose()
        if was_leading:
            log.info("this process (%s) gave up the scheduler", self.identity)
