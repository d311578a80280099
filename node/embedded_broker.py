"""The embedded broker without its polling delay: kombu's SQLAlchemy transport over SQLite, whose
consumers are woken the moment a message is committed.

kombu's SQLAlchemy transport polls: an idle worker looks for a message, finds none and sleeps
``polling_interval`` before it looks again, so a job queued on an idle worker waited half that
interval on average (0.2 s: up to 0.2 s) and each idle worker spent CPU on its polls. Here each
consuming process binds a Unix datagram socket in a directory beside the broker's database
(``broker.db.wake/<pid>-<n>.sock``) and waits on it between polls; each process that publishes
sends one byte to every socket there after its message is committed. The poll stays as a safety
net (:data:`FALLBACK_POLLING_INTERVAL_S`), so a lost wake-up costs at most that.

Only a broker on an SQLite file has a directory to meet in, and all the embedded processes run
on one host; any other SQLAlchemy URL polls as before.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import select
import socket
import threading
from pathlib import Path
from time import monotonic
from typing import Any

from kombu.transport import TRANSPORT_ALIASES
from kombu.transport import sqlalchemy as kombu_sqla
from sqlalchemy.engine import make_url

log = logging.getLogger(__name__)

#: How long an idle consumer waits for a wake-up before it polls anyway.
FALLBACK_POLLING_INTERVAL_S = 1.0
#: The directory of wake-up sockets is the database file's path plus this.
WAKE_SUFFIX = ".wake"
#: Unix socket paths longer than this cannot be bound (``sun_path``): the consumer then polls.
_MAX_SOCKET_PATH = 107
_counter = itertools.count()


def wake_dir(database_url: str) -> Path | None:
    """The directory of wake-up sockets for an SQLAlchemy ``database_url``; None when it is not an
    SQLite file (another database, or in memory)."""
    try:
        url = make_url(database_url)
    except Exception:  # noqa: BLE001 (not a URL kombu will use either: no wake-ups)
        return None
    if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
        return None
    return Path(url.database + WAKE_SUFFIX)


def wake_all(directory: Path) -> int:
    """Send one byte to every consumer socket in ``directory``; return how many were reached.

    A socket nobody listens on any more (its process died) is removed. A consumer whose socket
    buffer is full has been woken already.
    """
    reached = 0
    try:
        entries = [e.path for e in os.scandir(directory) if e.name.endswith(".sock")]
    except FileNotFoundError:
        return 0
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        sender.setblocking(False)
        for path in entries:
            try:
                sender.sendto(b"\0", path)
                reached += 1
            except (ConnectionRefusedError, FileNotFoundError):
                _unlink(path)
            except BlockingIOError:
                reached += 1
            except OSError as exc:
                log.debug("could not wake %s: %s", path, exc)
    return reached


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class WakeSocket:
    """A consumer's socket in the wake-up directory: :meth:`wait` returns when woken or after
    ``timeout_s``."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = str(directory / f"{os.getpid()}-{next(_counter)}.sock")
        if len(self.path.encode()) > _MAX_SOCKET_PATH:
            raise OSError(errno.ENAMETOOLONG, f"wake-up socket path too long: {self.path}")
        _unlink(self.path)
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.setblocking(False)
        self._socket.bind(self.path)

    def wait(self, timeout_s: float) -> bool:
        """Wait for a wake-up (True) or ``timeout_s`` (False); empty the socket either way."""
        ready, _, _ = select.select([self._socket], [], [], timeout_s)
        while True:
            try:
                self._socket.recv(64)
            except (BlockingIOError, InterruptedError):
                break
        return bool(ready)

    def close(self) -> None:
        self._socket.close()
        _unlink(self.path)


class Channel(kombu_sqla.Channel):
    def _put(self, queue: str, payload: Any, **kwargs: Any) -> None:
        super()._put(queue, payload, **kwargs)  # committed when this returns
        directory = wake_dir(self.connection.client.hostname)
        if directory is not None:
            wake_all(directory)


class Transport(kombu_sqla.Transport):
    """kombu's SQLAlchemy transport whose idle consumers wait on a wake-up socket, not a sleep."""

    Channel = Channel
    polling_interval = FALLBACK_POLLING_INTERVAL_S

    def __init__(self, client: Any, **kwargs: Any) -> None:
        super().__init__(client, **kwargs)
        self._wake: WakeSocket | None = None
        self._wake_lock = threading.Lock()
        self._wake_failed = False

    def _wake_socket(self) -> WakeSocket | None:
        if self._wake is None and not self._wake_failed:
            with self._wake_lock:
                directory = wake_dir(self.client.hostname)
                if directory is None:
                    self._wake_failed = True
                    return None
                try:
                    self._wake = WakeSocket(directory)
                except OSError as exc:
                    log.warning("embedded broker: no wake-up socket (%s); polling every %.1f s",
                                exc, self.polling_interval)
                    self._wake_failed = True
        return self._wake

    def drain_events(self, connection: Any, timeout: float | None = None) -> None:
        """kombu's loop (``virtual.Transport.drain_events``) with the sleep between polls replaced
        by a wait on the wake-up socket, created before the first poll so no wake-up is lost."""
        wake = self._wake_socket()
        time_start = monotonic()
        get = self.cycle.get
        polling_interval = self.polling_interval
        if timeout and polling_interval and polling_interval > timeout:
            polling_interval = timeout
        while True:
            try:
                get(self._deliver, timeout=timeout)
            except kombu_sqla.Empty:
                elapsed = monotonic() - time_start
                if timeout is not None and elapsed >= timeout:
                    raise TimeoutError() from None
                wait_s = polling_interval if timeout is None else min(polling_interval, timeout - elapsed)
                if wake is not None:
                    wake.wait(wait_s)
                else:
                    select.select([], [], [], wait_s)
            else:
                break

    def close_connection(self, connection: Any) -> None:
        if self._wake is not None:
            self._wake.close()
            self._wake = None
        super().close_connection(connection)


def install() -> None:
    """Have ``sqla+…`` broker URLs use :class:`Transport` in this process."""
    TRANSPORT_ALIASES["sqla"] = TRANSPORT_ALIASES["sqlalchemy"] = f"{__name__}:Transport"
