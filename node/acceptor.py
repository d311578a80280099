"""How the listener sets up each association: pynetdicom's own, with C-STORE served on arrival.

pynetdicom runs an association on two threads, both polling. The DUL thread reads PDUs and
assembles DIMSE messages, sleeping 1 ms (``DULServiceProvider._run_loop_delay``) after every pass
that found nothing to do; the association thread wakes every millisecond (a fixed
``time.sleep(0.001)`` in ``Association._run_reactor``) to look for a complete message, runs the
service handler, and hands the response back to the DUL thread to send. A peer that sends one
C-STORE at a time — storescu, Orthanc, most modalities — waits for those wake-ups on every
instance; the association thread's thousand wake-ups a second each take the GIL from the thread
doing the work; and the request's bytes are read in 4 KiB ``recv`` calls (128 of them for a
512×512 CT). docs/BENCHMARKS.md ("Ingest") has the measurements.

:class:`StoreRequestHandler`, given to pynetdicom's server as its ``request_handler``, lets
pynetdicom set each association up, then:

* serves a C-STORE request on the DUL thread as soon as its message is complete
  (:class:`ServeStoreOnArrival`), as pynetdicom itself does for N-EVENT-REPORT. Other requests
  (C-ECHO) still go through the association thread. While the handler runs the DUL thread reads
  nothing more; mednode negotiates no asynchronous operations window, so the peer has nothing to
  send before the response but an A-ABORT, which is acted on once the handler returns;
* lets the association thread sleep until something is handed to it (:class:`ReactorCheckpoint`,
  :class:`SignallingQueue`) instead of waking every millisecond;
* has the DUL thread wait on the socket (and a :class:`Doorbell` rung when something is queued
  for it to send) instead of polling it, and read each PDU with as few
  ``recv_into`` calls as the kernel allows (:class:`AcceptorSocket`).

And the server copies its presentation contexts for each new association without ``deepcopy``
(:class:`SupportedContexts`, installed by :func:`copy_contexts_quickly`).

An idle association thus costs a few wake-ups a second instead of two thousand (about 6 % of a
core each on the 2-core benchmark machine: a dozen idle peers took most of a core from the ones
sending).

These use pynetdicom internals (the association's DIMSE message queue, ``_serve_request`` and
``_reactor_checkpoint``; the DUL's ``to_user_queue`` and ``to_provider_queue``; the socket's
class; the attributes of a presentation context).
:func:`shortcuts_supported` and :func:`copy_contexts_quickly` check them; if a pynetdicom release
changes them, the listener logs one warning and runs pynetdicom unchanged (slower, still
correct), and tests/unit/node/test_acceptor.py fails.
"""

from __future__ import annotations

import logging
import queue
import select
import socket
import ssl
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import AssociationServer, AssociationSocket, RequestHandler

if TYPE_CHECKING:
    from pynetdicom.association import Association

log = logging.getLogger(__name__)

#: Most bytes one ``recv_into`` buffer is allocated for: a PDU whose header claims more (the
#: listener accepts any PDU length) is read in blocks of this size, so a lying length costs no
#: more memory than the bytes actually sent.
MAX_READ_BLOCK = 1 << 20
#: Longest the DUL thread waits on an idle connection per pass of its loop: how late it notices
#: its ARTIM timer or being stopped. The peer's data and a primitive queued for it to send (a
#: C-ECHO response, an A-RELEASE response) end the wait at once.
SOCKET_WAIT_S = 0.2
#: Longest the association thread sleeps when nothing is handed to it: how late it notices the DUL
#: thread's end and the network timeout. Requests, A-RELEASE, A-ABORT and kills wake it at once.
ASSOCIATION_WAIT_S = 0.2
#: The DUL state after the release (or an abort) was sent, waiting for the transport to close.
RELEASED = "Sta13"
#: Pace of the DUL thread's loop once the connection is closed, until pynetdicom stops it (as
#: pynetdicom's own 1 ms sleep).
CLOSED_PACE_S = 0.001


