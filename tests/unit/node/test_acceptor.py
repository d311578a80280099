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
from pynetdicom import AE, evt
from pynetdicom._globals import MODE_ACCEPTOR
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ, C_STORE_RSP, DIMSEMessage
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.transport import AssociationSocket

from node import acceptor
from node.acceptor import (
    CONTEXT_ATTRIBUTES,
    AcceptorSocket,
    Doorbell,
    QuickStoreRequests,
    QuickStoreResponses,
    ReactorCheckpoint,
    ServeStoreOnArrival,
    SignallingQueue,
    SupportedContexts,
    copy_contexts_quickly,
    encode_store_response,
    shortcuts_supported,
    store_request_primitive,
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


def _store_response(message_id: int, sop_instance_uid: str, status: int) -> C_STORE:
    response = C_STORE()
    response.MessageID = message_id
    response.MessageIDBeingRespondedTo = message_id
    response.AffectedSOPClassUID = CTImageStorage
    response.AffectedSOPInstanceUID = sop_instance_uid
    response.Status = status
    return response


def _pynetdicom_pdvs(response: C_STORE, context_id: int, maximum_pdu_size: int = 0) -> list[list[tuple[int, bytes]]]:
    message = C_STORE_RSP()
    message.primitive_to_message(response)
    return [p.presentation_data_value_list for p in message.encode_msg(context_id, maximum_pdu_size)]


@pytest.mark.parametrize("message_id", [1, 0x1234, 0xFFFF])
@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4", "1.2.3.45", "2.25." + "9" * 59])
@pytest.mark.parametrize("status", [0x0000, 0xA700, 0xB007])
def test_a_store_response_is_encoded_byte_for_byte_as_pynetdicom_does(
    message_id: int, sop_instance_uid: str, status: int
) -> None:
    [[(context_id, pdv)]] = _pynetdicom_pdvs(_store_response(message_id, sop_instance_uid, status), 7)
    assert context_id == 7 and pdv[:1] == b"\x03"
    assert encode_store_response(message_id, CTImageStorage, sop_instance_uid, status) == pdv[1:]


class FakeResponder(SimpleNamespace):
    """What :class:`QuickStoreResponses` uses of an association."""

    def __init__(self, maximum_pdu_size: int = 0, dimse_sent_handlers: list[object] | None = None) -> None:
        self.by_pynetdicom: list[tuple[C_STORE, int]] = []
        self.sent: list[list[tuple[int, bytes]]] = []
        self.handlers = dimse_sent_handlers or []
        super().__init__(
            dimse=SimpleNamespace(send_msg=lambda primitive, cx: self.by_pynetdicom.append((primitive, cx)),
                                  maximum_pdu_size=maximum_pdu_size),
            dul=SimpleNamespace(send_pdu=lambda pdata: self.sent.append(pdata.presentation_data_value_list)),
        )

    def get_handlers(self, event: object) -> list[object]:
        return self.handlers if event == evt.EVT_DIMSE_SENT else []


def test_store_responses_go_out_quickly_unless_pynetdicom_must_encode_them() -> None:
    assoc = FakeResponder()
    send = QuickStoreResponses(assoc)  # type: ignore[arg-type]
    success = _store_response(3, "1.2.3.4.5", 0x0000)
    send(success, 5)
    assert assoc.sent == _pynetdicom_pdvs(success, 5) and assoc.by_pynetdicom == []

    refused = _store_response(4, "1.2.3.4.6", 0xA700)
    refused.ErrorComment = "Out of resources: index unavailable"
    send(refused, 5)
    echo = C_ECHO()
    echo.MessageIDBeingRespondedTo, echo.Status = 5, 0
    send(echo, 1)
    assert assoc.by_pynetdicom == [(refused, 5), (echo, 1)] and len(assoc.sent) == 1

    watched = FakeResponder(dimse_sent_handlers=[(print, None)])  # someone inspects the messages
    QuickStoreResponses(watched)(success, 5)  # type: ignore[arg-type]
    tiny = FakeResponder(maximum_pdu_size=64)  # the command set would take two PDUs
    QuickStoreResponses(tiny)(success, 5)  # type: ignore[arg-type]
    assert watched.by_pynetdicom == tiny.by_pynetdicom == [(success, 5)] and not watched.sent and not tiny.sent


def _received(request: C_STORE, context_id: int = 3) -> DIMSEMessage:
    """``request`` as pynetdicom's DIMSE provider assembles it from the P-DATA a peer sends."""
    sent = C_STORE_RQ()
    sent.primitive_to_message(request)
    message = DIMSEMessage()
    assert [message.decode_msg(p) for p in sent.encode_msg(context_id, 16384)][-1]
    return message


def _parameters(primitive: C_STORE) -> dict[str, object]:
    names = ("MessageID", "Priority", "AffectedSOPClassUID", "AffectedSOPInstanceUID",
             "MoveOriginatorApplicationEntityTitle", "MoveOriginatorMessageID", "_context_id",
             "_dataset_path", "_dataset_file")
    values: dict[str, object] = {name: getattr(primitive, name) for name in names}
    values["DataSet"] = primitive.DataSet.getvalue() if primitive.DataSet is not None else None
    return values


@pytest.mark.parametrize("sop_instance_uid", ["1.2.3.4", "1.2.3.45", "2.25." + "9" * 59])
@pytest.mark.parametrize(("message_id", "priority", "move_originator_id"), [(1, 0, None), (0xFFFF, 2, 77)])
def test_a_store_request_becomes_the_primitive_pynetdicom_makes(
    sop_instance_uid: str, message_id: int, priority: int, move_originator_id: int | None
) -> None:
    request = _store_request()
    request.MessageID, request.Priority = message_id, priority
    request.AffectedSOPInstanceUID = sop_instance_uid
    request.MoveOriginatorMessageID = move_originator_id
    pynetdicoms = _received(request).message_to_primitive()
    ours = store_request_primitive(_received(request))
    assert ours is not None and type(ours) is C_STORE
    assert _parameters(ours) == _parameters(pynetdicoms)
    assert _parameters(ours)["AffectedSOPInstanceUID"] == sop_instance_uid


def test_store_requests_it_cannot_read_are_left_to_pynetdicom() -> None:
    moved = _store_request()
    moved.MoveOriginatorApplicationEntityTitle = "PACS"
    moved.MoveOriginatorMessageID = 5
    assert store_request_primitive(_received(moved)) is None
    two_values = _received(_store_request())
    two_values.command_set.AffectedSOPClassUID = [CTImageStorage, CTImageStorage]  # not a raw element now
    assert store_request_primitive(two_values) is None

    # through the association's receive_primitive: pynetdicom's conversion for the first
    queued: list[object] = []
    dimse = SimpleNamespace(message=None)
    dimse.receive_primitive = lambda pdata: queued.append(dimse.message.decode_msg(pdata) and dimse.message)
    receive = QuickStoreRequests(dimse)
    sent = C_STORE_RQ()
    sent.primitive_to_message(moved)
    for pdata in sent.encode_msg(1, 16384):
        receive(pdata)
    message = queued[-1]
    assert isinstance(message, C_STORE_RQ)
    assert message.message_to_primitive().MoveOriginatorApplicationEntityTitle == "PACS"


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
