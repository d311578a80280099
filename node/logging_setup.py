"""Logging of mednode processes: one line per event, identified by UIDs and job ids only."""

from __future__ import annotations

import logging
import sys
import warnings

from node.failures import redact

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"
#: Libraries that quote attribute values in their log messages.
VALUE_QUOTING_LOGGERS = ("pydicom", "highdicom")


class RedactLibraryValues(logging.Filter):
    """Replace the values pydicom and highdicom quote in their log records by ``'…'``.

    pydicom validates each value it reads and logs a bad one with the value itself
    (``Invalid value for VR DA: '<a de-identifier's hash>'``) at WARNING, whatever
    warnings filter is set: that value may be patient data (:func:`node.failures.redact`).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".", 1)[0] in VALUE_QUOTING_LOGGERS:
            record.msg = redact(record.getMessage())
            record.args = None
        return True


def configure_logging(level: str = "INFO") -> None:
    """Send log records of every library to stderr in one format (idempotent)."""
    root = logging.getLogger()
    if not any(getattr(h, "_mednode", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler.addFilter(RedactLibraryValues())
        handler._mednode = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs identifiers of data sets at DEBUG; mednode never turns that on
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    for noisy in ("sqlalchemy.engine", "amqp", "kombu", "multipart", "httpx", "highdicom", "alembic",
                   "dicomweb_client", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom and highdicom quote attribute values in their warnings (a PatientName that is
    # "unlikely to represent the intended person name", an invalid IS value...): such values may
    # be patient data, so these warnings never reach a log
    warnings.filterwarnings("ignore", module=r"(pydicom|highdicom)(\..*)?$")
