"""Read and check the header of a received instance before it is acknowledged.

The listener stores the peer's bytes as sent; this module decides whether those bytes are a DICOM
instance mednode can index, and extracts the attributes the index needs. It reads each instance once,
from memory, and never decodes pixel data: it only checks that the Pixel Data element is as long as
the image attributes say (native) or is a well-formed fragment sequence (encapsulated).
"""

from __future__ import annotations

import re
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from typing import TypeVar, cast

import pydicom
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import parse_basic_offsets, parse_fragments
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.fileutil import read_undefined_length_value
from pydicom.filewriter import write_data_element, write_file_meta_info
from pydicom.tag import SequenceDelimiterTag, Tag
from pydicom.uid import UID
from pydicom.valuerep import MAX_VALUE_LEN

from dicom_io.errors import InvalidInstanceError

_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Largest pixel matrix accepted in one instance (frames × rows × columns × samples); beyond this
#: the header is taken as corrupt rather than as an image anyone could view.
MAX_PIXELS = 4 * 1024**3
#: Elements longer than this are not copied out of the stream while parsing (in practice: the
#: Pixel Data of a native image, checked by its declared length and sliced only when needed).
DEFER_BYTES = 64 * 1024
PIXEL_DATA = Tag(0x7FE0, 0x0010)
MEDIA_STORAGE_SOP_INSTANCE_UID = 0x00020003
UNDEFINED_LENGTH = 0xFFFFFFFF


