"""Prometheus metrics shared by every process of a node: the listener, the web and each worker.

Job, stage and delivery histograms and model load times are observed in worker processes, while
``/metrics`` is served by the web process. ``prometheus_client``'s multiprocess mode makes each
process write its samples to memory-mapped files in one directory, which the web process sums at
each scrape. The directory is ``<data_dir>/metrics``: ``data_dir`` is already shared by the listener
and every worker (one host, or one volume in ``docker-compose.yml``), so no extra set-up is needed.

``PROMETHEUS_MULTIPROC_DIR`` must be set before ``prometheus_client`` creates any metric in a
process, so :func:`enable` runs first thing in ``mednode serve`` and ``mednode worker`` (worker
children of ``serve`` inherit the variable). Each process's files are named by
:func:`process_identifier` — host name and PID — because containers sharing the volume all have
small, colliding PIDs.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
DIRNAME = "metrics"


def process_identifier(pid: int | None = None) -> str:
    """``<host>-<pid>``: unique across containers that share the metrics directory.

    ``prometheus_client`` splits file names on ``_``, so none may appear in the identifier.
    """
    return f"{socket.gethostname()}-{os.getpid() if pid is None else pid}".replace("_", "-")


def enable(data_dir: Path, *, clean: bool) -> Path | None:
    """Make this process (and the children it starts) write metrics to ``<data_dir>/metrics``.

    Parameters
    ----------
    data_dir
        The node's data directory, shared by the listener and every worker.
    clean
        Delete the metric files there first. Only a process that starts every other writer after this
        call may do so (``mednode serve`` with its embedded workers): files of processes still
        running elsewhere would be lost. Files of exited processes are otherwise kept, and their
        counts stay in the totals (counters and histograms never go backwards).

    Returns
    -------
    Path or None
        The directory, or None when this process already created its metrics in memory (it
        imported :mod:`node.metrics` first, as in-process tests do): then ``/metrics`` shows this
        process's own samples only.
    """
    if "node.metrics" in sys.modules and os.environ.get(ENV) is None:
        log.warning("metrics were created before the multiprocess directory was set; "
                    "/metrics shows this process only")
        return None
    directory = Path(os.environ.get(ENV) or data_dir / DIRNAME)
    directory.mkdir(parents=True, exist_ok=True)
    if clean:  # the metric files only: the directory may be one an administrator named
        for stale in directory.glob("*.db"):
            stale.unlink(missing_ok=True)
    os.environ[ENV] = str(directory)
    from prometheus_client import values

    # the class is read when each metric is created, so this covers every metric made from now on;
    # it also re-opens the files after a fork (Celery's prefork pool), as the default does
    values.ValueClass = values.MultiProcessValue(process_identifier=process_identifier)
    return directory


def mark_process_dead(pid: int) -> None:
    """Drop the live-gauge files of an exited process (its counters and histograms stay)."""
    directory = os.environ.get(ENV)
    if directory is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(process_identifier(pid), directory)  # type: ignore[no-untyped-call]
