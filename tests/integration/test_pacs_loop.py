"""A PACS that forwards every stable study back to mednode (issue 12's echo loop), with real
Orthanc: an ``OnStableStudy`` Lua script posts each stable study to ``/modalities/mednode/store``,
so mednode's own SEG and SR come back inside the study. Exactly one job and one result set must
come of it, whatever the PACS sends back, and a hand re-send in other transfer syntaxes too.
And a late series, sent over the network to a running node, reopens a complete study only if a
rule would run on it."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage

from tests.integration.conftest import MednodeFactory, MednodeNode
from tests.integration.e2e import poll, wait_for_results
from tests.peers import LOOPBACK, Orthanc, StoreSCP, storescu

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"

#: how long the PACS forwards every stable study to mednode while mednode sends it results
FORWARDING_S = 120.0
STABLE_AGE_S = 2

FORWARD_EVERY_STABLE_STUDY = """
function OnStableStudy(studyId, tags, metadata)
  -- a common site set-up: every study that went quiet goes to the AI node, whatever is in it
  RestApiPost('/modalities/mednode/store', '{"Resources": ["' .. studyId .. '"], "Synchronous": true}')
  forwarded = (forwarded or 0) + 1
  print('forwarded stable study ' .. studyId .. ' (' .. forwarded .. ')')