@dataclass(frozen=True)
class InstanceHeader:
    """Attributes of one instance that the index keeps. Patient fields are never logged."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str | None
    body_part_examined: str | None
    series_description: str | None
    series_number: int | None
    instance_number: int | None
    study_description: str | None
    study_date: str | None
    accession_number: str | None
    patient_id: str | None
    issuer_of_patient_id: str | None
    patient_name: str | None
    patient_birth_date: str | None
    patient_sex: str | None
    #: of the equipment that made the instance: mednode's own results name mednode here
    manufacturer: str | None = None


#: Longest text indexed per VR (PS3.5 6.2): a Person Name has up to three component groups of 64.
_INDEXED_LENGTH = {**MAX_VALUE_LEN, "DA": 8, "AS": 4, "PN": 324}


#: A raw value (trailing NUL and space padding removed) that reads the same in every character
#: set DICOM allows (PS3.5 6.1.2.5.3, Annex: each keeps ISO 646 / ASCII as its G0 set): printable
#: ASCII, no backslash (the value delimiter) and no ESC (ISO 2022 code extensions).
_NOT_PLAIN = re.compile(rb"[^\x20-\x5b\x5d-\x7e]")
_INTEGER = re.compile(r"[+-]?[0-9]+")
#: what :func:`_plain_value` returns for a value it leaves to pydicom
_UNREAD = object()
_TAG_VR: dict[str, tuple[int, str]] = {}


def _tag_and_vr(keyword: str) -> tuple[int, str]:
    found = _TAG_VR.get(keyword)
    if found is None:
        tag = tag_for_keyword(keyword)
        assert tag is not None, keyword
        found = _TAG_VR[keyword] = (tag, dictionary_VR(tag))
    return found


def _plain_value(ds: Dataset, keyword: str) -> str | None | object:
    """The value of a text element read from its raw bytes, as pydicom would convert it and
    ``str(value).strip()`` then would leave it (None when absent or empty), if those bytes are
    plain (:data:`_NOT_PLAIN`) and of the dictionary's VR; :data:`_UNREAD` for anything else,
    which pydicom then converts.

    pydicom's conversion of a value (character sets, value multiplicity, validation, the
    value's class) took most of a received instance's header checks (about 0.25 ms for the
    index's twenty-odd attributes, docs/BENCHMARKS.md); every value of a typical header is plain.
    """
    tag, vr = _tag_and_vr(keyword)
    element = ds.get_item(tag)
    if element is None:
        return None
    if not isinstance(element, RawDataElement) or element.VR not in (None, vr) or element.value is None:
        return _UNREAD
    value = bytes(element.value).rstrip(b"\x00 ")
    if _NOT_PLAIN.search(value):
        return _UNREAD
    return value.decode("ascii").strip() or None


def _text(ds: Dataset, keyword: str) -> str | None:
    plain = _plain_value(ds, keyword)
    if plain is _UNREAD:
        value = ds.get(keyword)
        if value is None or value == "":
            return None
        text: str | None = str(value).strip()
    else:
        text = cast(str | None, plain)
    if text is None:
        return None
    if len(text) > _INDEXED_LENGTH.get(_tag_and_vr(keyword)[1], len(text)):
        # not indexed: each index column is as wide as its VR allows, and a de-identifier's hash
        # in a DA or a 56-character SH would make the database refuse the instance
        return None
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    plain = _plain_value(ds, keyword)
    if plain is None:
        return None
    if isinstance(plain, str) and _INTEGER.fullmatch(plain):
        return int(plain)
    try:
        value = ds.get(keyword)
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _uid(ds: Dataset, keyword: str) -> str:
    plain = _plain_value(ds, keyword)
    if plain is _UNREAD:
        value = ds.get(keyword)
        text = str(value).strip().rstrip("\x00") if value is not None else ""
    else:
        text = cast(str | None, plain) or ""
    if not text:
        raise InvalidInstanceError(f"{keyword} is missing or empty")
    if len(text) > 64 or not _UID_RE.match(text):
        raise InvalidInstanceError(f"{keyword} is not a valid UID (digits and dots, at most 64)")
    return text


def _us(ds: Dataset, keyword: str, default: int | None = None) -> int:
    """An unsigned short (US) element's value, from its two raw bytes when it has them, else as
    pydicom converts it; ``default`` when absent (if given)."""
    tag, _ = _tag_and_vr(keyword)
    element = ds.get_item(tag)
    if element is None and default is not None:
        return default
    if isinstance(element, RawDataElement) and element.VR in (None, "US") and element.value is not None \
            and len(element.value) == 2:
        return int.from_bytes(element.value, "little" if element.is_little_endian else "big")
    return int(ds[tag].value)


def _check_native_pixels(ds: Dataset, length: int) -> None:
    try:
        rows = _us(ds, "Rows")
        columns = _us(ds, "Columns")
        bits = _us(ds, "BitsAllocated")
        samples = _us(ds, "SamplesPerPixel", 1)
        frames = _frames(ds)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise InvalidInstanceError(f"image attributes needed to read Pixel Data are invalid: {exc}")
    if min(rows, columns, bits, samples, frames) <= 0:
        raise InvalidInstanceError(
            "Rows, Columns, BitsAllocated, SamplesPerPixel and NumberOfFrames must be positive"
        )
    if frames * rows * columns * samples > MAX_PIXELS:
        raise InvalidInstanceError(
            f"image attributes describe {frames}×{rows}×{columns}×{samples} pixels, beyond any real image"
        )
    expected_bits = frames * rows * columns * samples * bits
    expected = (expected_bits + 7) // 8
    if length < expected:
        raise InvalidInstanceError(
            f"Pixel Data holds {length} bytes but {frames} frame(s) of {rows}×{columns}×{samples} "
            f"at {bits} bits need {expected}: the instance is truncated"
        )


def _frames(ds: Dataset) -> int:
    """NumberOfFrames (1 when absent); an empty or zero value is an error, not one frame."""
    element = ds.get((0x0028, 0x0008))
    if element is None:
        return 1
    if element.value in (None, ""):
        raise ValueError("NumberOfFrames is present but empty")
    return int(element.value)


def _check_encapsulated_pixels(ds: Dataset, value: bytes | memoryview) -> None:
    try:
        frames = _frames(ds)
    except (TypeError, ValueError) as exc:
        raise InvalidInstanceError(f"NumberOfFrames is invalid: {exc}")
    if frames <= 0:
        raise InvalidInstanceError("NumberOfFrames must be positive")
    try:
        buffer = BytesIO(value)
        parse_basic_offsets(buffer)
        count, offsets = parse_fragments(buffer)
    except Exception as exc:  # noqa: BLE001 (pydicom raises several types for corrupt item headers)
        raise InvalidInstanceError(
            f"encapsulated Pixel Data is not a valid fragment sequence: {exc}"
        )
    for offset in offsets:
        # each item: tag (4 bytes), length (4), then that many bytes, all inside the element
        length = int.from_bytes(value[offset + 4 : offset + 8], "little")
        if offset + 8 + length > len(value):
            raise InvalidInstanceError(
                f"a Pixel Data fragment claims {length} bytes but the element ends before: "
                "the instance is truncated"
            )
    if count == 0:
        raise InvalidInstanceError("encapsulated Pixel Data has no fragments")
    if count < frames:
        # a fragment holds data of one frame only (PS3.5 A.4), so each frame needs one at least
        raise InvalidInstanceError(
            f"NumberOfFrames is {frames} but encapsulated Pixel Data holds {count} fragment(s)"
        )


def _has_other_pixel_data(ds: Dataset) -> bool:
    # Float/Double Float Pixel Data hold the image instead of Pixel Data (PS3.3 C.7.6.3)
    return (0x7FE0, 0x0008) in ds or (0x7FE0, 0x0009) in ds


def parse_header(data: bytes) -> tuple[InstanceHeader, Dataset]:
    """Parse a Part 10 byte stream (preamble, File Meta, data set) and check it.

    Returns
    -------
    tuple
        The header attributes and the parsed data set. Pixel Data is checked but not read into
        the data set (its element is deferred): callers that need pixels read the stored file.

    Raises
    ------
    InvalidInstanceError
        If the bytes are not a readable DICOM data set, lack a required UID, carry invalid UIDs,
        or the Pixel Data is shorter than the image attributes require (a truncated instance).
    """
    instance = read_part10(data)
    return instance.header(), instance.dataset


@dataclass(frozen=True)
class InstanceUIDs:
    """The UIDs that name an instance and its file, checked."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str


class ReadInstance:
    """A data set that was read (its values converted as they are asked for) but not yet checked.

    :meth:`uids` checks only the four UIDs — enough to name and start writing the file — and
    :meth:`header` everything else: a receiver can start the disk's work in between, and the
    remaining checks (Pixel Data length, the index attributes) run while the disk works.
    Both raise :class:`InvalidInstanceError`; ``header()`` implies ``uids()``.
    """

    def __init__(self, dataset: Dataset, buffer: bytes, transfer_syntax: str | None) -> None:
        self.dataset = dataset
        self._buffer = buffer
        self._transfer_syntax = transfer_syntax

    def uids(self) -> InstanceUIDs:
        ds = self.dataset
        return _converted(lambda: InstanceUIDs(
            sop_class_uid=_uid(ds, "SOPClassUID"),
            sop_instance_uid=_uid(ds, "SOPInstanceUID"),
            study_instance_uid=_uid(ds, "StudyInstanceUID"),
            series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        ))

    def header(self) -> InstanceHeader:
        return _converted(lambda: _checked_header(self.dataset, self._buffer, self._transfer_syntax))


def read_part10(data: bytes) -> ReadInstance:
    """Read a Part 10 byte stream; :class:`ReadInstance` checks it.

    Raises
    ------
    InvalidInstanceError
        If the bytes are not a readable DICOM data set.
    """

    def read() -> Dataset:
        ds = pydicom.dcmread(BytesIO(data), defer_size=DEFER_BYTES)
        if UID(str(ds.file_meta.get("TransferSyntaxUID", ""))).is_deflated:
            # deferred offsets would point into the inflated stream, not into ``data``
            ds = pydicom.dcmread(BytesIO(data))
        return ds

    return ReadInstance(_read(read), data, None)


def read_received(dataset: bytes, transfer_syntax_uid: str, prefix: bytes) -> ReadInstance:
    """:func:`read_part10` for a data set as a C-STORE delivers it: without a preamble or File
    Meta, encoded in ``transfer_syntax_uid`` (the presentation context's). Saves joining the File
    Meta to the data set only to parse them apart.

    ``prefix`` is what the data set will be stored after (:func:`part10_prefix`,
    :class:`Part10Prefixes`); it is read only for a deflated data set, which pydicom inflates when
    reading a whole file. The data set read has no ``file_meta``.
    """
    transfer_syntax = UID(transfer_syntax_uid)
    if not transfer_syntax:
        raise InvalidInstanceError("the presentation context has no Transfer Syntax UID")
    if transfer_syntax.is_deflated:
        return read_part10(prefix + dataset)  # rare: let dcmread inflate (or refuse) it

    def read() -> Dataset:
        return read_dataset(
            BytesIO(dataset),
            transfer_syntax.is_implicit_VR,
            transfer_syntax.is_little_endian,
            defer_size=DEFER_BYTES,
        )

    return ReadInstance(_read(read), dataset, str(transfer_syntax))


def part10_prefix(file_meta: FileMetaDataset) -> bytes:
    """Preamble, ``DICM`` and the encoded File Meta: what precedes a data set in a Part 10 file."""
    buffer = DicomBytesIO()
    buffer.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buffer, file_meta, enforce_standard=True)
    return buffer.getvalue()


