"""The acceptor's shortcuts: whole-PDU reads, waiting on the socket, C-STORE served on arrival,
an association thread woken instead of polling, and the fallback."""

from __future__ import annotations

import copy
import logging
import queue
import socket
import threading
import time
from collections.abc import Iterator
from io import BytesIO
from types import SimpleNamespace

import pytest
from pydicom.uid import CTImageStorage
from pynetdicom import AE
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.transport import AssociationSocket

from node import acceptor
from node.acceptor import (
    CONTEXT_ATTRIBUTES,
    AcceptorSocket,
    Doorbell,
    ReactorCheckpoint,
    ServeStoreOnArrival,
    SignallingQueue,
    SupportedContexts,
    copy_contexts_quickly,
    shortcuts_supported,
)


@pytest.fixture
def pair() -> Iterator[tuple[AcceptorSocket, socket.socket]]:
    ours, peer = socket.socketpair()
    doorbell = Doorbell()
    dul = SimpleNamespace(
        event_queue=queue.Queue(),
        to_provider_queue=SignallingQueue(doorbell.ring),
        state_machine=SimpleNamespace(current_state="Sta6"),  # established
    )
    owner = SimpleNamespace(dul=dul)
    sock = AcceptorSocket(owner, client_socket=ours)  # type: ignore[arg-type]
    sock.doorbell = doorbell
    assert owner.dul.event_queue.get(block=False) == "Evt5"  # connected: the DUL would act on it
    yield sock, peer
    sock.close()
    peer.close()


def _send_in_pieces(peer: socket.socket, data: bytes, piece: int, close: bool = False) -> threading.Thread:
    def run() -> None:
        for start in range(0, len(data), piece):
            peer.sendall(data[start : start + piece])
        if close:
            peer.shutdown(socket.SHUT_WR)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_pdu_sent_in_pieces_is_read_whole(pair: tuple[AcceptorSocket, socket.socket]) -> None:
    sock, peer = pair
    data = bytes(range(256)) * 2048  # 512 KiB, more than one socket buffer
    sender = _send_in_pieces(peer, data, piece=7000)
    received = sock.recv(len(data))
    sender.join()
    assert received == data
    assert isinstance(received, bytearray)  # what pynetdicom's DUL expects


def test_reads_only_what_is_asked_for(pair: tuple[AcceptorSocket, socket.socket]) -> None:
    sock, peer = pair
    peer.sendall(b"\x04\x00\x00\x00\x00\x0aREST OF THE PDU")
    assert sock.recv(6) == b"\x04\x00\x00\x00\x00\x0a"
    assert sock.recv(4) == b"REST"


def test_a_closed_connection_returns_what_was_read(pair: tuple[AcceptorSocket, socket.socket]) -> None:
    sock, peer = pair
    sender = _send_in_pieces(peer, b"x" * 3000, piece=1000, close=True)
    assert sock.recv(10_000) == b"x" * 3000
    sender.join()


