"""De-identified and non-conformant variants of the shared samples, as real sources arrive.

Each variant rewrites a header the way an anonymiser or a scanner does, then goes through bytes
(written in the variant's character set, read back) so tests see what a file would hold. Values
are synthetic, and distinctive, so a test can look for them in logs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from io import BytesIO

import pydicom
from pydicom import config
from pydicom.dataset import Dataset

#: A de-identifier's hash in Patient's Birth Date (DA: 8 characters, YYYYMMDD).
HASHED_BIRTH_DATE = hashlib.sha256(b"mednode birth date canary").hexdigest()
#: A de-identifier's 56-character pseudonym in Accession Number (SH: 16 characters at most).
LONG_ACCESSION = hashlib.sha224(b"mednode accession canary").hexdigest()
assert len(LONG_ACCESSION) == 56


def hashed(ds: Dataset) -> None:
    """A Canon DX through a de-identifier: hashed birth date, 56-character accession, no Study ID."""
    ds.PatientBirthDate = HASHED_BIRTH_DATE
    ds.AccessionNumber = LONG_ACCESSION
    if "StudyID" in ds:
        del ds.StudyID


def missing_type2(ds: Dataset) -> None:
    """A scanner that leaves Type 2 elements out (Siemens CT without accession or birth date)."""
    for keyword in ("AccessionNumber", "PatientBirthDate", "StudyID", "ReferringPhysicianName",
                    "PatientSex", "StudyTime"):
        if keyword in ds:
            delattr(ds, keyword)


def garbled(ds: Dataset) -> None:
    """Values of the right length but not of their VR, and an over-long person name."""
    ds.PatientBirthDate = "19801341"  # month 13
    ds.StudyDate = "2024-1-5"  # not YYYYMMDD
    ds.StudyTime = "25:61"
    ds.PatientName = "Canary" * 12 + "^Garbled"  # a 72-character family name (PN: 64)
    ds.PatientAge = "45"  # AS is nnnD/W/M/Y
    ds.StudyID = "S" * 20  # SH: 16


def latin1(ds: Dataset) -> None:
    """ISO_IR 100 (Latin-1) names, with an over-long accession."""
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    ds.ReferringPhysicianName = "Français^Élodie"
    ds.AccessionNumber = LONG_ACCESSION


def gb18030(ds: Dataset) -> None:
    """GB18030 (Chinese) names, with a hashed birth date."""
    ds.SpecificCharacterSet = "GB18030"
    ds.PatientName = "王^小明"
    ds.StudyDescription = "胸部 CT 平扫"
    ds.PatientBirthDate = HASHED_BIRTH_DATE


def iso2022_japanese(ds: Dataset) -> None:
    """ISO 2022 IR 87 (Japanese kanji and hiragana), missing accession."""
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    if "AccessionNumber" in ds:
        del ds.AccessionNumber


VARIANTS: dict[str, Callable[[Dataset], None]] = {
    "hashed": hashed,
    "missing-type2": missing_type2,
    "garbled": garbled,
    "latin1": latin1,
    "gb18030": gb18030,
    "iso2022-ir87": iso2022_japanese,
}


def variant(ds: Dataset, name: str) -> Dataset:
    """``ds`` rewritten by variant ``name``, written to bytes and read back (a copy)."""
    settings = config.settings
    previous = settings.reading_validation_mode, settings.writing_validation_mode
    # invalid on purpose, and quietly (an element read from a file validates with the reading mode)
    settings.reading_validation_mode = settings.writing_validation_mode = config.IGNORE
    try:
        changed = pydicom.dcmread(BytesIO(_to_bytes(ds)))
        VARIANTS[name](changed)
        return pydicom.dcmread(BytesIO(_to_bytes(changed)))
    finally:
        settings.reading_validation_mode, settings.writing_validation_mode = previous


def _to_bytes(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()
