"""The DICOM listener with real dcmtk peers: C-ECHO, malformed input, compressed syntaxes as sent,
idempotent re-sends, reopened studies and the disk watermark.

Most tests run the SCP in-process (``node.listener.start_listener`` with an :class:`Ingestor` on a
temporary SQLite index and store), so the store and index can be inspected directly; the reopening
and watermark tests run ``mednode serve`` itself through ``mednode_factory``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pynetdicom import AE, evt
from pynetdicom import _config as pynetdicom_config
from pynetdicom.dsutils import split_dataset
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node import acceptor
from node.completion import complete_due_studies
from node.config import load_settings
from node.ingest import Ingestor
from node.listener import start_listener
from storage.db import make_engine, make_session_factory, upgrade
from storage.models import Instance, Job, JobState, Study, StudyState, utcnow
from storage.store import InstanceStore
from tests.integration.conftest import MednodeFactory
from tests.integration.e2e import poll
from tests.peers import LOOPBACK, StoreSCP, dcmsend, echoscu, free_port, require_tool, storescu
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series
from tests.shared_data import SHARED_DICOM

AE_TITLE = "MEDNODE"
DEFLATED = "1.2.840.10008.1.2.1.99"


@dataclass
class Listener:
    """An in-process SCP on a free port with its own store and SQLite index."""

    port: int
    store: InstanceStore
    sessions: sessionmaker[Session]
    server: ThreadedAssociationServer

    def instance_count(self) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count(Instance.id))) or 0

    def stored_files(self) -> list[Path]:
        return sorted(p for p in self.store.root.rglob("*") if p.is_file())

    def stored_path(self, sop_instance_uid: str) -> Path:
        with self.sessions() as session:
            relative = session.scalar(select(Instance.path).where(Instance.sop_instance_uid == sop_instance_uid))
        assert relative is not None, f"no Instance row for {sop_instance_uid}"
        return self.store.absolute(relative)

    def study(self, uid: str) -> Study:
        with self.sessions() as session:
            return session.scalars(select(Study).where(Study.study_instance_uid == uid)).one()

    def echo_ok(self) -> bool:
        return echoscu(LOOPBACK, self.port, called=AE_TITLE).returncode == 0


@pytest.fixture
def listener_factory(tmp_path: Path) -> Iterator[Callable[..., Listener]]:
    started: list[Listener] = []

    def start(min_free_bytes: int = 0) -> Listener:
        root = tmp_path / f"node{len(started)}"
        engine = make_engine(f"sqlite:///{root / 'mednode.db'}")
        upgrade(engine)
        sessions = make_session_factory(engine)
        store = InstanceStore(root / "store", min_free_bytes=min_free_bytes)
        port = free_port()
        server = start_listener(Ingestor(store, sessions), ae_title=AE_TITLE, host=LOOPBACK, port=port)
        listener = Listener(port, store, sessions, server)
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.server.shutdown()


@pytest.fixture
def listener(listener_factory: Callable[..., Listener]) -> Listener:
    return listener_factory()


def _dataset_bytes(path: Path) -> bytes:
    """The data set of a Part 10 file as encoded, without preamble and File Meta."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_c_echo(listener: Listener, dcmtk) -> None:  # type: ignore[no-untyped-def]
    done = echoscu(LOOPBACK, listener.port, called=AE_TITLE)
    assert done.returncode == 0, done.stdout + done.stderr


