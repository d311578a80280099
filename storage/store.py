"""The on-disk store of received instances and written results.

Every file is first written under a *partial* name in its target directory,
``.<name>~<host>~<pid>~<token>.partial``, naming the host and process writing it; it appears under
its own name only once its bytes are all written. So a file under its own name is never in
progress, and several processes and hosts sharing one store (a shared volume) never take each
other's writes for a crash's leftovers: start-up repair (:meth:`InstanceStore.remove_partials`)
removes only the partial files of its own host whose process is gone.

A result file is synced (``fdatasync``) and renamed into place, and the directory is synced. A
received instance is written once under a name that carries its SHA-256
(:meth:`InstanceStore.begin_instance`) and counts only once synced
(:meth:`PendingInstance.finish`). Its index row commits after that, or — PostgreSQL's hot path,
:class:`node.ingest.Ingestor` — while the sync runs; the peer is answered only after both. A
crash in between leaves a whole file the index does not know, which the start-up reconciliation
(:mod:`storage.reconcile`) re-indexes; a power loss may leave one whose content does not match
its name, which it removes, and a row whose file is torn or missing, which it removes too: a new
file keeps its partial name until its sync returns, the mark that tells the reconciliation which
files to read (:meth:`InstanceStore.unconfirmed_instances`).
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from storage.errors import InvalidUIDError, StorageError, StorageFullError

log = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
PARTIAL_SUFFIX = ".partial"
#: Separates the target's name, host, process id and a token in a partial file's name (no host
#: name, UID or digest holds it).
PARTIAL_SEPARATOR = "~"
#: A partial file in the format before host and process were named is removed at start once it
#: is this old (no write takes that long).
LEGACY_PARTIAL_AGE_S = 3600.0
#: Hex digits of the SHA-256 kept in an instance file's name.
DIGEST_CHARS = 16
#: Threads running the ``fdatasync`` of new instance files; one per association writing at once
#: is enough, and more writers only queue for them (and for the disk).
SYNC_THREADS = 8


def check_uid(uid: str) -> str:
    """Return ``uid`` if it is safe as a path component (a DICOM UID: digits and dots, ≤ 64 chars).

    Raises
    ------
    InvalidUIDError
        If ``uid`` is empty, longer than 64 characters or contains anything but digits and dots.
    """
    if not uid or len(uid) > 64 or not _UID.match(uid):
        raise InvalidUIDError(f"not a valid DICOM UID: {uid[:80]!r}")
    return uid


@dataclass(frozen=True)
class StoredFile:
    """Where a file was written and what it holds."""

    relative_path: str
    size_bytes: int
    sha256: str


def _sync_data(fd: int) -> None:
    # fdatasync flushes the data and the size, all a reader needs; it skips timestamps
    if hasattr(os, "fdatasync"):
        os.fdatasync(fd)
    else:  # macOS, Windows
        os.fsync(fd)


def _sync_started(fd: int, started: threading.Event, marker: Path | None = None) -> None:
    started.set()  # the caller wakes once this thread releases the GIL: inside the sync
    _sync_data(fd)
    if marker is not None:
        # the bytes are on disk: the file's partial name, kept as the mark of a sync not yet
        # confirmed (:meth:`InstanceStore.unconfirmed_instances`), can go
        marker.unlink(missing_ok=True)


def _dont_need(fd: int) -> None:
    """``POSIX_FADV_DONTNEED`` on the whole file (Linux: starts writeback of dirty pages without
    waiting for it, drops clean ones); nothing where the call does not exist."""
    if hasattr(os, "posix_fadvise"):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


def sha256_hex(data: bytes | Sequence[bytes]) -> str:
    """SHA-256 of ``data`` (or of its parts, in order) as lowercase hex."""
    digest = hashlib.sha256()
    for part in [data] if isinstance(data, bytes) else data:
        digest.update(part)
    return digest.hexdigest()


def _write_all(fd: int, parts: Sequence[bytes]) -> None:
    views = [memoryview(p) for p in parts if len(p)]
    while views:
        written = os.writev(fd, views)
        while views and written >= len(views[0]):
            written -= len(views[0])
            views.pop(0)
        if views and written:
            views[0] = views[0][written:]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class PartialWriter:
    """Who is writing a partial file, read from its name."""

    host: str
    pid: int


def partial_writer(name: str) -> PartialWriter | None:
    """The host and process named by a partial file's name; None for a name without them
    (written before they were named) or not a partial file's."""
    if not (name.startswith(".") and name.endswith(PARTIAL_SUFFIX)):
        return None
    fields = name[1:-len(PARTIAL_SUFFIX)].split(PARTIAL_SEPARATOR)
    if len(fields) != 4 or not fields[2].isdigit():
        return None
    return PartialWriter(fields[1], int(fields[2]))


