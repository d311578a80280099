"""STOW-RS in (PS3.18 10.5): a ``multipart/related`` request's instances, each through the same
checks, durable write and index as a C-STORE (:class:`node.ingest.Ingestor`), and the answer.

Each part gets one entry in the response: stored (Referenced SOP Sequence) or refused with a
Failure Reason (Failed SOP Sequence), the codes a C-STORE would answer (PS3.18 10.5.3, PS3.4
B.2.3): 0xC000 cannot understand (unreadable, invalid UIDs, truncated pixel data, a part that is
not ``application/dicom``), 0xA900 the instance does not belong to the study the URL names,
0xA700 out of resources (disk full, index unavailable). The HTTP status follows PS3.18 Table
10.5.3-1: 200 every instance stored, 202 some stored and some refused, 409 none stored.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message

from pydicom import Dataset
from sqlalchemy.exc import SQLAlchemyError

from dicom_io.errors import InvalidInstanceError
from node import metrics
from node.ingest import Ingestor, RequestMismatchError
from storage.errors import StorageError, StorageFullError

log = logging.getLogger(__name__)

DICOM = "application/dicom"
CANNOT_UNDERSTAND = 0xC000
DOES_NOT_MATCH = 0xA900
OUT_OF_RESOURCES = 0xA700
PROCESSING_FAILURE = 0x0110


class StowRequestError(ValueError):
    """The request as a whole cannot be read (HTTP 400)."""


class UnsupportedMediaTypeError(StowRequestError):
    """The request is not ``multipart/related; type="application/dicom"`` (HTTP 415)."""


@dataclass(frozen=True)
class Part:
    content_type: str | None  #: the part's own Content-Type, lower case, no parameters
    data: bytes


def media_type_params(value: str) -> tuple[str, dict[str, str]]:
    """The media type of a Content-Type (or one ``Accept`` range) and its parameters, names lowercased."""
    message = Message()
    message["content-type"] = value
    params = {k.lower(): str(v) for k, v in message.get_params(failobj=[])[1:]}
    return message.get_content_type().lower(), params


def parse_multipart_related(content_type: str | None, body: bytes) -> list[Part]:
    """Split a ``multipart/related`` body (RFC 2387, RFC 2046 5.1) into its parts.

    The request's ``type`` parameter, when given, must be ``application/dicom`` (mednode takes
    no metadata-and-bulk-data requests); a part without a Content-Type of its own takes it.

    Raises
    ------
    UnsupportedMediaTypeError
        If the request is not ``multipart/related``, or its ``type`` is another than
        ``application/dicom``.
    StowRequestError
        If the boundary is missing, or the body is not delimited by it.
    """
    media, params = media_type_params(content_type or "")
    if media != "multipart/related":
        raise UnsupportedMediaTypeError(
            f'expected Content-Type: multipart/related; type="{DICOM}", got {media or "none"}')
    declared = params.get("type", DICOM).lower()
    if declared != DICOM:
        raise UnsupportedMediaTypeError(f"multipart/related of type {declared!r}: only {DICOM} parts are accepted")
    boundary = params.get("boundary")
    if not boundary:
        raise StowRequestError("multipart/related without a boundary parameter")
    delimiter = b"--" + boundary.encode("latin-1")
    start = body.find(delimiter)
    if start < 0:
        raise StowRequestError("the body does not contain the boundary")
    parts: list[Part] = []
    position = start + len(delimiter)
    while True:
        if body[position:position + 2] == b"--":  # the close delimiter
            return parts
        line_end = body.find(b"\r\n", position)
        if line_end < 0:
            raise StowRequestError("a part ends before its headers")
        position = line_end + 2
        end = body.find(b"\r\n" + delimiter, position)
        if end < 0:
            raise StowRequestError("the body has no closing boundary")
        raw = body[position:end]
        if raw.startswith(b"\r\n"):  # no headers
            headers, data = b"", raw[2:]
        else:
            split = raw.find(b"\r\n\r\n")
            if split < 0:
                raise StowRequestError("a part's headers are not ended by an empty line")
            headers, data = raw[:split], raw[split + 4:]
        parts.append(Part(_part_type(headers) or declared, data))
        position = end + 2 + len(delimiter)


def _part_type(headers: bytes) -> str | None:
    for line in headers.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-type":
            return media_type_params(value.strip())[0]
    return None


@dataclass(frozen=True)
class StowEntry:
    """One part's outcome: stored, or refused with a Failure Reason."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str | None
    failure_reason: int | None = None  #: None: stored

    @property
    def stored(self) -> bool:
        return self.failure_reason is None


