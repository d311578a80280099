"""What a peer's answer means for a delivery, with real dcmtk ``storescp`` and Orthanc as peers.

``send_files``/``echo`` run in-process against storescp configured to refuse (``--refuse``: an
association rejected permanently; an association profile without SR/SEG: presentation contexts
rejected; ``--abort-after``: an abort) and over DICOM TLS (``+tls``, certificates from the
security tests' PKI). The node-level tests run ``mednode serve`` and check that a permanent
refusal fails the delivery on its first attempt and the job with that reason, while the TLS
destination with its own calling AE title is delivered.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.config import Destination, DestinationTLS
from node.delivery import (
    Outcome,
    PermanentDeliveryError,
    Timeouts,
    TransientDeliveryError,
    echo,
    send_files,
)
from node.dispatch import attempt_all
from storage.db import make_engine, make_session_factory
from storage.models import Delivery, DeliveryState, Job, JobState
from tests.integration.conftest import MednodeFactory
from tests.integration.e2e import poll
from tests.integration.test_security import PKI, pki  # noqa: F401 (the session's CA and certificates)
from tests.peers import LOOPBACK, StoreSCP, free_port, storescu
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series
from tests.shared_data import SHARED_DICOM

SHARED_SR = SHARED_DICOM / "sr" / "dcmtk_test_SR.dcm"
GEOMETRY = PhantomGeometry(rows=96, columns=96, pixel_spacing_mm=(3.2, 3.2), slice_spacing_mm=10.0, num_slices=18)

#: a dcmtk association profile (``storescp -xf``) that accepts CT images only: no SR, no SEG
CT_ONLY_PROFILE = """\
[[TransferSyntaxes]]
[Uncompressed]
TransferSyntax1 = LocalEndianExplicit
TransferSyntax2 = OppositeEndianExplicit
TransferSyntax3 = LittleEndianImplicit

[[PresentationContexts]]
[CTOnly]
PresentationContext1 = CTImageStorage\\Uncompressed

