"""Sending DICOM objects to peers (C-STORE SCU) and checking them (C-ECHO).

Files are sent as stored, in their own transfer syntax, their data set's bytes read from the file
as they go out (pynetdicom's chunked sending: without it pynetdicom decodes a file path's data set
and encodes it again: the sender's CPU for a 300-slice SEG of 600 frames and its SR was 0.069 s,
0.037 s without), one association per call, one presentation context per (SOP Class, Transfer
Syntax) pair.

Every failure is either *transient* (worth trying again later: no connection, a timeout, an
abort, a peer out of resources, an association rejected transiently) or *permanent* (the peer
refused for good: a failure status other than "out of resources", an association rejected
permanently, a presentation context rejected, a TLS certificate that does not verify). Only
transient failures are retried; :func:`classify_status` and :func:`classify_rejection` decide.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom import _config as pynetdicom_config
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node.config import Destination, DicomWebDestination
from node.tls import client_context

log = logging.getLogger(__name__)

#: how long a failed TLS association's second look waits for the peer's alert
TLS_ALERT_WAIT_S = 2.0
#: Most presentation contexts one association may propose (PS3.8 9.3.2.2: 128, odd ids 1..255).
MAX_CONTEXTS = 128


class Outcome(StrEnum):
    """What one answer of a peer means for the object sent."""

    SUCCESS = "success"
    WARNING = "warning"  #: stored, with a warning (coercion, elements discarded…)
    TRANSIENT = "transient"  #: not stored; trying again later may succeed
    PERMANENT = "permanent"  #: not stored; trying again cannot help until someone changes a setting

    @property
    def stored(self) -> bool:
        return self in (Outcome.SUCCESS, Outcome.WARNING)


#: C-STORE and general DIMSE statuses by code (PS3.4 B.2.3, PS3.7 C); ranges are in :func:`status_meaning`
STATUS_MEANINGS: dict[int, str] = {
    0x0000: "success",
    0x0001: "warning: requested optional attributes are not supported",
    0x0107: "warning: attribute list error",
    0x0116: "warning: attribute value out of range",
    0xB000: "warning: coercion of data elements",
    0xB006: "warning: elements discarded",
    0xB007: "warning: data set does not match SOP class",
    0x0110: "processing failure",
    0x0117: "invalid SOP instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0210: "duplicate invocation",
    0x0211: "unrecognized operation",
    0x0212: "mistyped argument",
    0x0213: "resource limitation",
    0xFE00: "cancelled",
}
_WARNINGS = frozenset({0x0001, 0x0107, 0x0116})
_TRANSIENT = frozenset({0x0213, 0xFE00})


def status_meaning(status: int) -> str:
    """The standard's words for a C-STORE status, e.g. ``data set does not match SOP class``."""
    if status in STATUS_MEANINGS:
        return STATUS_MEANINGS[status]
    if 0xA700 <= status <= 0xA7FF:
        return "out of resources"
    if 0xA900 <= status <= 0xA9FF:
        return "data set does not match SOP class"
    if 0xC000 <= status <= 0xCFFF:
        return "cannot understand"
    if 0xB000 <= status <= 0xBFFF:
        return "warning"
    return "failure"


def classify_status(status: int | None) -> Outcome:
    """Sort a C-STORE response status (PS3.4 B.2.3) into success, warning, transient or permanent.

    ``None`` (no response: the association was aborted or the DIMSE timeout passed) and "out of
    resources" (0xA7xx, 0x0213) are transient, as is a cancel; every other failure status
    (0xA9xx, 0xCxxx, 0x0110, 0x0122, 0x0124, …) is a refusal that a retry would only repeat.
    """
    if status is None:
        return Outcome.TRANSIENT
    if status == 0x0000:
        return Outcome.SUCCESS
    if 0xB000 <= status <= 0xBFFF or status in _WARNINGS:
        return Outcome.WARNING
    if 0xA700 <= status <= 0xA7FF or status in _TRANSIENT or 0xFF00 <= status <= 0xFFFF:
        return Outcome.TRANSIENT
    return Outcome.PERMANENT


def classify_rejection(result: int | None) -> Outcome:
    """Sort an A-ASSOCIATE-RJ by its Result (PS3.8 9.3.4): 1 permanent, 2 transient.

    Anything else (no answer, an invalid one) is transient: the association did not happen and
    nothing says the peer meant it.
    """
    return Outcome.PERMANENT if result == 0x01 else Outcome.TRANSIENT


class DeliveryError(ConnectionError):
    """Sending to a peer failed before any object could be stored."""

    outcome: Outcome = Outcome.TRANSIENT


class TransientDeliveryError(DeliveryError):
    """The peer could not be reached, timed out, aborted or was busy; worth retrying later."""


class PermanentDeliveryError(DeliveryError):
    """The peer refused for good (association rejected permanently, TLS certificate not trusted);
    retrying cannot help until someone changes a setting here or at the peer."""

    outcome = Outcome.PERMANENT