class Doorbell:
    """Wakes a thread blocked in ``select`` on :meth:`fileno`: a loopback socket pair.

    :meth:`ring` never blocks and never fails: a full buffer means it has already been rung,
    and after :meth:`close` nobody is listening. A lock keeps a ring from another thread off
    descriptors that :meth:`close` has just given back (and the system may have reused).
    """

    def __init__(self) -> None:
        self._listen, self._ring = socket.socketpair()
        self._listen.setblocking(False)
        self._ring.setblocking(False)
        self._lock = threading.Lock()
        self._closed = False

    def fileno(self) -> int:
        return self._listen.fileno()

    def ring(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                self._ring.send(b"\0")
            except BlockingIOError:
                return  # the buffer is full: rung already

    def drain(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                while self._listen.recv(4096):
                    continue
            except BlockingIOError:
                return  # all read

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._listen.close()
            self._ring.close()


class SignallingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that calls ``signal`` after each ``put``: how a thread that waits elsewhere (in
    ``select``, on an event) learns that something was queued for it."""

    def __init__(self, signal: Callable[[], None]) -> None:
        super().__init__()
        self._signal = signal

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._signal()


class AcceptorSocket(AssociationSocket):
    """pynetdicom's association socket, waiting for data instead of polling, and reading each
    PDU with as few system calls as possible.

    ``doorbell`` is rung whenever something is queued for the DUL thread to send (its
    ``to_provider_queue`` is a :class:`SignallingQueue`); ``StoreRequestHandler`` sets it.
    """

    doorbell: Doorbell

    @property
    def ready(self) -> bool:
        """Whether data can be read; first waits for it, up to :data:`SOCKET_WAIT_S`.

        The DUL thread asks this once per pass of its loop; the wait here ends as soon as the
        peer's data arrives or a primitive is queued to be sent. (pynetdicom still sleeps its
        ``_run_loop_delay``, 1 ms, after a pass that found nothing — after a timeout here or a
        primitive to send — but not between the PDUs of a C-STORE. Set to 0, that sleep also
        made pynetdicom's wait for a stopping DUL thread spin and keep the GIL from it: released
        associations held their slot while new peers were refused.) It waits only when the DUL has nothing
        queued, and not once the association is released: pynetdicom then closes the connection
        unless data is already there, and the association's slot is free at once.
        """
        dul = self.assoc.dul
        sock = self.socket
        if dul.state_machine.current_state == RELEASED:
            pass  # as pynetdicom does: read what is there, else close at once and free the slot
        elif dul.event_queue.empty() and dul.to_provider_queue.empty():
            if sock is None or not self._is_connected:
                time.sleep(CLOSED_PACE_S)
            elif not (isinstance(sock, ssl.SSLSocket) and sock.pending()):
                self._wait(sock, dul.to_provider_queue)
        return bool(super().ready)

    def _wait(self, sock: socket.socket | ssl.SSLSocket, outgoing: queue.Queue) -> None:  # type: ignore[type-arg]
        deadline = time.monotonic() + SOCKET_WAIT_S
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                readable, _, _ = select.select([sock.fileno(), self.doorbell.fileno()], [], [], remaining)
            except (OSError, ValueError):
                return  # closed meanwhile: pynetdicom's own check reports it
            if self.doorbell.fileno() not in readable:
                return  # the peer's data, or the wait is over
            self.doorbell.drain()
            if not outgoing.empty() or len(readable) > 1:
                return
            # rung for a primitive the loop has sent already: wait on

    def close(self) -> None:
        super().close()
        self.doorbell.close()

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


class ReactorCheckpoint(threading.Event):
    """The association thread's checkpoint, which also paces its loop.

    pynetdicom's association thread loops forever: sleep 1 ms, wait for this checkpoint (set
    unless another thread paused the reactor), look for work. Here the wait first sleeps until
    :meth:`notify` (something was queued for the thread) or :meth:`set` (pynetdicom resumes or
    kills the reactor) is called, or :data:`ASSOCIATION_WAIT_S` has passed, and then waits for
    the checkpoint as pynetdicom's does. A notification that comes while the thread is looking
    for work is not lost: the thread looks after clearing it.
    """

    def __init__(self) -> None:
        self._wake = threading.Event()
        super().__init__()
        self.set()

    def notify(self) -> None:
        """Wake the association thread: something is queued for it."""
        self._wake.set()

    def set(self) -> None:
        super().set()
        self._wake.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._wake.wait(ASSOCIATION_WAIT_S)
        self._wake.clear()
        return super().wait(timeout)


class ServeStoreOnArrival(SignallingQueue):
    """An association's DIMSE message queue that serves C-STORE requests instead of queueing them.

    pynetdicom's DUL thread puts each complete message on the association's queue
    (``DIMSEServiceProvider.msg_queue``); here a valid C-STORE request is served right there, on
    the DUL thread, and its response is queued for that same thread to send once the handler
    returns. Everything else — C-ECHO, responses, the ``(None, None)`` put on abort — is queued,
    and ``signal`` called to wake the association thread.
    """

    def __init__(self, assoc: Association, signal: Callable[[], None]) -> None:
        super().__init__(signal)
        self._assoc = assoc

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        context_id, message = item
        if isinstance(message, C_STORE) and context_id is not None and message.is_valid_request:
            self._assoc._serve_request(message, context_id)
            return
        super().put(item, block, timeout)


class StoreRequestHandler(RequestHandler):
    """pynetdicom's connection handler, with the association set up as the module describes.

    Give it to pynetdicom's server as ``request_handler`` (``AE.make_server(...,
    request_handler=StoreRequestHandler)``).
    """

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        if shortcuts_supported(assoc):
            checkpoint = ReactorCheckpoint()
            assoc._reactor_checkpoint = checkpoint
            assoc.dimse.msg_queue = ServeStoreOnArrival(assoc, checkpoint.notify)
            # A-RELEASE, A-ABORT and A-P-ABORT indications for the association thread
            assoc.dul.to_user_queue = SignallingQueue(checkpoint.notify)
            doorbell = Doorbell()
            assoc.dul.to_provider_queue = SignallingQueue(doorbell.ring)
            # the socket pynetdicom already made, with its state: a few methods more
            sock = cast(AcceptorSocket, assoc.dul.socket)
            sock.__class__ = AcceptorSocket
            sock.doorbell = doorbell
        return assoc


#: What a pynetdicom presentation context holds: immutable values (ints, booleans, a UID) and
#: one list of UIDs, ``_transfer_syntax``.
CONTEXT_ATTRIBUTES = frozenset(
    {"_context_id", "_abstract_syntax", "_transfer_syntax", "result", "_scu_role", "_scp_role", "_as_scp", "_as_scu"}
)


class SupportedContexts(list):  # type: ignore[type-arg]
    """A server's presentation contexts, copied for each association without ``copy.deepcopy``.

    pynetdicom gives every association its own copy of the server's contexts (negotiation
    writes into them) with ``deepcopy``: about 0.1 s per association for mednode's 171 contexts
    here, most of what a peer that sends one instance per association waited for. A context
    holds only immutable values and its list of transfer syntaxes
    (:data:`CONTEXT_ATTRIBUTES`), so copying its attributes and that list is a deep copy
    (0.3 ms for the 171).
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        copies = []
        for context in self:
            duplicate = object.__new__(PresentationContext)
            duplicate.__dict__.update(vars(context))
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies


