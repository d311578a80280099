"""Child processes of ``mednode serve`` that it keeps running: the embedded workers
(:class:`node.service.WorkerSupervisor`) and the extra listeners (:class:`node.listener_pool.ListenerPool`).

Each child gets :data:`PARENT_PID_ENV` and ties its life to ``serve`` (:func:`node.service.die_with_parent`);
one that exits unexpectedly is restarted, and its metrics files are marked dead so that ``/metrics``
keeps its counts but not its gauges.
"""

from __future__ import annotations

import logging
import os
import subprocess
import threading

from node import multiprocess_metrics

log = logging.getLogger(__name__)

#: Set by ``mednode serve`` for its children: each ties its life to that PID.
PARENT_PID_ENV = "MEDNODE_PARENT_PID"


class Children:
    """Keeps one process per command running until :meth:`stop`.

    Parameters
    ----------
    commands
        One argument vector per child.
    kind
        What the children are, for thread names and log lines (``embedded worker``, ``listener process``).
    """

    def __init__(self, commands: list[list[str]], kind: str) -> None:
        self.commands = commands
        self.kind = kind
        self.processes: list[subprocess.Popen[bytes] | None] = [None] * len(commands)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=kind.replace(" ", "-"), daemon=True)

    def start(self) -> None:
        for index in range(len(self.commands)):
            self._spawn(index)
        self._thread.start()

    def describe(self, index: int) -> str:
        """What child ``index`` is, for the log line that starts it."""
        return self.kind

    def _spawn(self, index: int) -> None:
        env = {**os.environ, PARENT_PID_ENV: str(os.getpid())}
        process = subprocess.Popen(self.commands[index], env=env)
        self.processes[index] = process
        log.info("started %s (pid %d)", self.describe(index), process.pid)

    def _watch(self) -> None:
        while not self._stop.wait(2.0):
            for index, process in enumerate(self.processes):
                if process is not None and process.poll() is not None and not self._stop.is_set():
                    log.error("%s %d exited with %s; restarting it", self.kind, process.pid, process.returncode)
                    multiprocess_metrics.mark_process_dead(process.pid)
                    self._spawn(index)

    def stop(self) -> None:
        """Stop watching, ask every child to end (SIGTERM), and kill one that takes over 20 s."""
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