@dataclass(frozen=True)
class Timeouts:
    acse_s: float = 30.0
    dimse_s: float = 120.0
    network_s: float = 60.0


def destination_timeouts(destination: Destination, defaults: Timeouts) -> Timeouts:
    """The destination's own timeouts where it has them, ``defaults`` for the others."""
    own = destination.timeouts
    return Timeouts(
        acse_s=own.acse_s if own.acse_s is not None else defaults.acse_s,
        dimse_s=own.dimse_s if own.dimse_s is not None else defaults.dimse_s,
        network_s=own.network_s if own.network_s is not None else defaults.network_s,
    )


@dataclass(frozen=True)
class SendStatus:
    path: Path
    sop_instance_uid: str
    status: int | None  #: None when no response came (association lost, context rejected)
    comment: str | None = None
    #: what the answer means; by default from ``status`` (see :func:`classify_status`)
    outcome: Outcome = field(default=Outcome.TRANSIENT)

    def __post_init__(self) -> None:
        if self.status is not None:
            object.__setattr__(self, "outcome", classify_status(self.status))

    @property
    def ok(self) -> bool:
        return self.outcome.stored

    def describe(self) -> str:
        """``status 0xA900 (data set does not match SOP class): <comment>``, or the comment alone."""
        if self.status is None:
            return self.comment or "no response"
        text = f"status 0x{self.status:04X} ({status_meaning(self.status)})"
        return f"{text}: {self.comment}" if self.comment else text


def _ae(calling_ae_title: str, timeouts: Timeouts) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    ae.connection_timeout = timeouts.network_s
    return ae


def _tls_args(destination: Destination) -> tuple[ssl.SSLContext, str] | None:
    if destination.tls is None:
        return None
    return client_context(destination.tls), destination.tls.server_hostname or destination.host


def _unread_rejection(assoc: Association) -> A_ASSOCIATE | None:
    """The A-ASSOCIATE-RJ a peer sent, when pynetdicom reported an abort instead.

    A peer that rejects and closes at once (dcmtk ``storescp --refuse``) can have its rejection
    read and the transport closed before pynetdicom's association thread checks that the socket
    is connected; it then aborts and leaves the rejection unread in the DUL's queue (seen in about
    one association in three on loopback, pynetdicom 3.0). The rejection decides whether a retry
    can help, so look for it there.
    """
    queue = getattr(getattr(assoc, "dul", None), "to_user_queue", None)
    for primitive in list(getattr(queue, "queue", ())):
        if isinstance(primitive, A_ASSOCIATE) and getattr(primitive, "result", None) in (0x01, 0x02):
            return primitive
    return None


def _associate(destination: Destination, ae: AE) -> Association:
    """Open the association or raise the :class:`DeliveryError` that says why not."""
    tls_args = _tls_args(destination)
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title, tls_args=tls_args)
    if assoc.is_established:
        return assoc
    answer = assoc.acceptor.primitive if assoc.is_rejected else _unread_rejection(assoc)
    if answer is not None:
        result = getattr(answer, "result", None)
        words = f"{answer.result_str}, source: {answer.source_str}, reason: {answer.reason_str}"
        if classify_rejection(result) is Outcome.PERMANENT:
            raise PermanentDeliveryError(f"association rejected ({words})")
        raise TransientDeliveryError(f"association with {destination} rejected ({words})")
    if tls_args is not None:
        _explain_tls_failure(destination, tls_args, ae.connection_timeout or 30.0)
    how = "aborted" if assoc.is_aborted else "not established"
    raise TransientDeliveryError(f"association with {destination} {how} (peer down, unreachable or busy?)")


def _explain_tls_failure(destination: Destination, tls_args: tuple[ssl.SSLContext, str], timeout_s: float) -> None:
    """pynetdicom logs, but does not return, why a TLS connection failed: try the handshake
    once more to learn it, and raise :class:`PermanentDeliveryError` for a certificate problem.

    A certificate that does not verify, or a peer that refuses ours, is a configuration problem
    here or at the peer: retrying for a day would only hide it. Anything else (refused, reset,
    timed out) is left to the caller as transient.
    """
    context, server_hostname = tls_args
    try:
        with socket.create_connection((destination.host, destination.port), timeout=timeout_s) as raw, \
                context.wrap_socket(raw, server_hostname=server_hostname) as tls:
            # TLS 1.3: a peer that refuses our certificate says so after the handshake, in an
            # alert; a DICOM peer otherwise sends nothing before our A-ASSOCIATE-RQ
            tls.settimeout(TLS_ALERT_WAIT_S)
            tls.recv(1)
            return
    except ssl.SSLCertVerificationError as exc:
        raise PermanentDeliveryError(
            f"TLS: the peer's certificate does not verify ({exc.verify_message}); "
            "check the destination's tls.ca_file (the CA that signed the peer's certificate) and "
            "tls.server_hostname"
        ) from None
    except (ssl.SSLEOFError, ssl.SSLZeroReturnError, TimeoutError):
        return
    except ssl.SSLError as exc:
        raise PermanentDeliveryError(
            f"TLS handshake failed ({exc.reason or exc}); check the "
            "destination's tls.cert_file/key_file (the peer may not trust this node's certificate)"
        ) from None
    except OSError:
        return


