"""Fast network polling while an association is busy, pynetdicom's default while it is idle.

pynetdicom's DUL thread polls the socket and its queues, and sleeps ``_run_loop_delay`` (1 ms)
after every pass that found nothing to do (its own comment calls this a trade-off between idle
CPU and latency, with a TODO to make it event based). A C-STORE crosses that sleep several
times — the next PDU not arrived yet, the C-STORE response queued while the thread sleeps — which
was about 1 ms of the 2.8 ms a 512×512 CT took to receive over loopback with an empty handler
(docs/BENCHMARKS.md). :class:`BusyPolling` shortens the delay of an association as soon as it
receives a PDU and gives the default back once it has been quiet for ``idle_after_s``, so an
idle association costs what pynetdicom's default costs.

The delay is a private attribute of pynetdicom's ``DULServiceProvider``; if a release drops it,
the listener logs one warning and keeps pynetdicom's own polling (slower, still correct).
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

log = logging.getLogger(__name__)

#: The DUL attribute holding the sleep between idle passes (pynetdicom 2.x and 3.x).
DELAY_ATTRIBUTE = "_run_loop_delay"


class BusyPolling:
    """Keeps the DUL polling delay short for associations that received a PDU recently.

    Bind :meth:`on_pdu_received` to ``evt.EVT_PDU_RECV``. A reaper thread runs only while some
    association is busy: it restores the default delay of associations quiet for
    ``idle_after_s`` (or gone) and exits when none is left.

    Parameters
    ----------
    busy_delay_s
        Sleep between idle passes while busy (pynetdicom's default is 0.001).
    idle_after_s
        Quiet time after which an association gets its default delay back.
    """

    def __init__(self, busy_delay_s: float = 0.0001, idle_after_s: float = 0.1) -> None:
        self.busy_delay_s = busy_delay_s
        self.idle_after_s = idle_after_s
        self._lock = threading.Lock()
        #: dul -> (its default delay, monotonic time of its last PDU)
        self._busy: dict[Any, tuple[float, float]] = {}
        self._reaper: threading.Thread | None = None
        self._warned = False

    def on_pdu_received(self, event: Any) -> None:
        """``EVT_PDU_RECV`` handler: mark the association busy."""
        dul = event.assoc.dul
        now = time.monotonic()
        with self._lock:
            entry = self._busy.get(dul)
            if entry is not None:
                self._busy[dul] = (entry[0], now)
                return
            default = getattr(dul, DELAY_ATTRIBUTE, None)
            if not isinstance(default, float):
                self._warn_once()
                return
            setattr(dul, DELAY_ATTRIBUTE, min(default, self.busy_delay_s))
            self._busy[dul] = (default, now)
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="dul-polling", daemon=True)
                self._reaper.start()

    def busy_count(self) -> int:
        """Associations currently polled fast."""
        with self._lock:
            return len(self._busy)

    def _reap(self) -> None:
        while True:
            time.sleep(self.idle_after_s / 2)
            now = time.monotonic()
            with self._lock:
                for dul, (default, last) in list(self._busy.items()):
                    if now - last >= self.idle_after_s or not dul.is_alive():
                        setattr(dul, DELAY_ATTRIBUTE, default)
                        del self._busy[dul]
                if not self._busy:
                    self._reaper = None
                    return

    def _warn_once(self) -> None:
        if not self._warned:
            self._warned = True
            log.warning(
                "pynetdicom's DUL has no float %s: keeping its default polling "
                "(C-STORE receive will be slower)",
                DELAY_ATTRIBUTE,
            )