def test_c_store_is_answered_from_the_dul_thread_and_c_echo_still_works(listener: Listener, shared_dicom: Path) -> None:
    # node.acceptor serves C-STORE on the thread that read it and leaves C-ECHO to pynetdicom's
    # association thread; both on one association, interleaved, must keep working
    files = sorted((shared_dicom / "ct" / "pydicom_head_ct2").glob("*.dcm"))[:3]
    answered_from: list[tuple[str, bool]] = []

    def on_sent(event) -> None:  # type: ignore[no-untyped-def]
        answered_from.append((type(event.message).__name__, threading.current_thread() is event.assoc.dul))

    listener.server.bind(evt.EVT_DIMSE_SENT, on_sent)
    scu = AE(ae_title="SCU")
    scu.add_requested_context("1.2.840.10008.1.1")
    datasets = [pydicom.dcmread(path) for path in files]
    for ds in datasets:
        scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = scu.associate(LOOPBACK, listener.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        statuses = [assoc.send_c_echo().Status]
        for ds in datasets:
            statuses.append(assoc.send_c_store(ds).Status)
            statuses.append(assoc.send_c_echo().Status)
    finally:
        assoc.release()

    assert statuses == [0x0000] * 7
    assert listener.instance_count() == 3
    assert answered_from == [("C_ECHO_RSP", False)] + [("C_STORE_RSP", True), ("C_ECHO_RSP", False)] * 3


def test_the_association_thread_is_woken_not_polled(
    listener: Listener, shared_dicom: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # with its idle sleep far longer than the test, C-ECHOs and the release are still answered at
    # once (each wakes the association thread; the C-STORE is served on the DUL thread), and an
    # idle association wakes it rarely, where pynetdicom's own loop runs every millisecond
    monkeypatch.setattr(acceptor, "ASSOCIATION_WAIT_S", 10.0)
    passes: list[float] = []
    wait = acceptor.ReactorCheckpoint.wait

    def counted(self: acceptor.ReactorCheckpoint, timeout: float | None = None) -> bool:
        passes.append(time.monotonic())
        return wait(self, timeout)

    monkeypatch.setattr(acceptor.ReactorCheckpoint, "wait", counted)
    assert isinstance(listener.server.contexts, acceptor.SupportedContexts)  # copied quickly per association
    ds = pydicom.dcmread(min((shared_dicom / "ct" / "pydicom_head_ct2").glob("*.dcm")))
    scu = AE(ae_title="SCU")
    scu.add_requested_context("1.2.840.10008.1.1")
    scu.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    start = time.monotonic()
    assoc = scu.associate(LOOPBACK, listener.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        assert assoc.send_c_echo().Status == 0x0000
        assert assoc.send_c_store(ds).Status == 0x0000
        idle_from = time.monotonic()
        time.sleep(0.5)
        idle_passes = [t for t in passes if idle_from <= t < idle_from + 0.5]
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert not assoc.is_established and assoc.is_released
    assert time.monotonic() - start < 5.0  # far below one idle sleep of the association thread
    assert len(passes) >= 3  # the acceptor's checkpoint was in use: woken for two C-ECHOs, the release
    assert len(idle_passes) <= 2, f"{len(idle_passes)} passes of the association thread in 0.5 s idle"
    assert listener.instance_count() == 1


# -- malformed input --------------------------------------------------------------------------------
def _malformed(shared_dicom: Path) -> list[Path]:
    files = sorted((shared_dicom / "malformed").iterdir())
    assert files, "no malformed samples"
    return files


def test_malformed_files_from_storescu_fail_and_leave_nothing(listener: Listener, shared_dicom: Path, dcmtk) -> None:  # type: ignore[no-untyped-def]
    """Each file in its own association. storescu itself refuses to send the files it cannot
    parse (truncated Pixel Data, missing sequence delimiter, no File Meta): that is asserted as
    such. Whatever reaches the node gets a failure status."""
    reached_node = []
    refused_by_storescu = []
    for path in _malformed(shared_dicom):
        sent = storescu(LOOPBACK, listener.port, [path], called=AE_TITLE)
        output = sent.stdout + sent.stderr
        assert not sent.all_ok, f"{path.name} was accepted: {sent.describe()}"
        if "Received Store Response" in output:
            [status] = sent.statuses
            assert status.status.startswith(("Error", "Failure")), f"{path.name}: {status.status}"
            reached_node.append(path.name)
        else:
            assert "Bad DICOM file" in output or "Store SCU Failed" in output, output
            refused_by_storescu.append(path.name)
        assert listener.echo_ok(), f"the node stopped answering C-ECHO after {path.name}"
    print(f"failure status from the node: {reached_node}; storescu refused to send: {refused_by_storescu}")
    assert reached_node, "no malformed file reached the node through storescu"
    assert listener.stored_files() == []
    assert listener.instance_count() == 0


def _raw_sendable(path: Path, tmp_path: Path) -> Path:
    """``path`` itself, or — for a file without File Meta — its bytes behind a made-up File Meta
    (CT Image Storage, Implicit VR LE), so the peer's bytes reach the node unparsed."""
    try:
        meta, _ = split_dataset(path)
        if "TransferSyntaxUID" in meta:
            return path
    except InvalidDicomError:  # no preamble and no 'DICM'
        pass
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5.6.7"
    file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    holder = Dataset()
    holder.file_meta = file_meta
    wrapped = tmp_path / f"wrapped-{path.name}"
    holder.save_as(wrapped, enforce_file_format=True)
    wrapped.write_bytes(wrapped.read_bytes() + path.read_bytes())
    return wrapped


def test_malformed_bytes_sent_unparsed_get_a_failure_status(
    listener: Listener, shared_dicom: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dcmtk
) -> None:  # type: ignore[no-untyped-def]
    """The same files sent byte for byte (pynetdicom streams the data set from the file without
    parsing it), so the node itself must refuse what storescu would not send."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    for path in _malformed(shared_dicom):
        sendable = _raw_sendable(path, tmp_path)
        meta, _ = split_dataset(sendable)
        ae = AE(ae_title="RAWSCU")
        ae.add_requested_context(meta.MediaStorageSOPClassUID, [meta.TransferSyntaxUID])
        assoc = ae.associate(LOOPBACK, listener.port, ae_title=AE_TITLE)
        assert assoc.is_established
        try:
            response = assoc.send_c_store(sendable)
        finally:
            assoc.release()
        status = int(response.Status)
        assert 0xA700 <= status <= 0xCFFF and not 0xB000 <= status <= 0xBFFF, f"{path.name}: 0x{status:04X}"
        assert status != 0xA700, f"{path.name}: a bad instance is not 'out of resources'"
        assert str(response.get("ErrorComment", "")), f"{path.name}: a failure says why"
        assert listener.echo_ok()
    assert listener.stored_files() == []
    assert listener.instance_count() == 0


# -- transfer syntaxes as sent ----------------------------------------------------------------------
def _compressed_params() -> list[str]:
    root = SHARED_DICOM / "compressed"
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.dcm")) if root.is_dir() else []


@pytest.fixture(scope="module")
def compressed_received(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Listener, dict[str, Path], object]]:
    """Send every compressed sample once with dcmsend to the node and to a bit-preserving storescp."""
    require_tool("dcmsend")
    require_tool("storescp")
    tmp = tmp_path_factory.mktemp("compressed")
    engine = make_engine(f"sqlite:///{tmp / 'mednode.db'}")
    upgrade(engine)
    sessions = make_session_factory(engine)
    store = InstanceStore(tmp / "store")
    port = free_port()
    server = start_listener(Ingestor(store, sessions), ae_title=AE_TITLE, host=LOOPBACK, port=port)
    node = Listener(port, store, sessions, server)
    scp = StoreSCP(tmp / "storescp", extra=["--bit-preserving"]).start()
    root = SHARED_DICOM / "compressed"
    files = sorted(root.rglob("*.dcm"))
    try:
        to_node = dcmsend(LOOPBACK, port, files, called=AE_TITLE)
        to_scp = dcmsend(LOOPBACK, scp.port, files, called=scp.aet)
        assert to_node.all_ok, to_node.describe()
        assert to_scp.all_ok, to_scp.describe()
        by_uid = {p.name.split(".", 1)[1]: p for p in scp.received()}
        yield node, by_uid, to_node
    finally:
        scp.stop()
        server.shutdown()
        engine.dispose()


@pytest.mark.parametrize("name", _compressed_params())
def test_compressed_file_is_stored_as_sent(name: str, compressed_received, shared_dicom: Path) -> None:  # type: ignore[no-untyped-def]
    """Stored in the file's own transfer syntax, and the data set bytes are exactly those on the
    wire (equal to what a bit-preserving dcmtk storescp writes for the same dcmsend)."""
    node, storescp_files, _ = compressed_received
    source_path = shared_dicom / "compressed" / name
    source = pydicom.dcmread(source_path)
    stored_path = node.stored_path(source.SOPInstanceUID)
    stored = pydicom.dcmread(stored_path)

    assert stored.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
    with node.sessions() as session:
        row = session.scalars(select(Instance).where(Instance.sop_instance_uid == source.SOPInstanceUID)).one()
    assert row.transfer_syntax_uid == source.file_meta.TransferSyntaxUID
    assert row.size_bytes == stored_path.stat().st_size
    assert stored.PixelData == source.PixelData  # encapsulated fragments untouched
    assert _dataset_bytes(stored_path) == _dataset_bytes(storescp_files[source.SOPInstanceUID])


def test_deflated_file_keeps_its_content(compressed_received, shared_dicom: Path) -> None:  # type: ignore[no-untyped-def]
    """The deflated sample is stored deflated, as dcmsend sent it, and nothing in it changes."""
    node, _, _ = compressed_received
    source = pydicom.dcmread(shared_dicom / "compressed" / "image_dfl_deflated.dcm")
    assert source.file_meta.TransferSyntaxUID == DEFLATED
    stored = pydicom.dcmread(node.stored_path(source.SOPInstanceUID))
    assert stored.file_meta.TransferSyntaxUID == DEFLATED
    assert {e.tag: e.value for e in stored} == {e.tag: e.value for e in source}


# -- negotiation: the sender's order, lossless before lossy -----------------------------------------
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
J2K_LOSSLESS = "1.2.840.10008.1.2.4.90"
J2K = "1.2.840.10008.1.2.4.91"
RLE = "1.2.840.10008.1.2.5"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
IMPLICIT_LE = "1.2.840.10008.1.2"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
#: The same NEMA WG04 CT image in each syntax (compressed/*.dcm), by transfer syntax.
CT1_BY_SYNTAX = {
    EXPLICIT_LE: "CT1_UNC.explicit_little_endian.dcm",
    JPEG_LOSSLESS_SV1: "CT1_JPLL.dcm",
    JPEG_LS_LOSSLESS: "CT1_JLSL.dcm",
    J2K_LOSSLESS: "CT1_J2KR.dcm",
    J2K: "CT1_J2KI.dcm",
    RLE: "CT1_RLE.dcm",
}


@pytest.mark.parametrize(("proposed", "expected"), [
    # the sender: lossy JPEG Baseline first, yet a lossless syntax is chosen (its first)
    ([JPEG_BASELINE, J2K, JPEG_LOSSLESS_SV1, EXPLICIT_LE, IMPLICIT_LE], JPEG_LOSSLESS_SV1),
    ([JPEG_BASELINE, J2K, EXPLICIT_LE, JPEG_LOSSLESS_SV1, IMPLICIT_LE], EXPLICIT_LE),
    ([J2K, J2K_LOSSLESS, EXPLICIT_LE], J2K_LOSSLESS),
    ([EXPLICIT_LE, JPEG_LOSSLESS_SV1, RLE], EXPLICIT_LE),
    ([RLE, EXPLICIT_LE, IMPLICIT_LE], RLE),
    ([JPEG_LS_LOSSLESS, IMPLICIT_LE, JPEG_BASELINE], JPEG_LS_LOSSLESS),
    # only lossy syntaxes proposed: the sender holds the image that way; its first is taken
    ([J2K, JPEG_BASELINE], J2K),
], ids=["issue-order", "uncompressed-before-lossless", "j2k-lossless", "explicit-first", "rle-first",
        "jpeg-ls", "lossy-only"])
def test_one_context_with_several_syntaxes_gets_the_senders_first_lossless(
    listener: Listener, shared_dicom: Path, monkeypatch: pytest.MonkeyPatch, proposed: list[str], expected: str
) -> None:
    """A pynetdicom sender proposing several syntaxes in ONE context for CT Image Storage is asked
    for its first lossless one (its first at all if it proposes only lossy ones); the file it then
    sends, streamed from disk unparsed, is stored byte for byte with that syntax in its File Meta."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    path = shared_dicom / "compressed" / CT1_BY_SYNTAX[expected]
    ae = AE(ae_title="MULTISCU")
    ae.add_requested_context(CT_IMAGE_STORAGE, proposed)
    assoc = ae.associate(LOOPBACK, listener.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        [context] = assoc.accepted_contexts
        assert context.transfer_syntax[0] == expected, context.transfer_syntax[0].name
        response = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert response.Status == 0x0000
    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    stored = listener.stored_path(uid)
    assert pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == expected
    assert _dataset_bytes(stored) == _dataset_bytes(path)


def test_pynetdicom_default_proposal_and_deflated_first(listener: Listener, shared_dicom: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom's default proposal (Implicit, Explicit, Deflated, Big Endian) gets Implicit VR LE,
    its first: a sender is never made to deflate; one that proposes Deflated first (it holds the
    file deflated) sends it deflated, stored as sent."""
    monkeypatch.setattr(pynetdicom_config, "STORE_SEND_CHUNKED_DATASET", True)
    path = shared_dicom / "compressed" / "image_dfl_deflated.dcm"
    sop_class = pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID
    ae = AE(ae_title="MULTISCU")
    ae.add_requested_context(sop_class)  # pynetdicom's default transfer syntaxes
    ae.add_requested_context(CT_IMAGE_STORAGE, [DEFLATED, EXPLICIT_LE, IMPLICIT_LE])
    assoc = ae.associate(LOOPBACK, listener.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        accepted = {str(cx.abstract_syntax): str(cx.transfer_syntax[0]) for cx in assoc.accepted_contexts}
    finally:
        assoc.release()
    assert accepted == {str(sop_class): IMPLICIT_LE, CT_IMAGE_STORAGE: DEFLATED}

    ae = AE(ae_title="MULTISCU")
    ae.add_requested_context(sop_class, [DEFLATED, EXPLICIT_LE, IMPLICIT_LE])
    assoc = ae.associate(LOOPBACK, listener.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        assert str(assoc.accepted_contexts[0].transfer_syntax[0]) == DEFLATED
        assert assoc.send_c_store(path).Status == 0x0000
    finally:
        assoc.release()
    stored = listener.stored_path(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    assert pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == DEFLATED
    assert _dataset_bytes(stored) == _dataset_bytes(path)


_STORESCP_PREFERS = {EXPLICIT_LE: "+xe", EXPLICIT_BE: "+xb", IMPLICIT_LE: "+xi", DEFLATED: "+xd",
                     JPEG_LOSSLESS_SV1: "+xs", RLE: "+xr", JPEG_LS_LOSSLESS: "+xt"}


@pytest.mark.parametrize(("options", "expected"), [
    ([], EXPLICIT_LE),  # -x= : uncompressed, explicit VR in local byte order first
    (["-xe"], EXPLICIT_LE),
    (["-xb"], EXPLICIT_BE),
    (["-xi"], IMPLICIT_LE),
    (["-xd"], DEFLATED),
    # storescu here cannot compress: each of these sends the CT already in that syntax
    (["-xs"], JPEG_LOSSLESS_SV1),
    (["-xr"], RLE),
    (["-xt"], JPEG_LS_LOSSLESS),
    # JPEG Baseline (lossy) first, then the uncompressed ones: never the lossy one
    (["-xy"], EXPLICIT_LE),
    (["-xw"], EXPLICIT_LE),  # JPEG 2000 lossy first
], ids=lambda v: "".join(v) if isinstance(v, list) else None)
def test_storescu_proposals_in_one_context(listener: Listener, shared_dicom: Path, tmp_path: Path,
                                           dcmtk, options: list[str], expected: str) -> None:  # type: ignore[no-untyped-def]
    """dcmtk storescu with each ``-x…`` proposal, combined in one context (``+C``), sending the CT
    (uncompressed, or already in the compressed syntax proposed): the node picks the first
    lossless syntax of storescu's order, storescu converts the file to it where needed, and the
    node stores exactly what a bit-preserving dcmtk storescp receives from the same command,
    with that syntax in the File Meta."""
    path = shared_dicom / "compressed" / CT1_BY_SYNTAX.get(expected, CT1_BY_SYNTAX[EXPLICIT_LE])
    argv = ["+C", *options]
    sent = storescu(LOOPBACK, listener.port, [path], called=AE_TITLE, extra=argv)
    assert sent.all_ok, sent.describe()
    uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
    stored = listener.stored_path(uid)
    assert pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == expected
    # storescp made to choose the same syntax (its own preference option) as the reference
    with StoreSCP(tmp_path / "storescp", extra=["--bit-preserving", _STORESCP_PREFERS[expected]]) as scp:
        to_scp = storescu(LOOPBACK, scp.port, [path], called=scp.aet, extra=argv)
        assert to_scp.all_ok, to_scp.describe()
        [received] = scp.received()
        assert pydicom.dcmread(received, stop_before_pixels=True).file_meta.TransferSyntaxUID == expected
        assert _dataset_bytes(stored) == _dataset_bytes(received)


# -- re-sends and reopening -------------------------------------------------------------------------
def test_resending_the_same_instances_is_idempotent(listener: Listener, shared_dicom: Path, tmp_path: Path, dcmtk) -> None:  # type: ignore[no-untyped-def]
    files = sorted((shared_dicom / "ct" / "pydicom_head_ct2").glob("*.dcm"))
    study_uid = pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID
    first = storescu(LOOPBACK, listener.port, files, called=AE_TITLE)
    assert first.all_ok, first.describe()
    assert listener.instance_count() == len(files)
    settings = load_settings(data_dir=tmp_path / "unused", quiet_period_s=1)
    complete_due_studies(listener.sessions, settings, now=utcnow() + timedelta(seconds=5))
    before = listener.study(study_uid)
    assert (before.state, before.version) == (StudyState.ROUTED, 1)
    contents = {p: p.read_bytes() for p in listener.stored_files()}

    again = storescu(LOOPBACK, listener.port, files, called=AE_TITLE)

    assert again.all_ok, again.describe()
    assert listener.instance_count() == len(files)
    after = listener.study(study_uid)
    assert (after.state, after.version, after.last_received_at) == (StudyState.ROUTED, 1, before.last_received_at)
    assert {p: p.read_bytes() for p in listener.stored_files()} == contents
    assert complete_due_studies(listener.sessions, settings, now=utcnow() + timedelta(seconds=60)) == []


def _node_db(data_dir: Path) -> sessionmaker[Session]:
    return make_session_factory(make_engine(f"sqlite:///{data_dir / 'var' / 'mednode.db'}"))


def test_more_instances_after_completion_run_a_new_job_version(
    mednode_factory: MednodeFactory, tmp_path: Path, dcmtk
) -> None:  # type: ignore[no-untyped-def]
    geometry = PhantomGeometry(rows=96, columns=96, pixel_spacing_mm=(3.2, 3.2), slice_spacing_mm=10.0, num_slices=18)
    datasets = make_ct_phantom(geometry=geometry)
    files = write_series(datasets, tmp_path / "phantom")
    receiver = StoreSCP(tmp_path / "received").start()
    try:
        node = mednode_factory(destination=f"{receiver.aet}@{LOOPBACK}:{receiver.port}", quiet_period_s=1.0)
        sessions = _node_db(node.data_dir)

        def jobs() -> list[Job]:
            with sessions() as session:
                return list(session.scalars(select(Job).order_by(Job.id)))

        sent = storescu(LOOPBACK, node.dicom_port, files[:9], called=node.ae_title)
        assert sent.all_ok, sent.describe()
        poll(lambda: [j.state for j in jobs()] == [JobState.DELIVERED], 120, 0.3, "job v1 delivered")
        assert len(receiver.received()) == 2  # SEG and SR of version 1

        sent = storescu(LOOPBACK, node.dicom_port, files[9:], called=node.ae_title)
        assert sent.all_ok, sent.describe()
        poll(lambda: [j.state for j in jobs()] == [JobState.DELIVERED] * 2, 120, 0.3, "job v2 delivered")

        first, second = jobs()
        assert (first.study_version, second.study_version) == (1, 2)
        assert first.rule_name == second.rule_name == "ct-analysis"
        with sessions() as session:
            study = session.scalars(select(Study)).one()
            assert (study.state, study.version) == (StudyState.ROUTED, 2)
            assert session.scalar(select(func.count(Instance.id))) == len(files)
        # version 2 has its own objects (UIDs derive from the study version), covering all slices
        received = [pydicom.dcmread(p) for p in receiver.received()]
        assert len(received) == 4
        assert len({ds.SOPInstanceUID for ds in received}) == 4
        segs = [ds for ds in received if ds.Modality == "SEG"]
        frame_sources = sorted(
            len({f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                 for f in ds.PerFrameFunctionalGroupsSequence})
            for ds in segs
        )
        assert frame_sources[-1] > 9 >= frame_sources[0]
    finally:
        receiver.stop()


# -- resources --------------------------------------------------------------------------------------
def test_disk_watermark_refuses_with_out_of_resources(
    mednode_factory: MednodeFactory, shared_dicom: Path, dcmtk
) -> None:  # type: ignore[no-untyped-def]
    node = mednode_factory(extra_env={"MEDNODE_MIN_FREE_DISK_MB": str(10**12)})
    path = shared_dicom / "ct" / "pydicom_head_ct2" / "17106.dcm"

    sent = storescu(LOOPBACK, node.dicom_port, [path], called=node.ae_title)

    assert not sent.all_ok
    [status] = sent.statuses
    assert status.status == "Refused: OutOfResources", sent.describe()  # dcmtk's name of 0xA7xx
    store = node.data_dir / "var" / "store"
    assert not store.exists() or [p for p in store.rglob("*") if p.is_file()] == []
    counts = json.loads(node.cli("status", "--json").stdout)
    assert counts["instances"] == 0
    assert echoscu(LOOPBACK, node.dicom_port, called=node.ae_title).returncode == 0


def test_in_process_watermark_status_is_a700(listener_factory: Callable[..., Listener], shared_dicom: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The exact status code and comment, read with a pynetdicom SCU."""
    listener = listener_factory(min_free_bytes=10**18)
    path = shared_dicom / "ct" / "pydicom_head_ct2" / "17106.dcm"
    ds = pydicom.dcmread(path)
    ae = AE(ae_title="SCU")
    ae.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = ae.associate(LOOPBACK, listener.port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        response = assoc.send_c_store(path)
    finally:
        assoc.release()
    assert int(response.Status) == 0xA700
    assert "storage full" in str(response.ErrorComment)
    assert listener.stored_files() == [] and listener.instance_count() == 0
