"""Header values read straight from their raw bytes (the listener's fast path) are exactly what
pydicom's conversion gives, for plain values and for every value the fast path leaves to pydicom:
padding, empty and absent values, several values, non-ASCII text in single-byte, UTF-8 and
ISO 2022 character sets, malformed numbers and UIDs, in each uncompressed transfer syntax."""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterator

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from dicom_io import header as header_module
from dicom_io.errors import InvalidInstanceError
from dicom_io.header import InstanceHeader, read_received

SYNTAXES = {
    ImplicitVRLittleEndian: (True, True),
    ExplicitVRLittleEndian: (False, True),
    ExplicitVRBigEndian: (False, False),
}
SERIES = "1.2.826.0.1.3680043.8.498.9.1"
TEXTS = ["", " ", "CHEST", " CHEST ", "A B", "X" * 70, "Müller", "A\\B", "tab\there"]
NAMES = ["", "Doe^John", "Doe^John ", "Müller^Jörg", "Yamada^Tarou=山田^太郎=やまだ^たろう", "A^B\\C^D"]
NUMBERS = ["", "7", " 12 ", "+3", "-4", "1.0", "abc", "1\\2"]
UIDS = ["1.2.3", "1.2.3 ", " 1.2.3", "1.2.3", "1.2.3", "1.2.3", "1.2.a", "1.2.3\\1.2.4", "1." + "2" * 70]
CHARSETS = [None, "ISO_IR 100", "ISO_IR 192", ["", "ISO 2022 IR 87"]]


#: placeholders of the Integer String values, replaced in the encoded bytes (pydicom refuses to
#: hold an invalid one): 8 bytes each, as the values put in their place
INSTANCE_NUMBER, SERIES_NUMBER = "99999999", "88888888"


def _dataset(name: str, text: str, uid: str, charset: object, rows: int | None) -> Dataset:
    ds = Dataset()
    if charset is not None:
        ds.SpecificCharacterSet = charset
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = f"{SERIES}.1"
    ds.StudyInstanceUID = uid
    ds.SeriesInstanceUID = SERIES
    ds.Modality = "CT"
    ds.PatientName = name
    ds.PatientID = text
    ds.StudyDescription = text
    ds.BodyPartExamined = text[:16]
    ds.StudyDate = "20240501" if text else ""
    ds.InstanceNumber, ds.SeriesNumber = INSTANCE_NUMBER, SERIES_NUMBER  # replaced once encoded
    if rows is not None:
        ds.Rows, ds.Columns = rows, 2
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.SamplesPerPixel, ds.PixelRepresentation, ds.PhotometricInterpretation = 1, 0, "MONOCHROME2"
        ds.PixelData = bytes(2 * 2 * max(rows, 0))
    return ds


def _encoded(ds: Dataset, syntax: str, number: str = "1") -> bytes:
    implicit, little = SYNTAXES[syntax]
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = implicit, little
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # invalid values on purpose
        write_dataset(buffer, ds)
    return (buffer.getvalue().replace(INSTANCE_NUMBER.encode(), number.encode().ljust(8))
            .replace(SERIES_NUMBER.encode(), number[::-1].encode().ljust(8)))


def _read(data: bytes, syntax: str) -> InstanceHeader | str:
    try:
        instance = read_received(data, syntax, b"")
        instance.uids()
        return instance.header()
    except InvalidInstanceError as exc:
        return f"refused: {exc}"


def _cases() -> Iterator[tuple[str, bytes]]:
    for syntax, charset in itertools.product(SYNTAXES, CHARSETS):
        if not SYNTAXES[syntax][1] and isinstance(charset, list):
            continue  # ISO 2022 with big endian: pydicom writes it, nothing else matters here
        for name, text, number, uid in itertools.zip_longest(NAMES, TEXTS, NUMBERS, UIDS, fillvalue=None):
            ds = _dataset(name or "", text or "", uid or "1.2.3", charset, rows=4)
            yield syntax, _encoded(ds, syntax, number or "")
        for rows in (None, 0, 3):
            yield syntax, _encoded(_dataset("Doe", "X", "1.2.3", charset, rows), syntax)


def test_fast_path_reads_what_pydicom_converts(monkeypatch: pytest.MonkeyPatch) -> None:
    cases = list(_cases())
    fast = [_read(data, syntax) for syntax, data in cases]
    with monkeypatch.context() as patch:
        # every value through pydicom's conversion, as before the fast path
        patch.setattr(header_module, "_plain_value", lambda ds, keyword: header_module._UNREAD)
        patch.setattr(header_module, "_us", lambda ds, keyword, default=None: int(
            ds[header_module._tag_and_vr(keyword)[0]].value if default is None else ds.get(keyword, default)))
        converted = [_read(data, syntax) for syntax, data in cases]
    assert fast == converted
    # the cases cover what they claim: plain values, pydicom's own and refusals
    read = [h for h in fast if isinstance(h, InstanceHeader)]
    assert {h.patient_name for h in read} >= {"Doe^John", "Müller^Jörg", "Yamada^Tarou=山田^太郎=やまだ^たろう"}
    assert {h.instance_number for h in read} >= {None, 7, 12, 3, -4}
    assert any(isinstance(h, str) for h in fast)