@dataclass(frozen=True)
class UnconfirmedInstance:
    """An instance file whose sync its writer, a process of this host now gone, never saw return
    (:meth:`InstanceStore.unconfirmed_instances`)."""

    #: the file's own name, relative to the store: what an index row names
    relative_path: str
    #: its partial name, still linked
    marker: Path
    #: ``written``: the file's name holds the partial's bytes (whole, or torn by a power loss);
    #: ``missing``: the file's name is gone (never linked, or lost); ``another``: the name holds
    #: another writer's file of the same bytes, which this one never touched
    state: Literal["written", "missing", "another"]


#: File systems that other hosts may write through (the store shared over a network)
NETWORK_FILESYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "fuse.glusterfs", "fuse.sshfs",
    "fuse.cephfs", "9p", "lustre", "beegfs", "gpfs", "afs", "ocfs2", "gfs2",
})


def mount_type(path: Path, mounts: str) -> str | None:
    """The file system type of the mount holding ``path`` (absolute, resolved), from the text of
    ``/proc/mounts``; None when no mount holds it."""
    best, kind = -1, None
    for line in mounts.splitlines():
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1].replace("\\040", " ")
        inside = path == Path(point) or Path(point) in path.parents
        if inside and len(point) > best:
            best, kind = len(point), fields[2]
    return kind


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class PendingInstance:
    """An instance file that is written but not yet known to be on disk.

    :meth:`finish` makes it durable and keeps it (or raises, leaving nothing); :meth:`abort`
    removes a file this write created and did not finish (and its partial name), and does
    nothing otherwise, so it can always be called in a ``finally``. :meth:`sync` makes it durable
    without keeping it yet: a caller that must know the file is on disk before it commits the row
    naming it, and that removes the file again if the row fails, syncs, runs its statements, then
    finishes. A caller may instead commit the row while the sync runs where
    :attr:`syncing_in_background` holds, and must then remove the row itself if
    :meth:`finish` fails. A file
    that was already there (an identical re-send, or the same bytes written at once by another
    association, process or host) is synced too before it counts, and never removed here.
    """

    def __init__(
        self,
        target: Path,
        stored: StoredFile,
        fd: int | None = None,
        marker: Path | None = None,
    ) -> None:
        self.target = target
        self.stored = stored
        self._fd = fd
        self._created = fd is not None
        self._synced = False
        self._finished = False
        self._sync: Future[None] | None = None  # the fdatasync of ``fd`` in a sync thread
        #: the partial name still linked to ``target`` until its sync is confirmed
        self._marker = marker

    @property
    def syncing_in_background(self) -> bool:
        """Whether this write created the file and its sync is under way in a store thread, with
        its partial name kept until the sync returns: then a crash before the sync is confirmed
        leaves that name beside the file (:meth:`InstanceStore.unconfirmed_instances`), so a
        row may name the file before :meth:`finish` — the start-up reconciliation finds it and
        removes the row if the file did not survive whole (:func:`storage.reconcile.remove_lost_instances`)."""
        return self._sync is not None and self._marker is not None

    def finish(self) -> StoredFile:
        """Wait until the file is on disk (:meth:`sync`), keep it, and return what was stored.

        Raises
        ------
        StorageFullError
            If the disk filled up before the data reached it.
        StorageError
            If a file of these bytes is still being written by another association.
        """
        stored = self.sync()
        self._finished = True
        return stored

    def sync(self) -> StoredFile:
        """Wait until the file is on disk and return what was stored; :meth:`abort` still removes
        it until :meth:`finish` is called.

        Raises
        ------
        StorageFullError, StorageError
            As :meth:`finish` (and then the file is removed).
        """
        if self._synced:
            return self.stored
        try:
            fd = self._synced_descriptor()
            # the pages are clean now: let the next write reuse them instead of growing the page
            # cache (on a VM, every never-touched page costs a first-touch fault into the host)
            _dont_need(fd)
        except OSError as exc:
            self.abort()
            if exc.errno == errno.ENOSPC:
                raise StorageFullError(f"disk full writing {self.stored.relative_path}") from exc
            raise
        except StorageError:
            self.abort()
            raise
        os.close(fd)
        self._fd = None
        self._synced = True
        self._marker = None  # the sync thread removed it
        return self.stored

    def _synced_descriptor(self) -> int:
        """The file's open descriptor, once its data is on disk."""
        if self._fd is not None and self._sync is not None:  # written here, sync under way
            self._wait_for_sync()
            return self._fd
        if self._fd is None:  # already there: the same bytes, written earlier or elsewhere
            self._fd = os.open(self.target, os.O_RDONLY)
            if os.fstat(self._fd).st_size != self.stored.size_bytes:
                raise StorageError(
                    f"{self.stored.relative_path} is being written by another association; "
                    "send the instance again"
                )
        _sync_data(self._fd)
        return self._fd

    def _wait_for_sync(self) -> None:
        sync, self._sync = self._sync, None
        if sync is not None:
            sync.result()

    def abort(self) -> None:
        """Close the file and remove it if this write created it and did not finish."""
        try:
            self._wait_for_sync()  # never close a descriptor a sync thread still uses
        except OSError:
            pass  # the file goes anyway
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._created and not self._finished:
            self.target.unlink(missing_ok=True)
            self._created = False
        if self._marker is not None:  # the sync failed or never ran
            self._marker.unlink(missing_ok=True)
            self._marker = None


