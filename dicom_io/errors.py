"""Exceptions raised by :mod:`dicom_io`.

Every exception derives from :class:`DicomIOError` and from the matching built-in,
so callers may catch either the package base or the built-in.
"""

from __future__ import annotations


class DicomIOError(Exception):
    """Base class of every error raised by :mod:`dicom_io`."""


class InvalidInstanceError(DicomIOError, ValueError):
    """A DICOM instance cannot be read or lacks what the operation needs."""


class InconsistentSeriesError(DicomIOError, ValueError):
    """The instances of a series do not form one regular volume."""


class ValidatorUnavailableError(DicomIOError, RuntimeError):
    """An external DICOM validator (e.g. ``dciodvfy``) is not installed."""
