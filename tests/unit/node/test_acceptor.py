"""The acceptor's C-STORE shortcuts: whole-PDU reads, C-STORE served on arrival, and the fallback."""

from __future__ import annotations

import logging
import queue
import socket
import threading
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
from node.acceptor import ServeStoreOnArrival, WholeReadSocket, shortcuts_supported


@pytest.fixture
def pair() -> Iterator[tuple[WholeReadSocket, socket.socket]]:
    ours, peer = socket.socketpair()
    owner = SimpleNamespace(dul=SimpleNamespace(event_queue=queue.Queue()))
    sock = WholeReadSocket(owner, client_socket=ours)  # type: ignore[arg-type]
    yield sock, peer
    ours.close()
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


def test_a_pdu_sent_in_pieces_is_read_whole(pair: tuple[WholeReadSocket, socket.socket]) -> None:
    sock, peer = pair
    data = bytes(range(256)) * 2048  # 512 KiB, more than one socket buffer
    sender = _send_in_pieces(peer, data, piece=7000)
    received = sock.recv(len(data))
    sender.join()
    assert received == data
    assert isinstance(received, bytearray)  # what pynetdicom's DUL expects


def test_reads_only_what_is_asked_for(pair: tuple[WholeReadSocket, socket.socket]) -> None:
    sock, peer = pair
    peer.sendall(b"\x04\x00\x00\x00\x00\x0aREST OF THE PDU")
    assert sock.recv(6) == b"\x04\x00\x00\x00\x00\x0a"
    assert sock.recv(4) == b"REST"


def test_a_closed_connection_returns_what_was_read(pair: tuple[WholeReadSocket, socket.socket]) -> None:
    sock, peer = pair
    sender = _send_in_pieces(peer, b"x" * 3000, piece=1000, close=True)
    assert sock.recv(10_000) == b"x" * 3000
    sender.join()


def test_a_lying_pdu_length_costs_only_the_bytes_sent(
    pair: tuple[WholeReadSocket, socket.socket], monkeypatch: pytest.MonkeyPatch
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


def test_store_requests_are_served_on_arrival_everything_else_is_queued() -> None:
    served: list[tuple[object, int]] = []
    assoc = SimpleNamespace(_serve_request=lambda message, context_id: served.append((message, context_id)))
    messages = ServeStoreOnArrival(assoc)  # type: ignore[arg-type]
    store = _store_request()
    echo = C_ECHO()
    echo.MessageID = 2
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"

    messages.put((3, store))
    messages.put((1, echo))
    messages.put((None, None))  # what pynetdicom puts on abort to wake a blocked reader

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
    assert len([r for r in caplog.records if "pynetdicom's own polling" in r.getMessage()]) == 1
