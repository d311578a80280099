"""Logging of mednode processes: one line per event, identified by UIDs and job ids only."""

from __future__ import annotations

import logging
import sys
import warnings

FORMAT = "%(asctime)s %(levelname)-7s %(processName)s %(name)s: %(message)s"


def configure_logging(level: str = "INFO") -> None:
    """Send log records of every library to stderr in one format (idempotent)."""
    root = logging.getLogger()
    if not any(getattr(h, "_mednode", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT))
        handler._mednode = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(level)
    # pynetdicom logs identifiers of data sets at DEBUG; mednode never turns that on
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    for noisy in ("sqlalchemy.engine", "amqp", "kombu", "multipart", "httpx", "highdicom", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # pydicom and highdicom quote attribute values in their warnings (a PatientName that is
    # "unlikely to represent the intended person name", an invalid IS value...): such values may
    # be patient data, so these warnings never reach a log
    warnings.filterwarnings("ignore", module=r"(pydicom|highdicom)(\..*)?$")
