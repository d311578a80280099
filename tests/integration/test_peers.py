"""The real-peer helpers work: Orthanc, storescu, storescp, dcmsend, echoscu, stop by PID."""

from __future__ import annotations

import io
import os
import re
import sys
from pathlib import Path
from typing import Any

import pydicom
import pytest

from tests.peers import (
    ManagedProcess,
    PeerError,
    StoreSCP,
    dcmsend,
    echoscu,
    free_port,
    parse_dcmsend_report,
    parse_storescu_output,
    port_accepts,
    require_tool,
    storescu,
    wait_port_closed,
)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"


@pytest.fixture
def ct3(shared_dicom: Path) -> list[Path]:
    files = sorted((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm"))
    assert len(files) == 3, f"expected 3 CT slices in {shared_dicom / 'ct' / 'dcmqi_ct3slice'}"
    return files


def test_orthanc_receives_storescu_and_pushes_to_storescp(
    orthanc_factory, dcmtk, ct3: list[Path], tmp_path: Path
) -> None:
    sent = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in ct3}
    study_uid = pydicom.dcmread(ct3[0], stop_before_pixels=True).StudyInstanceUID

    with StoreSCP(tmp_path / "sink", aet="SINK") as sink:
        orthanc = orthanc_factory(
            modalities={"sink": {"AET": "SINK", "Host": "127.0.0.1", "Port": sink.port}}
        )
        result = storescu(orthanc.host, orthanc.dicom_port, ct3, called=orthanc.aet)
        assert result.all_ok, result.describe()
        assert [s.path for s in result.statuses] == [str(f) for f in ct3]

        studies = orthanc.studies()
        assert [s["MainDicomTags"]["StudyInstanceUID"] for s in studies] == [study_uid]
        rows = orthanc.study_instances(study_uid)
        assert {r["SOPInstanceUID"] for r in rows} == set(sent)
        assert {r["SOPClassUID"] for r in rows} == {CT_IMAGE_STORAGE}
        assert orthanc.find_instances(study_uid, sop_class_uid=COMPREHENSIVE_3D_SR) == []
        stored = pydicom.dcmread(io.BytesIO(orthanc.instance_file(rows[0]["ID"])))
        assert stored.SOPInstanceUID == rows[0]["SOPInstanceUID"]

        answer = orthanc.store_to_modality("sink", studies[0]["ID"])
        assert answer["InstancesCount"] == 3 and answer["FailedInstancesCount"] == 0, answer
        received = orthanc.wait_for(
            lambda: len(sink.received()) == 3 and sink.received(), timeout_s=10, what="3 files"
        )
        got = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in received}
        assert got == set(sent)

        orthanc_pid, dicom_port, http_port = (
            orthanc.process.pid,
            orthanc.dicom_port,
            orthanc.http_port,
        )
        assert orthanc.stop() == 0, orthanc.log_tail()
        assert not orthanc.process.is_running
        with pytest.raises(ProcessLookupError):
            os.kill(orthanc_pid, 0)
        assert wait_port_closed(dicom_port) and wait_port_closed(http_port)
    assert not sink.is_running
    assert not port_accepts(sink.port)


def test_echoscu_and_dcmsend_against_storescp(dcmtk, ct3: list[Path], tmp_path: Path) -> None:
    with StoreSCP(tmp_path / "in", aet="SINK") as sink:
        assert echoscu(sink.host, sink.port, called="SINK").returncode == 0
        result = dcmsend(sink.host, sink.port, ct3[:2], called="SINK")
        assert result.all_ok, result.describe()
        assert [s.path for s in result.statuses] == [str(f) for f in ct3[:2]]
        assert len(sink.received()) == 2
    assert echoscu("127.0.0.1", sink.port, called="SINK", timeout_s=10).returncode != 0


