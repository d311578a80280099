"""Listener processes beside ``mednode serve``: one DICOM port served by several processes.

One Python process receives at about one core's speed (the GIL). With ``listener_processes: N``,
``serve`` listens itself and starts N-1 ``mednode listen`` children; all bind the port with
``SO_REUSEPORT`` and the kernel gives each new association to one of them. They share nothing but
the index (PostgreSQL: :func:`storage.index.index_instance` takes concurrent first instances of
a study) and the store (partial files name their process: :mod:`storage.store`). Completion,
the web and the workers stay in ``serve``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from pathlib import Path

from node import multiprocess_metrics
from node.children import PARENT_PID_ENV, Children
from node.config import Settings
from node.stacks import dump_stacks_on_sigusr1

log = logging.getLogger(__name__)

class ListenerPool(Children):
    """Keeps ``count`` ``mednode listen`` children running; restarts one that exits."""

    def __init__(self, config_path: Path | None, count: int) -> None:
        command = [sys.executable, "-m", "node.cli", "listen"]
        if config_path is not None:
            command += ["--config", str(config_path)]
        super().__init__([command] * count, "listener process")


def run_listener(settings: Settings) -> None:
    """The body of ``mednode listen``: serve the DICOM port(s) beside ``serve`` until SIGTERM.

    The index is migrated and the store repaired by ``serve`` before it starts this process.
    """
    dump_stacks_on_sigusr1()
    multiprocess_metrics.enable(settings.data_dir, clean=False)  # before any metric is created
    import multiprocessing

    multiprocessing.current_process().name = f"listener-{os.getpid()}"  # names this process in logs
    from node import context
    from node.collector import freeze_start_up_objects
    from node.completion import late_series_check
    from node.ingest import Ingestor
    from node.service import die_with_parent, start_listeners

    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent is not None:
        die_with_parent(int(parent))
    context.configure(settings)
    ctx = context.current()
    ingestor = Ingestor(ctx.store, ctx.sessions, late_series_check(settings.effective_rules))
    servers = start_listeners(settings, ingestor, reuse_port=True)
    # full collections walked them on the associations' threads (0.1–0.5 s each)
    freeze_start_up_objects(full_collection_every=None)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    for server in servers:
        server.shutdown()
    ingestor.close()
    ctx.close()