[[Profiles]]
[CTOnly]
PresentationContexts = CTOnly
"""


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return write_series(make_ct_phantom(geometry=GEOMETRY), tmp_path_factory.mktemp("ct"))


@pytest.fixture(scope="module")
def sr_file() -> Path:
    """A Comprehensive SR (dcmtk's test SR from the shared samples)."""
    path = SHARED_SR
    if not path.is_file():
        pytest.skip(f"shared sample {path} is missing")
    return path


def _scp(tmp_path: Path, *extra: str, accept_all: bool = True) -> StoreSCP:
    return StoreSCP(tmp_path / f"received-{free_port()}", extra=list(extra), accept_all=accept_all).start()


def _tls_scp(tmp_path: Path, pki: PKI) -> StoreSCP:  # noqa: F811
    """storescp over TLS: its server certificate, and it requires a client certificate from our CA."""
    return _scp(tmp_path, "+tls", str(pki.server_key), str(pki.server_crt), "+cf", str(pki.ca_crt), "-rc",
                "--debug")


def _calling_ae_titles(scp: StoreSCP) -> list[str]:
    """Calling AE titles of the associations storescp accepted, one per association (``--debug``
    logs each A-ASSOCIATE-RQ and its A-ASSOCIATE-AC)."""
    requests = re.findall(r"BEGIN A-ASSOCIATE-RQ.*?END A-ASSOCIATE-RQ", scp.log_text(), re.DOTALL)
    return [m[1] for rq in requests if (m := re.search(r"Calling Application Name:\s+(\S+)", rq))]


# -- statuses and rejections from real peers ----------------------------------------------------------
def test_an_association_rejected_permanently_raises_a_permanent_error(tmp_path: Path, sr_file: Path, dcmtk) -> None:  # type: ignore[no-untyped-def]
    scp = _scp(tmp_path, "--refuse")
    try:
        with pytest.raises(PermanentDeliveryError) as raised:
            send_files(Destination(ae_title="STORESCP", host=LOOPBACK, port=scp.port), [sr_file],
                       calling_ae_title="MEDNODE")
    finally:
        scp.stop()
    assert raised.value.outcome is Outcome.PERMANENT
    assert "association rejected (Rejected Permanent, source: Service User" in str(raised.value), raised.value


def test_a_peer_that_accepts_no_sr_refuses_it_permanently(tmp_path: Path, sr_file: Path, ct_files: list[Path],
                                                         dcmtk) -> None:  # type: ignore[no-untyped-def]
    profile = tmp_path / "ct-only.cfg"
    profile.write_text(CT_ONLY_PROFILE)
    scp = _scp(tmp_path, "-xf", str(profile), "CTOnly", accept_all=False)
    try:
        ct_file = ct_files[0]
        ct_syntax = pydicom.dcmread(ct_file, stop_before_pixels=True).file_meta.TransferSyntaxUID
        assert ct_syntax == "1.2.840.10008.1.2.1", "the phantom is Explicit VR LE, which the profile accepts"
        sr_status, ct_status = send_files(Destination(ae_title="STORESCP", host=LOOPBACK, port=scp.port),
                                          [sr_file, ct_file], calling_ae_title="MEDNODE")
        received = scp.received()
    finally:
        scp.stop()
    assert (ct_status.ok, ct_status.status) == (True, 0x0000)
    assert (sr_status.ok, sr_status.outcome, sr_status.status) == (False, Outcome.PERMANENT, None)
    assert "presentation context rejected" in sr_status.describe() and "Comprehensive SR" in sr_status.describe()
    assert len(received) == 1


def test_an_abort_during_the_store_is_transient(tmp_path: Path, sr_file: Path, dcmtk) -> None:  # type: ignore[no-untyped-def]
    scp = _scp(tmp_path, "--abort-after")
    try:
        [status] = send_files(Destination(ae_title="STORESCP", host=LOOPBACK, port=scp.port), [sr_file],
                              calling_ae_title="MEDNODE")
    finally:
        scp.stop()
    assert (status.ok, status.status, status.outcome) == (False, None, Outcome.TRANSIENT)


@pytest.mark.parametrize("abort", ["--abort-after", "--abort-during"])
def test_after_an_abort_the_rest_of_a_job_waits_for_a_new_association(
        tmp_path: Path, sr_file: Path, ct_files: list[Path], abort: str, dcmtk) -> None:  # type: ignore[no-untyped-def]
    """A peer that aborts (or drops) the association mid-store ends the batch there: the files
    left are not sent into the dead association, where each would wait out the DIMSE timeout
    (pynetdicom may not have marked the association ended when the C-STORE comes back empty)."""
    scp = _scp(tmp_path, abort)
    destination = Destination(ae_title="STORESCP", host=LOOPBACK, port=scp.port)
    started = time.monotonic()
    try:
        outcomes = attempt_all(destination, [sr_file, *ct_files[:3]], "MEDNODE", Timeouts(10, 60, 60))
    finally:
        scp.stop()
    assert time.monotonic() - started < 30, "a C-STORE went into the aborted association"
    assert [(ok, permanent) for ok, permanent, _, _ in outcomes] == [(False, False)] * 4  # all retried later
    assert all("association lost" in (error or "") for _, _, error, _ in outcomes[1:])


@pytest.fixture(scope="module")
def no_study_uid(tmp_path_factory: pytest.TempPathFactory, ct_files: list[Path]) -> Path:
    """A CT image without StudyInstanceUID: what a broken sender might produce."""
    ds = pydicom.dcmread(ct_files[0])
    del ds.StudyInstanceUID
    path = tmp_path_factory.mktemp("broken") / "no-study-uid.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_a_cannot_understand_status_is_a_permanent_refusal_with_the_status_in_the_reason(
        tmp_path: Path, no_study_uid: Path) -> None:
    """Another mednode as the peer: it answers 0xC000 for an instance without StudyInstanceUID."""
    from node.dispatch import attempt
    from node.ingest import Ingestor
    from node.listener import start_listener
    from storage.db import upgrade
    from storage.store import InstanceStore

    engine = make_engine(f"sqlite:///{tmp_path / 'peer.db'}")
    upgrade(engine)
    port = free_port()
    server = start_listener(Ingestor(InstanceStore(tmp_path / "store"), make_session_factory(engine)),
                            ae_title="PEER", host=LOOPBACK, port=port)
    try:
        destination = Destination(ae_title="PEER", host=LOOPBACK, port=port)
        [status] = send_files(destination, [no_study_uid], calling_ae_title="MEDNODE")
        ok, permanent, reason = attempt(destination, no_study_uid, "MEDNODE", Timeouts())
    finally:
        server.shutdown()
        engine.dispose()
    assert (status.ok, status.status, status.outcome) == (False, 0xC000, Outcome.PERMANENT)
    assert (ok, permanent) == (False, True)
    assert reason == (f"refused by PEER@{LOOPBACK}:{port}: status 0xC000 (cannot understand): "
                      "Cannot understand: StudyInstanceUID is missing or empty"), reason


