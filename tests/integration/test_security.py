"""Security of the node with real peers: who may associate (calling AE allow-list), DICOM TLS with
and without client certificates, the audit trail, and patient data kept out of every process's logs.

The allow-list and TLS tests run the SCP in-process (:func:`node.listener.start_listener` on a
temporary SQLite index) and talk to it with dcmtk ``echoscu``/``storescu`` — and with a pynetdicom
SCU where a source address must be chosen (storescu cannot bind one). Certificates are made per
test session with the ``openssl`` command line: a CA, a server and a client certificate, and a
client certificate from another CA. The canary test runs ``mednode serve`` and ``mednode worker``
as separate processes with TLS and the allow-list on, and reads every log they wrote.
"""

from __future__ import annotations

import json
import logging
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from node.config import ConfigError, TLSSettings
from node.ingest import Ingestor
from node.listener import CallingAEAllowList, start_listener
from node.tls import server_context
from storage.db import make_engine, make_session_factory, upgrade
from storage.models import Instance
from storage.store import InstanceStore
from tests.integration.conftest import MednodeFactory
from tests.integration.e2e import poll
from tests.peers import (
    LOOPBACK,
    StoreSCP,
    echoscu,
    find_tool,
    free_port,
    peer_env,
    require_tool,
    storescu,
)
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series

AE_TITLE = "MEDNODE"
REJECTED_CALLING_AE = ("Rejected Permanent, Source: Service User", "Calling AE Title Not Recognized")


# -- certificates ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class PKI:
    ca_crt: Path
    server_crt: Path
    server_key: Path
    client_crt: Path
    client_key: Path
    other_client_crt: Path  #: signed by another CA
    other_client_key: Path


