"""The DICOM listener: a pynetdicom SCP for C-ECHO and C-STORE of every storage SOP class.

The C-STORE handler never raises: each failure becomes a status with a comment (PS3.4 B.2.3) —
``0xA700`` when mednode cannot take the instance now (disk, database), ``0xA900`` when the data set
does not match the request, ``0xC000`` when it cannot be understood — and the listener keeps serving.
"""

from __future__ import annotations

import logging
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    AE,
    AllStoragePresentationContexts,
    _config as pynetdicom_config,
    evt,
)
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from dicom_io.errors import InvalidInstanceError
from node import metrics
from node.ingest import Ingestor, RequestMismatchError
from storage.errors import StorageError, StorageFullError

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

_UNCOMPRESSED = [
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
]
#: The acceptor's order decides which syntax a peer ends up using: compressed first, so files
#: proposed in their own compressed syntax arrive (and are stored) exactly as sent.
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _UNCOMPRESSED
] + _UNCOMPRESSED


def quiet_pynetdicom() -> None:
    """Stop pynetdicom from logging data set identifiers (patient data) at any level."""
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    pynetdicom_config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def _status(code: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]  # LO: 64 characters at most
    metrics.STORE_FAILURES.labels(status=f"0x{code:04X}").inc()
    return ds


def handle_store(event: Any, ingestor: Ingestor) -> int | Dataset:
    """Answer one C-STORE request: Success only once the instance is on disk and indexed."""
    assoc = event.assoc
    calling = assoc.requestor.ae_title.strip() if assoc.requestor.ae_title else None
    called = assoc.acceptor.ae_title.strip() if assoc.acceptor.ae_title else None
    request = event.request
    try:
        data = event.encoded_dataset(include_meta=True)
        ingestor.ingest(
            data,
            calling_ae_title=calling,
            called_ae_title=called,
            expected_sop_class_uid=str(request.AffectedSOPClassUID),
            expected_sop_instance_uid=str(request.AffectedSOPInstanceUID),
        )
    except InvalidInstanceError as exc:
        log.warning("refused instance %s: %s", request.AffectedSOPInstanceUID, exc)
        return _status(STATUS_CANNOT_UNDERSTAND, f"Cannot understand: {exc}")
    except RequestMismatchError as exc:
        log.warning("refused instance %s: %s", request.AffectedSOPInstanceUID, exc)
        return _status(STATUS_DATASET_MISMATCH, str(exc))
    except StorageFullError as exc:
        log.error("out of storage, refused %s: %s", request.AffectedSOPInstanceUID, exc)
        return _status(STATUS_OUT_OF_RESOURCES, "Out of resources: storage full")
    except (StorageError, OSError) as exc:
        log.error("could not write %s: %s", request.AffectedSOPInstanceUID, exc)
        return _status(STATUS_OUT_OF_RESOURCES, "Out of resources: cannot write instance")
    except SQLAlchemyError as exc:
        log.error("could not index %s: %s", request.AffectedSOPInstanceUID, type(exc).__name__)
        return _status(STATUS_OUT_OF_RESOURCES, "Out of resources: index unavailable")
    except Exception:  # boundary: a handler must answer, never raise into pynetdicom
        log.exception("unexpected error storing %s", request.AffectedSOPInstanceUID)
        return _status(STATUS_CANNOT_UNDERSTAND, "Cannot understand: internal error")
    return STATUS_SUCCESS


def _log_association(event: Any) -> None:
    assoc = event.assoc
    log.info(
        "association %s from %s@%s:%s",
        event.event.name.replace("EVT_", "").lower(),
        assoc.requestor.ae_title,
        assoc.requestor.address,
        assoc.requestor.port,
    )


def make_ae(ae_title: str) -> AE:
    """An Application Entity accepting Verification and every storage SOP class."""
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = 0  # no limit: large PDUs cost fewer round trips
    ae.network_timeout = 60
    ae.acse_timeout = 30
    ae.dimse_timeout = 120
    return ae


def start_listener(
    ingestor: Ingestor, *, ae_title: str, host: str, port: int
) -> ThreadedAssociationServer:
    """Start the SCP in background threads and return the server (``.shutdown()`` stops it)."""
    quiet_pynetdicom()
    ae = make_ae(ae_title)
    handlers = [
        (evt.EVT_C_STORE, handle_store, [ingestor]),
        (evt.EVT_ACCEPTED, _log_association),
        (evt.EVT_ABORTED, _log_association),
    ]
    server = ae.start_server((host, port), block=False, evt_handlers=handlers)
    log.info("listening as %s on %s:%d", ae_title, host, port)
    return server
