"""A worker's bound on the memory its concurrent volume jobs hold at once.

An inference worker runs ``worker_concurrency`` jobs as threads of one process. Each job that
loads a CT or MR series into a volume holds memory in proportion to the series' pixels (a
2,000-slice 512² CT: 1 GB of int16, about 2 GB at the job's peak), so four such jobs at once could
take four times that. A :class:`VolumeBudget` makes each volume job reserve its estimated peak
before it loads the series, and a job whose reservation does not fit waits, in arrival order,
until running jobs give theirs back (``volume_memory_budget_mb`` in the config).

The budget is a setting, and a job larger than all of it still runs (alone). What no setting can
give is memory the worker does not have: :func:`memory_limit_bytes` is the most this process can
hold (its machine's memory or its container's limit), so a series that could never fit fails its
job with the reason instead of the kernel killing the worker, and every job running in it, part
way through.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

MB = 1024 * 1024


class VolumeBudget:
    """Reservations of bytes against a limit, granted in arrival order.

    Parameters
    ----------
    limit_bytes
        Most bytes reserved at once; None: no bound (reservations never wait).

    A reservation larger than the whole limit is granted once it is alone (refusing it would
    fail a study because of a setting); it then holds the whole budget.
    """

    def __init__(self, limit_bytes: int | None) -> None:
        self.limit_bytes = limit_bytes
        self._held = 0
        self._condition = threading.Condition()
        self._tickets = itertools.count()
        self._serving = 0  # the ticket whose turn it is: later arrivals wait behind it
        self._waiting = 0

    @property
    def held_bytes(self) -> int:
        """Bytes reserved now."""
        with self._condition:
            return self._held

    @property
    def waiting(self) -> int:
        """Reservations waiting for their turn or for memory now."""
        with self._condition:
            return self._waiting

    @contextmanager
    def reserve(self, nbytes: int, job_key: str) -> Iterator[float]:
        """Hold ``nbytes`` of the budget while the block runs; yields the seconds waited for it."""
        if self.limit_bytes is None:
            yield 0.0
            return
        amount = min(max(0, nbytes), self.limit_bytes)
        started = time.perf_counter()
        with self._condition:
            ticket = next(self._tickets)
            logged = False
            self._waiting += 1
            while ticket != self._serving or (self._held and self._held + amount > self.limit_bytes):
                if not logged and ticket == self._serving:
                    log.info("%s: waits for %d MB of the volume memory budget (%d of %d MB held)",
                             job_key, amount // MB, self._held // MB, self.limit_bytes // MB)
                    logged = True
                self._condition.wait()
            self._waiting -= 1
            self._held += amount
            self._serving += 1
            self._condition.notify_all()
        waited_s = time.perf_counter() - started
        if logged:
            log.info("%s: got its volume memory after %.1f s", job_key, waited_s)
        try:
            yield waited_s
        finally:
            with self._condition:
                self._held -= amount
                self._condition.notify_all()


_BUDGET: VolumeBudget | None = None
_BUDGET_LOCK = threading.Lock()


def process_budget(limit_bytes: int | None) -> VolumeBudget:
    """The budget this process's jobs share (made anew when the configured limit changes)."""
    global _BUDGET
    with _BUDGET_LOCK:
        if _BUDGET is None or _BUDGET.limit_bytes != limit_bytes:
            _BUDGET = VolumeBudget(limit_bytes)
        return _BUDGET


def memory_limit_bytes(root: Path = Path("/")) -> int | None:
    """The most memory this process can hold: its machine's (``MemTotal``) or the tightest
    memory limit of its control group and their parents (cgroup v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), whichever is lower; None when none can be read.

    ``root`` is where ``/proc`` and ``/sys`` are found (a test's copy of them).
    """
    limits = [limit for limit in (_mem_total(root), _cgroup_limit(root)) if limit is not None]
    return min(limits) if limits else None


def resident_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm", encoding="ascii") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _mem_total(root: Path) -> int | None:
    try:
        for line in (root / "proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_limit(root: Path) -> int | None:
    try:
        lines = (root / "proc/self/cgroup").read_text(encoding="ascii").splitlines()
    except OSError:
        return None
    limits: list[int] = []
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":  # v2: one unified hierarchy
            base, name = root / "sys/fs/cgroup", "memory.max"
        elif "memory" in controllers.split(","):  # v1: the memory controller's hierarchy
            base, name = root / "sys/fs/cgroup/memory", "memory.limit_in_bytes"
        else:
            continue
        group = Path(path.strip("/"))
        for directory in (group, *group.parents):  # a parent's limit binds its children too
            limit = _limit_file(base / directory / name)
            if limit is not None:
                limits.append(limit)
    return min(limits) if limits else None


def _limit_file(path: Path) -> int | None:
    try:
        text = path.read_text(encoding="ascii").strip()
    except OSError:
        return None
    if not text.isdigit():  # "max": no limit
        return None
    value = int(text)
    return value if value < 1 << 60 else None  # v1 writes "no limit" as a page-rounded 2**63 - 1