def copy_contexts_quickly(server: AssociationServer) -> bool:
    """Give ``server`` :class:`SupportedContexts` if its contexts are as expected; else keep
    pynetdicom's ``deepcopy`` (and say so once)."""
    contexts = server.contexts
    if all(type(c) is PresentationContext and set(vars(c)) == CONTEXT_ATTRIBUTES for c in contexts):
        server.contexts = SupportedContexts(contexts)
        return True
    _warn_once()
    return False


_warned = False


def _warn_once() -> None:
    global _warned
    if not _warned:
        _warned = True
        log.warning(
            "this pynetdicom's internals differ from what node.acceptor expects: associations "
            "are served as pynetdicom itself serves them (slower)"
        )


def shortcuts_supported(assoc: Association) -> bool:
    """Whether this pynetdicom still has what the shortcuts replace; warn once if not."""
    dul = assoc.dul
    checkpoint = getattr(assoc, "_reactor_checkpoint", None)
    supported = (
        type(assoc.dimse.msg_queue) is queue.Queue
        and assoc.dimse.msg_queue.empty()
        and callable(getattr(assoc, "_serve_request", None))
        and type(checkpoint) is threading.Event
        and checkpoint.is_set()
        and type(getattr(dul, "to_user_queue", None)) is queue.Queue
        and dul.to_user_queue.empty()
        and type(getattr(dul, "to_provider_queue", None)) is queue.Queue
        and dul.to_provider_queue.empty()
        and type(dul.socket) is AssociationSocket
    )
    if not supported:
        _warn_once()
    return supported
