"""dcmtk command-line peers: storescu, dcmsend, echoscu as calls; storescp as a managed process.

All of them run with ``TCP_NODELAY=1`` (see :mod:`tests.peers.processes`). The send helpers
return a :class:`subprocess.CompletedProcess` subclass that also carries one
:class:`FileStatus` per file, parsed from storescu's ``-v`` output or dcmsend's report file.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from tests.peers.ports import LOOPBACK, free_port
from tests.peers.processes import ManagedProcess, find_tool, peer_env


@dataclass(frozen=True)
class FileStatus:
    """Outcome of sending one file.

    Attributes
    ----------
    path
        The file as given to the tool.
    status
        The tool's words for the response (``"Success"``, ``"0x0000 (Success)"``, an error
        line), or ``"not sent"``.
    ok
        True for a Success response (warnings count as not ok so tests notice them).
    """

    path: str
    status: str
    ok: bool


class SendResult(subprocess.CompletedProcess[str]):
    """A finished dcmtk send: the usual fields plus ``statuses``, one per file in send order."""

    statuses: list[FileStatus]

    def __init__(self, done: subprocess.CompletedProcess[str], statuses: list[FileStatus]) -> None:
        super().__init__(done.args, done.returncode, done.stdout, done.stderr)
        self.statuses = statuses

    @property
    def all_ok(self) -> bool:
        """True when the tool exited 0 and every file got a Success response."""
        return self.returncode == 0 and bool(self.statuses) and all(s.ok for s in self.statuses)

    def describe(self) -> str:
        """Return a short text for assertion messages: exit status, failures, output tail."""
        bad = [s for s in self.statuses if not s.ok]
        return (
            f"exit {self.returncode}; {len(self.statuses)} files, {len(bad)} not ok "
            f"{bad[:5]}\n{(self.stdout or '')[-3000:]}{(self.stderr or '')[-2000:]}"
        )


_SENDING = re.compile(r"^I: Sending file: (?P<path>.+)$")
_RESPONSE = re.compile(r"^I: Received Store Response \((?P<status>.+)\)\s*$")
_ERROR = re.compile(r"^[EF]: (?P<msg>.+)$")


def parse_storescu_output(text: str) -> list[FileStatus]:
    """Turn ``storescu -v`` output into one :class:`FileStatus` per file it started to send."""
    statuses: list[FileStatus] = []
    current: str | None = None
    error: str | None = None
    for line in text.splitlines():
        if match := _SENDING.match(line):
            if current is not None:
                statuses.append(FileStatus(current, error or "not sent", False))
            current, error = match["path"], None
        elif current is not None and (match := _RESPONSE.match(line)):
            status = match["status"]
            statuses.append(FileStatus(current, status, status == "Success"))
            current = None
        elif current is not None and (match := _ERROR.match(line)) and error is None:
            error = match["msg"]
    if current is not None:
        statuses.append(FileStatus(current, error or "not sent", False))
    return statuses


def parse_dcmsend_report(text: str) -> list[FileStatus]:
    """Turn a ``dcmsend --create-report-file`` report into one :class:`FileStatus` per file."""
    statuses: list[FileStatus] = []
    path: str | None = None
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "Filename":
            if path is not None:
                statuses.append(FileStatus(path, "not sent", False))
            path = value
        elif key == "DIMSE Status" and path is not None:
            statuses.append(FileStatus(path, value, value.startswith("0x0000")))
            path = None
    if path is not None:
        statuses.append(FileStatus(path, "not sent", False))
    return statuses


def _run(argv: Sequence[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        errors="replace",
        env=peer_env(),
        timeout=timeout_s,
        check=False,
        stdin=subprocess.DEVNULL,
    )


def storescu(
    host: str,
    port: int,
    files: Iterable[Path | str],
    aet: str = "STORESCU",
    called: str = "MEDNODE",
    extra: Sequence[str] = (),
    timeout_s: float = 300.0,
) -> SendResult:
    """Send ``files`` over one association with dcmtk ``storescu -v``.

    storescu proposes uncompressed transfer syntaxes only (it converts files to Explicit VR
    LE); use :func:`dcmsend` to send compressed files as they are. Pass directories with
    ``extra=["+sd"]`` to scan them. Parsing stops at the first failure storescu aborts on.
    """
    argv = [find_tool("storescu"), "-v", "-aet", aet, "-aec", called, *extra, host, str(port)]
    done = _run([*argv, *[str(f) for f in files]], timeout_s)
    return SendResult(done, parse_storescu_output(done.stdout + done.stderr))


def dcmsend(
    host: str,
    port: int,
    files: Iterable[Path | str],
    aet: str = "DCMSEND",
    called: str = "MEDNODE",
    extra: Sequence[str] = (),
    report_path: Path | None = None,
    timeout_s: float = 300.0,
) -> SendResult:
    """Send ``files`` with dcmtk ``dcmsend``, which proposes each file's own transfer syntax.

    The per-file statuses come from dcmsend's report file (written to ``report_path``, or a
    temporary file next to nothing when None).
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dcmsend-") as tmp:
        report = Path(report_path) if report_path else Path(tmp) / "report.txt"
        argv = [
            find_tool("dcmsend"),
            "-v",
            "-aet",
            aet,
            "-aec",
            called,
            "--create-report-file",
            str(report),
            *extra,
            host,
            str(port),
        ]
        done = _run([*argv, *[str(f) for f in files]], timeout_s)
        text = report.read_text(errors="replace") if report.exists() else ""
    return SendResult(done, parse_dcmsend_report(text))