def _openssl(*args: str | Path) -> None:
    done = subprocess.run([require_tool("openssl"), *map(str, args)], capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, f"openssl {' '.join(map(str, args))}: {done.stderr}"


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, crt = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", crt, "-days", "2",
             "-subj", f"/CN=mednode test {name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, crt


def _leaf(directory: Path, name: str, ca: tuple[Path, Path], extensions: str) -> tuple[Path, Path]:
    key, csr, crt = directory / f"{name}.key", directory / f"{name}.csr", directory / f"{name}.crt"
    ext = directory / f"{name}.ext"
    ext.write_text(extensions + "\n")
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={name}")
    _openssl("x509", "-req", "-in", csr, "-CA", ca[1], "-CAkey", ca[0], "-CAcreateserial", "-out", crt,
             "-days", "2", "-extfile", ext)
    return key, crt


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> PKI:
    directory = tmp_path_factory.mktemp("pki")
    ca = _ca(directory, "ca")
    other_ca = _ca(directory, "other-ca")
    server_key, server_crt = _leaf(directory, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                                   "extendedKeyUsage=serverAuth")
    client_key, client_crt = _leaf(directory, "client", ca, "extendedKeyUsage=clientAuth")
    other_key, other_crt = _leaf(directory, "other-client", other_ca, "extendedKeyUsage=clientAuth")
    return PKI(ca[1], server_crt, server_key, client_crt, client_key, other_crt, other_key)


def _tls_args(pki: PKI, client: str = "client") -> list[str]:
    """storescu/echoscu options for DICOM TLS: our key and certificate, trusting our CA."""
    if client == "none":
        return ["+tla", "+cf", str(pki.ca_crt)]  # TLS without a client certificate
    key, crt = (pki.client_key, pki.client_crt) if client == "client" else (pki.other_client_key, pki.other_client_crt)
    return ["+tls", str(key), str(crt), "+cf", str(pki.ca_crt)]


def _echo(port: int, aet: str = "ECHOSCU", extra: tuple[str, ...] | list[str] = (),
          timeout_s: float = 30) -> subprocess.CompletedProcess[str]:
    """dcmtk ``echoscu -v`` (``extra``: TLS options) to the in-process node."""
    return subprocess.run([find_tool("echoscu"), "-v", "-aet", aet, "-aec", AE_TITLE, *extra, LOOPBACK, str(port)],
                          capture_output=True, text=True, errors="replace", env=peer_env(), timeout=timeout_s,
                          check=False, stdin=subprocess.DEVNULL)


# -- an in-process listener -----------------------------------------------------------------------
@dataclass
class Listener:
    port: int
    sessions: sessionmaker[Session]

    def instance_count(self) -> int:
        with self.sessions() as session:
            return session.scalar(select(func.count(Instance.id))) or 0


@pytest.fixture
def listener_factory(tmp_path: Path) -> Iterator[Callable[..., Listener]]:
    servers = []

    def start(allowed: list[str] | None = None, tls: TLSSettings | None = None) -> Listener:
        root = tmp_path / f"node{len(servers)}"
        engine = make_engine(f"sqlite:///{root / 'mednode.db'}")
        upgrade(engine)
        sessions = make_session_factory(engine)
        port = tls.port if tls is not None else free_port()
        server = start_listener(Ingestor(InstanceStore(root / "store"), sessions), ae_title=AE_TITLE,
                                host=LOOPBACK, port=port, allowed_calling_ae_titles=allowed,
                                ssl_context=server_context(tls) if tls is not None else None)
        servers.append(server)
        return Listener(port, sessions)

    yield start
    for server in servers:
        server.shutdown()


@pytest.fixture(scope="module")
def ct_files(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    geometry = PhantomGeometry(rows=36, columns=36, pixel_spacing_mm=(10.0, 10.0), slice_spacing_mm=25.0, num_slices=9)
    return write_series(make_ct_phantom(geometry=geometry), tmp_path_factory.mktemp("ct"))


# -- calling AE allow-list --------------------------------------------------------------------------
def test_allowed_ae_titles_associate_and_store(listener_factory, ct_files, dcmtk) -> None:  # type: ignore[no-untyped-def]
    node = listener_factory(allowed=["STORESCU", "ECHOSCU@127.0.0.1", "MODALITY@localhost"])
    done = _echo(node.port)
    assert done.returncode == 0, done.stdout + done.stderr
    assert _echo(node.port, aet="MODALITY").returncode == 0  # a host name, resolved at start
    sent = storescu(LOOPBACK, node.port, ct_files, aet="STORESCU", called=AE_TITLE)
    assert sent.all_ok, sent.describe()
    assert node.instance_count() == len(ct_files)


def test_unknown_ae_title_is_rejected_with_the_reason(listener_factory, ct_files, dcmtk, caplog) -> None:  # type: ignore[no-untyped-def]
    node = listener_factory(allowed=["STORESCU"])
    with caplog.at_level(logging.WARNING, logger="node.listener"):
        done = _echo(node.port, aet="INTRUDER")
        sent = storescu(LOOPBACK, node.port, ct_files, aet="STRANGER", called=AE_TITLE)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "Association Rejected" in output and all(text in output for text in REJECTED_CALLING_AE), output
    assert not sent.all_ok and "Association Rejected" in sent.stdout + sent.stderr
    assert node.instance_count() == 0
    rejections = [r.getMessage() for r in caplog.records if "rejected association" in r.getMessage()]
    assert rejections == [
        "rejected association from INTRUDER@127.0.0.1: calling AE title not allowed from this address",
        "rejected association from STRANGER@127.0.0.1: calling AE title not allowed from this address",
    ]
    assert _echo(node.port, aet="STORESCU").returncode == 0  # still serving the allowed peer


def _pynetdicom_echo(port: int, aet: str, source: str) -> tuple[bool, tuple[int, int, int] | None]:
    """C-ECHO from ``source`` (a local address to bind); (accepted, A-ASSOCIATE-RJ fields)."""
    ae = AE(ae_title=aet)
    ae.add_requested_context(Verification)
    assoc = ae.associate(LOOPBACK, port, ae_title=AE_TITLE, bind_address=(source, 0))
    if assoc.is_established:
        status = assoc.send_c_echo()
        assoc.release()
        return status.Status == 0x0000, None
    primitive = assoc.acceptor.primitive
    rejection = (primitive.result, primitive.result_source, primitive.diagnostic) if assoc.is_rejected else None
    return False, rejection


def _loopback_alias_usable() -> bool:
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
    except OSError:
        return False
    return True


def test_allowed_ae_title_from_another_host_is_rejected(listener_factory) -> None:  # type: ignore[no-untyped-def]
    if not _loopback_alias_usable():
        pytest.skip("127.0.0.2 cannot be bound here (no 127/8 loopback routing)")
    node = listener_factory(allowed=["MODALITY@127.0.0.1", "ANYWHERE"])
    assert _pynetdicom_echo(node.port, "MODALITY", "127.0.0.1") == (True, None)
    # rejected-permanent (1), DICOM UL service-user (1), calling AE title not recognised (3)
    assert _pynetdicom_echo(node.port, "MODALITY", "127.0.0.2") == (False, (1, 1, 3))
    assert _pynetdicom_echo(node.port, "ANYWHERE", "127.0.0.2") == (True, None)


def test_invalid_allow_list_entries_are_refused() -> None:
    for entry in ("", "@host", "AET@", "A" * 17, "BACK\\SLASH"):
        with pytest.raises(ConfigError, match="allowed_calling_ae_titles"):
            CallingAEAllowList.parse([entry])


# -- DICOM TLS ----------------------------------------------------------------------------------------
def _tls(pki: PKI, require_client_cert: bool = True) -> TLSSettings:
    return TLSSettings(port=free_port(), cert_file=pki.server_crt, key_file=pki.server_key, ca_file=pki.ca_crt,
                       require_client_cert=require_client_cert)


def test_storescu_stores_over_tls_with_a_client_certificate(listener_factory, pki, ct_files, dcmtk) -> None:  # type: ignore[no-untyped-def]
    node = listener_factory(tls=_tls(pki), allowed=["STORESCU"])
    sent = storescu(LOOPBACK, node.port, ct_files, aet="STORESCU", called=AE_TITLE, extra=_tls_args(pki))
    assert sent.all_ok, sent.describe() + sent.stdout + sent.stderr
    assert node.instance_count() == len(ct_files)
    # the allow-list holds on the TLS port too
    refused = storescu(LOOPBACK, node.port, ct_files, aet="STRANGER", called=AE_TITLE, extra=_tls_args(pki))
    assert all(text in refused.stdout + refused.stderr for text in REJECTED_CALLING_AE)


def test_tls_refuses_peers_without_a_trusted_client_certificate(listener_factory, pki, ct_files, dcmtk, caplog) -> None:  # type: ignore[no-untyped-def]
    node = listener_factory(tls=_tls(pki))
    with caplog.at_level(logging.WARNING, logger="node.listener"):
        for client in ("none", "other"):
            sent = storescu(LOOPBACK, node.port, ct_files, called=AE_TITLE, extra=_tls_args(pki, client))
            assert not sent.all_ok, f"{client}: {sent.describe()}"
            assert "Association Accepted" not in sent.stdout + sent.stderr
    assert node.instance_count() == 0
    failures = [r.getMessage() for r in caplog.records if "TLS handshake" in r.getMessage()]
    assert len(failures) == 2 and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in failures[0], failures


def test_tls_without_required_client_certificate_accepts_anonymous_clients(listener_factory, pki, dcmtk) -> None:  # type: ignore[no-untyped-def]
    node = listener_factory(tls=_tls(pki, require_client_cert=False))
    done = _echo(node.port, extra=_tls_args(pki, "none"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert _echo(node.port, extra=_tls_args(pki)).returncode == 0
    # a certificate offered is still verified: one from another CA is refused
    assert _echo(node.port, extra=_tls_args(pki, "other")).returncode != 0


def test_plain_tcp_to_the_tls_port_fails(listener_factory, pki, ct_files, dcmtk) -> None:  # type: ignore[no-untyped-def]
    node = listener_factory(tls=_tls(pki))
    sent = storescu(LOOPBACK, node.port, ct_files, called=AE_TITLE, extra=["-to", "10"])
    assert not sent.all_ok and "Association Accepted" not in sent.stdout + sent.stderr
    assert node.instance_count() == 0
    assert _echo(node.port, extra=_tls_args(pki)).returncode == 0


def test_an_idle_connection_does_not_block_tls_peers(listener_factory, pki, dcmtk) -> None:  # type: ignore[no-untyped-def]
    """A client that connects to the TLS port and says nothing must not stall the accept loop."""
    node = listener_factory(tls=_tls(pki))
    with socket.create_connection((LOOPBACK, node.port)), socket.create_connection((LOOPBACK, node.port)):
        done = _echo(node.port, extra=["-to", "10", *_tls_args(pki)], timeout_s=20)
        assert done.returncode == 0, done.stdout + done.stderr


def test_tls_files_are_checked_at_start(pki, tmp_path) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="tls.cert_file: file not found"):
        server_context(TLSSettings(port=1, cert_file=tmp_path / "missing.crt", key_file=pki.server_key))
    with pytest.raises(ConfigError, match="tls.cert_file/tls.key_file: cannot load"):
        server_context(TLSSettings(port=1, cert_file=pki.server_crt, key_file=pki.client_key))
    (tmp_path / "bad-ca.crt").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="tls.ca_file"):
        server_context(TLSSettings(port=1, cert_file=pki.server_crt, key_file=pki.server_key,
                                   ca_file=tmp_path / "bad-ca.crt"))
    with pytest.raises(ValueError, match="tls.ca_file"):
        TLSSettings(port=1, cert_file=pki.server_crt, key_file=pki.server_key, require_client_cert=True)


# -- the whole node: TLS, allow-list, audit trail, no patient data in any log ------------------------
CANARY_NAME = "Canary^Quillfeather8X"
CANARY_ID = "SEC-CANARY-55817"
CANARY_ACCESSION = "SECACC77193"
CANARY_BIRTH_DATE = "19230417"
CANARIES = (CANARY_NAME, "Quillfeather8X", CANARY_ID, CANARY_ACCESSION, CANARY_BIRTH_DATE)
ADMIN = ("auditor", "correct-horse-battery")
TOKEN = "security-test-token-2291"


def test_canary_never_reaches_any_log(tmp_path, mednode_factory: MednodeFactory, pki, dcmtk) -> None:  # type: ignore[no-untyped-def]
    """A study with canary patient fields goes in over DICOM TLS from an allowed AE, through a
    separate worker process, back out to a PACS, and is viewed and searched by patient on the
    dashboard; every log the node's processes wrote is free of the canaries, the audit trail
    records each step by UID, and it holds no canary either."""
    geometry = PhantomGeometry(rows=96, columns=96, pixel_spacing_mm=(3.2, 3.2), slice_spacing_mm=10.0, num_slices=18)
    datasets = make_ct_phantom(geometry=geometry, patient_name=CANARY_NAME, patient_id=CANARY_ID,
                               accession_number=CANARY_ACCESSION)
    for ds in datasets:
        ds.PatientBirthDate = CANARY_BIRTH_DATE
    files = write_series(datasets, tmp_path / "canary")
    study_uid = str(datasets[0].StudyInstanceUID)

    pacs = StoreSCP(tmp_path / "pacs" / "in", log_dir=tmp_path / "pacs", aet="PACS").start()
    tls_port = free_port()
    try:
        node = mednode_factory(
            destination=f"PACS@127.0.0.1:{pacs.port}", separate_worker=True,
            extra_env={
                "MEDNODE_ALLOWED_CALLING_AE_TITLES": json.dumps(["MODALITY@127.0.0.1", "ECHOSCU"]),
                "MEDNODE_TLS__PORT": str(tls_port),
                "MEDNODE_TLS__CERT_FILE": str(pki.server_crt),
                "MEDNODE_TLS__KEY_FILE": str(pki.server_key),
                "MEDNODE_TLS__CA_FILE": str(pki.ca_crt),
                "MEDNODE_TLS__REQUIRE_CLIENT_CERT": "true",
                "MEDNODE_WEB_ADMIN_USER": ADMIN[0],
                "MEDNODE_WEB_ADMIN_PASSWORD": ADMIN[1],
                "MEDNODE_WEB_SECRET_KEY": "security-test-secret-key-0123456789abcdef",
                "MEDNODE_WEB_API_TOKENS": json.dumps([TOKEN]),
            },
        )
        node.processes[0].wait_for_port(tls_port, timeout_s=30)

        # DICOM: in over TLS from the allowed AE; an unknown AE is turned away on the plain port
        sent = storescu(LOOPBACK, tls_port, files, aet="MODALITY", called=node.ae_title, extra=_tls_args(pki))
        assert sent.all_ok, sent.describe() + sent.stderr
        assert echoscu(LOOPBACK, node.dicom_port, aet="ECHOSCU", called=node.ae_title).returncode == 0
        assert echoscu(LOOPBACK, node.dicom_port, aet="INTRUDER", called=node.ae_title).returncode != 0

        poll(lambda: node.status()["jobs"].get("delivered") == 1, 240, what="job delivered to the PACS")
        received = [pydicom.dcmread(p) for p in pacs.received()]
        assert received and all(r.StudyInstanceUID == study_uid for r in received)
        assert {str(r.PatientName) for r in received} == {CANARY_NAME}  # the canary really went through

        # the dashboard: log in, open the study with its patient fields, search by patient
        with httpx.Client(base_url=node.web_url, timeout=30, follow_redirects=True) as browser:
            login_page = browser.get("/login")
            csrf = login_page.text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
            done = browser.post("/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": csrf,
                                                "next": "/queue"})
            assert done.status_code == 200 and ADMIN[0] in done.text
            page = browser.get(f"/studies/{study_uid}")
            assert page.status_code == 200 and CANARY_NAME in page.text and CANARY_ID in page.text
            assert CANARY_ID in browser.get("/studies", params={"patient": CANARY_ID}).text
            assert browser.get("/audit").status_code == 200
            # every form that posts carries the CSRF token (the queue, a study, destinations, rules…)
            for path in ("/queue", f"/studies/{study_uid}", "/destinations", "/rules", "/audit"):
                html = browser.get(path).text
                forms = re.findall(r"<form\b[^>]*method=\"post\"[^>]*>.*?</form>", html, re.DOTALL | re.IGNORECASE)
                assert forms, f"{path} has no form"
                for form in forms:
                    assert 'name="csrf_token" value="' in form, f"a form of {path} posts without the CSRF token"
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        detail = httpx.get(f"{node.web_url}/api/v1/studies/{study_uid}", headers=bearer, timeout=30).json()
        assert detail["patient"]["patient_name"] == CANARY_NAME
        assert httpx.get(f"{node.web_url}/api/v1/studies", params={"patient": "Quillfeather8X"},
                         headers=bearer, timeout=30).json()["total"] == 1

        # the audit trail: received, sent (each object), viewed — by UID, with no patient data
        trail = httpx.get(f"{node.web_url}/api/v1/audit", params={"study_uid": study_uid, "limit": 1000},
                          headers=bearer, timeout=30)
        assert trail.status_code == 200
        events = trail.json()["items"]
        by_action: dict[str, list[dict[str, object]]] = {}
        for event in events:
            by_action.setdefault(str(event["action"]), []).append(event)
        assert [e["actor"] for e in by_action["received"]] == ["dicom:MODALITY"]
        assert len(by_action["sent"]) == len(received) and {e["actor"] for e in by_action["sent"]} == {"mednode"}
        assert {e["actor"] for e in by_action["viewed"]} == {ADMIN[0], "token"}
        assert httpx.get(f"{node.web_url}/api/v1/audit", timeout=30).status_code == 401
        for canary in CANARIES:
            assert canary not in trail.text, f"patient data {canary!r} in the audit trail"
    finally:
        pacs.stop()

    logs = {p.name: p.log_text() for p in node.processes}
    assert set(logs) == {"serve", "worker"}
    assert study_uid in logs["serve"] and "mednode.run_job" in logs["worker"]  # the logs are there, by UID
    assert "rejected association from INTRUDER@127.0.0.1" in logs["serve"]
    log_files = {p.name: p.read_text(errors="replace") for p in node.data_dir.rglob("*.log")}
    for name, text in {**logs, **log_files}.items():
        for canary in CANARIES:
            assert canary not in text, f"patient data {canary!r} found in the {name} log"


# -- start-up refusals and the dashboard's CSRF protection -------------------------------------------
def _serve(env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """``mednode serve`` with only ``env`` as MEDNODE_* settings; killed (its group) if it starts."""
    import os
    import signal
    import sys

    from tests.integration.conftest import REPO_ROOT

    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("MEDNODE_")}
    clean.update({"MEDNODE_DICOM_HOST": LOOPBACK, "MEDNODE_DICOM_PORT": str(free_port()),
                  "MEDNODE_WEB_PORT": str(free_port()), "COLUMNS": "200", **env})
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve"], cwd=REPO_ROOT, env=clean, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"mednode serve started although it should have refused:\n{stderr[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.mark.parametrize("secret", [None, "change-me", "short-secret"])
def test_serve_refuses_a_dashboard_beyond_loopback_without_a_real_secret(tmp_path, secret) -> None:  # type: ignore[no-untyped-def]
    env = {"MEDNODE_DATA_DIR": str(tmp_path / "var"), "MEDNODE_WEB_HOST": "0.0.0.0"}
    if secret is not None:
        env["MEDNODE_WEB_SECRET_KEY"] = secret
    done = _serve(env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "web_secret_key" in done.stderr and "MEDNODE_WEB_SECRET_KEY" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and (secret is None or secret not in done.stderr)
    assert not (tmp_path / "var").exists()  # nothing was started


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("MEDNODE_TLS__CERT_FILE", "/nonexistent/server.crt", "tls.cert_file: file not found"),
    ("MEDNODE_ALLOWED_CALLING_AE_TITLES", '["GOOD", "BAD@"]', "allowed_calling_ae_titles: 'BAD@'"),
])
def test_serve_refuses_unusable_listener_security_settings(tmp_path, pki, variable, value, message) -> None:  # type: ignore[no-untyped-def]
    env = {"MEDNODE_DATA_DIR": str(tmp_path / "var"), "MEDNODE_TLS__PORT": str(free_port()),
           "MEDNODE_TLS__CERT_FILE": str(pki.server_crt), "MEDNODE_TLS__KEY_FILE": str(pki.server_key),
           variable: value}
    done = _serve(env)
    assert done.returncode == 2, done.stdout + done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert not (tmp_path / "var").exists()  # checked before the index or the store is touched


def test_every_post_route_needs_the_csrf_token_with_a_cookie_session(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """A cross-site form can ride on the session cookie but cannot know the CSRF token: every
    state-changing route of the app (pages and API) answers 403 to a logged-in browser without
    it, and 401 to an anonymous caller. New routes are covered as they are added."""
    from fastapi.routing import APIRoute
    from fastapi.testclient import TestClient

    from node import context
    from node.celery_app import configure_celery
    from node.web import pages
    from node.web.app import create_app
    from tests.unit.web.conftest import ADMIN as WEB_ADMIN
    from tests.unit.web.conftest import WebSettings, csrf_of

    settings = WebSettings(data_dir=tmp_path / "var", broker_url="memory://")
    settings.data_dir.mkdir(parents=True)
    context.configure(settings)
    upgrade(context.current().engine)
    configure_celery(settings)
    app = create_app(settings)
    values = {"job_id": "1", "study_uid": "1.2.3", "name": "default", "index": "0", "result_id": "1"}
    changing = {"POST", "PUT", "PATCH", "DELETE"}
    routes: list[tuple[str, str]] = []
    for path, operations in app.openapi()["paths"].items():  # the API (in the schema)
        routes += [(m.upper(), path) for m in operations if m.upper() in changing]
    for route in pages.router.routes:  # the dashboard's forms (left out of the schema)
        if isinstance(route, APIRoute):
            routes += [(m, route.path) for m in sorted(route.methods & changing)]
    routes = [(method, re.sub(r"\{(\w+)\}", lambda m: values.get(m[1], "1"), path)) for method, path in routes]
    assert ("POST", "/login") in routes and ("POST", "/ui/jobs/1/cancel") in routes and len(routes) > 8
    try:
        with TestClient(app) as client:
            for method, path in routes:
                if path != "/login":
                    assert client.request(method, path).status_code == 401, f"{method} {path} anonymous"
            token = csrf_of(client.get("/login").text)
            assert client.post("/login", data={"username": WEB_ADMIN[0], "password": WEB_ADMIN[1]},
                               follow_redirects=False).status_code == 403  # the login form needs it too
            assert client.post("/login", data={"username": WEB_ADMIN[0], "password": WEB_ADMIN[1],
                                               "csrf_token": token}, follow_redirects=False).status_code == 303
            for method, path in routes:
                if path == "/login":
                    continue
                answer = client.request(method, path, data={"csrf_token": "forged"})
                assert answer.status_code == 403, f"{method} {path} with a forged token: {answer.status_code}"
                answer = client.request(method, path, headers={"X-CSRF-Token": token + "x"})
                assert answer.status_code == 403, f"{method} {path} with a wrong header: {answer.status_code}"
    finally:
        context.current().close()


# -- a dashboard reachable from other hosts ------------------------------------------------------------
EXPOSED_DESCRIPTION = "Exposed Desc Canary 6142"


def test_a_dashboard_bound_beyond_loopback_shows_patient_data_only_after_a_login(  # type: ignore[no-untyped-def]
        tmp_path, mednode_factory: MednodeFactory, shared_dicom, dcmtk) -> None:
    """``mednode serve`` with the dashboard on 0.0.0.0 (reached here through 127.0.0.1 only): a
    CT goes in with dcmtk and through the CT analyzer; an anonymous caller gets states but no
    description, key image or DICOM file; an API token gets them, each look audited; five
    wrong passwords lock the login out (429, Retry-After), audited without the password."""
    files = []
    for n, path in enumerate(sorted((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm"))):
        ds = pydicom.dcmread(path)
        ds.StudyDescription = EXPOSED_DESCRIPTION
        ds.PatientName = CANARY_NAME
        target = tmp_path / f"{n}.dcm"
        ds.save_as(target, enforce_file_format=True)
        files.append(target)
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    node = mednode_factory(extra_env={
        "MEDNODE_WEB_HOST": "0.0.0.0",
        "MEDNODE_WEB_ADMIN_USER": ADMIN[0],
        "MEDNODE_WEB_ADMIN_PASSWORD": ADMIN[1],
        "MEDNODE_WEB_SECRET_KEY": "exposed-test-secret-key-0123456789abcdef",
        "MEDNODE_WEB_API_TOKENS": json.dumps([TOKEN]),
        "MEDNODE_WEB_LOGIN_LOCKOUT_S": "2",
    })
    sent = storescu(LOOPBACK, node.dicom_port, files, called=node.ae_title)
    assert sent.all_ok, sent.describe() + sent.stderr
    poll(lambda: node.status()["jobs"].get("succeeded") == 1, 240, what="the CT analysis job succeeded")

    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.Client(base_url=node.web_url, timeout=30) as anonymous:
        study = anonymous.get(f"/api/v1/studies/{study_uid}").json()
        assert study["state"] == "routed" and study["patient_data_hidden"] and study["study_description"] is None
        [job] = study["jobs"]
        assert job["state"] == "succeeded" and all(r["summary"] is None for r in job["results"])
        page = anonymous.get(f"/studies/{study_uid}")
        assert page.status_code == 200 and study_uid in page.text
        assert EXPOSED_DESCRIPTION not in page.text and "key-images/" not in page.text
        png_url = f"/api/v1/jobs/{job['id']}/key-images/0.png"
        dicom_url = f"/api/v1/results/{job['results'][0]['id']}/dicom"
        assert anonymous.get(png_url).status_code == 401
        assert anonymous.get(dicom_url).status_code == 401

        detail = anonymous.get(f"/api/v1/studies/{study_uid}", headers=bearer).json()
        assert detail["study_description"] == EXPOSED_DESCRIPTION
        assert anonymous.get(png_url, headers=bearer).content.startswith(b"\x89PNG")
        assert anonymous.get(dicom_url, headers=bearer).content[128:132] == b"DICM"

        csrf = anonymous.get("/login").text.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
        wrong = "wrong-password-canary-31"
        answers = [anonymous.post("/login", data={"username": ADMIN[0], "password": wrong, "csrf_token": csrf})
                   for _ in range(6)]
        assert [a.status_code for a in answers] == [401] * 5 + [429]
        assert int(answers[-1].headers["Retry-After"]) > 0

        # the lockout is per address: the token's requests from it wait too, and a made-up
        # X-Forwarded-For does not make another address of it (no trusted proxy configured)
        assert anonymous.get("/api/v1/audit", headers=bearer).status_code == 429
        spoofed = {**bearer, "X-Forwarded-For": "203.0.113.9"}
        assert anonymous.get("/api/v1/audit", headers=spoofed).status_code == 429
        time.sleep(int(answers[-1].headers["Retry-After"]) + 0.5)
        trail = anonymous.get("/api/v1/audit", params={"limit": 1000}, headers=bearer)
        assert trail.status_code == 200
    events = trail.json()["items"]
    actions = {(e["actor"], e["action"]) for e in events}
    assert {("token", "viewed"), ("token", "viewed images"), ("token", "downloaded")} <= actions
    locked = [e for e in events if e["action"] == "login locked"]
    assert locked and all(e["actor"] == "web:127.0.0.1" for e in locked)
    for secret in (EXPOSED_DESCRIPTION, CANARY_NAME, "wrong-password-canary-31", ADMIN[1]):
        assert secret not in trail.text, f"{secret!r} in the audit trail"
    log = node.processes[0].log_text()
    assert "wrong-password-canary-31" not in log and EXPOSED_DESCRIPTION not in log and CANARY_NAME not in log
