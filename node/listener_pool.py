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
import subprocess
import sys
import threading
from pathlib import Path

from node import multiprocess_metrics
from node.config import Settings

log = logging.getLogger(__name__)

class ListenerPool:
    """Keeps ``count`` ``mednode listen`` children running; restarts one that exits."""

    def __init__(self, config_path: Path | None, count: int) -> None:
        self.command = [sys.executable, "-m", "node.cli", "listen"]
        if config_path is not None:
            self.command += ["--config", str(config_path)]
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * count
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="listener-pool", daemon=True)

    def start(self) -> None:
        for index in range(len(self.processes)):
            self._spawn(index)
        self._thread.start()

    def _spawn(self, index: int) -> None:
        from node.service import PARENT_PID_ENV

        env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
        process = subprocess.Popen(self.command, env=env)
        self.processes[index] = process
        log.info("started listener process %d", process.pid)

    def _watch(self) -> None:
        while not self._stop.wait(2.0):
            for index, process in enumerate(self.processes):
                if process is not None and process.poll() is not None and not self._stop.is_set():
                    log.error("listener process %d exited with %s; restarting it", process.pid, process.returncode)
                    multiprocess_metrics.mark_process_dead(process.pid)
                    self._spawn(index)

    def stop(self) -> None:
        self._stop.set()
        running = [p for p in self.processes if p is not None and p.poll() is None]
        for process in running:
            process.terminate()
        for process in running:
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            multiprocess_metrics.mark_process_dead(process.pid)


def run_listener(settings: Settings) -> None:
    """The body of ``mednode listen``: serve the DICOM port(s) beside ``serve`` until SIGTERM.

    The index is migrated and the store repaired by ``serve`` before it starts this process.
    """
    multiprocess_metrics.enable(settings.data_dir, clean=False)  # before any metric is created
    import multiprocessing

    multiprocessing.current_process().name = f"listener-{os.getpid()}"  # names this process in logs
    from node import context
    from node.completion import late_series_check
    from node.ingest import Ingestor
    from node.service import PARENT_PID_ENV, die_with_parent, start_listeners

    parent = os.environ.pop(PARENT_PID_ENV, None)
    if parent is not None:
        die_with_parent(int(parent))
    context.configure(settings)
    ctx = context.current()
    ingestor = Ingestor(ctx.store, ctx.sessions, late_series_check(settings.effective_rules))
    servers = start_listeners(settings, ingestor, reuse_port=True)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    stop.wait()
    for server in servers:
        server.shutdown()
    ctx.close()