end
"""


def _metric(node: MednodeNode, line_start: str) -> float:
    for line in httpx.get(f"{node.web_url}/metrics", timeout=10).text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _resend(node: MednodeNode, files: list[Path], syntax: str) -> None:
    """Send ``files`` to mednode by hand over one association that accepts only ``syntax``
    (pynetdicom re-encodes each data set in it: the same instances, other bytes)."""
    ae = AE(ae_title="BYHAND")
    ae.add_requested_context(CTImageStorage, [syntax])
    assoc = ae.associate(LOOPBACK, node.dicom_port, ae_title=node.ae_title)
    assert assoc.is_established, "mednode refused the association"
    try:
        for path in files:
            status = assoc.send_c_store(pydicom.dcmread(path))
            assert status.Status == 0x0000, f"C-STORE answered {status.Status:#06x}"
    finally:
        assoc.release()


@pytest.mark.slow
def test_a_pacs_forwarding_every_stable_study_gets_one_result_set(
    tmp_path: Path, orthanc_factory, mednode_factory: MednodeFactory, shared_dicom: Path,  # type: ignore[no-untyped-def]
) -> None:
    files = sorted((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    lua = tmp_path / "forward.lua"
    lua.write_text(FORWARD_EVERY_STABLE_STUDY)
    orthanc: Orthanc = orthanc_factory(extra_config={"LuaScripts": [str(lua)], "StableAge": STABLE_AGE_S})
    node = mednode_factory(destination=f"{orthanc.aet}@{LOOPBACK}:{orthanc.dicom_port}", quiet_period_s=2.0)
    orthanc.add_modality("mednode", node.ae_title, node.dicom_port)
    started = time.monotonic()

    for path in files:
        orthanc.upload(path)

    # the first round: the study goes stable, mednode receives it, answers with a SEG and an SR
    wait_for_results(orthanc, study_uid, timeout_s=FORWARDING_S)
    poll(lambda: node.status()["jobs"]["delivered"] == 1, 60, what="job delivered")

    def returned_series() -> list[dict]:
        study = httpx.get(f"{node.web_url}/api/v1/studies/{study_uid}", timeout=10).json()
        return [s for s in study["series"] if s["origin"] == "mednode_result"]

    # the second round: Orthanc's study changed (the results), went stable, and was forwarded
    # whole — the CT again, and mednode's own SEG and SR
    returned = poll(lambda: len(returned_series()) == 2 and returned_series(), 60,
                    what="mednode's SEG and SR forwarded back by Orthanc")
    assert all(s["origin_label"] == "mednode result, returned by PACS" for s in returned)
    poll(lambda: _metric(node, 'mednode_instances_received_total{outcome="unchanged"}') >= len(files), 30,
         what="the CT forwarded a second time")

    # a person re-sends the study by hand, twice, in other transfer syntaxes than the PACS used
    _resend(node, files, ExplicitVRLittleEndian)
    _resend(node, files, ImplicitVRLittleEndian)

    # keep the PACS forwarding for the rest of the two minutes: nothing more may come of it
    time.sleep(max(0.0, FORWARDING_S - (time.monotonic() - started)))

    jobs = httpx.get(f"{node.web_url}/api/v1/jobs", timeout=10).json()
    assert len(jobs) == 1, f"expected one job, got {[(j['id'], j['state']) for j in jobs]}"
    assert jobs[0]["state"] == "delivered" and len(jobs[0]["results"]) == 2
    study = httpx.get(f"{node.web_url}/api/v1/studies/{study_uid}", timeout=10).json()
    assert (study["state"], study["version"]) == ("routed", 1)
    counts = node.status()
    assert counts["instances"] == len(files) + 2  # the CT and mednode's two returned results
    assert counts["deliveries"] == {**counts["deliveries"], "delivered": 2, "pending": 0}
    # one result set in the PACS: the 3 CT images, one SEG, one SR
    assert len(orthanc.study_instances(study_uid)) == len(files) + 2
    # what the re-sends did: at least one of the two syntaxes differed from the held files
    assert _metric(node, 'mednode_instances_received_total{outcome="duplicate"}') >= len(files)
    assert _metric(node, "mednode_studies_split") == 0
    assert _metric(node, 'mednode_series_held{origin="mednode_result"}') == 2
    forwarded = orthanc.log_tail(200_000).count("forwarded stable study")
    print(f"Orthanc forwarded the stable study {forwarded} time(s) in {FORWARDING_S:.0f} s")
    assert forwarded >= 2


def _late_series(files: list[Path], out: Path, **changes: str) -> list[Path]:
    """``files`` as a new series of the same study (new Series and SOP Instance UIDs)."""
    out.mkdir()
    series_uid = generate_uid()
    paths = []
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for keyword, value in changes.items():
            setattr(ds, keyword, value)
        if "SOPClassUID" in changes:
            ds.file_meta.MediaStorageSOPClassUID = changes["SOPClassUID"]
        paths.append(out / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return paths


@pytest.mark.slow
def test_a_late_series_reopens_a_complete_study_only_if_a_rule_runs_on_it(
    tmp_path: Path, mednode_factory: MednodeFactory, shared_dicom: Path, dcmtk,  # type: ignore[no-untyped-def]
) -> None:
    files = sorted((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm"))
    study_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    with StoreSCP(tmp_path / "pacs") as pacs:
        node = mednode_factory(destination=f"{pacs.aet}@{LOOPBACK}:{pacs.port}", quiet_period_s=1.0)

        def study() -> dict:
            return httpx.get(f"{node.web_url}/api/v1/studies/{study_uid}", timeout=10).json()

        assert storescu(LOOPBACK, node.dicom_port, files, called=node.ae_title).all_ok
        poll(lambda: node.status()["jobs"]["delivered"] == 1, 120, what="job of version 1 delivered")

        # a dose screen captured after the study was read: the CT rule does not run on it
        capture = _late_series(files, tmp_path / "capture", Modality="OT", SOPClassUID=SECONDARY_CAPTURE)
        assert storescu(LOOPBACK, node.dicom_port, capture, called=node.ae_title).all_ok
        time.sleep(3)  # three quiet periods: a reopened study would have completed again
        held = study()
        assert (held["state"], held["version"]) == ("routed", 1)
        [late] = [s for s in held["series"] if s["modality"] == "OT"]
        assert late["late_at"] is not None and late["held_reason"] == "late series: no rule would run on it"
        assert late["instance_count"] == len(files)  # stored all the same

        # a late CT series: the rule runs on it, so the study reopens and gets version 2
        ct = _late_series(files, tmp_path / "ct")
        assert storescu(LOOPBACK, node.dicom_port, ct, called=node.ae_title).all_ok
        poll(lambda: node.status()["jobs"]["delivered"] == 2, 120, what="job of version 2 delivered")
        reopened = study()
        assert (reopened["state"], reopened["version"]) == ("routed", 2)
        assert _metric(node, "mednode_studies_split") == 1 and _metric(node, "mednode_studies_late") == 1
