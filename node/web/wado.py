"""WADO-RS (PS3.18 10.4): the instances, metadata, frames and bulk data of what the node holds.

What can be retrieved is what QIDO-RS finds: the instances received (C-STORE, STOW-RS) and the
results mednode wrote (SR, SEG), by study, series and instance.

Transfer syntaxes (PS3.18 8.7.3): a client names those it takes in its ``Accept`` header
(``multipart/related; type="application/dicom"; transfer-syntax=…``); ``*`` takes each object
as it is stored. Naming none means Explicit VR Little Endian, the default of PS3.18. An object
stored otherwise is re-encoded in Explicit VR Little Endian by pydicom, decompressed where it
is compressed (pydicom's decoders: pylibjpeg, Pillow); one it cannot decode, or a request whose
``Accept`` names nothing this node can send, gets 406 with what it could send. Frames and bulk
data are answered the same way in ``application/octet-stream`` parts: a compressed frame as it
is stored when its transfer syntax is accepted, else its decoded pixels in the native encoding.

Metadata (``application/dicom+json``) carries every attribute; pixel data, and other binary
values over 1 KiB, are given as a ``BulkDataURI`` naming this node's ``bulkdata`` resource of
the instance, and read from the file only when that resource is asked for.

These functions read files and the index; the routes that call them (:mod:`node.web.dicomweb`)
check the caller and write the audit rows.
"""

from __future__ import annotations

import io
import re
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from pydicom.datadict import dictionary_has_tag, dictionary_VR
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.encaps import get_frame
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import get_decoder, pack_bits, pixel_array
from pydicom.tag import Tag
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.orm import Session

from node.web.stow import media_type_params
from storage.models import Instance, Job, Result, Series, Study

