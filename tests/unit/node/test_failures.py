"""Job failure reasons name what is wrong with the input, quote no value, never 'internal error'."""

from __future__ import annotations

import hashlib
import io
import logging
import warnings

import numpy as np
import pytest
from pydicom import config
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.valuerep import DA

from inference.errors import InvalidInputError
from node.failures import failure_reason, redact
from node.logging_setup import RedactLibraryValues

HASH = hashlib.sha256(b"failure canary").hexdigest()


def raised(call) -> BaseException:  # type: ignore[no-untyped-def]
    with pytest.raises(Exception) as info:
        call()
    return info.value


def test_pydicom_value_error_names_pydicom_and_hides_the_value() -> None:
    exc = raised(lambda: DA(HASH))
    assert HASH in str(exc)  # pydicom quotes it
    reason = failure_reason(exc)
    assert reason.startswith("invalid input for pydicom (ValueError)")
    assert HASH not in reason and "'DA'" in reason


def test_missing_attribute_of_a_data_set_is_named() -> None:
    ds = Dataset()
    ds.PatientID = "ANON"
    reason = failure_reason(raised(lambda: ds.AccessionNumber))
    assert "lack the DICOM attribute AccessionNumber" in reason
    assert "internal error" not in reason


def test_numpy_error_is_input() -> None:
    reason = failure_reason(raised(lambda: np.linalg.inv(np.zeros((3, 3)))))
    assert reason.startswith("invalid input for numpy (LinAlgError)"), reason


def test_own_errors_keep_their_words() -> None:
    reason = failure_reason(InvalidInputError("the study has no CT series for this rule"))
    assert reason == "InvalidInputError: the study has no CT series for this rule"


def test_a_defect_says_where_and_not_internal_error() -> None:
    def broken() -> None:
        raise RuntimeError(f"state {HASH!r} lost")

    reason = failure_reason(raised(broken))
    assert reason.startswith("unexpected RuntimeError at test_failures.py:")
    assert "report it with this job's id" in reason and HASH not in reason


def test_redact_keeps_keywords_vrs_uids_and_tags() -> None:
    text = "Unable to convert 'Müller' to 'DA' for 'PatientBirthDate' in '1.2.3' at '(0010, 0030)'"
    assert redact(text) == "Unable to convert '…' to 'DA' for 'PatientBirthDate' in '1.2.3' at '(0010, 0030)'"


def test_pydicom_log_records_lose_their_values() -> None:
    """pydicom logs a bad value it reads with the value itself; the node's handler redacts it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(RedactLibraryValues())
    logger = logging.getLogger("pydicom")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            DataElement(0x00100030, "DA", HASH, validation_mode=config.WARN)
    finally:
        logger.removeHandler(handler)
    assert "Invalid value for VR DA: '…'" in stream.getvalue()
    assert HASH not in stream.getvalue()
