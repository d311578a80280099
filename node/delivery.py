"""Sending DICOM objects to peers (C-STORE SCU) and checking them (C-ECHO).

Files are sent as stored, in their own transfer syntax (pynetdicom sends a file path's encoded
data set without decoding it), one association per call, one presentation context per
(SOP Class, Transfer Syntax) pair.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from node.config import Destination

log = logging.getLogger(__name__)

#: Most presentation contexts one association may propose (PS3.8 9.3.2.2: 128, odd ids 1..255).
MAX_CONTEXTS = 128


class DeliveryError(ConnectionError):
    """The peer could not be reached or refused the association; worth retrying later."""


@dataclass(frozen=True)
class Timeouts:
    acse_s: float = 30.0
    dimse_s: float = 120.0
    network_s: float = 60.0


@dataclass(frozen=True)
class SendStatus:
    path: Path
    sop_instance_uid: str
    status: int | None  #: None when no response came (association lost)
    comment: str | None = None

    @property
    def ok(self) -> bool:
        # 0xB000, 0xB007, 0xB006 are warnings: the peer stored the object
        return self.status is not None and (self.status == 0 or 0xB000 <= self.status <= 0xBFFF)


def _ae(calling_ae_title: str, timeouts: Timeouts) -> AE:
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    return ae


def send_files(
    destination: Destination,
    paths: Sequence[Path],
    *,
    calling_ae_title: str,
    timeouts: Timeouts = Timeouts(),
    progress: Callable[[SendStatus], None] | None = None,
) -> list[SendStatus]:
    """C-STORE ``paths`` to ``destination``, each file in its own transfer syntax.

    Raises
    ------
    DeliveryError
        If the association cannot be established or no presentation context was accepted.
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
    ae = _ae(calling_ae_title, timeouts)
    for sop_class, syntax in contexts:
        ae.add_requested_context(sop_class, [syntax])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        reason = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "not established"
        raise DeliveryError(f"association with {destination} {reason}")
    statuses: list[SendStatus] = []
    try:
        accepted = {
            (cx.abstract_syntax, cx.transfer_syntax[0]) for cx in assoc.accepted_contexts
        }
        for path, sop_uid, pair in headers:
            if pair not in accepted:
                result = SendStatus(path, sop_uid, None, "no accepted presentation context")
            else:
                response = assoc.send_c_store(path)
                status = int(response.Status) if "Status" in response else None
                comment = str(response.get("ErrorComment", "")) or None
                result = SendStatus(path, sop_uid, status, comment)
            statuses.append(result)
            if progress is not None:
                progress(result)
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


@dataclass(frozen=True)
class EchoResult:
    destination: Destination
    ok: bool
    status: int | None
    latency_s: float
    error: str | None = None


def echo(destination: Destination, *, calling_ae_title: str, timeouts: Timeouts = Timeouts()) -> EchoResult:
    """C-ECHO ``destination`` and measure the round trip (association included)."""
    ae = _ae(calling_ae_title, timeouts)
    ae.add_requested_context(Verification)
    started = time.perf_counter()
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        return EchoResult(destination, False, None, time.perf_counter() - started, "association failed")
    try:
        response = assoc.send_c_echo()
        status = int(response.Status) if "Status" in response else None
    finally:
        assoc.release()
    return EchoResult(destination, status == 0, status, time.perf_counter() - started)