#: the transfer syntax of a request that names none (PS3.18 8.7.3.5)
DEFAULT_TRANSFER_SYNTAX = ExplicitVRLittleEndian
#: binary value representations; a value of one of these over :data:`BULK_THRESHOLD` bytes (and
#: pixel data of any size) is given in metadata as a BulkDataURI
BULK_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN"})
BULK_THRESHOLD = 1024
PIXEL_DATA = Tag(0x7FE0, 0x0010)
_UID_PATTERN = re.compile(r"[0-9]+(\.[0-9]+)*")  # leading zeros too: the index holds what peers sent
#: bytes per read when a stored file is streamed into a response
CHUNK_BYTES = 1 << 20
OCTET_STREAM = "application/octet-stream"
#: the transfer syntaxes whose frames a ``multipart/related; type="image/…"`` range asks for (PS3.18
#: Table 8.7.3-2); such frames are sent as stored, in ``application/octet-stream`` parts naming it
_SYNTAXES_OF_IMAGE_TYPE: dict[str, tuple[str, ...]] = {
    "image/jpeg": ("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                   "1.2.840.10008.1.2.4.70"),
    "image/jls": ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"),
    "image/jp2": ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"),
    "image/jpx": ("1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93"),
    "image/dicom-rle": ("1.2.840.10008.1.2.5",),
}


class NotAcceptableError(ValueError):
    """Nothing the request's ``Accept`` header names can be sent (406)."""


class WadoRequestError(ValueError):
    """The request names frames or an attribute that cannot exist (400)."""


@dataclass(frozen=True)
class Located:
    """One stored object of a retrieve request."""

    study_uid: str
    series_uid: str
    sop_uid: str
    path: str  #: relative to the store's root


def locate(session: Session, study_uid: str, series_uid: str | None = None,
           sop_uid: str | None = None) -> list[Located]:
    """The objects of a study (or of one series, or one instance): received instances in series
    and instance number order, then the results mednode wrote that the PACS has not sent back
    (those are received instances already)."""
    received = (
        select(Series.series_instance_uid, Instance.sop_instance_uid, Instance.path)
        .join(Series, Instance.series_pk == Series.id).join(Study, Series.study_pk == Study.id)
        .where(Study.study_instance_uid == study_uid)
        .order_by(Series.id, Instance.instance_number, Instance.id)
    )
    written = (
        select(Result.series_instance_uid, Result.sop_instance_uid, Result.path)
        .join(Job, Result.job_pk == Job.id).join(Study, Job.study_pk == Study.id)
        .where(Study.study_instance_uid == study_uid,
               ~Result.sop_instance_uid.in_(select(Instance.sop_instance_uid)))
        .order_by(Result.id)
    )
    if series_uid is not None:
        received = received.where(Series.series_instance_uid == series_uid)
        written = written.where(Result.series_instance_uid == series_uid)
    if sop_uid is not None:
        received = received.where(Instance.sop_instance_uid == sop_uid)
        written = written.where(Result.sop_instance_uid == sop_uid)
    rows = [*session.execute(received), *session.execute(written)]
    return [Located(study_uid, row[0], row[1], row[2]) for row in rows]


# -- Accept ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Wanted:
    """The transfer syntaxes a request takes for one payload type."""

    syntaxes: frozenset[str]
    any_syntax: bool = False

    def takes(self, transfer_syntax: str) -> bool:
        return self.any_syntax or transfer_syntax in self.syntaxes

    @property
    def takes_default(self) -> bool:
        return self.takes(DEFAULT_TRANSFER_SYNTAX)


def _media_ranges(accept: str) -> Iterator[tuple[str, dict[str, str]]]:
    """(media type, parameters) of each range of an ``Accept`` header, q=0 ones left out."""
    for item in accept.split(","):
        if not item.strip():
            continue
        media_type, params = media_type_params(item.strip())
        if params.get("q", "1").strip() not in ("0", "0.0", "0.00", "0.000"):
            yield media_type, params


def negotiate(accept: str | None, payload: str) -> Wanted:
    """What a request's ``Accept`` header takes for parts of ``payload`` (``application/dicom`` or
    ``application/octet-stream``) in a ``multipart/related`` answer.

    Raises
    ------
    NotAcceptableError
        If no range of the header takes such parts.
    """
    if not accept:
        return Wanted(frozenset({DEFAULT_TRANSFER_SYNTAX}))
    syntaxes: set[str] = set()
    any_syntax = False
    matched = False
    for media_type, params in _media_ranges(accept):
        part_type = params.get("type", "").lower()
        if media_type not in ("*/*", "multipart/*", "multipart/related"):
            continue
        named = params.get("transfer-syntax")
        if part_type in ("", "*/*", payload) or media_type != "multipart/related":
            matched = True
            syntax = named or DEFAULT_TRANSFER_SYNTAX
            if syntax == "*":
                any_syntax = True
            else:
                syntaxes.add(syntax)
        elif payload == OCTET_STREAM and part_type in _SYNTAXES_OF_IMAGE_TYPE:  # image/jp2 …: compressed frames
            matched = True
            syntaxes.update([named] if named else _SYNTAXES_OF_IMAGE_TYPE[part_type])
    if not matched:
        raise NotAcceptableError(
            f'this resource is sent as multipart/related; type="{payload}" (with transfer-syntax=* for '
            f"objects as they are stored): the Accept header names no such type ({accept!r})")
    return Wanted(frozenset(syntaxes), any_syntax)


def wants_json(accept: str | None) -> None:
    """Check that a metadata request takes ``application/dicom+json``.

    Raises
    ------
    NotAcceptableError
        If it names only other types (``application/dicom+xml`` among them: not served).
    """
    if not accept:
        return
    for media_type, _ in _media_ranges(accept):
        if media_type in ("*/*", "application/*", "application/dicom+json", "application/json"):
            return
    raise NotAcceptableError(f"metadata is sent as application/dicom+json only; the Accept header asks for {accept!r}")


# -- instances ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Part:
    """One part of a ``multipart/related`` answer: its content type and its bytes, or the file
    that holds them (streamed)."""

    content_type: str
    data: bytes | Path


def stored_transfer_syntax(path: Path) -> str:
    return str(read_file_meta_info(path).TransferSyntaxUID)


def check_acceptable(path: Path, wanted: Wanted) -> UID:
    """The transfer syntax ``path`` is stored in, once it is known :func:`instance_part` can send
    it as the request takes it.

    Raises
    ------
    NotAcceptableError
        If the request takes neither the stored transfer syntax nor Explicit VR Little Endian,
        or the object is compressed in a form no installed decoder reads.
    """
    stored = UID(stored_transfer_syntax(path))
    if wanted.takes(stored):
        return stored
    if not wanted.takes_default:
        raise NotAcceptableError(
            f"an object is stored as {stored}, which the request does not take; it can be sent as {stored} "
            f"or {DEFAULT_TRANSFER_SYNTAX} (transfer-syntax=* takes each object as stored)")
    if stored.is_compressed and not _decodable(stored):
        raise NotAcceptableError(
            f"an object is stored as {stored}, and no decoder here reads it to send it as "
            f"{DEFAULT_TRANSFER_SYNTAX}: ask for transfer-syntax={stored} or * to take it as stored")
    return stored


def _decodable(transfer_syntax: UID) -> bool:
    try:
        return bool(get_decoder(transfer_syntax).is_available)
    except NotImplementedError:  # pydicom knows no decoder for it at all
        return False


def instance_part(path: Path, wanted: Wanted, stored: UID) -> Part:
    """An object as the request takes it: as stored, or re-encoded in Explicit VR Little Endian,
    decompressed when it was compressed (the same SOP Instance UID: the pixels are the stored
    ones, decoded). ``stored``: its transfer syntax, as :func:`check_acceptable` returned it."""
    if wanted.takes(stored):
        return Part(f"application/dicom; transfer-syntax={stored}", path)
    ds = dcmread(path)
    if stored.is_compressed:
        ds.decompress(generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return Part(f"application/dicom; transfer-syntax={DEFAULT_TRANSFER_SYNTAX}", buffer.getvalue())


def multipart(parts: Iterable[Part], boundary: str) -> Iterator[bytes]:
    """The body of a ``multipart/related`` answer, file parts read as it is sent."""
    for part in parts:
        yield f"--{boundary}\r\nContent-Type: {part.content_type}\r\n\r\n".encode()
        if isinstance(part.data, Path):
            with part.data.open("rb") as f:
                while chunk := f.read(CHUNK_BYTES):
                    yield chunk
        else:
            yield part.data
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def new_boundary() -> str:
    return f"mednode-{uuid.uuid4().hex}"


def multipart_type(payload: str, boundary: str) -> str:
    return f'multipart/related; type="{payload}"; boundary={boundary}'


# -- metadata -------------------------------------------------------------------------------------
def metadata(path: Path, bulk_uri: Callable[[str], str]) -> dict[str, Any]:
    """The DICOM JSON of an object (File Meta left out), pixel data and large binary values as a
    ``BulkDataURI`` (``bulk_uri(tag)``, the tag as eight hex digits); those are never read here."""
    ds = dcmread(path, defer_size=BULK_THRESHOLD)
    out: dict[str, Any] = {}
    tags = ds.keys()  # not the data set itself: iterating it would read every deferred value
    for tag in tags:
        raw = ds.get_item(tag, keep_deferred=True)
        if not isinstance(raw, DataElement | RawDataElement):  # a tag gives an element (a slice, a data set)
            continue
        key = f"{int(tag):08X}"
        vr, length = _vr_and_length(raw, ds)
        if vr in BULK_VRS and (tag == PIXEL_DATA or length > BULK_THRESHOLD):
            out[key] = {"vr": vr, "BulkDataURI": bulk_uri(key)}
            continue
        out[key] = ds[tag].to_json_dict(None, BULK_THRESHOLD)  # nested binary values inline
    return out


def _vr_and_length(element: DataElement | RawDataElement, ds: Dataset) -> tuple[str, int]:
    """VR and value length of an element as read, without reading a deferred value; an implicit
    VR file's element gets its VR from the dictionary (pixel data OW beyond 8 bits, as PS3.5 A.1)."""
    if isinstance(element, RawDataElement):
        vr = element.VR
        if vr is None:
            vr = dictionary_VR(element.tag) if dictionary_has_tag(element.tag) else "UN"
            if " or " in vr:
                vr = "OW" if element.tag == PIXEL_DATA and int(ds.get("BitsAllocated", 8)) > 8 else vr.split(" or ")[0]
        return str(vr), element.length
    value = element.value
    return str(element.VR), len(value) if isinstance(value, bytes | bytearray) else 0


# -- frames and bulk data -------------------------------------------------------------------------
def parse_frames(text: str) -> list[int]:
    """The 1-based frame numbers of a ``frames/{list}`` path segment (``1``, ``1,3,5``).

    Raises
    ------
    WadoRequestError
        If the list is empty or holds anything but positive integers.
    """
    try:
        frames = [int(f) for f in text.split(",")]
    except ValueError:
        frames = []
    if not frames or any(f < 1 for f in frames):
        raise WadoRequestError(f"frames/{text}: give frame numbers from 1, separated by commas")
    return frames


def frame_parts(path: Path, frames: list[int] | None, wanted: Wanted) -> list[Part]:
    """The pixel data of ``frames`` (all when None) of an image, one ``application/octet-stream``
    part each: compressed frames as stored where the request takes their transfer syntax, else
    decoded to the native encoding (1-bit frames packed one by one, as PS3.5 8.1.1 packs them).

    Raises
    ------
    LookupError
        If the object has no pixel data or fewer frames than asked for.
    NotAcceptableError
        If a compressed frame is asked for in a form that cannot be made here.
    """
    ds = dcmread(path)
    if PIXEL_DATA not in ds:
        raise LookupError("this object has no pixel data")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    numbers = frames if frames is not None else list(range(1, count + 1))
    beyond = [n for n in numbers if n > count]
    if beyond:
        raise LookupError(f"frame {beyond[0]} asked for, but the object has {count} frame(s)")
    stored = ds.file_meta.TransferSyntaxUID
    if stored.is_compressed and wanted.takes(stored):
        return [Part(f"application/octet-stream; transfer-syntax={stored}",
                     get_frame(ds.PixelData, n - 1, number_of_frames=count)) for n in numbers]
    if not wanted.takes_default and not wanted.takes(stored):
        raise NotAcceptableError(
            f'frames are stored as {stored}: ask for multipart/related; type="{OCTET_STREAM}" to take them '
            f"decoded ({DEFAULT_TRANSFER_SYNTAX}), or add transfer-syntax={stored} (or *) to take them as stored")
    content_type = f"application/octet-stream; transfer-syntax={DEFAULT_TRANSFER_SYNTAX}"
    if not stored.is_compressed and ds.BitsAllocated % 8 == 0:
        size = ds.Rows * ds.Columns * ds.SamplesPerPixel * (ds.BitsAllocated // 8)
        data = ds.PixelData
        return [Part(content_type, bytes(data[(n - 1) * size:n * size])) for n in numbers]
    if stored.is_compressed and not _decodable(stored):
        raise NotAcceptableError(
            f"frames stored as {stored} cannot be decoded here: ask for transfer-syntax={stored} or * "
            "to take them as stored")
    decoded = [pixel_array(ds, index=n - 1) for n in numbers]
    if ds.BitsAllocated == 1:
        return [Part(content_type, pack_bits(frame)) for frame in decoded]
    dtype = decoded[0].dtype.newbyteorder("<")
    return [Part(content_type, frame.astype(dtype, copy=False).tobytes()) for frame in decoded]


def bulk_parts(path: Path, tag_hex: str, wanted: Wanted) -> list[Part]:
    """The value of one top-level attribute given as a BulkDataURI by :func:`metadata`, in one
    part: native pixel data as stored (a 1-bit SEG's frames packed end to end, as a viewer loading
    the SEG by its BulkDataURI reads them), compressed pixel data one part per frame as stored
    where the request takes its transfer syntax, else decoded frames end to end; another binary
    value as stored.

    Raises
    ------
    WadoRequestError
        If ``tag_hex`` is not eight hex digits.
    LookupError
        If the object has no such binary attribute.
    """
    try:
        tag = Tag(int(tag_hex, 16)) if len(tag_hex) == 8 else None
    except ValueError:
        tag = None
    if tag is None:
        raise WadoRequestError(f"bulkdata/{tag_hex}: name the attribute by its tag, eight hex digits (7FE00010)")
    ds = dcmread(path)
    stored = ds.file_meta.TransferSyntaxUID
    if tag == PIXEL_DATA and PIXEL_DATA in ds and stored.is_compressed:
        if wanted.takes(stored):
            return frame_parts(path, None, wanted)  # compressed frames as stored, one part each
        if not wanted.takes_default or not _decodable(stored):
            raise NotAcceptableError(
                f"pixel data stored as {stored} can be sent as stored (transfer-syntax={stored} or *)"
                + (f" or decoded ({DEFAULT_TRANSFER_SYNTAX})" if _decodable(stored) else ""))
        pixels = pixel_array(ds)  # every frame, decoded
        data = pack_bits(pixels.reshape(-1)) if ds.BitsAllocated == 1 else (
            pixels.astype(pixels.dtype.newbyteorder("<"), copy=False).tobytes())
        return [Part(f"{OCTET_STREAM}; transfer-syntax={DEFAULT_TRANSFER_SYNTAX}", data)]
    element = ds.get(tag)
    if element is None or (element.VR not in BULK_VRS and " or " not in str(element.VR)):
        raise LookupError(f"this object has no binary attribute {tag_hex}")
    return [Part(OCTET_STREAM, bytes(element.value or b""))]


def uid_in_path(value: str) -> str:
    """``value`` if it can be a UID (digits and dots, at most 64 characters).

    Raises
    ------
    WadoRequestError
        Otherwise.
    """
    if len(value) > 64 or not _UID_PATTERN.fullmatch(value):
        raise WadoRequestError(f"{value[:70]!r} is not a UID")
    return value
