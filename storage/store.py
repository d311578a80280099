"""The on-disk store of received instances and written results.

Every file appears atomically: bytes go to a temporary file in the target directory, are flushed and
fsync'ed, then renamed into place and the directory is fsync'ed. A reader (or a process restarted
after a crash) therefore sees either the whole file or nothing; stray ``.partial`` files left by a
crash are never indexed and are removed by :meth:`InstanceStore.remove_partials`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from storage.errors import InvalidUIDError, StorageFullError

log = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
PARTIAL_SUFFIX = ".partial"


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


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class InstanceStore:
    """Files under one root: ``instances/<study>/<series>/<sop>.dcm`` and ``results/<job>/<sop>.dcm``.

    Parameters
    ----------
    root
        Directory of the store; created if missing.
    min_free_bytes
        Writes are refused with :class:`StorageFullError` when less than this would remain free.
    """

    def __init__(self, root: Path, *, min_free_bytes: int = 0) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.min_free_bytes = min_free_bytes
        self._known_dirs: set[Path] = set()

    # -- paths ------------------------------------------------------------------------------
    def instance_path(self, study_uid: str, series_uid: str, sop_uid: str) -> str:
        """Relative path of a received instance."""
        return "/".join(
            ("instances", check_uid(study_uid), check_uid(series_uid), check_uid(sop_uid) + ".dcm")
        )

    def result_path(self, job_id: int, sop_uid: str) -> str:
        """Relative path of a result object written for job ``job_id``."""
        return f"results/{int(job_id)}/{check_uid(sop_uid)}.dcm"

    def absolute(self, relative_path: str) -> Path:
        """Absolute path of a stored file; refuses paths that leave the store."""
        path = (self.root / relative_path).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise InvalidUIDError(f"path outside the store: {relative_path!r}")
        return path

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
        tmp = directory / f".{target.name}.{uuid.uuid4().hex}{PARTIAL_SUFFIX}"
        digest = hashlib.sha256()
        try:
            with open(tmp, "wb") as fh:
                for part in parts:
                    fh.write(part)
                    digest.update(part)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, target)
            _fsync_dir(directory)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno == 28:  # ENOSPC
                raise StorageFullError(f"disk full under {self.root}") from exc
            raise
        return StoredFile(relative_path, size, digest.hexdigest())

    def read(self, relative_path: str) -> bytes:
        return self.absolute(relative_path).read_bytes()

    def delete(self, relative_path: str) -> None:
        self.absolute(relative_path).unlink(missing_ok=True)

    def remove_partials(self) -> int:
        """Delete temporary files a crashed writer left behind; return how many were removed."""
        count = 0
        for path in self.root.rglob(f"*{PARTIAL_SUFFIX}"):
            path.unlink(missing_ok=True)
            count += 1
        if count:
            log.warning("removed %d partial files left by an interrupted write", count)
        return count