class InstanceStore:
    """Files under one root: ``instances/<study>/<series>/<sop>.<digest>.dcm`` (the first 16 hex
    digits of the SHA-256) and ``results/<job>/<sop>.dcm``.

    Parameters
    ----------
    root
        Directory of the store; created if missing.
    min_free_bytes
        Writes are refused with :class:`StorageFullError` when less than this would remain free.
    host
        This host's name in partial files' names (the host name by default). Hosts sharing a
        store must have distinct names, each stable across restarts.
    """

    def __init__(self, root: Path, *, min_free_bytes: int = 0, host: str | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_bytes
        self.host = host or socket.gethostname()
        if PARTIAL_SEPARATOR in self.host or "/" in self.host:
            raise ValueError(f"a host name in the store may not hold {PARTIAL_SEPARATOR!r} or '/': {self.host!r}")
        self._known_dirs: set[Path] = set()
        # fdatasync releases the GIL: run it beside the caller's index statements
        self._syncer = ThreadPoolExecutor(max_workers=SYNC_THREADS, thread_name_prefix="store-sync")

    # -- paths ------------------------------------------------------------------------------
    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str, sha256: str) -> str:
        """Relative path of a received instance: its UIDs, and its content digest in the name."""
        if not re.fullmatch(r"[0-9a-f]{64}", sha256):
            raise ValueError("sha256 must be 64 lowercase hex digits")
        name = f"{check_uid(sop_uid)}.{sha256[:DIGEST_CHARS]}.dcm"
        return "/".join(("instances", check_uid(study_uid), check_uid(series_uid), name))

    def result_path(self, job_id: int, sop_uid: str) -> str:
        """Relative path of a result object written for job ``job_id``."""
        return f"results/{int(job_id)}/{check_uid(sop_uid)}.dcm"

    def prior_area(self, job_id: int) -> str:
        """Relative folder of the prior studies job ``job_id`` retrieved from a PACS for comparison:
        copies of another system's instances, never indexed, removed when the job ends (and by
        :meth:`purge_priors` when a job died before it could)."""
        return f"priors/{int(job_id)}"

    def absolute(self, relative_path: str) -> Path:
        """Absolute path of a stored file; refuses paths that leave the store."""
        path = (self.root / relative_path).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise InvalidUIDError(f"path outside the store: {relative_path!r}")
        return path

    def partial_path(self, target: Path) -> Path:
        """A fresh partial file's path for ``target``: in its directory, hidden, naming this host
        and process (:func:`partial_writer` reads them back)."""
        name = PARTIAL_SEPARATOR.join((target.name, self.host, str(os.getpid()), uuid.uuid4().hex[:12]))
        return target.parent / f".{name}{PARTIAL_SUFFIX}"

    def on_network_filesystem(self) -> bool:
        """Whether the store is on a file system other hosts may share (NFS, CIFS, CephFS…), as
        far as ``/proc/mounts`` tells; False where it cannot be read."""
        try:
            mounts = Path("/proc/mounts").read_text()
        except OSError:
            return False
        return mount_type(self.root.resolve(), mounts) in NETWORK_FILESYSTEMS

    # -- writing ----------------------------------------------------------------------------
    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def write(self, relative_path: str, chunks: list[bytes] | bytes) -> StoredFile:
        """Write ``chunks`` atomically to ``relative_path`` and return what was stored.

        An existing file at that path is replaced atomically (a re-sent instance).

        Raises
        ------
        StorageFullError
            If the write would leave less than ``min_free_bytes`` free, or the disk is full.
        """
        parts = [chunks] if isinstance(chunks, bytes) else chunks
        size = sum(len(p) for p in parts)
        if self.min_free_bytes and self.free_bytes() - size < self.min_free_bytes:
            raise StorageFullError(
                f"refusing to write {size} bytes: free space is below the watermark of "
                f"{self.min_free_bytes} bytes under {self.root}"
            )
        target = self.absolute(relative_path)
        directory = target.parent
        if directory not in self._known_dirs:
            directory.mkdir(parents=True, exist_ok=True)
            self._known_dirs.add(directory)
        tmp = self.partial_path(target)
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as fh:
                for part in parts:
                    fh.write(part)
                    digest.update(part)
                fh.flush()
                _sync_data(fh.fileno())
            os.replace(tmp, target)
            _fsync_dir(directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise StorageFullError(f"disk full under {self.root}") from exc
            raise
        return StoredFile(relative_path, size, digest.hexdigest())

    def write_instance(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        data: bytes | Sequence[bytes],
    ) -> StoredFile:
        """Write a received instance durably: :meth:`begin_instance`, then its ``finish()``."""
        pending = self.begin_instance(study_uid, series_uid, sop_uid, data)
        try:
            return pending.finish()
        finally:
            pending.abort()

    def begin_instance(
        self,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        data: bytes | Sequence[bytes],
    ) -> PendingInstance:
        """Write a received instance under a content-addressed name; it is durable once the
        returned :class:`PendingInstance` is finished.

        The name carries the SHA-256 of the bytes. The bytes go to a partial file naming this
        host and process (:meth:`partial_path`), which is then hard-linked to the file's name
        — only if no file has that name: the same bytes written at once by another association,
        process or host are taken as they are, never overwritten, never removed. The
        ``fdatasync`` of the file follows. On ext4 and XFS it commits the journal up to the
        file's last data change: the partial name, created before the data, is then durable;
        the file's own name may not be yet (its link can come after writeback allocated the
        blocks). The partial name is unlinked only once that sync returned, and a journal
        commits in order, so after a power loss the file's bytes keep at least one of the two
        names. Until then the partial name marks a file that a power loss may lose or tear
        although a row names it already (a caller may commit the row while the sync runs,
        :attr:`PendingInstance.syncing_in_background`); the start-up reconciliation reads the
        marks (:meth:`unconfirmed_instances`) and gives a whole file its lost name back. An identical re-send
        finds the file and writes nothing. A file under its own name is whole: one of the wrong
        size is what a power loss left, and is replaced; one of the right size whose content a
        power loss tore is removed at start by :func:`storage.reconcile.reindex_orphans` (it was
        never indexed, so nothing ever read it).

        The bytes are written here, the kernel is asked to start writing them back, and their
        ``fdatasync`` starts at once in one of the store's sync threads (it holds no GIL while
        the disk works); this returns once that thread is inside the system call. The caller
        does its other work (header checks, index statements) before ``finish()`` waits for the
        sync, so the disk's time overlaps that work instead of following it. Once synced, the
        file's pages are dropped from the page cache: received instances are read again only
        when a job runs, and letting the cache grow with every instance made the write itself
        the slowest step of a C-STORE (docs/BENCHMARKS.md).

        Parameters
        ----------
        data
            The file's bytes, or its parts in order (e.g. File Meta and a received data set,
            written with one ``writev`` instead of being joined first).

        Raises
        ------
        StorageFullError
            If the write would leave less than ``min_free_bytes`` free, or the disk is full.
        """
        parts = [data] if isinstance(data, bytes) else list(data)
        size = sum(len(p) for p in parts)
        digest = sha256_hex(parts)
        relative = self.instance_path(study_uid, series_uid, sop_uid, digest)
        target = self.root / relative  # safe without absolute()'s resolve: built from checked UIDs
        stored = StoredFile(relative, size, digest)
        directory = target.parent
        if directory not in self._known_dirs:
            if not directory.is_dir():
                directory.mkdir(parents=True, exist_ok=True)
                for parent in (directory, directory.parent, directory.parent.parent):
                    _fsync_dir(parent)
            self._known_dirs.add(directory)
        try:
            existing_size: int | None = target.stat().st_size
        except FileNotFoundError:
            existing_size = None
        if existing_size == size:
            return PendingInstance(target, stored)  # the same bytes: finish() syncs them
        partial = self.partial_path(target)
        fd = self._write_new(partial, parts, size)
        replace = existing_size is not None
        try:
            if not self._publish(partial, target, replace=replace, keep_partial=not replace):
                os.close(fd)  # another writer of these very bytes was first: take its file
                return PendingInstance(target, stored)
        except BaseException:
            os.close(fd)
            partial.unlink(missing_ok=True)
            raise
        # the partial name stays linked to the file until its sync returns (not where a torn
        # file was replaced: os.replace moved that name; then the caller syncs before its row)
        marker = None if replace else partial
        pending = PendingInstance(target, stored, fd, marker)
        try:
            started = threading.Event()
            pending._sync = self._syncer.submit(_sync_started, fd, started, marker)
            # hand the GIL over until the sync is in the kernel: left waiting for it, the sync
            # thread would start only when this one next blocks (the index statements)
            started.wait()
        except BaseException:
            pending.abort()
            raise
        return pending

    @staticmethod
    def _publish(partial: Path, target: Path, *, replace: bool, keep_partial: bool = False) -> bool:
        """Give the whole partial file its own name; False when a file of that name appeared
        meanwhile (then the partial is removed and the other stays).

        ``replace``: the name holds a torn file (of the wrong size) a power loss left, replaced
        atomically. ``keep_partial``: once linked, the partial name stays too (the caller removes
        it once the file is synced).
        """
        published = False
        try:
            if replace:
                os.replace(partial, target)
                return True
            try:
                os.link(partial, target)
            except FileExistsError:
                return False
            published = True
            return True
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise StorageFullError(f"disk full writing {target.name}") from exc
            raise
        finally:
            if not (published and keep_partial):
                partial.unlink(missing_ok=True)

    def _write_new(self, target: Path, parts: Sequence[bytes], size: int) -> int:
        """Create ``target`` with ``parts``, start its writeback and return the open descriptor."""
        if self.min_free_bytes and self.free_bytes() - size < self.min_free_bytes:
            raise StorageFullError(
                f"refusing to write {size} bytes: free space is below the watermark of "
                f"{self.min_free_bytes} bytes under {self.root}"
            )
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:  # no inode left
                raise StorageFullError(f"disk full under {self.root}") from exc
            raise
        try:
            _write_all(fd, parts)
            _dont_need(fd)  # start the writeback now; finish() waits for it
        except OSError as exc:
            os.close(fd)
            target.unlink(missing_ok=True)
            if exc.errno == errno.ENOSPC:
                raise StorageFullError(f"disk full under {self.root}") from exc
            raise
        return fd

    @staticmethod
    def name_matches_content(relative_path: str, data: bytes) -> bool:
        """Whether an instance file holds the bytes its name's digest promises."""
        parts = relative_path.rsplit("/", 1)[-1].split(".")
        return len(parts) > 2 and hashlib.sha256(data).hexdigest()[:DIGEST_CHARS] == parts[-2]

    def read(self, relative_path: str) -> bytes:
        return self.absolute(relative_path).read_bytes()

    def prefetch(self, relative_paths: Iterable[str]) -> None:
        """Ask the kernel to start reading these files into the page cache, all at once
        (``POSIX_FADV_WILLNEED``); returns at once, without waiting for the disk.

        Received instances leave the page cache once synced (:meth:`begin_instance`), so a job
        reads its series back from the disk. Read one file after the other, each read waits for
        its own; prefetched, the disk reads the whole series while the job parses the headers,
        and the decode finds the pixels in memory (a 300-slice CT's load stage 0.54 → 0.42 s in
        the node: docs/BENCHMARKS.md, latency run 7). A file that is gone is skipped: its reader
        reports it.
        """
        if not hasattr(os, "posix_fadvise"):
            return
        for relative in relative_paths:
            try:
                fd = os.open(self.absolute(relative), os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def delete(self, relative_path: str) -> None:
        self.absolute(relative_path).unlink(missing_ok=True)

    def partial_files(self) -> list[Path]:
        """Every partial file in the store, any writer's: one walk of the whole tree, which start-up
        repair hands to both :meth:`unconfirmed_instances` and :meth:`remove_partials` (on a large
        or network store, each walk takes minutes)."""
        return list(self.root.rglob(f"*{PARTIAL_SUFFIX}"))

    def remove_partials(self, partials: Iterable[Path] | None = None) -> int:
        """Delete the partial files a crashed writer of this host left; return how many.

        ``partials``: the store's partial files as :meth:`partial_files` listed them (listed here
        when None). Call it at start, before this process writes. A partial file is removed when it names
        this host and a process that no longer runs (or this very process: a predecessor with
        the same process id, as in a restarted container); another host's, or one of a live
        process of this host (another listener), is in progress or that host's to clean up, and
        stays. A partial file in the format before hosts were named is removed once it is
        :data:`LEGACY_PARTIAL_AGE_S` old.
        """
        count = kept = 0
        now = time.time()
        for path in self.partial_files() if partials is None else partials:
            writer = partial_writer(path.name)
            if writer is None:
                try:
                    stale = now - path.stat().st_mtime >= LEGACY_PARTIAL_AGE_S
                except FileNotFoundError:
                    continue
            else:
                stale = self._left_by_dead_process(writer)
            if not stale:
                kept += 1
                continue
            try:
                path.unlink()
            except FileNotFoundError:  # settled since it was listed (remove_lost_instances)
                continue
            count += 1
        if count:
            log.warning("removed %d partial files left by an interrupted write", count)
        if kept:
            log.info("left %d partial files of other hosts or running processes in place", kept)
        return count

    def _left_by_dead_process(self, writer: PartialWriter) -> bool:
        """Whether a partial file's writer is a process of this host that no longer runs (or this
        very process: a predecessor with the same process id, as in a restarted container)."""
        return writer.host == self.host and (writer.pid == os.getpid() or not _process_exists(writer.pid))

    def unconfirmed_instances(self, partials: Iterable[Path] | None = None) -> list[UnconfirmedInstance]:
        """Instance files whose sync a process of this host that no longer runs never saw return.

        :meth:`begin_instance` keeps a new file's partial name linked to it until its
        ``fdatasync`` returns, so that name marks a file that may be lost or torn after a power
        loss and may already be named by an index row (:func:`storage.reconcile.remove_lost_instances`
        settles them; call it at start, before :meth:`remove_partials`). Why the mark survives
        whenever the file's own name does: the partial name is created before the file's name
        is linked, and is removed only after the sync returned, and a journaling filesystem
        (ext4, XFS) commits metadata in order — a file's name that survived a power loss
        without its sync brings the partial name with it. Other hosts' and live processes'
        partial files are not listed. ``partials``: the store's partial files as
        :meth:`partial_files` listed them (those under ``instances/`` are listed here when None).
        """
        found: list[UnconfirmedInstance] = []
        instances = self.root / "instances"
        if partials is None:
            partials = instances.rglob(f"*{PARTIAL_SUFFIX}") if instances.is_dir() else []
        for path in partials:
            if not path.is_relative_to(instances):
                continue
            writer = partial_writer(path.name)
            if writer is None or not self._left_by_dead_process(writer):
                continue
            target = path.parent / path.name[1:].split(PARTIAL_SEPARATOR, 1)[0]
            try:
                inode = path.stat().st_ino
            except FileNotFoundError:
                continue
            state: Literal["written", "missing", "another"]
            try:
                state = "written" if target.stat().st_ino == inode else "another"
            except FileNotFoundError:
                state = "missing"
            found.append(UnconfirmedInstance(target.relative_to(self.root).as_posix(), path, state))
        return found

    def remove_area(self, relative_dir: str) -> None:
        """Delete a folder of the store (e.g. a job's :meth:`prior_area`) and what it holds."""
        self._forget_dirs(self.absolute(relative_dir))
        shutil.rmtree(self.absolute(relative_dir), ignore_errors=True)

    def _forget_dirs(self, removed: Path) -> None:
        """Folders under ``removed`` must be made again by the next write there."""
        self._known_dirs = {d for d in self._known_dirs if not d.is_relative_to(removed)}

    def purge_priors(self, older_than_s: float, *, now: float | None = None) -> int:
        """Delete prior-study folders not touched for ``older_than_s``; return how many."""
        priors = self.root / "priors"
        if not priors.is_dir():
            return 0
        cutoff = (time.time() if now is None else now) - older_than_s
        removed = 0
        for entry in os.scandir(priors):
            if entry.is_dir() and entry.stat().st_mtime < cutoff:
                self._forget_dirs(Path(entry.path).resolve())
                shutil.rmtree(entry.path, ignore_errors=True)
                removed += 1
        if removed:
            log.info("retention: removed %d prior-study folder(s) left by jobs", removed)
        return removed

    def instance_files_changed_since(self, mtime: float | None) -> list[str]:
        """Relative paths of instance files in series directories modified at or after ``mtime``
        (all of them when ``mtime`` is None), for re-indexing after a crash."""
        found: list[str] = []
        instances = self.root / "instances"
        if not instances.is_dir():
            return found
        for study in os.scandir(instances):
            if not study.is_dir():
                continue
            for series in os.scandir(study.path):
                if not series.is_dir() or (mtime is not None and series.stat().st_mtime < mtime):
                    continue
                for entry in os.scandir(series.path):
                    if entry.name.endswith(".dcm") and not entry.name.startswith("."):
                        found.append(f"instances/{study.name}/{series.name}/{entry.name}")
        return found
