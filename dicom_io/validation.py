"""Validate DICOM files with David Clunie's ``dciodvfy`` (Debian package dicom3tools)."""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from dicom_io.errors import ValidatorUnavailableError

logger = logging.getLogger(__name__)

_INSTALL_HINT = "install it with `apt-get install dicom3tools` (Debian/Ubuntu) or `make peers`"


@dataclass
class ValidationReport:
    """What ``dciodvfy`` said about one file.

    Attributes
    ----------
    errors
        Lines starting with ``Error``: the file violates its IOD.
    warnings
        Lines starting with ``Warning``: dubious but allowed.
    """

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether there is no error."""
        return not self.errors


def run_dciodvfy(path: str | Path, *, timeout_s: float = 120.0) -> ValidationReport:
    """Check ``path`` against its IOD with ``dciodvfy``.

    ``dciodvfy`` checks modules and attributes, not SR templates: also read SR/SEG
    back with highdicom to check their content.

    Raises
    ------
    ValidatorUnavailableError
        If ``dciodvfy`` is not on ``PATH``.
    FileNotFoundError
        If ``path`` does not exist.
    """
    executable = shutil.which("dciodvfy")
    if executable is None:
        raise ValidatorUnavailableError(f"dciodvfy is not on PATH: {_INSTALL_HINT}.")
    file_path = Path(path)
    if not file_path.is_file():
        raise FileNotFoundError(f"no file to validate at {file_path}")
    completed = subprocess.run(
        [executable, "-new", str(file_path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout_s,
        check=False,
    )
    report = ValidationReport()
    for line in (completed.stderr + completed.stdout).splitlines():
        stripped = line.strip()
        if stripped.startswith("Error"):
            report.errors.append(stripped)
        elif stripped.startswith("Warning"):
            report.warnings.append(stripped)
    if completed.returncode != 0 and not report.errors:
        report.errors.append(
            f"dciodvfy exited with status {completed.returncode}: {completed.stderr.strip()[:500]}"
        )
    return report