def test_a_lying_pdu_length_costs_only_the_bytes_sent(
    pair: tuple[AcceptorSocket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, peer = pair
    monkeypatch.setattr(acceptor, "MAX_READ_BLOCK", 1024)
    sender = _send_in_pieces(peer, b"y" * 5000, piece=999, close=True)
    received = sock.recv(0xFFFFFFFF)  # a PDU header may claim 4 GiB
    sender.join()
    assert received == b"y" * 5000


def _store_request() -> C_STORE:
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPClassUID = CTImageStorage
    request.AffectedSOPInstanceUID = "1.2.3.4"
    request.Priority = 0
    request.DataSet = BytesIO(b"\x08\x00\x16\x00")  # any bytes: only the primitive is checked
    return request


class CountingCheckpoint(ReactorCheckpoint):
    def __init__(self) -> None:
        super().__init__()
        self.notified = 0

    def notify(self) -> None:
        self.notified += 1
        super().notify()


def test_store_requests_are_served_on_arrival_everything_else_is_queued() -> None:
    served: list[tuple[object, int]] = []
    assoc = SimpleNamespace(_serve_request=lambda message, context_id: served.append((message, context_id)))
    checkpoint = CountingCheckpoint()
    messages = ServeStoreOnArrival(assoc, checkpoint.notify)  # type: ignore[arg-type]
    store = _store_request()
    echo = C_ECHO()
    echo.MessageID = 2
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"

    messages.put((3, store))
    assert checkpoint.notified == 0  # served here: nothing for the association thread
    messages.put((1, echo))
    messages.put((None, None))  # what pynetdicom puts on abort to wake a blocked reader
    assert checkpoint.notified == 2

    assert served == [(store, 3)]
    assert messages.get(block=False) == (1, echo)
    assert messages.get(block=False) == (None, None)

    response = C_STORE()
    response.MessageIDBeingRespondedTo = 1
    response.Status = 0
    messages.put((3, response))  # not a request: the association thread deals with it
    assert messages.get(block=False) == (3, response)
    assert len(served) == 1


def test_pynetdicom_associations_have_what_the_shortcuts_replace() -> None:
    # if a pynetdicom release changes these internals this fails, rather than the listener
    # silently falling back to the slower path
    assoc = Association(AE(), MODE_ACCEPTOR)
    ours, peer = socket.socketpair()
    try:
        assoc.set_socket(AssociationSocket(assoc, client_socket=ours))
        assert shortcuts_supported(assoc)
    finally:
        ours.close()
        peer.close()


def test_other_internals_are_left_alone_with_one_warning(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(acceptor, "_warned", False)
    changed = SimpleNamespace(
        dimse=SimpleNamespace(msg_queue=[]),  # not a queue.Queue any more
        dul=SimpleNamespace(socket=None),
        _serve_request=lambda *args: None,
    )
    with caplog.at_level(logging.WARNING, logger="node.acceptor"):
        assert not shortcuts_supported(changed)  # type: ignore[arg-type]
        assert not shortcuts_supported(changed)  # type: ignore[arg-type]
    assert len([r for r in caplog.records if "as pynetdicom itself serves them" in r.getMessage()]) == 1


# -- the association thread sleeps until woken ------------------------------------------------------
def _timed_wait(checkpoint: ReactorCheckpoint) -> float:
    start = time.monotonic()
    assert checkpoint.wait()
    return time.monotonic() - start


def test_the_association_thread_sleeps_until_notified(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acceptor, "ASSOCIATION_WAIT_S", 1.0)
    checkpoint = ReactorCheckpoint()
    assert checkpoint.is_set()  # as pynetdicom's: the reactor is not paused
    checkpoint.wait()  # the wake-up of set() in __init__
    assert 0.9 <= _timed_wait(checkpoint) < 5.0  # nothing came: the full wait

    threading.Timer(0.05, checkpoint.notify).start()
    assert _timed_wait(checkpoint) < 0.8

    checkpoint.notify()  # notified while the thread was busy: the next wait returns at once
    assert _timed_wait(checkpoint) < 0.8


def test_a_paused_reactor_stays_paused_until_set(monkeypatch: pytest.MonkeyPatch) -> None:
    # pynetdicom pauses the reactor with clear() and resumes (or kills) it with set()
    monkeypatch.setattr(acceptor, "ASSOCIATION_WAIT_S", 0.01)
    checkpoint = ReactorCheckpoint()
    checkpoint.clear()
    checkpoint.notify()
    assert not checkpoint.wait(timeout=0.2)  # a notification does not end a pause
    threading.Timer(0.1, checkpoint.set).start()
    assert checkpoint.wait(timeout=5)


def test_a_signalling_queue_signals_after_each_put() -> None:
    checkpoint = CountingCheckpoint()
    indications = SignallingQueue(checkpoint.notify)
    indications.put("A-RELEASE")
    assert checkpoint.notified == 1
    assert indications.get(block=False) == "A-RELEASE"


# -- the DUL thread waits on the socket ---------------------------------------------------------------
def test_ready_waits_for_data_and_returns_as_it_arrives(
    pair: tuple[AcceptorSocket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, peer = pair
    monkeypatch.setattr(acceptor, "SOCKET_WAIT_S", 1.0)
    start = time.monotonic()
    assert not sock.ready  # nothing sent: waited, then not ready
    assert time.monotonic() - start >= 0.9

    threading.Timer(0.05, peer.sendall, args=(b"\x05",)).start()
    start = time.monotonic()
    assert sock.ready
    assert time.monotonic() - start < 0.8


def test_ready_returns_when_a_primitive_is_queued_to_be_sent(
    pair: tuple[AcceptorSocket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    # the association thread queues a C-ECHO response: the DUL thread must send it now
    sock, _ = pair
    monkeypatch.setattr(acceptor, "SOCKET_WAIT_S", 5.0)
    outgoing = sock.assoc.dul.to_provider_queue
    threading.Timer(0.05, outgoing.put, args=("a primitive to send",)).start()
    start = time.monotonic()
    assert not sock.ready  # nothing to read, but the loop goes on to send
    assert time.monotonic() - start < 1.0
    assert outgoing.get(block=False) == "a primitive to send"


def test_a_ring_for_a_primitive_already_sent_does_not_end_the_wait(
    pair: tuple[AcceptorSocket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, peer = pair
    monkeypatch.setattr(acceptor, "SOCKET_WAIT_S", 5.0)
    outgoing = sock.assoc.dul.to_provider_queue
    outgoing.put("the C-STORE response")  # rings
    outgoing.get(block=False)  # the DUL's next pass sent it
    threading.Timer(0.5, peer.sendall, args=(b"\x04",)).start()
    start = time.monotonic()
    assert sock.ready  # woke for the ring, found nothing to send, waited on for the data
    assert 0.45 <= time.monotonic() - start < 4.0


def test_a_doorbell_rung_often_or_after_close_never_blocks_or_raises() -> None:
    doorbell = Doorbell()
    for _ in range(200_000):  # more than a socket buffer holds
        doorbell.ring()
    doorbell.drain()
    doorbell.close()
    doorbell.ring()
    doorbell.drain()


def test_ready_does_not_wait_once_the_association_is_released(
    pair: tuple[AcceptorSocket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    # pynetdicom then reads what is there or closes the connection at once, freeing the slot
    sock, _ = pair
    monkeypatch.setattr(acceptor, "SOCKET_WAIT_S", 5.0)
    sock.assoc.dul.state_machine.current_state = acceptor.RELEASED
    start = time.monotonic()
    assert not sock.ready
    assert time.monotonic() - start < 1.0


def test_ready_does_not_wait_while_the_dul_has_work_queued(
    pair: tuple[AcceptorSocket, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    sock, _ = pair
    monkeypatch.setattr(acceptor, "SOCKET_WAIT_S", 5.0)
    sock.assoc.dul.to_provider_queue.put("a primitive to send")
    start = time.monotonic()
    assert not sock.ready
    assert time.monotonic() - start < 1.0


# -- presentation contexts copied per association -----------------------------------------------------
def _listener_contexts() -> list:  # type: ignore[type-arg]
    from node.listener import make_ae

    return make_ae("MEDNODE").supported_contexts


def test_a_quick_copy_of_the_contexts_is_a_deep_copy() -> None:
    contexts = _listener_contexts()
    assert all(set(vars(c)) == CONTEXT_ATTRIBUTES for c in contexts)  # fails if pynetdicom adds state
    quick = copy.deepcopy(SupportedContexts(contexts))
    slow = copy.deepcopy(contexts)
    assert type(quick) is list and len(quick) == len(contexts)
    for original, ours, theirs in zip(contexts, quick, slow, strict=True):
        assert ours is not original and ours._transfer_syntax is not original._transfer_syntax
        assert vars(ours) == vars(theirs)
    # negotiation writes into an association's copy: the server's own contexts stay as they were
    quick[0].result = 0
    quick[0]._transfer_syntax.append("1.2.3")
    assert contexts[0].result is None and "1.2.3" not in contexts[0]._transfer_syntax


def test_the_server_gets_quick_copies_unless_a_context_has_more_state(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = SimpleNamespace(contexts=_listener_contexts())
    assert copy_contexts_quickly(server)  # type: ignore[arg-type]
    assert isinstance(server.contexts, SupportedContexts)

    monkeypatch.setattr(acceptor, "_warned", False)
    changed = _listener_contexts()
    changed[3].negotiated_extra = ["mutable"]  # a future pynetdicom's new attribute
    server = SimpleNamespace(contexts=changed)
    with caplog.at_level(logging.WARNING, logger="node.acceptor"):
        assert not copy_contexts_quickly(server)  # type: ignore[arg-type]
    assert server.contexts is changed  # left to pynetdicom's deepcopy
    assert any("as pynetdicom itself serves them" in r.getMessage() for r in caplog.records)
