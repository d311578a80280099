"""How the listener sets up each accepted association: pynetdicom's own, with two C-STORE shortcuts.

pynetdicom runs an association on two threads. The DUL thread reads PDUs and assembles DIMSE
messages; the association thread wakes every millisecond (a fixed ``time.sleep(0.001)`` in
``Association._run_reactor``) to look for a complete message, runs the service handler, and hands
the response back to the DUL thread to send. A peer that sends one C-STORE at a time — storescu,
Orthanc, most modalities — waits for that wake-up on every instance, and the request's bytes are
read in 4 KiB ``recv`` calls (128 of them for a 512×512 CT). Together that was about a fifth of the
time the listener took per instance (docs/BENCHMARKS.md, "Ingest").

:class:`StoreRequestHandler`, given to pynetdicom's server as its ``request_handler``, lets
pynetdicom set each association up, then:

* serves a C-STORE request on the DUL thread as soon as its message is complete
  (:class:`ServeStoreOnArrival`), as pynetdicom itself does for N-EVENT-REPORT. Other requests
  (C-ECHO) still go through the association thread. While the handler runs the DUL thread reads
  nothing more; mednode negotiates no asynchronous operations window, so the peer has nothing to
  send before the response but an A-ABORT, which is acted on once the handler returns;
* reads each PDU with as few ``recv_into`` calls as the kernel allows (:class:`WholeReadSocket`).

Both shortcuts use pynetdicom internals (the association's DIMSE message queue and
``_serve_request``, the socket's class). :func:`shortcuts_supported` checks them once; if a
pynetdicom release changes them, the listener logs one warning and runs pynetdicom unchanged
(slower, still correct), and tests/unit/node/test_acceptor.py fails.
"""

from __future__ import annotations

import logging
import queue
import socket
import ssl
from typing import TYPE_CHECKING, Any, cast

from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.transport import AssociationSocket, RequestHandler

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

#: Most bytes one ``recv_into`` buffer is allocated for: a PDU whose header claims more (the
#: listener accepts any PDU length) is read in blocks of this size, so a lying length costs no
#: more memory than the bytes actually sent.
MAX_READ_BLOCK = 1 << 20


class WholeReadSocket(AssociationSocket):
    """pynetdicom's association socket, reading each request with as few syscalls as possible."""

    def recv(self, nr_bytes: int) -> bytearray:
        """Read `nr_bytes` from the socket; fewer only if the peer closes the connection.

        pynetdicom's own ``recv`` asks for at most 4096 bytes per call and appends each piece;
        this one reads straight into a buffer of the full size (up to :data:`MAX_READ_BLOCK`).
        """
        sock = cast(socket.socket, self.socket)
        data = bytearray()
        while len(data) < nr_bytes:
            block = bytearray(min(nr_bytes - len(data), MAX_READ_BLOCK))
            filled = _fill(sock, block)
            if filled < len(block):
                data += memoryview(block)[:filled]
                return data  # connection closed: what was read, as pynetdicom returns it
            if data:
                data += block
            else:
                data = block
        return data


def _fill(sock: socket.socket | ssl.SSLSocket, block: bytearray) -> int:
    """Read into `block` until it is full or the peer closes; return the bytes read."""
    filled = 0
    with memoryview(block) as view:
        while filled < len(block):
            count = sock.recv_into(view[filled:])
            if not count:
                break
            filled += count
    return filled


class ServeStoreOnArrival(queue.Queue):  # type: ignore[type-arg]
    """An association's DIMSE message queue that serves C-STORE requests instead of queueing them.

    pynetdicom's DUL thread puts each complete message on the association's queue
    (``DIMSEServiceProvider.msg_queue``); here a valid C-STORE request is served right there, on
    the DUL thread, and its response is queued for that same thread to send once the handler
    returns. Everything else — C-ECHO, responses, the ``(None, None)`` put on abort — is queued
    for the association thread as before.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__()
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, message = item
        if isinstance(message, C_STORE) and context_id is not None and message.is_valid_request:
            self._assoc._serve_request(message, context_id)
            return
        super().put(item, block, timeout)


class StoreRequestHandler(RequestHandler):
    """pynetdicom's connection handler, with :class:`ServeStoreOnArrival` and :class:`WholeReadSocket`.

    Give it to pynetdicom's server as ``request_handler`` (``AE.make_server(...,
    request_handler=StoreRequestHandler)``).
    """

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        if shortcuts_supported(assoc):
            assoc.dimse.msg_queue = ServeStoreOnArrival(assoc)
            # same state, one method more: the socket pynetdicom already made, reading faster
            assoc.dul.socket.__class__ = WholeReadSocket
        return assoc


_warned = False


def shortcuts_supported(assoc: Association) -> bool:
    """Whether this pynetdicom still has what the shortcuts replace; warn once if not."""
    global _warned
    supported = (
        type(assoc.dimse.msg_queue) is queue.Queue
        and assoc.dimse.msg_queue.empty()
        and callable(getattr(assoc, "_serve_request", None))
        and type(assoc.dul.socket) is AssociationSocket
    )
    if not supported and not _warned:
        _warned = True
        log.warning(
            "this pynetdicom's association internals differ from what node.acceptor expects: "
            "C-STORE is served by pynetdicom's own polling (slower)"
        )
    return supported