def echoscu(
    host: str,
    port: int,
    aet: str = "ECHOSCU",
    called: str = "MEDNODE",
    timeout_s: float = 30.0,
) -> subprocess.CompletedProcess[str]:
    """C-ECHO ``called`` at ``host:port``; exit status 0 means the peer answered Success."""
    return _run([find_tool("echoscu"), "-aet", aet, "-aec", called, host, str(port)], timeout_s)


class StoreSCP(ManagedProcess):
    """dcmtk ``storescp`` (no ``--fork``) writing every received instance to ``output_dir``.

    Parameters
    ----------
    output_dir
        Where received files go (created if missing), named ``<modality>.<SOPInstanceUID>``.
    log_dir
        Directory for ``storescp.log``; defaults to the parent of ``output_dir``.
    port
        Listening port; a free one when None.
    aet
        Its AE title.
    extra
        More storescp options, e.g. ``["--ignore"]`` to receive without writing.
    accept_all
        Accept every storage SOP class in every transfer syntax (``+xa``); False for
        ``extra=["-xf", config, profile]``, which storescp allows only without it.
    """

    def __init__(
        self,
        output_dir: Path,
        log_dir: Path | None = None,
        port: int | None = None,
        aet: str = "STORESCP",
        extra: Sequence[str] = (),
        accept_all: bool = True,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.port = port or free_port()
        self.aet = aet
        self.host = LOOPBACK
        argv = [
            find_tool("storescp"),
            "-v",
            "-aet",
            aet,
            "-od",
            str(self.output_dir),
            *(["+xa"] if accept_all else []),
            *extra,
            str(self.port),
        ]
        super().__init__(argv, log_dir=log_dir or self.output_dir.parent, name=f"storescp-{aet}")

    def start(self, port: int | None = None, host: str = LOOPBACK, timeout_s: float = 30.0) -> Self:
        """Create the output directory, start storescp and wait until its port accepts."""
        self.output_dir.mkdir(parents=True, exist_ok=True)
        super().start(port=port or self.port, host=host, timeout_s=timeout_s)
        return self

    def __enter__(self) -> Self:
        return self.start()

    def received(self) -> list[Path]:
        """Return the files written so far, sorted by name."""
        return sorted(p for p in self.output_dir.iterdir() if p.is_file())
