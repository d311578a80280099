"""The ``mednode`` command line against real peers: echo, send (each file's own transfer syntax),
status --json, and start-up errors of serve."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from io import BytesIO
from pathlib import Path

import pydicom
import pytest

from dicom_io.header import parse_header
from storage.db import make_engine, make_session_factory, upgrade
from storage.index import index_instance
from storage.models import JobState, StudyState
from storage.store import InstanceStore
from tests.integration.conftest import REPO_ROOT
from tests.peers import LOOPBACK, Orthanc, StoreSCP, free_port, port_accepts

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"


def mednode(*args: str, env: dict[str, str] | None = None, timeout_s: float = 90) -> subprocess.CompletedProcess[str]:
    """Run ``python -m node.cli ARGS`` with no ``MEDNODE_*`` variable but ``env``; the process group
    is killed if it outlives ``timeout_s`` (so a ``serve`` that wrongly starts leaves nothing behind)."""
    clean = {k: v for k, v in os.environ.items() if not k.upper().startswith("MEDNODE_")}
    clean.update({"COLUMNS": "200", "TCP_NODELAY": "1"}, **(env or {}))
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", *args], cwd=REPO_ROOT, env=clean, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"mednode {' '.join(args)} still ran after {timeout_s} s:\n{stdout[-2000:]}{stderr[-2000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture
def data_env(tmp_path: Path) -> dict[str, str]:
    return {"MEDNODE_DATA_DIR": str(tmp_path / "var")}


# -- echo ---------------------------------------------------------------------------------------
def test_echo_orthanc(orthanc_factory, data_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    orthanc: Orthanc = orthanc_factory()
    done = mednode("echo", f"{orthanc.aet}@{LOOPBACK}:{orthanc.dicom_port}", env=data_env)
    assert done.returncode == 0, done.stderr
    assert f"{orthanc.aet}@{LOOPBACK}:{orthanc.dicom_port}: success" in done.stdout


def test_echo_storescp(tmp_path: Path, data_env: dict[str, str], dcmtk) -> None:  # type: ignore[no-untyped-def]
    with StoreSCP(tmp_path / "received") as scp:
        done = mednode("echo", f"{scp.aet}@{LOOPBACK}:{scp.port}", env=data_env)
    assert done.returncode == 0, done.stderr
    assert "success in" in done.stdout


def test_echo_a_closed_port_fails_clearly(data_env: dict[str, str]) -> None:
    port = free_port()
    assert not port_accepts(port)
    done = mednode("echo", f"NOBODY@{LOOPBACK}:{port}", env=data_env)
    assert done.returncode != 0
    assert f"NOBODY@{LOOPBACK}:{port}: failed" in done.stderr
    assert "Traceback" not in done.stderr


def test_echo_refuses_a_malformed_destination(data_env: dict[str, str]) -> None:
    done = mednode("echo", "no-port-here", env=data_env)
    assert done.returncode == 2
    assert "AET@host:port" in done.stderr


# -- send ---------------------------------------------------------------------------------------
def test_send_keeps_each_files_transfer_syntax(orthanc_factory, shared_dicom: Path, tmp_path: Path,
                                                data_env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    orthanc: Orthanc = orthanc_factory()
    folder = tmp_path / "mixed"
    folder.mkdir()
    sources = {
        "jpeg-ls.dcm": shared_dicom / "compressed" / "CT1_JLSL.dcm",
        "jpeg-lossless.dcm": shared_dicom / "compressed" / "CT1_JPLL.dcm",
        "rle.dcm": shared_dicom / "compressed" / "CT1_RLE.dcm",
        "implicit.dcm": shared_dicom / "ct" / "pydicom_head_ct2" / "17106.dcm",
    }
    for name, source in sources.items():
        (folder / name).write_bytes(source.read_bytes())
    single = shared_dicom / "compressed" / "mr_series_j2k" / "IM-0001-0001-0001.dcm"

    done = mednode("send", str(folder), str(single), "--to", f"{orthanc.aet}@{LOOPBACK}:{orthanc.dicom_port}",
                   env=data_env)

    assert done.returncode == 0, done.stdout + done.stderr
    assert f"sent 5 of 5 file(s) to {orthanc.aet}@{LOOPBACK}:{orthanc.dicom_port}" in done.stderr
    for source in [*sources.values(), single]:
        ds = pydicom.dcmread(source, stop_before_pixels=True)
        [row] = [r for r in orthanc.study_instances(ds.StudyInstanceUID) if r["SOPInstanceUID"] == ds.SOPInstanceUID]
        assert row["TransferSyntaxUID"] == ds.file_meta.TransferSyntaxUID, source.name
    jls = pydicom.dcmread(sources["jpeg-ls.dcm"], stop_before_pixels=True)
    assert jls.file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS
    [row] = [r for r in orthanc.study_instances(jls.StudyInstanceUID) if r["SOPInstanceUID"] == jls.SOPInstanceUID]
    stored = pydicom.dcmread(BytesIO(orthanc.instance_file(row["ID"])))
    assert stored.file_meta.TransferSyntaxUID == JPEG_LS_LOSSLESS
    assert stored.PixelData == pydicom.dcmread(sources["jpeg-ls.dcm"]).PixelData


def test_send_to_a_closed_port_fails_clearly(shared_dicom: Path, data_env: dict[str, str]) -> None:
    port = free_port()
    done = mednode("send", str(shared_dicom / "ct" / "pydicom_head_ct2" / "17106.dcm"),
                   "--to", f"NOBODY@{LOOPBACK}:{port}", env=data_env)
    assert done.returncode == 1
    assert f"association with NOBODY@{LOOPBACK}:{port}" in done.stderr
    assert "Traceback" not in done.stderr


def test_send_reports_refused_files(tmp_path: Path, shared_dicom: Path, data_env: dict[str, str], dcmtk) -> None:  # type: ignore[no-untyped-def]
    """A peer that refuses the instance (here a mednode listener above its disk watermark) makes
    send exit 1 and name the file with the status."""
    from node.ingest import Ingestor
    from node.listener import start_listener

    engine = make_engine(f"sqlite:///{tmp_path / 'refusing.db'}")
    upgrade(engine)
    port = free_port()
    server = start_listener(Ingestor(InstanceStore(tmp_path / "store", min_free_bytes=10**18),
                                     make_session_factory(engine)), ae_title="FULL", host=LOOPBACK, port=port)
    path = shared_dicom / "ct" / "pydicom_head_ct2" / "17106.dcm"
    try:
        done = mednode("send", str(path), "--to", f"FULL@{LOOPBACK}:{port}", env=data_env)
    finally:
        server.shutdown()
        engine.dispose()
    assert done.returncode == 1
    assert f"{path}: status 0xA700 (out of resources): Out of resources: storage full [transient]" in done.stderr, \
        done.stderr
    assert "sent 0 of 1 file(s)" in done.stderr


# -- status -------------------------------------------------------------------------------------
def test_status_json_on_a_fresh_node(data_env: dict[str, str]) -> None:
    done = mednode("status", "--json", env=data_env)
    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    assert counts["instances"] == 0
    assert counts["studies"] == {s.value: 0 for s in StudyState}
    assert counts["jobs"] == {s.value: 0 for s in JobState}


def test_status_json_counts_what_is_indexed(tmp_path: Path, shared_dicom: Path, data_env: dict[str, str]) -> None:
    data_dir = Path(data_env["MEDNODE_DATA_DIR"])
    engine = make_engine(f"sqlite:///{data_dir / 'mednode.db'}")
    upgrade(engine)
    store = InstanceStore(data_dir / "store")
    sessions = make_session_factory(engine)
    for path in sorted((shared_dicom / "ct" / "pydicom_head_ct2").glob("*.dcm")):
        data = path.read_bytes()
        header, _ = parse_header(data)
        stored = store.write_instance(header.study_instance_uid, header.series_instance_uid,
                                      header.sop_instance_uid, data)
        with sessions() as session, session.begin():
            index_instance(session, header, stored, calling_ae_title="X", called_ae_title="MEDNODE")
    engine.dispose()

    done = mednode("status", "--json", env=data_env)

    assert done.returncode == 0, done.stderr
    counts = json.loads(done.stdout)
    assert counts["instances"] == 4
    assert counts["studies"]["receiving"] == 1 and sum(counts["studies"].values()) == 1
    assert sum(counts["jobs"].values()) == 0


# -- studies complete ---------------------------------------------------------------------------
def test_studies_complete_routes_a_receiving_study_now(shared_dicom: Path, data_env: dict[str, str]) -> None:
    data_dir = Path(data_env["MEDNODE_DATA_DIR"])
    engine = make_engine(f"sqlite:///{data_dir / 'mednode.db'}")
    upgrade(engine)
    store = InstanceStore(data_dir / "store")
    sessions = make_session_factory(engine)
    study_uid = ""
    for path in sorted((shared_dicom / "ct" / "pydicom_head_ct2").glob("*.dcm")):
        data = path.read_bytes()
        header, _ = parse_header(data)
        study_uid = header.study_instance_uid
        stored = store.write_instance(header.study_instance_uid, header.series_instance_uid,
                                      header.sop_instance_uid, data)
        with sessions() as session, session.begin():
            index_instance(session, header, stored, calling_ae_title="X", called_ae_title="MEDNODE")
    engine.dispose()
    env = {**data_env, "MEDNODE_DESTINATION": "PACS@127.0.0.1:104"}

    done = mednode("studies", "complete", study_uid, env=env)

    assert done.returncode == 0, done.stderr
    assert f"study {study_uid} complete: job(s) 1 queued" in done.stdout
    counts = json.loads(mednode("status", "--json", env=env).stdout)
    assert counts["studies"]["routed"] == 1 and counts["jobs"]["queued"] == 1
    again = mednode("studies", "complete", study_uid, env=env)
    assert again.returncode == 1 and "complete already" in again.stdout + again.stderr
    unknown = mednode("studies", "complete", "1.2.3.404", env=env)
    assert unknown.returncode == 1 and "not stored" in unknown.stdout + unknown.stderr

    table = mednode("status", env=data_env)
    assert table.returncode == 0 and "instances stored: 4" in table.stdout


# -- serve refuses an invalid configuration ------------------------------------------------------
@pytest.mark.parametrize(
    ("variable", "value", "key"),
    [
        ("MEDNODE_DICOM_PORT", "99999", "dicom_port"),
        ("MEDNODE_AE_TITLE", "A_TITLE_OF_SEVENTEEN", "ae_title"),
        ("MEDNODE_DESTINATION", "not-a-destination", "destination"),
        ("MEDNODE_QUIET_PERIOD_S", "[/bold]", "quiet_period_s"),  # markup in a value is shown, not parsed
        ("MEDNODE_DELIVERY__GIVE_UP_AFTER_S", "-1", "delivery.give_up_after_s"),
    ],
)
def test_serve_with_an_invalid_variable_exits_2_naming_it(
    variable: str, value: str, key: str, data_env: dict[str, str]
) -> None:
    web_port, dicom_port = free_port(), free_port()
    env = {**data_env, "MEDNODE_DICOM_HOST": LOOPBACK, "MEDNODE_DICOM_PORT": str(dicom_port),
           "MEDNODE_WEB_PORT": str(web_port), variable: value}
    done = mednode("serve", env=env, timeout_s=60)
    assert done.returncode == 2, done.stdout + done.stderr
    assert key in done.stderr and f"(env {variable})" in done.stderr, done.stderr
    assert repr(value) in done.stderr
    assert "Traceback" not in done.stderr
    assert not Path(data_env["MEDNODE_DATA_DIR"]).exists()  # nothing was started or created
