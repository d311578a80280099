"""STOW-RS into, QIDO-RS and WADO-RS out of a real ``mednode serve``, with ``dicomweb-client`` as
the client.

A CT study stored by STOW-RS is processed as a C-STORE study would be (completion, routing, the CT
analyzer's SEG and SR); a malformed part gets its own failure entry while the good parts are
stored; an instance of another study than the URL names is refused (409, 0xA900); callers without
the API token get 401 for both services; QIDO-RS finds the study, its series and the results
mednode wrote by the mandatory matching keys, with limit and offset; WADO-RS gives the study back
with its results, the pixels unchanged, metadata whose BulkDataURIs the client follows, frames,
and a JPEG 2000 instance decoded for a client that names no transfer syntax. mednode's own STOW-RS
client (:mod:`node.dicomweb_delivery`) reads mednode's per-instance refusal as a permanent one.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pydicom
import pytest
import requests
from dicomweb_client import DICOMwebClient

from node.config import DicomWebDestination, DicomWebSettings
from node.delivery import Outcome
from node.dicomweb_delivery import send_files
from tests.integration.conftest import MednodeFactory, MednodeNode
from tests.integration.e2e import poll
from tests.peers import free_port
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series
from tests.shared_data import SHARED_DICOM

TOKEN = "stow-test-token-0123456789"
CANARY = "Canary^Stowrs"
GEOMETRY = PhantomGeometry(rows=96, columns=96, pixel_spacing_mm=(3.2, 3.2), slice_spacing_mm=10.0, num_slices=18)
TRUNCATED = SHARED_DICOM / "malformed" / "MR_truncated.dcm"


def _client(node: MednodeNode, token: str | None = TOKEN) -> DICOMwebClient:
    session = requests.Session()
    if token:
        session.headers["Authorization"] = f"Bearer {token}"
    return DICOMwebClient(f"{node.web_url}/dicom-web", session=session)


@pytest.fixture(scope="module")
def ct_series(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    datasets = make_ct_phantom(geometry=GEOMETRY, patient_name=CANARY, patient_id="STOW-PID-1",
                               accession_number="ACC-STOW-1")
    for ds in datasets:
        ds.StudyDate = "20240315"
    return write_series(datasets, tmp_path_factory.mktemp("stow-ct"))


def _multipart(parts: list[bytes], boundary: str = "mednode-test-boundary") -> tuple[bytes, str]:
    body = b"".join(b"--" + boundary.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n"
                    for p in parts) + b"--" + boundary.encode() + b"--\r\n"
    return body, f'multipart/related; type="application/dicom"; boundary={boundary}'


def _study_jobs(node: MednodeNode, study_uid: str) -> list[dict]:
    answer = httpx.get(f"{node.web_url}/api/v1/studies/{study_uid}", headers={"Authorization": f"Bearer {TOKEN}"},
                       timeout=10)
    return answer.json().get("jobs", []) if answer.status_code == 200 else []


def test_stow_rs_in_and_qido_rs_out(mednode_factory: MednodeFactory, ct_series: list[Path]) -> None:
    web_port = free_port()  # the URL the node writes into its answers names it (web_public_url)
    node = mednode_factory(quiet_period_s=1.0, web_port=web_port, extra_env={
        "MEDNODE_WEB_API_TOKENS": f'["{TOKEN}"]', "MEDNODE_WEB_PUBLIC_URL": f"http://127.0.0.1:{web_port}/"})
    datasets = [pydicom.dcmread(p) for p in ct_series]
    study_uid = str(datasets[0].StudyInstanceUID)

    # without the token: 401 for both services
    with pytest.raises(requests.HTTPError) as refused:
        _client(node, None).store_instances(datasets[:1])
    assert refused.value.response.status_code == 401
    with pytest.raises(requests.HTTPError) as hidden:
        _client(node, None).search_for_studies()
    assert hidden.value.response.status_code == 401
    with pytest.raises(requests.HTTPError) as wrong:
        _client(node, "not-the-token").search_for_studies()
    assert wrong.value.response.status_code == 401

    client = _client(node)
    # the study, less one slice, by dicomweb-client
    answer = client.store_instances(datasets[:-1])
    # its WADO-RS resource, at web_public_url: dicomweb-client's Host header names no port
    assert answer.RetrieveURL == f"{node.web_url}/dicom-web/studies/{study_uid}"
    stored = {str(item.ReferencedSOPInstanceUID) for item in answer.ReferencedSOPSequence}
    assert stored == {str(ds.SOPInstanceUID) for ds in datasets[:-1]}
    assert "FailedSOPSequence" not in answer

    # the last slice beside two malformed parts: the good one is stored, each bad one has its entry
    body, content_type = _multipart([ct_series[-1].read_bytes(), b"this is not DICOM", TRUNCATED.read_bytes()])
    mixed = requests.post(f"{node.web_url}/dicom-web/studies", data=body, timeout=60,
                          headers={"Content-Type": content_type, "Authorization": f"Bearer {TOKEN}",
                                   "Accept": "application/dicom+json"})
    assert mixed.status_code == 202, mixed.text
    assert mixed.headers["content-type"].startswith("application/dicom+json")
    response = pydicom.Dataset.from_json(mixed.json())
    assert [str(i.ReferencedSOPInstanceUID) for i in response.ReferencedSOPSequence] == [str(datasets[-1].SOPInstanceUID)]
    failures = [(str(i.ReferencedSOPInstanceUID), int(i.FailureReason)) for i in response.FailedSOPSequence]
    truncated_uid = str(pydicom.dcmread(TRUNCATED, stop_before_pixels=True).SOPInstanceUID)
    assert failures == [("", 0xC000), (truncated_uid, 0xC000)]

    # an instance of another study than the URL names: 409, Failure Reason 0xA900
    with pytest.raises(requests.HTTPError) as conflict:
        client.store_instances(datasets[:1], study_instance_uid="1.2.3.4.5.6.7.8.9")
    assert conflict.value.response.status_code == 409
    [failure] = pydicom.Dataset.from_json(conflict.value.response.json()).FailedSOPSequence
    assert int(failure.FailureReason) == 0xA900

    # wrong media types and bodies are refused as a whole
    as_json = requests.post(f"{node.web_url}/dicom-web/studies", data=b"{}", timeout=10,
                            headers={"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"})
    assert as_json.status_code == 415
    no_boundary = requests.post(f"{node.web_url}/dicom-web/studies", data=b"x", timeout=10, headers={
        "Content-Type": 'multipart/related; type="application/dicom"', "Authorization": f"Bearer {TOKEN}"})
    assert no_boundary.status_code == 400

    # mednode's own STOW-RS client reads mednode's per-instance refusal as permanent
    [own] = send_files(DicomWebDestination(dicomweb=DicomWebSettings(
        url=f"{node.web_url}/dicom-web", auth="bearer", token=TOKEN)), [TRUNCATED])
    assert own.outcome is Outcome.PERMANENT and own.status == 0xC000, own.describe()

    # processed like a C-STORE study: complete, routed to the CT analyzer, SEG and SR written
    def finished() -> list[dict] | None:
        jobs = _study_jobs(node, study_uid)
        return jobs if jobs and jobs[0]["state"] in ("succeeded", "delivered", "failed") else None

    [job] = poll(finished, 180, 0.5, "the CT analyzer's job on the STOW-RS study")
    assert job["state"] == "succeeded", job
    assert sorted(r["kind"] for r in job["results"]) == ["seg", "sr"], job["results"]

    # QIDO-RS: studies by the mandatory keys
    def study_uids(**filters: str) -> list[str]:
        return [str(pydicom.Dataset.from_json(s).StudyInstanceUID)
                for s in client.search_for_studies(search_filters=filters)]

    assert study_uids(PatientID="STOW-PID-1") == [study_uid]
    assert study_uids(PatientID="STOW-*") == [study_uid]
    assert study_uids(StudyDate="20240301-20240331") == [study_uid]
    assert study_uids(StudyDate="-20240101") == []
    assert study_uids(AccessionNumber="ACC-STOW-1") == [study_uid]
    assert study_uids(ModalitiesInStudy="SEG") == [study_uid]  # what mednode wrote counts
    assert study_uids(StudyInstanceUID=study_uid) == [study_uid]
    [study] = [pydicom.Dataset.from_json(s) for s in client.search_for_studies(search_filters={"PatientID": "STOW-PID-1"})]
    assert list(study.ModalitiesInStudy) == ["CT", "SEG", "SR"]
    assert study.NumberOfStudyRelatedInstances == len(datasets) + 2
    assert str(study.PatientName) == CANARY  # identity for a logged-in caller
    assert study.RetrieveURL == f"{node.web_url}/dicom-web/studies/{study_uid}"

    series = [pydicom.Dataset.from_json(s) for s in client.search_for_series(study_instance_uid=study_uid)]
    assert sorted(s.Modality for s in series) == ["CT", "SEG", "SR"]
    [sr_series] = [s for s in series if s.Modality == "SR"]
    by_modality = client.search_for_series(search_filters={"Modality": "SEG", "StudyInstanceUID": study_uid})
    assert [pydicom.Dataset.from_json(s).Modality for s in by_modality] == ["SEG"]

    instances = client.search_for_instances(study_instance_uid=study_uid, limit=5)
    assert len(instances) == 5
    everything = client.search_for_instances(study_instance_uid=study_uid, limit=100)
    assert len(everything) == len(datasets) + 2
    tail = client.search_for_instances(study_instance_uid=study_uid, offset=len(datasets), limit=100)
    assert sorted(pydicom.Dataset.from_json(i).Modality for i in tail) == ["SEG", "SR"]
    [sr] = client.search_for_instances(study_instance_uid=study_uid,
                                       series_instance_uid=str(sr_series.SeriesInstanceUID))
    sr_uid = str(pydicom.Dataset.from_json(sr).SOPInstanceUID)
    [found] = client.search_for_instances(search_filters={"SOPInstanceUID": sr_uid})
    assert str(pydicom.Dataset.from_json(found).SOPClassUID).startswith("1.2.840.10008.5.1.4.1.1.88.")
    ct_one = client.search_for_instances(search_filters={"StudyInstanceUID": study_uid, "InstanceNumber": "1",
                                                         "Modality": "CT"})
    assert len(ct_one) == 1

    # WADO-RS: the study back, results included, the pixels as sent
    with pytest.raises(requests.HTTPError) as anonymous:
        _client(node, None).retrieve_study(study_uid)
    assert anonymous.value.response.status_code == 401
    retrieved = client.retrieve_study(study_uid)
    assert sorted(str(ds.Modality) for ds in retrieved) == ["CT"] * len(datasets) + ["SEG", "SR"]
    sent = {str(ds.SOPInstanceUID): ds for ds in datasets}
    for ds in retrieved:
        if ds.Modality == "CT":
            assert ds.PixelData == sent[str(ds.SOPInstanceUID)].PixelData, ds.SOPInstanceUID
            assert str(ds.PatientName) == CANARY
    ct_series_uid = str(datasets[0].SeriesInstanceUID)
    metadata = client.retrieve_series_metadata(study_uid, ct_series_uid)
    assert len(metadata) == len(datasets)
    first = pydicom.Dataset.from_json(metadata[0], bulk_data_uri_handler=lambda tag, vr, uri: client.retrieve_bulkdata(uri)[0])
    pixels = bytes(first.PixelData)  # pydicom keeps what the handler gave as a list of byte values
    assert pixels == sent[str(first.SOPInstanceUID)].PixelData, "the BulkDataURI, followed"
    [frame] = client.retrieve_instance_frames(study_uid, ct_series_uid, str(first.SOPInstanceUID), frame_numbers=[1])
    assert frame == pixels, "frame 1"

    # a JPEG 2000 instance: as stored (dicomweb-client asks transfer-syntax=* by default), or decoded
    # for a client that takes Explicit VR Little Endian only
    j2k = pydicom.dcmread(SHARED_DICOM / "compressed" / "CT1_J2KR.dcm")
    client.store_instances([j2k])
    uids = str(j2k.StudyInstanceUID), str(j2k.SeriesInstanceUID), str(j2k.SOPInstanceUID)
    decoded = client.retrieve_instance(*uids, media_types=(("application/dicom", str(pydicom.uid.ExplicitVRLittleEndian)),))
    assert decoded.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
    assert (decoded.pixel_array == j2k.pixel_array).all(), "decoded pixels"
    as_stored = client.retrieve_instance(*uids)
    assert as_stored.file_meta.TransferSyntaxUID == j2k.file_meta.TransferSyntaxUID
    assert as_stored.PixelData == j2k.PixelData, "the JPEG 2000 codestream as sent"

    # the audit trail has the STOW-RS stores and the QIDO-RS views, by UID, never by value
    audit = httpx.get(f"{node.web_url}/api/v1/audit", params={"limit": 200}, timeout=10,
                      headers={"Authorization": f"Bearer {TOKEN}"}).json()
    events = audit["items"] if isinstance(audit, dict) else audit
    stored_rows = [e for e in events if e["action"] == "stored" and e.get("study_instance_uid") == study_uid]
    assert stored_rows and all("STOW-RS" in (e.get("detail") or "") for e in stored_rows), events[:5]
    assert any(e["action"] == "viewed" and "QIDO-RS" in (e.get("detail") or "") for e in events), events[:5]
    assert any(e["action"] == "downloaded" and "WADO-RS study" in (e.get("detail") or "") for e in events), events[:5]
    assert all(CANARY not in (e.get("detail") or "") for e in events)
    # patient data never in logs
    logs = node.logs()
    assert CANARY not in logs and "STOW-PID-1" not in logs and "ACC-STOW-1" not in logs
