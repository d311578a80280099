"""Why a job failed: words that name what is wrong with its input, and no patient data.

A job's failure reason is shown on the dashboard and logged. Errors mednode raises on purpose
(:class:`~inference.errors.InferenceError`, :class:`~dicom_io.errors.DicomIOError`) already say
what is wrong and quote no attribute value. Errors that pydicom, highdicom or numpy raise on
input they cannot take do quote values (``Unable to convert '<a hash>' to 'DA' object``), and
an ``AttributeError`` from a data set names only the missing keyword: :func:`failure_reason`
turns each into a sentence about the input, with quoted values replaced by ``'…'``.
"""

from __future__ import annotations

import re
import traceback
from pathlib import PurePath

from pydicom.datadict import keyword_dict

from dicom_io.errors import DicomIOError
from inference.errors import InferenceError

#: Libraries whose errors are about the data they were given.
INPUT_LIBRARIES = ("pydicom", "highdicom", "numpy", "scipy", "SimpleITK", "nibabel", "PIL")
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_NO_ATTRIBUTE = re.compile(r"'(\w*Dataset)' object has no attribute '(\w+)'")
#: Quoted words that are not patient data: DICOM keywords, VRs, UIDs and tags.
_VRS = frozenset({
    "AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV",
    "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV",
})


def redact(text: str) -> str:
    """``text`` with each quoted value replaced by ``'…'``, except DICOM keywords, VRs and UIDs."""

    def keep_or_hide(match: re.Match[str]) -> str:
        inner = match.group(0)[1:-1]
        if inner in keyword_dict or inner in _VRS or re.fullmatch(r"[0-9.]+|\(?[0-9A-Fa-f]{4}, ?[0-9A-Fa-f]{4}\)?", inner):
            return match.group(0)
        return "'…'"

    return _QUOTED.sub(keep_or_hide, text)


def _origin(exc: BaseException) -> tuple[str | None, str]:
    """The library of the innermost frame that raised ``exc`` (``None`` if not one of
    :data:`INPUT_LIBRARIES`) and that frame as ``module.py:line``."""
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None, "?"
    last = frames[-1]
    where = f"{PurePath(last.filename).name}:{last.lineno}"
    for frame in reversed(frames):
        parts = PurePath(frame.filename).parts
        for library in INPUT_LIBRARIES:
            if library in parts:
                return library, where
    return None, where


def failure_reason(exc: BaseException) -> str:
    """What to record as the reason ``exc`` failed a job: what is wrong with the input.

    Examples: ``the source images lack the DICOM attribute FrameOfReferenceUID (Type 1 for
    this task)``; ``invalid input for highdicom: Source images have no Frame Of Reference UID,
    but it is required by the IOD.``; ``the series does not fit in this worker's memory``.
    Only an error raised by mednode's own code outside those cases — a defect — is reported as
    ``unexpected <Type> at <file:line>``, to be reported with the job id.
    """
    message = redact(str(exc)).strip()
    if isinstance(exc, InferenceError | DicomIOError):
        return f"{type(exc).__name__}: {message}"
    if isinstance(exc, MemoryError):
        return ("the series does not fit in this worker's memory: give the worker more memory, or route "
                "smaller series to this rule")
    missing = _NO_ATTRIBUTE.search(str(exc)) if isinstance(exc, AttributeError) else None
    if missing is not None:
        return (f"the source images lack the DICOM attribute {missing.group(2)}, which this task needs: "
                "fix the sender or its de-identification profile")
    library, where = _origin(exc)
    if library is not None:
        return f"invalid input for {library} ({type(exc).__name__}): {message or 'no detail given'}"
    if isinstance(exc, ValueError | KeyError | LookupError | TypeError | ArithmeticError):
        return f"invalid input ({type(exc).__name__} at {where}): {message or 'no detail given'}"
    return (f"unexpected {type(exc).__name__} at {where}: {message or 'no detail given'} — a mednode "
            "defect: report it with this job's id")