class Part10Prefixes:
    """:func:`part10_prefix` for received instances, encoded by pydicom once per kind of instance.

    The File Meta of two instances of one series differs only in the Media Storage SOP Instance
    UID, yet encoding it with pydicom took a tenth of a C-STORE's time in the listener
    (docs/BENCHMARKS.md). Here pydicom encodes the whole prefix once per SOP Class, Transfer
    Syntax and encoded UID length, with a placeholder UID of that length; each instance then gets
    that prefix with its own SOP Instance UID element, also encoded by pydicom, in the
    placeholder's place. Group length and offsets are the same by construction, and the result
    is byte for byte what :func:`part10_prefix` writes (tests/unit/dicom_io/test_header.py).

    Parameters
    ----------
    implementation_class_uid, implementation_version_name
        Written into every File Meta (the implementation that writes the files).
    """

    #: Kinds kept; past this many (SOP Classes × syntaxes × UID lengths) the cache starts over.
    MAX_KINDS = 1024

    def __init__(self, implementation_class_uid: str, implementation_version_name: str | None) -> None:
        self.implementation_class_uid = implementation_class_uid
        self.implementation_version_name = implementation_version_name
        self._kinds: dict[tuple[str, str, int], tuple[bytes, bytes]] = {}

    def prefix(self, sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
        """The preamble, ``DICM`` and File Meta of one instance."""
        element = _encoded_element(MEDIA_STORAGE_SOP_INSTANCE_UID, "UI", sop_instance_uid)
        key = (sop_class_uid, transfer_syntax_uid, len(element))
        around = self._kinds.get(key)
        if around is None:
            around = self._encode_kind(sop_class_uid, transfer_syntax_uid, len(element))
            if len(self._kinds) >= self.MAX_KINDS:
                self._kinds.clear()
            self._kinds[key] = around
        return around[0] + element + around[1]

    def _encode_kind(self, sop_class_uid: str, transfer_syntax_uid: str, element_length: int) -> tuple[bytes, bytes]:
        # a placeholder of the instance UID's padded length (the element has an 8-byte header)
        placeholder = "9" * (element_length - 8)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = UID(sop_class_uid)
        meta.MediaStorageSOPInstanceUID = UID(placeholder)
        meta.TransferSyntaxUID = UID(transfer_syntax_uid)
        meta.ImplementationClassUID = UID(self.implementation_class_uid)
        if self.implementation_version_name:
            meta.ImplementationVersionName = self.implementation_version_name
        encoded = part10_prefix(meta)
        at = encoded.index(_encoded_element(MEDIA_STORAGE_SOP_INSTANCE_UID, "UI", placeholder))
        return encoded[:at], encoded[at + element_length:]


def _encoded_element(tag: int, vr: str, value: str) -> bytes:
    """One element in Explicit VR Little Endian (the File Meta's encoding), by pydicom."""
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_data_element(buffer, DataElement(tag, vr, value))
    return buffer.getvalue()


def _read(read: Callable[[], Dataset]) -> Dataset:
    with warnings.catch_warnings():
        # pydicom warns instead of failing on some corrupt streams; decide here, loudly
        warnings.simplefilter("ignore")
        try:
            ds = read()
        except Exception as exc:  # noqa: BLE001 (any parse failure means: cannot understand)
            raise InvalidInstanceError(
                f"not a readable DICOM data set: {type(exc).__name__}: {exc}"
            )
    if len(ds) == 0:
        raise InvalidInstanceError(
            "the data set is empty after parsing (a sequence or Pixel Data is missing its end)"
        )
    return ds


_T = TypeVar("_T")


def _converted(check: Callable[[], _T]) -> _T:
    """Run ``check``; pydicom converts values lazily, so a corrupt element raises only there."""
    try:
        return check()
    except InvalidInstanceError:
        raise
    except Exception as exc:  # noqa: BLE001 (whatever pydicom raises for a corrupt value)
        raise InvalidInstanceError(f"an element cannot be read: {type(exc).__name__}: {exc}") from None


def _pixel_data_value(ds: Dataset, buffer: bytes) -> bytes | memoryview | None:
    """The Pixel Data value, taken from ``buffer`` when it was deferred (None if absent).

    A deferred element of defined length was skipped by that length: a stream that ends before
    it is truncated (a read would have returned the short remainder instead), and only its
    length is needed for native pixels. An undefined length one (encapsulated) is read again up
    to its delimiter, as the parse would have.
    """
    if PIXEL_DATA not in ds:
        return None
    element = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if isinstance(element, RawDataElement) and element.length == UNDEFINED_LENGTH:
        value = element.value
        if value is None:
            stream = BytesIO(buffer)
            stream.seek(element.value_tell)
            value = read_undefined_length_value(stream, element.is_little_endian, SequenceDelimiterTag)
        _check_sequence_delimiter(buffer, element.value_tell + len(value or b""), element.is_little_endian)
        return value or b""
    if not (isinstance(element, RawDataElement) and element.value is None):
        return ds[PIXEL_DATA].value or b""
    end = element.value_tell + element.length
    if end > len(buffer):
        raise InvalidInstanceError(
            f"Pixel Data claims {element.length} bytes but the data set ends "
            f"{end - len(buffer)} bytes short: the instance is truncated"
        )
    return memoryview(buffer)[element.value_tell:end]


def _check_sequence_delimiter(buffer: bytes, end: int, little_endian: bool) -> None:
    """An undefined length Pixel Data value ending at ``end`` must be followed by a whole Sequence
    Delimitation Item (its tag and 4-byte length): pydicom parses a stream cut inside it."""
    delimiter = buffer[end:end + 8]
    tag = struct.pack("<HH" if little_endian else ">HH", SequenceDelimiterTag.group, SequenceDelimiterTag.elem)
    if len(delimiter) < 8 or delimiter[:4] != tag:
        raise InvalidInstanceError(
            f"encapsulated Pixel Data ends without a whole Sequence Delimitation Item "
            f"({len(delimiter)} of its 8 bytes): the instance is truncated")


def _checked_header(ds: Dataset, buffer: bytes, transfer_syntax: str | None) -> InstanceHeader:
    """The index attributes of a parsed data set, after checking UIDs and Pixel Data."""
    if transfer_syntax is not None:
        tsyntax = transfer_syntax
    else:
        tsyntax = str(ds.file_meta.get("TransferSyntaxUID", "")) if hasattr(ds, "file_meta") else ""
    if not tsyntax:
        raise InvalidInstanceError("File Meta Information has no TransferSyntaxUID")
    header = InstanceHeader(
        sop_class_uid=_uid(ds, "SOPClassUID"),
        sop_instance_uid=_uid(ds, "SOPInstanceUID"),
        study_instance_uid=_uid(ds, "StudyInstanceUID"),
        series_instance_uid=_uid(ds, "SeriesInstanceUID"),
        transfer_syntax_uid=tsyntax,
        modality=_text(ds, "Modality"),
        body_part_examined=_text(ds, "BodyPartExamined"),
        series_description=_text(ds, "SeriesDescription"),
        series_number=_int(ds, "SeriesNumber"),
        instance_number=_int(ds, "InstanceNumber"),
        study_description=_text(ds, "StudyDescription"),
        study_date=_text(ds, "StudyDate"),
        accession_number=_text(ds, "AccessionNumber"),
        patient_id=_text(ds, "PatientID"),
        issuer_of_patient_id=_text(ds, "IssuerOfPatientID"),
        patient_name=_text(ds, "PatientName"),
        patient_birth_date=_text(ds, "PatientBirthDate"),
        patient_sex=_text(ds, "PatientSex"),
        manufacturer=_text(ds, "Manufacturer"),
    )
    value = _pixel_data_value(ds, buffer)
    if value is None and "Rows" in ds and "Columns" in ds and not _has_other_pixel_data(ds):
        # an image whose stream ended inside the Pixel Data element header parses without it
        raise InvalidInstanceError("the image has Rows and Columns but no Pixel Data: truncated?")
    if value is not None:
        if UID(tsyntax).is_encapsulated:
            _check_encapsulated_pixels(ds, value)
        else:
            _check_native_pixels(ds, len(value))
    return header
