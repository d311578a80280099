"""The DICOM listener: a pynetdicom SCP for C-ECHO and C-STORE of every storage SOP class.

The C-STORE handler never raises: each failure becomes a status with a comment (PS3.4 B.2.3) —
``0xA700`` when mednode cannot take the instance now (disk, database), ``0xA900`` when the data set
does not match the request, ``0xC000`` when it cannot be understood — and the listener keeps serving.

Who may associate: with an allow-list (``allowed_calling_ae_titles``, entries ``AET`` or
``AET@host``) any other peer gets an A-ASSOCIATE-RJ, rejected-permanent, "calling AE title not
recognised" (PS3.8 9.3.4, source service user, reason 3) before any data is exchanged. The same
listener can also run on a DICOM TLS port (PS3.15 B.1, :mod:`node.tls`).

Which transfer syntax a sender uses: of those it proposes in a context, its first lossless one,
or its first if it proposes only lossy ones (:func:`follow_sender_order`): mednode never makes a
sender compress lossily, and stores what it sends as sent, Deflated included.

Each accepted association is set up by :class:`node.acceptor.StoreRequestHandler`: pynetdicom's
own, except that C-STORE is served on the thread that reads the network as soon as the request is
complete and neither of the association's threads polls (docs/BENCHMARKS.md, "Ingest").
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Sequence
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    evt,
)
from pynetdicom import (
    _config as pynetdicom_config,
)
from pynetdicom.sop_class import Verification
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from dicom_io.errors import InvalidInstanceError
from node import metrics
from node.acceptor import StoreRequestHandler, copy_contexts_quickly
from node.ingest import Ingestor, RequestMismatchError
from node.peer_policy import CallingAEAllowList
from storage.errors import StorageError, StorageFullError

log = logging.getLogger(__name__)

#: Concurrent associations the listener serves; beyond, peers are rejected (transient, "local limit").
MAX_ASSOCIATIONS = 32
#: Seconds a peer may take between connecting and requesting an association (and between ACSE steps).
ACSE_TIMEOUT_S = 15
STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC000

#: Transfer syntaxes that keep every pixel value (PS3.5 8 and Annex A): uncompressed, deflated,
#: RLE, JPEG lossless (processes 14), JPEG-LS lossless, JPEG 2000 / HTJ2K lossless only, JPEG XL
#: lossless, SMPTE ST 2110 uncompressed video and audio, Deflated Image Frame. Every other one may be
#: lossy (JPEG 2000 "Image Compression" may be either, hence lossy here).
LOSSLESS_TRANSFER_SYNTAXES = frozenset({
    ImplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, Process 14, Selection Value 1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.92",  # JPEG 2000 Part 2 Multi-component (Lossless Only)
    "1.2.840.10008.1.2.4.110",  # JPEG XL Lossless
    "1.2.840.10008.1.2.4.201",  # High-Throughput JPEG 2000 (Lossless Only)
    "1.2.840.10008.1.2.4.202",  # High-Throughput JPEG 2000 with RPCL Options (Lossless Only)
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.7.1",  # SMPTE ST 2110-20 Uncompressed Progressive Active Video
    "1.2.840.10008.1.2.7.2",  # SMPTE ST 2110-20 Uncompressed Interlaced Active Video
    "1.2.840.10008.1.2.7.3",  # SMPTE ST 2110-30 PCM Digital Audio
    "1.2.840.10008.1.2.8.1",  # Deflated Image Frame Compression
})
#: Every syntax pynetdicom knows, lossless ones first. Which one a peer ends up using is decided
#: per association by :func:`follow_sender_order`; this order only matters where that is skipped.
ACCEPTED_TRANSFER_SYNTAXES: list[str] = [
    ts for ts in ALL_TRANSFER_SYNTAXES if ts in LOSSLESS_TRANSFER_SYNTAXES
] + [ts for ts in ALL_TRANSFER_SYNTAXES if ts not in LOSSLESS_TRANSFER_SYNTAXES]


def sender_order(proposals: Sequence[Sequence[str]], supported: Sequence[UID]) -> list[UID]:
    """The proposed transfer syntaxes that mednode supports, in the order to accept them.

    ``proposals`` are the transfer syntax lists of the contexts a sender proposed for one
    abstract syntax. Within one context: the sender's own order, except that every lossless
    syntax comes before any lossy one, so a sender that proposes JPEG Baseline before JPEG
    Lossless or Explicit VR LE is asked for a lossless one (a transcoding sender never degrades
    an image for mednode), and a sender that proposes only lossy syntaxes (it holds the image
    that way) gets its first. A sender's first proposal is usually how it holds the file, so
    files arrive, and are stored, as it holds them. (PS3.8 9.3.2.2 leaves the choice to the
    acceptor; pynetdicom takes the first of the acceptor's list that a context proposes.)

    pynetdicom keeps one list per abstract syntax, so contexts proposed for the same one share it.
    dcmsend, for one, proposes a context per file syntax, each with the uncompressed ones as
    fallback: [JPEG Lossless, Explicit LE, …], [RLE, Explicit LE, …], [Explicit LE, …]. Syntaxes
    rank by their best place in any context, then the fewer contexts propose one the earlier it
    comes (a file's own syntax before everyone's fallback), so each such context gets its own
    first; for one context this is exactly the order above.
    """
    best_place: dict[UID, tuple[bool, int]] = {}
    contexts: dict[UID, int] = {}
    for proposal in proposals:
        mine = [ts if isinstance(ts, UID) else UID(ts) for ts in dict.fromkeys(proposal) if ts in supported]
        ranked = [ts for ts in mine if ts in LOSSLESS_TRANSFER_SYNTAXES] + [
            ts for ts in mine if ts not in LOSSLESS_TRANSFER_SYNTAXES
        ]
        for place, ts in enumerate(ranked):
            key = (ts not in LOSSLESS_TRANSFER_SYNTAXES, place)
            best_place[ts] = min(best_place.get(ts, key), key)
            contexts[ts] = contexts.get(ts, 0) + 1
    first_seen = {ts: index for index, ts in enumerate(best_place)}
    return sorted(best_place, key=lambda ts: (*best_place[ts], contexts[ts], first_seen[ts]))


def follow_sender_order(event: Any) -> None:
    """``EVT_REQUESTED`` handler: rank this association's transfer syntaxes as :func:`sender_order`.

    Runs before pynetdicom negotiates, on the association's own copy of the supported contexts
    (``assoc.acceptor.supported_contexts``, writable until the A-ASSOCIATE-AC is sent): each
    proposed abstract syntax's list becomes the proposed syntaxes mednode supports, ranked. The
    list is rewritten in place (the ``transfer_syntax`` setter validates each UID again: 3-6 ms
    more for a peer proposing 127 contexts); this handler takes about 1 ms for such a peer.
    """
    assoc = event.assoc
    if assoc.is_rejected or assoc.is_aborted:
        return
    proposed: dict[str, list[list[str]]] = {}
    for item in assoc.requestor.primitive.presentation_context_definition_list:
        proposed.setdefault(item.abstract_syntax, []).append(item.transfer_syntax)
    for context in assoc.acceptor.supported_contexts:
        proposals = proposed.get(context.abstract_syntax)
        if proposals:
            syntaxes = context.transfer_syntax
            ranked = sender_order(proposals, syntaxes)
            if ranked:
                syntaxes[:] = ranked


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
        ingestor.ingest_received(
            event.encoded_dataset(include_meta=False),
            sop_class_uid=str(request.AffectedSOPClassUID),
            sop_instance_uid=str(request.AffectedSOPInstanceUID),
            transfer_syntax_uid=str(event.context.transfer_syntax),
            calling_ae_title=calling,
            called_ae_title=called,
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


# -- who may associate ------------------------------------------------------------------------------
#: A-ASSOCIATE-RJ fields (PS3.8 9.3.4): rejected-permanent, DICOM UL service-user,
#: calling-AE-title-not-recognized.
REJECT_PERMANENT = 0x01
REJECT_SOURCE_SERVICE_USER = 0x01
REJECT_CALLING_AE_NOT_RECOGNISED = 0x03


def check_calling_peer(event: Any, allowed: CallingAEAllowList) -> None:
    """``EVT_REQUESTED`` handler: reject a peer the allow-list does not name, before negotiation.

    The rejection is A-ASSOCIATE-RJ (rejected-permanent, service user, calling AE title not
    recognised): a misconfigured modality sees why at once instead of retrying. Logged with the
    AE title and IP address only.
    """
    assoc = event.assoc
    calling = str(assoc.requestor.primitive.calling_ae_title or "").strip()
    address = str(assoc.requestor.address)
    if allowed.allows(calling, address):
        return
    log.warning("rejected association from %s@%s: calling AE title not allowed from this address",
                calling, address)
    assoc.acse.send_reject(REJECT_PERMANENT, REJECT_SOURCE_SERVICE_USER, REJECT_CALLING_AE_NOT_RECOGNISED)
    evt.trigger(assoc, evt.EVT_REJECTED, {})
    assoc.kill()  # waits until the peer has the A-ASSOCIATE-RJ and closes (as pynetdicom does)


def make_ae(ae_title: str) -> AE:
    """An Application Entity accepting Verification and every storage SOP class."""
    ae = AE(ae_title=ae_title)
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ACCEPTED_TRANSFER_SYNTAXES)
    ae.maximum_pdu_size = 0  # no limit: large PDUs cost fewer round trips
    # a PACS, its modalities and a few idle or half-open peers at once; an idle connection holds
    # its slot until the ACSE (ARTIM) timeout, hence a short one
    ae.maximum_associations = MAX_ASSOCIATIONS
    ae.network_timeout = 60
    ae.acse_timeout = ACSE_TIMEOUT_S
    ae.dimse_timeout = 120
    return ae


# -- servers ----------------------------------------------------------------------------------------
class TLSAssociationServer(ThreadedAssociationServer):
    """An association server whose TLS handshake runs in the connection's own thread.

    pynetdicom's server does the handshake in its accept loop, on a blocking socket: one client
    that connects and sends nothing (or a plain-TCP peer) would stall every other TLS peer. Here
    the accept loop only accepts; each connection's thread does the handshake with the ACSE
    timeout, and a failed handshake is logged (address and reason) and closed.
    """

    handshake_timeout_s: float = 30.0

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None and self.ssl_context is not None
        client, address = self.socket.accept()
        wrapped = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        return wrapped, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.handshake_timeout_s)
            request.do_handshake()
            request.settimeout(None)
        except (ssl.SSLError, OSError) as exc:
            log.warning("TLS handshake with %s failed: %s", client_address[0],
                        getattr(exc, "reason", None) or type(exc).__name__)
            return  # the server closes the socket (shutdown_request)
        super().finish_request(request, client_address)


class _ReusePort:
    """Binds with ``SO_REUSEPORT``: several listener processes serve one port, and the kernel
    hands each new connection (each association) to one of them."""

    socket: socket.socket | None

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()  # type: ignore[misc]


class ReusePortAssociationServer(_ReusePort, ThreadedAssociationServer):
    pass


class ReusePortTLSAssociationServer(_ReusePort, TLSAssociationServer):
    pass


def start_listener(
    ingestor: Ingestor,
    *,
    ae_title: str,
    host: str,
    port: int,
    allowed_calling_ae_titles: Sequence[str] | CallingAEAllowList | None = None,
    ssl_context: ssl.SSLContext | None = None,
    reuse_port: bool = False,
) -> ThreadedAssociationServer:
    """Start the SCP in background threads and return the server (``.shutdown()`` stops it).

    Parameters
    ----------
    allowed_calling_ae_titles
        ``AET`` or ``AET@host`` entries (or a built :class:`CallingAEAllowList`); any other
        peer is rejected. None accepts every peer.
    ssl_context
        Server-side TLS context (:func:`node.tls.server_context`): this listener then speaks
        DICOM TLS only.
    reuse_port
        Bind with ``SO_REUSEPORT``, beside the other listener processes of this node
        (``listener_processes``).

    Raises
    ------
    ConfigError
        If an allow-list entry is invalid.
    """
    quiet_pynetdicom()
    ae = make_ae(ae_title)
    handlers: list[Any] = [
        (evt.EVT_C_STORE, handle_store, [ingestor]),
        (evt.EVT_ACCEPTED, _log_association),
        (evt.EVT_ABORTED, _log_association),
    ]
    if allowed_calling_ae_titles is not None:
        allowed = (
            allowed_calling_ae_titles
            if isinstance(allowed_calling_ae_titles, CallingAEAllowList)
            else CallingAEAllowList.parse(allowed_calling_ae_titles)
        )
        handlers.append((evt.EVT_REQUESTED, check_calling_peer, [allowed]))
    handlers.append((evt.EVT_REQUESTED, follow_sender_order))  # after the allow-list: skipped if it rejects
    if reuse_port:
        server_class: type[ThreadedAssociationServer] = (
            ReusePortAssociationServer if ssl_context is None else ReusePortTLSAssociationServer)
    else:
        server_class = ThreadedAssociationServer if ssl_context is None else TLSAssociationServer
    server = cast(ThreadedAssociationServer, ae.make_server(
        (host, port), evt_handlers=handlers, ssl_context=ssl_context, server_class=server_class,
        request_handler=StoreRequestHandler))
    copy_contexts_quickly(server)
    if isinstance(server, TLSAssociationServer):
        server.handshake_timeout_s = float(ae.acse_timeout or 30)
    ae._servers.append(server)  # as start_server does: server.shutdown() removes it there
    threading.Thread(target=server.serve_forever, name=f"Acceptor@{port}", daemon=True).start()
    log.info("listening as %s on %s:%d%s%s", ae_title, host, port, " (DICOM TLS)" if ssl_context else "",
             "; calling AE titles restricted" if allowed_calling_ae_titles is not None else "")
    return server