def _uids_of(data: bytes) -> tuple[str, str]:
    """The SOP Class and Instance UIDs of a part that was refused, if they can be read at all."""
    from io import BytesIO

    from pydicom import dcmread

    try:
        ds = dcmread(BytesIO(data), force=True, stop_before_pixels=True,
                     specific_tags=["SOPClassUID", "SOPInstanceUID"])
        return str(ds.get("SOPClassUID", "") or ""), str(ds.get("SOPInstanceUID", "") or "")
    except Exception:  # noqa: BLE001 (anything unreadable simply has no UIDs to report)
        return "", ""


def store_parts(ingestor: Ingestor, parts: Iterable[Part], *, called_ae_title: str, calling_ae_title: str,
                study_instance_uid: str | None = None) -> list[StowEntry]:
    """Ingest each part as a C-STORE would be; never raises for one part's failure.

    Each stored instance is durable and indexed when this returns (the Ingestor's promise).
    """
    entries: list[StowEntry] = []
    for index, part in enumerate(parts):
        if part.content_type != DICOM:
            sop_class, sop_instance = _uids_of(part.data)
            metrics.STORE_FAILURES.labels(status=f"0x{CANNOT_UNDERSTAND:04X}").inc()
            log.warning("STOW-RS part %d refused: media type %s, not %s", index, part.content_type, DICOM)
            entries.append(StowEntry(sop_class, sop_instance, None, CANNOT_UNDERSTAND))
            continue
        try:
            result = ingestor.ingest(part.data, calling_ae_title=calling_ae_title, called_ae_title=called_ae_title,
                                     expected_study_instance_uid=study_instance_uid)
        except InvalidInstanceError as exc:
            reason, why = CANNOT_UNDERSTAND, str(exc)
        except RequestMismatchError as exc:
            reason, why = DOES_NOT_MATCH, str(exc)
        except StorageFullError:
            reason, why = OUT_OF_RESOURCES, "storage full"
        except (StorageError, OSError) as exc:
            reason, why = OUT_OF_RESOURCES, f"cannot write instance ({type(exc).__name__})"
        except SQLAlchemyError as exc:
            reason, why = OUT_OF_RESOURCES, f"index unavailable ({type(exc).__name__})"
        except Exception:  # boundary: one part's failure must not lose the others' answers
            log.exception("unexpected error storing STOW-RS part %d", index)
            reason, why = PROCESSING_FAILURE, "internal error"
        else:
            header = result.header
            entries.append(StowEntry(header.sop_class_uid, header.sop_instance_uid, header.study_instance_uid))
            continue
        sop_class, sop_instance = _uids_of(part.data)
        metrics.STORE_FAILURES.labels(status=f"0x{reason:04X}").inc()
        log.warning("STOW-RS refused instance %s (part %d): 0x%04X %s", sop_instance or "?", index, reason, why)
        entries.append(StowEntry(sop_class, sop_instance, None, reason))
    return entries


def stow_response(entries: list[StowEntry], retrieve_url: str | None = None) -> tuple[int, Dataset]:
    """The HTTP status and the Store Instances Response data set (PS3.18 Table 10.5.3-2).

    200: every instance stored; 202: some stored, some refused; 409: none stored (an empty
    request included: there was nothing to store).
    """
    response = Dataset()
    if retrieve_url:
        response.RetrieveURL = retrieve_url
    stored, failed = [], []
    for entry in entries:
        item = Dataset()
        item.ReferencedSOPClassUID = entry.sop_class_uid
        item.ReferencedSOPInstanceUID = entry.sop_instance_uid
        if entry.stored:
            stored.append(item)
        else:
            item.FailureReason = entry.failure_reason
            failed.append(item)
    if stored:
        response.ReferencedSOPSequence = stored
    if failed:
        response.FailedSOPSequence = failed
    if stored and not failed:
        return 200, response
    return (202 if stored else 409), response
