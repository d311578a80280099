"""A worker's bound on the memory its concurrent volume jobs hold at once.

An inference worker runs ``worker_concurrency`` jobs as threads of one process. Each job that
loads a CT or MR series into a volume holds memory in proportion to the series' pixels (a
2,000-slice 512² CT: 1 GB of int16, about 2 GB at the job's peak), so four such jobs at once could
take four times that. A :class:`VolumeBudget` makes each volume job reserve its estimated peak
before it loads the series, and a job whose reservation does not fit waits, in arrival order,
until running jobs give theirs back (``volume_memory_budget_mb`` in the config).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

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