def test_orthanc_answers_out_of_resources_for_an_instance_it_cannot_index(
        orthanc_factory, no_study_uid: Path) -> None:  # type: ignore[no-untyped-def]
    """Orthanc 1.10 says 0xA700 (out of resources) for an instance without StudyInstanceUID: by the
    standard's words that is transient, so a delivery of such an object would be retried until it
    gives up. (mednode never writes one; this pins the peer's behaviour the docs describe.)"""
    from node.dispatch import attempt

    orthanc = orthanc_factory()
    destination = Destination(ae_title=orthanc.aet, host=LOOPBACK, port=orthanc.dicom_port)
    ok, permanent, reason = attempt(destination, no_study_uid, "MEDNODE", Timeouts())
    assert (ok, permanent) == (False, False)
    assert reason is not None and reason.startswith(f"{destination}: status 0xA700 (out of resources)"), reason


def test_an_association_rejected_transiently_is_retried(tmp_path: Path, sr_file: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another mednode with every association slot taken rejects with "Rejected Transient, local
    limit exceeded" (pynetdicom's answer at ``maximum_associations``): worth retrying."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    from node import listener
    from node.ingest import Ingestor
    from storage.db import upgrade
    from storage.store import InstanceStore

    monkeypatch.setattr(listener, "MAX_ASSOCIATIONS", 1)
    engine = make_engine(f"sqlite:///{tmp_path / 'peer.db'}")
    upgrade(engine)
    port = free_port()
    server = listener.start_listener(Ingestor(InstanceStore(tmp_path / "store"), make_session_factory(engine)),
                                     ae_title="BUSY", host=LOOPBACK, port=port)
    holder = AE(ae_title="HOLDER")
    holder.add_requested_context(Verification)
    held = holder.associate(LOOPBACK, port, ae_title="BUSY")
    try:
        assert held.is_established
        with pytest.raises(TransientDeliveryError) as raised:
            send_files(Destination(ae_title="BUSY", host=LOOPBACK, port=port), [sr_file], calling_ae_title="MEDNODE")
    finally:
        held.release()
        server.shutdown()
        engine.dispose()
    assert raised.value.outcome is Outcome.TRANSIENT
    assert "rejected (Rejected Transient" in str(raised.value) and "Local limit exceeded" in str(raised.value), \
        raised.value


def test_a_closed_port_is_transient(sr_file: Path) -> None:
    with pytest.raises(TransientDeliveryError, match="association with STORESCP@127.0.0.1"):
        send_files(Destination(ae_title="STORESCP", host=LOOPBACK, port=free_port()), [sr_file],
                   calling_ae_title="MEDNODE")


# -- outbound TLS -----------------------------------------------------------------------------------
def _tls_destination(port: int, pki: PKI, *, ca: Path | None = None, client: bool = True,  # noqa: F811
                     calling: str | None = None) -> Destination:
    tls = DestinationTLS(ca_file=ca or pki.ca_crt, cert_file=pki.client_crt if client else None,
                         key_file=pki.client_key if client else None)
    return Destination(ae_title="STORESCP", host=LOOPBACK, port=port, calling_ae_title=calling, tls=tls)


def test_tls_echo_and_store_with_the_destinations_calling_ae_title(tmp_path: Path, pki: PKI, sr_file: Path,  # noqa: F811
                                                                   dcmtk) -> None:  # type: ignore[no-untyped-def]
    scp = _tls_scp(tmp_path, pki)
    try:
        destination = _tls_destination(scp.port, pki, calling="MEDNODE_OUT")
        answer = echo(destination, calling_ae_title="MEDNODE")
        assert (answer.ok, answer.status, answer.error) == (True, 0, None)
        [status] = send_files(destination, [sr_file], calling_ae_title="MEDNODE")
        assert status.ok, status.describe()
        [received] = scp.received()
        assert pydicom.dcmread(received).SOPInstanceUID == pydicom.dcmread(sr_file).SOPInstanceUID
        # plain TCP to the TLS port: no association, and not a refusal (nothing says the peer meant it)
        plain = Destination(ae_title="STORESCP", host=LOOPBACK, port=scp.port)
        assert not echo(plain, calling_ae_title="MEDNODE").ok
        logged = _calling_ae_titles(scp)
    finally:
        scp.stop()
    assert logged == ["MEDNODE_OUT", "MEDNODE_OUT"], logged  # the echo and the store


def test_the_destinations_page_echoes_over_tls_with_the_destinations_options(
        tmp_path: Path, pki: PKI, dcmtk) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    from node.config import Settings
    from node.web import system

    scp = _tls_scp(tmp_path, pki)
    try:
        tls = {"ca_file": pki.ca_crt, "cert_file": pki.client_crt, "key_file": pki.client_key}
        settings = Settings(data_dir=tmp_path / "var", destinations={
            "pacs": {"ae_title": "STORESCP", "host": LOOPBACK, "port": scp.port, "calling_ae_title": "MEDNODE_OUT",
                     "tls": tls},
            "plain": f"PLAIN@{LOOPBACK}:{scp.port}",
        })
        listed = {d.name: d for d in system.destinations_out(settings)}
        ok = system.echo_destination(settings, "pacs")
        plain = system.echo_destination(settings, "plain")
        callers = _calling_ae_titles(scp)
    finally:
        scp.stop()
    assert (listed["pacs"].tls, listed["pacs"].calling_ae_title) == (True, "MEDNODE_OUT")
    assert (listed["plain"].tls, listed["plain"].calling_ae_title) == (False, "MEDNODE")
    assert ok is not None and ok.ok and ok.status == 0, ok
    assert plain is not None and not plain.ok and plain.error, plain
    assert callers == ["MEDNODE_OUT"], callers  # plain TCP never got as far as an A-ASSOCIATE-RQ


def test_a_peer_certificate_from_another_ca_is_a_permanent_refusal(tmp_path: Path, pki: PKI, sr_file: Path,  # noqa: F811
                                                                   dcmtk) -> None:  # type: ignore[no-untyped-def]
    scp = _tls_scp(tmp_path, pki)
    other_ca = pki.other_client_crt.parent / "other-ca.crt"
    try:
        with pytest.raises(PermanentDeliveryError) as raised:
            send_files(_tls_destination(scp.port, pki, ca=other_ca), [sr_file], calling_ae_title="MEDNODE")
        answer = echo(_tls_destination(scp.port, pki, ca=other_ca), calling_ae_title="MEDNODE")
        received = scp.received()
    finally:
        scp.stop()
    assert "certificate does not verify" in str(raised.value) and "tls.ca_file" in str(raised.value), raised.value
    assert not answer.ok and answer.error is not None and "certificate does not verify" in answer.error
    assert received == []


def test_a_peer_that_requires_a_client_certificate_refuses_a_node_without_one(
        tmp_path: Path, pki: PKI, sr_file: Path, dcmtk) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    scp = _tls_scp(tmp_path, pki)
    try:
        with pytest.raises(PermanentDeliveryError) as raised:
            send_files(_tls_destination(scp.port, pki, client=False), [sr_file], calling_ae_title="MEDNODE")
        received = scp.received()
    finally:
        scp.stop()
    assert "TLS handshake failed" in str(raised.value) and "tls.cert_file" in str(raised.value), raised.value
    assert received == []


# -- the node: refusals fail at once, TLS destinations with their own calling AE title ---------------
def _sessions(node) -> sessionmaker[Session]:  # type: ignore[no-untyped-def]
    return make_session_factory(make_engine(f"sqlite:///{node.data_dir / 'var' / 'mednode.db'}"))


def _snapshot(sessions: sessionmaker[Session]) -> tuple[list[Job], list[Delivery]]:
    with sessions() as session:
        return (list(session.scalars(select(Job).order_by(Job.id))),
                list(session.scalars(select(Delivery).order_by(Delivery.id))))


def _job_finished(sessions: sessionmaker[Session]) -> bool:
    jobs, _ = _snapshot(sessions)
    return len(jobs) == 1 and jobs[0].state in (JobState.FAILED, JobState.DELIVERED)


def test_a_permanent_rejection_fails_the_delivery_and_the_job_on_the_first_attempt(
        mednode_factory: MednodeFactory, tmp_path: Path, ct_files: list[Path], dcmtk) -> None:  # type: ignore[no-untyped-def]
    scp = _scp(tmp_path, "--refuse")
    try:
        # retries every second for a day: only a permanent refusal can fail a delivery here
        node = mednode_factory(destination=f"STORESCP@{LOOPBACK}:{scp.port}", quiet_period_s=1.0,
                               extra_env={"MEDNODE_DELIVERY__RETRY_INITIAL_S": "1",
                                          "MEDNODE_DELIVERY__RETRY_MAX_S": "1"})
        sessions = _sessions(node)
        sent = storescu(LOOPBACK, node.dicom_port, ct_files, called=node.ae_title)
        assert sent.all_ok, sent.describe()
        poll(lambda: _job_finished(sessions), 120, 0.3, "job finished")
        [job], deliveries = _snapshot(sessions)
    finally:
        scp.stop()
    assert job.state is JobState.FAILED, (job.state, job.reason)
    assert len(deliveries) == 2 and all(d.state is DeliveryState.FAILED for d in deliveries)
    assert [d.attempts for d in deliveries] == [1, 1], [(d.attempts, d.last_error) for d in deliveries]
    refusal = f"refused by STORESCP@{LOOPBACK}:{scp.port}: association rejected (Rejected Permanent"
    assert all(d.last_error and d.last_error.startswith(refusal) for d in deliveries), \
        [d.last_error for d in deliveries]
    assert job.reason is not None and job.reason.startswith(f"delivery failed: {refusal}"), job.reason


def test_tls_destinations_with_their_options_deliver_or_fail_clearly(
        mednode_factory: MednodeFactory, tmp_path: Path, pki: PKI, ct_files: list[Path], dcmtk) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    scp = _tls_scp(tmp_path, pki)
    other_ca = pki.other_client_crt.parent / "other-ca.crt"
    config = tmp_path / "mednode.yaml"
    config.write_text(f"""
destinations:
  pacs:
    ae_title: STORESCP
    host: {LOOPBACK}
    port: {scp.port}
    calling_ae_title: MEDNODE_OUT
    timeouts: {{acse_s: 10, dimse_s: 30, network_s: 10}}
    tls: {{ca_file: {pki.ca_crt}, cert_file: {pki.client_crt}, key_file: {pki.client_key}}}
  wrong-ca:
    ae_title: WRONGCA
    host: {LOOPBACK}
    port: {scp.port}
    tls: {{ca_file: {other_ca}, cert_file: {pki.client_crt}, key_file: {pki.client_key}}}
rules:
  - {{name: ct, match: {{modality: CT}}, tasks: [ct_analysis], destinations: [pacs, wrong-ca]}}
""")
    try:
        node = mednode_factory(config=config, quiet_period_s=1.0,
                               extra_env={"MEDNODE_DELIVERY__RETRY_INITIAL_S": "1",
                                          "MEDNODE_DELIVERY__RETRY_MAX_S": "1"})
        echoed = node.cli("echo", "pacs", "--config", str(config))
        refused = node.cli("echo", "wrong-ca", "--config", str(config))
        sessions = _sessions(node)
        sent = storescu(LOOPBACK, node.dicom_port, ct_files, called=node.ae_title)
        assert sent.all_ok, sent.describe()
        poll(lambda: _job_finished(sessions), 120, 0.3, "job finished")
        [job], deliveries = _snapshot(sessions)
        received = {pydicom.dcmread(p).Modality for p in scp.received()}
        callers = _calling_ae_titles(scp)
    finally:
        scp.stop()
    assert echoed.returncode == 0 and "success" in echoed.stdout, echoed.stdout + echoed.stderr
    assert refused.returncode == 1 and "certificate does not verify" in refused.stderr, refused.stdout + refused.stderr
    assert received == {"SEG", "SR"}
    assert callers == ["MEDNODE_OUT"] * 2, callers  # the echo, and SEG + SR over one association
    by_destination: dict[str, list[Delivery]] = {}
    for d in deliveries:
        by_destination.setdefault(d.destination.split("@")[0], []).append(d)
    assert [d.state for d in by_destination["STORESCP"]] == [DeliveryState.DELIVERED] * 2
    wrong = by_destination["WRONGCA"]
    assert [(d.state, d.attempts) for d in wrong] == [(DeliveryState.FAILED, 1)] * 2, \
        [(d.state, d.attempts, d.last_error) for d in wrong]
    assert all(d.last_error and "TLS: the peer's certificate does not verify" in d.last_error for d in wrong)
    assert job.state is JobState.FAILED
    assert job.reason is not None and job.reason.startswith(f"delivery failed: refused by WRONGCA@{LOOPBACK}"), \
        job.reason


def test_serve_refuses_to_start_without_a_destinations_tls_files(tmp_path: Path) -> None:
    import json

    from tests.integration.test_security import _serve

    missing = tmp_path / "no-such-ca.pem"
    destinations = {"pacs": {"ae_title": "PACS", "host": LOOPBACK, "port": 2762, "tls": {"ca_file": str(missing)}}}
    done = _serve({"MEDNODE_DATA_DIR": str(tmp_path / "var"), "MEDNODE_DESTINATIONS": json.dumps(destinations)})
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"destinations.pacs.tls.ca_file: file not found: {missing}" in done.stderr, done.stderr[-2000:]
