"""The volume an inference worker read ahead of its job, while the study was still quiet.

A volume job (the built-in CT analyzer, a segmentation bundle) first reads its series into a volume:
~0.4 s for 300 CT slices on two cores, seconds for thousands. That read depends only on the series'
files, which the index names before the study is complete, so the scheduler asks an idle worker to
read them half-way through the study's quiet period (:mod:`node.preload`); the job that follows
takes the volume instead of reading the files again (issue 16: last instance → results in the
PACS).

A series of single-frame images (a classic CT or MR) is held as its slices, by stored file, in a
:class:`~dicom_io.volume.SeriesAccumulator`, so that it can be read while it is still being
received: the scheduler hints a receiving study again every :data:`~node.preload.PRELOAD_EVERY_S`,
each hint reads only the files that arrived since, and the job reads only those that arrived after
the last one, then takes the volume :func:`dicom_io.volume.load_volume` would have made, stacked in
place (the store names each file by its SOP Instance UID and content digest, so the same name is
the same bytes; a held file the job's series no longer has, an instance replaced, is left out). An
enhanced (multi-frame) series is held as one volume, read once its study is quiet.

A read-ahead is a guess and must never change a result or delay real work:

- a volume is used only by a job whose series holds **exactly** the files it was read from; an
  instance that arrived after it, or one replaced, makes the job read the series itself; held
  slices are used only for the files the job's series holds;
- a worker holds at most one, until :data:`HOLD_AFTER_DUE_S` after its study's quiet period was to
  end, and drops it as soon as any other volume job starts (before that job loads its own series),
  so the memory it holds is never more than one volume that a job of that worker was about to need;
  a read of another series of the same study replaces it (a scout received first, then the CT);
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

from dicom_io.volume import SeriesAccumulator, Volume
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
    #: whether the read holds slices (a :class:`SeriesAccumulator`), which a job of more files can use
    slices: bool = False
    #: the Study Instance UID of the series
    study: str = ""
    volume: Volume | SeriesAccumulator | None = None
    reading: bool = True
    read: threading.Event = field(default_factory=threading.Event)


class PreloadedVolume:
    """At most one volume read ahead in this worker process (see the module docstring)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entry: _Entry | None = None

    def begin(self, key: Key, label: str, hold_s: float, *, slices: bool = False, study: str = "") -> Reading | None:
        """Claim the slot to read ``key`` of ``study`` (``label`` names it in logs, by UID), to be
        held ``hold_s`` once read, as a volume or, with ``slices``, as a
        :class:`SeriesAccumulator`. Slices held of the same series go on with the new read
        (:attr:`Reading.held`); anything else held of the same study is dropped for it (the study
        has changed since: another series is now the one its job reads, or more files arrived
        than a volume holds). None when a read-ahead is running, or one of another study is held
        (the first one stays: a worker reads ahead one series at a time)."""
        with self._lock:
            self._expire()
            entry = self._entry
            held = None
            if entry is not None:
                if entry.reading:
                    return None
                if entry.key[0] == key[0] and slices and isinstance(entry.volume, SeriesAccumulator):
                    held = entry.volume
                elif study and entry.study == study:
                    self._drop(entry, "its study changed since")
                else:
                    return None
            self._entry = _Entry(key, label, hold_s, held_until=time.monotonic() + hold_s, slices=slices,
                                 study=study)
            return Reading(self, self._entry, held)

    def _finish(self, entry: _Entry, volume: Volume | SeriesAccumulator | None) -> None:
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

    def take(self, key: Key, job_key: str) -> Volume | SeriesAccumulator | None:
        """What was read ahead for ``key``, waiting for its read if it is running: the volume of
        exactly its files, or the slices of its series held so far (the caller reads the rest);
        None when there is none. A read-ahead of anything else is dropped (a volume job is
        starting, and it needs the memory), or, still running, dropped when it ends."""
        with self._lock:
            self._expire()
            entry = self._entry
            if entry is None:
                return None
            if entry.key[0] != key[0]:
                self._drop(entry, "a job of another series started")
                return None
            if not entry.slices and entry.key != key:
                self._drop(entry, "its series changed since")
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
    """A read-ahead being made: :meth:`done` hands its volume or slices over (or None when it
    failed); :attr:`held` is what an earlier read of the series left, for this one to add to."""

    def __init__(self, owner: PreloadedVolume, entry: _Entry, held: SeriesAccumulator | None = None) -> None:
        self._owner = owner
        self._entry = entry
        self.held = held

    @property
    def wanted(self) -> bool:
        """False once a job of another series dropped it: reading on is wasted."""
        return self._owner.is_current(self._entry)

    def done(self, volume: Volume | SeriesAccumulator | None) -> None:
        self._owner._finish(self._entry, volume)


def _count(outcome: str) -> None:
    metrics.VOLUME_PRELOADS.labels(outcome=outcome).inc()


_PROCESS = PreloadedVolume()


def process_preloaded() -> PreloadedVolume:
    """The read-ahead slot of this worker process."""
    return _PROCESS
