"""The volume an inference worker read ahead of its job, while the study was still quiet.

A volume job (the built-in CT analyzer, a segmentation bundle) first reads its series into a volume:
~0.4 s for 300 CT slices on two cores, seconds for thousands. That read depends only on the series'
files, which the index names before the study is complete, so the scheduler asks an idle worker to
read them half-way through the study's quiet period (:mod:`node.preload`); the job that follows
takes the volume instead of reading the files again (issue 16: last instance → results in the
PACS).

A read-ahead is a guess and must never change a result or delay real work:

- it is used only by a job whose series holds **exactly** the files it was read from (the store
  names each file by its SOP Instance UID and content digest, so the same names are the same
  bytes); an instance that arrived after it, or one replaced, makes the job read the series itself;
- a worker holds at most one, until :data:`HOLD_AFTER_DUE_S` after its study's quiet period was to
  end, and drops it as soon as any other volume job starts (before that job loads its own series),
  so the memory it holds is never more than one volume that a job of that worker was about to need;
- only an idle worker reads ahead (no job running, nothing reserved of its volume memory budget),
  reserving the volume's bytes of that budget while it reads;
- a job that finds the read still running waits for it rather than reading the same files twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from dicom_io.volume import Volume
from node import metrics

log = logging.getLogger(__name__)

#: a read-ahead nobody took is dropped this long after its study was due to complete (its job ran
#: on another worker, or the study received more and is still receiving)
HOLD_AFTER_DUE_S = 60.0
#: the longest a job waits for a read-ahead of its own series that is still running
WAIT_FOR_READ_S = 600.0

Key = tuple[str, tuple[str, ...]]


def key_of(series_uid: str, paths: Sequence[str]) -> Key:
    """What a read-ahead is for: a series and the stored paths of its instances, in order."""
    return series_uid, tuple(paths)


@dataclass(eq=False)
class _Entry:
    key: Key
    label: str
    hold_s: float
    held_until: float
    volume: Volume | None = None
    reading: bool = True
    read: threading.Event = field(default_factory=threading.Event)


class PreloadedVolume:
    """At most one volume read ahead in this worker process (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entry: _Entry | None = None

    def begin(self, key: Key, label: str, hold_s: float) -> Reading | None:
        """Claim the slot to read ``key`` (``label`` names it in logs, by UID), to be held
        ``hold_s`` once read; None when a read-ahead is already held or running (the first one
        stays: a worker reads ahead one series at a time)."""
        with self._lock:
            self._expire()
            if self._entry is not None:
                return None
            self._entry = _Entry(key, label, hold_s, held_until=time.monotonic() + hold_s)
            return Reading(self, self._entry)

    def _finish(self, entry: _Entry, volume: Volume | None) -> None:
        """A read ended (``volume`` None: it failed or stopped): hold its volume, unless it was
        dropped meanwhile."""
        with self._lock:
            entry.reading = False
            if self._entry is not entry or volume is None:
                if self._entry is entry:
                    self._entry = None
                if volume is not None:  # dropped while it was read
                    _count("discarded")
                    log.info("read-ahead of %s dropped as it was read", entry.label)
            else:
                entry.volume = volume
                entry.held_until = time.monotonic() + entry.hold_s
                timer = threading.Timer(entry.hold_s + 0.05, self._on_timer)
                timer.daemon = True
                timer.start()
            entry.read.set()

    def _on_timer(self) -> None:
        with self._lock:
            self._expire()

    def take(self, key: Key, job_key: str) -> Volume | None:
        """The volume read ahead for ``key``, waiting for its read if it is running; None when
        there is none. A read-ahead of anything else is dropped (a volume job is starting, and it
        needs the memory), or, still running, dropped when it ends."""
        with self._lock:
            self._expire()
            entry = self._entry
            if entry is None:
                return None
            if entry.key != key:
                self._drop(entry, "a job of another series started")
                return None
        if entry.reading:
            log.info("%s: waits for the read-ahead of its series", job_key)
            entry.read.wait(WAIT_FOR_READ_S)
        with self._lock:
            if self._entry is not entry or entry.volume is None:
                return None
            self._entry = None
            _count("used")
            return entry.volume

    def drop(self) -> None:
        """Let go of whatever is held or being read (a worker stopping, a test)."""
        with self._lock:
            if self._entry is not None:
                self._drop(self._entry, "let go")

    @property
    def held(self) -> Key | None:
        """The key of the volume held now (read), or None."""
        with self._lock:
            self._expire()
            entry = self._entry
            return entry.key if entry is not None and entry.volume is not None else None

    def is_current(self, entry: _Entry) -> bool:
        """Whether ``entry`` still holds the slot (not dropped)."""
        with self._lock:
            return self._entry is entry

    def _drop(self, entry: _Entry, why: str) -> None:
        self._entry = None
        if entry.reading:  # its reader lets the volume go when it ends
            entry.read.set()  # and nobody waits for a read that will not be used
            return
        _count("discarded")
        log.info("read-ahead of %s dropped: %s", entry.label, why)

    def _expire(self) -> None:
        entry = self._entry
        if entry is not None and not entry.reading and time.monotonic() > entry.held_until:
            self._entry = None
            _count("expired")
            log.info("read-ahead of %s dropped after %.0f s unused", entry.label, entry.hold_s)


class Reading:
    """A read-ahead being made: :meth:`done` hands its volume over (or None when it failed)."""

    def __init__(self, owner: PreloadedVolume, entry: _Entry) -> None:
        self._owner = owner
        self._entry = entry

    @property
    def wanted(self) -> bool:
        """False once a job of another series dropped it: reading on is wasted."""
        return self._owner.is_current(self._entry)

    def done(self, volume: Volume | None) -> None:
        self._owner._finish(self._entry, volume)


def _count(outcome: str) -> None:
    metrics.VOLUME_PRELOADS.labels(outcome=outcome).inc()


_PROCESS = PreloadedVolume()


def process_preloaded() -> PreloadedVolume:
    """The read-ahead slot of this worker process."""
    return _PROCESS