def test_storescu_reports_a_refused_file(dcmtk, shared_dicom: Path, tmp_path: Path) -> None:
    """A peer that refuses a SOP class shows up as a not-ok status for that file."""
    ct = min((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm"))
    # Comprehensive 3D SR: storescu proposes no presentation context for it.
    sr = shared_dicom / "sr" / "highdicom_sr_tid1500.dcm"
    with StoreSCP(tmp_path / "in", aet="SINK") as sink:
        result = storescu(sink.host, sink.port, [ct, sr], called="SINK")
    assert not result.all_ok
    assert [(s.path, s.ok) for s in result.statuses] == [(str(ct), True), (str(sr), False)]


def test_parsers_on_canned_output() -> None:
    out = (
        "I: Sending file: /a.dcm\nI: Received Store Response (Success)\n"
        "I: Sending file: /b.dcm\nI: Received Store Response (Warning: Coercion)\n"
        "I: Sending file: /c.dcm\nE: No presentation context for: (SR3)\n"
    )
    assert [(s.path, s.status, s.ok) for s in parse_storescu_output(out)] == [
        ("/a.dcm", "Success", True),
        ("/b.dcm", "Warning: Coercion", False),
        ("/c.dcm", "No presentation context for: (SR3)", False),
    ]
    report = "Filename      : /a.dcm\nDIMSE Status  : 0x0000 (Success)\nFilename : /b.dcm\n"
    assert [(s.path, s.ok) for s in parse_dcmsend_report(report)] == [
        ("/a.dcm", True),
        ("/b.dcm", False),
    ]


def test_managed_process_error_carries_log_tail(tmp_path: Path) -> None:
    proc = ManagedProcess(
        [
            sys.executable,
            "-c",
            "import os; print('boom', os.environ['TCP_NODELAY']); raise SystemExit(3)",
        ],
        log_dir=tmp_path,
        name="boom",
    )
    with pytest.raises(PeerError, match=r"(?s)exited with status 3.*boom 1"):
        proc.start(port=free_port(), timeout_s=10)
    assert proc.stop() == 3


def test_managed_process_stops_by_pid_with_sigkill_fallback(tmp_path: Path) -> None:
    port = free_port()
    script = (
        "import signal, socket, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        f"s = socket.socket(); s.bind(('127.0.0.1', {port})); s.listen()\n"
        "time.sleep(60)\n"
    )
    with ManagedProcess([sys.executable, "-c", script], log_dir=tmp_path, name="stubborn") as proc:
        proc.start(port=port, timeout_s=10)
        assert proc.is_running
        assert proc.stop(timeout_s=0.5) == -9
    assert not port_accepts(port)


def test_require_tool_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    missing = "mednode-no-such-tool"
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception):
        require_tool(missing)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must have every real peer"):
        require_tool(missing)
    assert Path(require_tool("storescu")).is_file()


def _load_bench() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "ingest.py"
    spec = importlib.util.spec_from_file_location("bench_ingest", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_ingest_bench_runs_small_and_rewrites_only_its_docs_section(
    dcmtk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    require_tool("Orthanc")
    bench = _load_bench()
    docs = tmp_path / "BENCHMARKS.md"
    docs.write_text(
        f"# Benchmarks\n\n## Other\nkeep me\n\n{bench.BEGIN}\nold\n{bench.END}\n\n## Tail\nkeep too\n"
    )
    monkeypatch.setattr(bench, "DOCS", docs)
    argv = ["--count", "4", "--repeats", "1", "--legs", "storescp,orthanc", "--write-docs"]
    assert bench.main([*argv, "--workdir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert re.search(r"\| dcmtk storescp → disk \| \d+ \| \d+ \|", table), table
    assert re.search(r"\| Orthanc [\d.]+ \(index \+ storage\) \| \d+ \| \d+ \|", table), table
    text = docs.read_text()
    assert "keep me" in text and "keep too" in text and "\nold\n" not in text
    assert text.count(bench.BEGIN) == 1 and "## Ingest" in text and "nproc" in text


def test_ingest_bench_holds_idle_associations_where_the_receiver_can(
    dcmtk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    require_tool("Orthanc")
    bench = _load_bench()
    monkeypatch.setattr(bench, "DOCS", tmp_path / "BENCHMARKS.md")
    argv = ["--count", "3", "--repeats", "1", "--legs", "storescp,orthanc", "--idle-associations", "2"]
    assert bench.main([*argv, "--workdir", str(tmp_path)]) == 1  # storescp could not be run
    table = capsys.readouterr().out
    assert "while 2 other associations to the receiver were open and idle" in table
    assert re.search(r"\| Orthanc [\d.]+ \(index \+ storage\) \| \d+ \| \d+ \|", table), table
    assert "not run: storescp serves one association at a time" in table
    assert not (tmp_path / "BENCHMARKS.md").exists()  # only --write-docs writes


def test_bench_study_is_one_readable_ct_series(tmp_path: Path) -> None:
    bench = _load_bench()
    total = bench.generate_study(tmp_path, count=3, size=64)
    files = sorted(tmp_path.iterdir())
    assert total == sum(f.stat().st_size for f in files)
    datasets = [pydicom.dcmread(f) for f in files]
    assert {ds.SeriesInstanceUID for ds in datasets} == {datasets[0].SeriesInstanceUID}
    assert [ds.pixel_array.dtype.name for ds in datasets] == ["int16"] * 3
    assert len({ds.pixel_array.tobytes() for ds in datasets}) == 3


def test_bench_node_env_keeps_the_developers_settings_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bench.nodes import node_env, node_process

    monkeypatch.setenv("MEDNODE_DESTINATION", "DEV@10.0.0.1:104")  # a developer's own setting
    env = node_env(tmp_path, dicom_port=11112, web_port=8080, embedded_worker=False, quiet_period_s=2.5,
                   broker_url=None)
    assert env["MEDNODE_EMBEDDED_WORKER"] == "false" and env["MEDNODE_QUIET_PERIOD_S"] == "2.5"
    assert env["MEDNODE_DICOM_HOST"] == env["MEDNODE_WEB_HOST"] == "127.0.0.1"
    assert "MEDNODE_BROKER_URL" not in env and "MEDNODE_DATABASE_URL" not in env
    process = node_process(["true"], env=env, log_dir=tmp_path)
    assert "MEDNODE_DESTINATION" not in process.env
    assert process.env["MEDNODE_DATA_DIR"] == str(tmp_path) and process.env["TCP_NODELAY"] == "1"


def test_load_bench_samples_every_listener_process_while_a_study_arrives(
    dcmtk, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from bench import load

    monkeypatch.setattr(load, "DOCS", tmp_path / "BENCHMARKS.md")
    argv = ["--rss", "4", "--listener-processes", "2", "--idle-max-s", "1", "--work", str(tmp_path)]
    assert load.main([*argv, "--write-docs"]) == 0
    table = capsys.readouterr().out
    # serve and its one `mednode listen` child, each sampled (a Python process is > 50 MB)
    row = re.search(r"\| 4 \| \d+ \| \d+ \| (\d+) → (\d+) \| (\d+) → (\d+) \| [+-]\d+ MB \|", table)
    assert row is not None, table
    assert all(int(value) > 50 for value in row.groups()), table
    assert "| serve: idle → peak | listen 1: idle → peak |" in table
    assert "## Listener memory with study size" in (tmp_path / "BENCHMARKS.md").read_text()
