"""Real peer processes for tests and benchmarks: start, wait until ready, stop by PID.

Every process started here gets ``TCP_NODELAY=1`` in its environment: dcmtk (and Orthanc, which
is built on it) leaves Nagle's algorithm on without it, and each C-STORE response then waits
~40 ms, so a test or benchmark would measure Nagle instead of the code under test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self

from tests.peers.ports import LOOPBACK, port_accepts

TRUTHY = {"1", "true", "yes", "on"}


class PeerError(RuntimeError):
    """A real peer (dcmtk, Orthanc, mednode) could not be started, reached or stopped."""


class ToolMissingError(PeerError, FileNotFoundError):
    """An external program needed by a test or benchmark is not on PATH."""


def in_ci() -> bool:
    """Return True when the environment variable ``CI`` is set to a truthy value."""
    return os.environ.get("CI", "").strip().lower() in TRUTHY


def peer_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Return a copy of the current environment with ``TCP_NODELAY=1`` and ``extra`` applied."""
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    if extra:
        env.update(extra)
    return env


def find_tool(name: str) -> str:
    """Return the absolute path of program ``name`` on PATH (``/usr/sbin`` included).

    Raises
    ------
    ToolMissingError
        If the program is not installed.
    """
    search = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin"])
    path = shutil.which(name, path=search)
    if path is None:
        raise ToolMissingError(
            f"{name!r} is not installed; run `make peers` as root (Debian packages orthanc, "
            "orthanc-dicomweb, dcmtk, dicom3tools) or install it by hand"
        )
    return path


def require_tool(name: str) -> str:
    """Return the path of program ``name``, or end the current test if it is missing.

    Outside CI a missing tool skips the test so a developer without the Debian peers can still
    run the rest; with ``CI`` truthy it fails the test, because a real-peer test must never
    silently skip there.
    """
    import pytest

    try:
        return find_tool(name)
    except ToolMissingError as exc:
        if in_ci():
            pytest.fail(f"CI must have every real peer: {exc}")
        pytest.skip(str(exc))
    raise AssertionError("unreachable")  # pragma: no cover - pytest.skip/fail raise


class ManagedProcess:
    """A subprocess whose output goes to a log file and which is stopped by its PID.

    Parameters
    ----------
    argv
        Program and arguments.
    log_dir
        Directory for ``<name>.log`` (stdout and stderr together).
    name
        Short label used in the log file name and in error messages.
    env
        Variables added to a copy of the current environment; ``TCP_NODELAY=1`` is always set.
    cwd
        Working directory of the process.

    Notes
    -----
    The process runs in its own session so that a Ctrl-C in the test runner does not reach it
    before :meth:`stop` does; :meth:`stop` signals only this PID, never a process name.
    """

    def __init__(
        self,
        argv: Sequence[str],
        log_dir: Path,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = [str(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        self.log_dir = Path(log_dir)
        self.log_path = self.log_dir / f"{self.name}.log"
        self.env = peer_env(env)
        self.cwd = cwd
        self._popen: subprocess.Popen[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------
    def start(self, port: int | None = None, host: str = LOOPBACK, timeout_s: float = 30.0) -> Self:
        """Start the process; if ``port`` is given, wait until it accepts TCP connections."""
        if self._popen is not None:
            raise PeerError(f"{self.name} was already started (pid {self._popen.pid})")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.cwd,
                start_new_session=True,
            )
        if port is not None:
            self.wait_for_port(port, host=host, timeout_s=timeout_s)
        return self

    def wait_for_port(self, port: int, host: str = LOOPBACK, timeout_s: float = 30.0) -> None:
        """Wait until ``host:port`` accepts a TCP connection.

        Raises
        ------
        PeerError
            If the process exits first or the port does not open within ``timeout_s``; the
            message carries the end of the process log.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.is_running:
                raise PeerError(
                    f"{self.name} exited with status {self.returncode} before port {port} "
                    f"opened; log {self.log_path}:\n{self.log_tail()}"
                )
            if port_accepts(port, host):
                return
            time.sleep(0.05)
        raise PeerError(
            f"{self.name} (pid {self.pid}) did not accept on {host}:{port} within "
            f"{timeout_s:.0f} s; log {self.log_path}:\n{self.log_tail()}"
        )

    def stop(self, timeout_s: float = 15.0) -> int | None:
        """Send SIGTERM to the PID, wait up to ``timeout_s``, then SIGKILL; return the exit status.

        Safe to call twice and on a process that already exited.
        """
        popen = self._popen
        if popen is None:
            return None
        if popen.poll() is None:
            try:
                os.kill(popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                return popen.wait()  # it exited between poll() and kill()
            try:
                popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(popen.pid, signal.SIGKILL)
                popen.wait(timeout=10)
        return popen.returncode

    # -- state -----------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """PID of the process, or None before :meth:`start`."""
        return None if self._popen is None else self._popen.pid

    @property
    def returncode(self) -> int | None:
        """Exit status once the process has ended, else None."""
        return None if self._popen is None else self._popen.poll()

    @property
    def is_running(self) -> bool:
        """True between a successful start and the end of the process."""
        return self._popen is not None and self._popen.poll() is None

    def log_text(self) -> str:
        """Return the whole log written so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n_chars: int = 4000) -> str:
        """Return the last ``n_chars`` characters of the log."""
        return self.log_text()[-n_chars:]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} pid={self.pid} running={self.is_running}>"