def send_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae_title: str,
    timeouts: Timeouts = Timeouts(),
    progress: Callable[[SendStatus], None] | None = None,
) -> list[SendStatus]:
    """C-STORE ``paths`` to ``destination``, each file in its own transfer syntax.

    The peer's options (calling AE title, timeouts, TLS) come from ``destination``; where it
    has none, ``calling_ae_title`` and ``timeouts`` apply. Each file's answer is in the
    returned :class:`SendStatus` (its ``outcome`` says whether a retry can help); a presentation
    context the peer rejected is a permanent refusal of the files that needed it.

    Raises
    ------
    PermanentDeliveryError
        If the peer rejected the association permanently, or its TLS certificate does not verify.
    TransientDeliveryError
        If the peer could not be reached, or aborted or rejected the association transiently.
    ConfigError
        If the destination's TLS files cannot be loaded.
    ValueError
        If the files need more than 128 distinct (SOP Class, Transfer Syntax) pairs.
    """
    headers = []
    contexts: dict[tuple[str, str], None] = {}
    for path in paths:
        ds = dcmread(path, stop_before_pixels=True)
        pair = (str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID))
        contexts[pair] = None
        headers.append((Path(path), str(ds.SOPInstanceUID), pair))
    if len(contexts) > MAX_CONTEXTS:
        raise ValueError(
            f"{len(contexts)} distinct SOP Class/Transfer Syntax pairs; send at most {MAX_CONTEXTS} per call"
        )
    # send each file's data set as its bytes (after the file meta), never decoded and encoded
    # again: the contexts proposed are the files' own (SOP Class, Transfer Syntax) pairs, which
    # is what chunked sending needs (pynetdicom's documented switch, process-wide; nothing in
    # mednode sends a C-STORE any other way)
    pynetdicom_config.STORE_SEND_CHUNKED_DATASET = True
    ae = _ae(destination.calling_ae_title or calling_ae_title, destination_timeouts(destination, timeouts))
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    assoc = _associate(destination, ae)
    statuses: list[SendStatus] = []
    unanswered = False
    try:
        accepted = {
            (cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
        }
        for path, sop_uid, pair in headers:
            if pair not in accepted:
                result = SendStatus(path, sop_uid, None, _context_refused(pair), Outcome.PERMANENT)
            else:
                response = assoc.send_c_store(path)
                status = int(response.Status) if "Status" in response else None
                comment = str(response.get("ErrorComment", "")) or None
                result = SendStatus(path, sop_uid, status, comment)
            statuses.append(result)
            if progress is not None:
                progress(result)
            # no answer: the peer aborted or closed the connection (or the DIMSE timeout passed).
            # pynetdicom's reactor may not have marked the association ended yet, and a C-STORE
            # sent into it would wait out the whole DIMSE timeout: the files left are sent again
            # over a new association (the caller's retry)
            unanswered = result.status is None and pair in accepted
            if unanswered or not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            if unanswered:
                assoc.abort()
            else:
                assoc.release()
    return statuses


def _context_refused(pair: tuple[str, str]) -> str:
    sop_class, syntax = (UID(u) for u in pair)
    return (f"presentation context rejected: the peer accepts no {sop_class.name} "
            f"in {syntax.name} (SOP class or transfer syntax not supported)")


@dataclass(frozen=True)
class EchoResult:
    destination: Destination | DicomWebDestination
    ok: bool
    status: int | None
    latency_s: float
    error: str | None = None


def echo(destination: Destination, *, calling_ae_title: str, timeouts: Timeouts = Timeouts()) -> EchoResult:
    """C-ECHO ``destination`` and measure the round trip (association included).

    The destination's own calling AE title, timeouts and TLS apply, as for :func:`send_files`.

    Raises
    ------
    ConfigError
        If the destination's TLS files cannot be loaded.
    """
    ae = _ae(destination.calling_ae_title or calling_ae_title, destination_timeouts(destination, timeouts))
    ae.add_requested_context(Verification)
    started = time.perf_counter()
    try:
        assoc = _associate(destination, ae)
    except DeliveryError as exc:
        return EchoResult(destination, False, None, time.perf_counter() - started, str(exc))
    try:
        response = assoc.send_c_echo()
        status = int(response.Status) if "Status" in response else None
    finally:
        if assoc.is_established:
            assoc.release()
    return EchoResult(destination, status == 0, status, time.perf_counter() - started)
