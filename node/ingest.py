"""Receiving one instance: check it, write it durably, index it — then, and only then, say Success.

:class:`Ingestor` knows nothing of the network: the SCP handler in :mod:`node.listener` hands it the
peer's encoded bytes and turns its outcome or error into a DICOM status.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from dicom_io.errors import InvalidInstanceError
from dicom_io.header import InstanceHeader, Part10Prefixes, ReadInstance, read_part10, read_received
from node import metrics
from storage.db import make_engine
from storage.index import (
    IndexOutcome,
    LateSeriesCheck,
    index_instance,
    index_new_instance,
    indexes_at_once,
    unindex_instance,
)
from storage.store import InstanceStore, PendingInstance, StoredFile

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class RequestMismatchError(ValueError):
    """The data set's SOP Class or Instance UID differs from the C-STORE request's (or its Study
    Instance UID from the study a STOW-RS request names)."""


@dataclass(frozen=True)
class IngestResult:
    header: InstanceHeader
    outcome: IndexOutcome
    size_bytes: int


def _unpinged_autocommit(bind: Engine) -> Engine:
    """An engine like ``bind`` whose connections commit each statement and are not pinged when
    taken from its pool (its own pool: ``bind``'s pings at every checkout)."""
    return make_engine(bind.url.render_as_string(hide_password=False), isolation_level="AUTOCOMMIT",
                       pool_pre_ping=False)


class Ingestor:
    """Writes received instances to the store and the index.

    The disk's work starts as early as it can and is waited for as late as it can: once the
    data set is read and its four UIDs (which name the file) are checked, the file is written
    and its ``fdatasync`` starts in a store thread; the rest of the header checks run meanwhile.
    Success is answered only once the file is synced *and* its row committed. An instance
    refused by the later checks, or whose row fails, has its file removed before the refusal is
    answered. (Writing and hashing in another thread was slower: those need the GIL between
    system calls; only the sync runs without it. docs/BENCHMARKS.md.)

    On PostgreSQL, a new instance of a series already indexed — nearly every instance — is
    indexed by one statement on a connection in autocommit mode
    (:func:`storage.index.index_new_instance`): one round trip to the server, the statement with
    its commit (those connections are not pinged at checkout, :meth:`_index_at_once`), where a
    transaction took five. That statement and
    its commit (a WAL flush) run *while* the file's sync runs, so an instance waits for one disk
    flush, not two in a row (docs/BENCHMARKS.md, "Per-instance cost"). The row may so be
    committed for a file that is not yet durable; what keeps that safe:

    - Success waits for both; a sync that fails after the commit deletes the row again before
      the failure is answered (:meth:`_unindex`);
    - until its sync returns, the file keeps its partial name, naming this host and process
      (:meth:`storage.store.InstanceStore.unconfirmed_instances`): after a power loss the
      start-up repair reads each such file and removes it with its row if it is torn, and
      removes rows whose file is missing (:func:`storage.reconcile.remove_lost_instances`) —
      instances never acknowledged, which the peer sends again;
    - readers meanwhile see the file whole: it has its name, with all its bytes written, before
      its row commits; only a power loss can take it away again.

    A file that was already there (an identical re-send) or that replaced a torn one has no
    such mark: it is synced before its statement, as before. Anything else (a new series, a
    re-send, a derived object) takes the full path, :func:`storage.index.index_instance` in a
    transaction that commits after the sync. There is no lock: associations of this process, of
    other listener processes and of other hosts index at once (``index_instance`` takes a peer's
    new patient, study or series row), and PostgreSQL's commits of concurrent associations share
    their WAL flushes.

    On SQLite, index writes are serialised by a lock: SQLite has one writer anyway, and a short
    critical section keeps commit latency predictable under several associations. A writer that
    finds the lock free runs its statements while its file syncs, and commits after the sync (one
    association: the disk's time overlaps the statements); one that finds it taken waits for its
    own file's sync first, so that the lock is held for statements and commits, not for disks.
    """

    def __init__(
        self,
        store: InstanceStore,
        session_factory: sessionmaker[Session],
        late_series_check: LateSeriesCheck | None = None,
    ) -> None:
        self.store = store
        self.session_factory = session_factory
        #: decides whether a late image series reopens its study (:func:`node.completion.late_series_check`)
        self.late_series_check = late_series_check
        bind = session_factory.kw.get("bind")
        sqlite = bind is None or bind.dialect.name == "sqlite"
        #: SQLite's one writer at a time (:meth:`_writer`); None where the database has many
        self._lock: threading.Lock | None = threading.Lock() if sqlite else None
        #: connections that commit each statement, not pinged at checkout: the one-statement
        #: index of a new instance (:meth:`_index_at_once`)
        self._at_once: Engine | None = (
            _unpinged_autocommit(bind) if isinstance(bind, Engine) and indexes_at_once(bind.dialect.name) else None
        )
        # the File Meta names the implementation that wrote the file: pynetdicom's SCP, as the
        # File Meta pynetdicom itself builds for a received data set does
        self._prefixes = Part10Prefixes(PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION)

    def ingest(
        self,
        data: bytes,
        *,
        calling_ae_title: str | None,
        called_ae_title: str | None,
        expected_sop_class_uid: str | None = None,
        expected_sop_instance_uid: str | None = None,
        expected_study_instance_uid: str | None = None,
    ) -> IngestResult:
        """Check, store and index one Part 10 byte stream.

        ``expected_study_instance_uid``: the study a STOW-RS request named in its URL
        (``/studies/{study}``); an instance of another study is refused before anything is written.

        Raises
        ------
        dicom_io.errors.InvalidInstanceError
            The bytes are not a valid instance (nothing is left written).
        RequestMismatchError
            The data set does not match the C-STORE request (nothing is written).
        storage.errors.StorageFullError, OSError
            The file could not be written durably.
        sqlalchemy.exc.SQLAlchemyError
            The index could not be updated. A file written for this request is removed again,
            unless the failure was the commit itself: then it stays (once synced), and a re-send
            or the start-up reconciliation (:func:`storage.reconcile.reindex_orphans`) indexes it.
        """
        return self._store(read_part10(data), [data], calling_ae_title, called_ae_title,
                           expected_sop_class_uid, expected_sop_instance_uid, expected_study_instance_uid)

    def ingest_received(
        self,
        dataset: bytes,
        *,
        sop_class_uid: str,
        sop_instance_uid: str,
        transfer_syntax_uid: str,
        calling_ae_title: str | None,
        called_ae_title: str | None,
    ) -> IngestResult:
        """:meth:`ingest` for a C-STORE's data set, as received in the context's transfer syntax.

        The stored file is the Part 10 stream a C-STORE SCP writes: a File Meta naming the
        request's SOP Class and Instance UIDs and the context's transfer syntax (encoded through
        :class:`~dicom_io.header.Part10Prefixes`), then the data set as received — parsed and
        written in place, never copied into one buffer with its File Meta (with 512×512 CT that
        join alone took 0.2 ms of fresh memory per instance). The data set must carry the
        request's UIDs. Raises as :meth:`ingest` does.
        """
        try:
            prefix = self._prefixes.prefix(sop_class_uid, sop_instance_uid, transfer_syntax_uid)
        except (ValueError, TypeError) as exc:  # pydicom refuses to write an invalid UID
            raise InvalidInstanceError(f"the request's UIDs cannot be written as File Meta: {exc}") from None
        instance = read_received(dataset, transfer_syntax_uid, prefix)
        return self._store(instance, [prefix, dataset], calling_ae_title, called_ae_title,
                           sop_class_uid, sop_instance_uid)

    @contextmanager
    def _writer(self, pending: PendingInstance) -> Iterator[None]:
        """Hold SQLite's writer lock (nothing elsewhere); if another association holds it, wait
        for ``pending``'s sync first, and only then for the lock."""
        lock = self._lock
        if lock is None:
            yield
            return
        if not lock.acquire(blocking=False):
            pending.sync()  # may raise: then the lock was never taken
            lock.acquire()
        try:
            yield
        finally:
            lock.release()

    def close(self) -> None:
        """Close the connections this ingestor opened itself (those of :meth:`_index_at_once`)."""
        if self._at_once is not None:
            self._at_once.dispose()

    def _index_at_once(
        self, pending: PendingInstance, header: InstanceHeader, calling_ae_title: str | None,
        called_ae_title: str | None,
    ) -> bool:
        """:func:`storage.index.index_new_instance` on a connection that commits each statement,
        while the file's sync may still run; then wait for the sync.

        The file is kept once synced when the row committed, or may have (the connection was lost
        while the statement ran: a re-send or the start-up reconciliation settles it). Any other
        failure of the statement rolled it back, and the file goes. A sync that fails after the
        row committed takes the row back out before the error is raised (:meth:`_unindex`).

        The connection is not pinged at checkout (a round trip per instance): one the server
        dropped (a restart, ``pg_terminate_backend``) fails the statement instead, SQLAlchemy
        then renews the pool's connections, and the statement runs once more on a new one. That
        is safe even if the first run committed before the connection was lost: the row is
        there, the statement inserts nothing, and the full path finds the instance unchanged.
        """
        try:
            indexed = self._at_once_statement(
                lambda connection: index_new_instance(connection, header, pending.stored,
                                                      calling_ae_title=calling_ae_title,
                                                      called_ae_title=called_ae_title),
                f"{header.sop_instance_uid} indexed")
        except DBAPIError as exc:
            if exc.connection_invalidated:  # the row may have committed: keep the file once synced
                self._finish_or_unindex(pending, header)  # a re-send or the reconciliation settles it
            raise
        if indexed:
            self._finish_or_unindex(pending, header)
        return indexed

    def _finish_or_unindex(self, pending: PendingInstance, header: InstanceHeader) -> None:
        """Wait for the file's sync; if it fails, take out the row that may name the file."""
        try:
            pending.finish()
        except Exception:
            self._unindex(header, pending.stored)
            raise

    def _at_once_statement(self, statement: Callable[[Connection], _T], what: str) -> _T:
        """``statement`` on a connection of the unpinged autocommit pool, run once more on a new
        connection if the server had dropped the first (:meth:`_index_at_once`)."""
        assert self._at_once is not None
        for attempt in range(2):
            try:
                with self._at_once.connect() as connection:
                    return statement(connection)
            except DBAPIError as exc:
                if not exc.connection_invalidated or attempt:
                    raise
                log.info("index connection lost (%s); %s on a new one", type(exc.orig).__name__, what)
        raise AssertionError("unreachable: the second attempt returns or raises")

    def _unindex(self, header: InstanceHeader, stored: StoredFile) -> None:
        """Delete the row just committed for a file whose sync then failed, before the failure is
        answered and the file removed: an instance not acknowledged leaves nothing.

        Only the row naming this very file goes (a re-send by another association may have
        pointed it at other bytes meanwhile). The study it touched stays touched (receiving):
        its completion waits one more quiet period. If the delete fails too, the row stays
        without its file until the peer's re-send writes the file again (the row names the same
        path: the re-send is unchanged) or the start-up reconciliation removes it
        (:func:`storage.reconcile.remove_lost_instances`).
        """
        try:
            self._at_once_statement(
                lambda connection: unindex_instance(connection, header.sop_instance_uid, stored.relative_path),
                f"the row of {header.sop_instance_uid} removed")
        except Exception:
            log.exception("could not remove the index row of %s after its file's sync failed; a re-send or "
                          "the start-up reconciliation removes it", header.sop_instance_uid)

    def _store(
        self,
        instance: ReadInstance,
        parts: list[bytes],
        calling_ae_title: str | None,
        called_ae_title: str | None,
        expected_sop_class_uid: str | None,
        expected_sop_instance_uid: str | None,
        expected_study_instance_uid: str | None = None,
    ) -> IngestResult:
        uids = instance.uids()
        if expected_study_instance_uid and uids.study_instance_uid != expected_study_instance_uid:
            raise RequestMismatchError("Study Instance UID differs from the request's")
        if expected_sop_class_uid and uids.sop_class_uid != expected_sop_class_uid:
            raise RequestMismatchError("SOP Class UID differs from the C-STORE request")
        if expected_sop_instance_uid and uids.sop_instance_uid != expected_sop_instance_uid:
            raise RequestMismatchError("SOP Instance UID differs from the C-STORE request")
        # the UIDs name the file: start the disk now, check the rest while it works
        pending = self.store.begin_instance(
            uids.study_instance_uid, uids.series_instance_uid, uids.sop_instance_uid, parts
        )
        try:
            header = instance.header()  # a refusal here removes the file (abort below)
            indexed = False
            if self._at_once is not None:
                if not pending.syncing_in_background:
                    # no mark of an unconfirmed sync (a file that was there, or replaced a torn
                    # one): the statement that follows commits as it runs, so the file goes first
                    pending.sync()
                # else the statement and its commit run while the file's sync does; Success
                # waits for both
                indexed = self._index_at_once(pending, header, calling_ae_title, called_ae_title)
                stored = pending.stored
                outcome, obsolete_path = IndexOutcome.NEW, None
            if not indexed:
                with self._writer(pending), self.session_factory() as session, session.begin():
                    outcome, obsolete_path = index_instance(
                        session,
                        header,
                        pending.stored,
                        calling_ae_title=calling_ae_title,
                        called_ae_title=called_ae_title,
                        late_series_check=self.late_series_check,
                    )
                    # the row commits only once the file is on disk; if that fails, it rolls back
                    stored = pending.finish()
        finally:
            pending.abort()  # removes the file unless it was kept (its row committed, or may have)
        if obsolete_path is not None and (obsolete_path != stored.relative_path or outcome is IndexOutcome.DUPLICATE):
            # the row points at the new bytes now, or (a duplicate) still at the file held
            self.store.delete(obsolete_path)
        metrics.INSTANCES_RECEIVED.labels(outcome=outcome.value).inc()
        metrics.BYTES_RECEIVED.inc(stored.size_bytes)
        log.debug(
            "stored %s (series %s, %s)",
            header.sop_instance_uid,
            header.series_instance_uid,
            outcome.value,
        )
        return IngestResult(header, outcome, stored.size_bytes)
