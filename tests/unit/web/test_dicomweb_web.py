"""``/dicom-web`` in-process on SQLite and PostgreSQL: who may store and search, what identity
shows, and the results mednode wrote in QIDO-RS answers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.unit.web.conftest import CANARY_ID, CANARY_NAME, TOKEN, WebNode

PATIENT_NAME, PATIENT_ID, STUDY_DATE, MODALITY = "00100010", "00100020", "00080020", "00080060"


def _multipart(files: list[Path]) -> tuple[bytes, dict[str, str]]:
    body = b"".join(b"--XB\r\nContent-Type: application/dicom\r\n\r\n" + f.read_bytes() + b"\r\n" for f in files)
    return body + b"--XB--\r\n", {"Content-Type": 'multipart/related; type="application/dicom"; boundary=XB'}


def test_an_open_loopback_node_takes_stow_without_login_and_never_shows_identity(
        web_node_factory: Callable[..., WebNode], ct_files: list[Path]) -> None:
    node = web_node_factory(web_admin_user=None, web_admin_password=None, web_api_tokens=[])
    body, headers = _multipart(ct_files)
    stored = node.client.post("/dicom-web/studies", content=body, headers=headers)
    assert stored.status_code == 200, stored.text
    assert len(stored.json()["00081199"]["Value"]) == len(ct_files)
    [study] = node.client.get("/dicom-web/studies").json()
    assert PATIENT_NAME not in study and PATIENT_ID not in study and STUDY_DATE in study
    assert node.client.get("/dicom-web/studies", params={"PatientID": "x"}).status_code == 401
    assert node.client.get("/dicom-web/studies", params={"StudyDate": "19000101"}).status_code == 204


def test_a_gated_node_wants_a_token_and_a_browser_session_its_csrf_header(
        processed: tuple[WebNode, str, int], ct_files: list[Path]) -> None:
    node, study_uid, _ = processed
    body, headers = _multipart(ct_files[:1])
    assert node.client.post("/dicom-web/studies", content=body, headers=headers).status_code == 401
    assert node.client.get("/dicom-web/studies").status_code == 401
    node.login()
    assert node.client.post("/dicom-web/studies", content=body, headers=headers).status_code == 403  # no CSRF
    assert node.client.post("/dicom-web/studies", content=body,
                            headers={**headers, "X-CSRF-Token": node.csrf()}).status_code == 200
    auth = {"Authorization": f"Bearer {TOKEN}"}
    [study] = node.client.get("/dicom-web/studies", params={"PatientName": "canary*"}, headers=auth).json()
    assert study[PATIENT_NAME]["Value"][0]["Alphabetic"] == CANARY_NAME and study[PATIENT_ID]["Value"] == [CANARY_ID]
    assert study["00080061"]["Value"] == ["CT", "SEG", "SR"]  # ModalitiesInStudy, results included
    retrieve = study["00081190"]["Value"][0]  # Retrieve URL: the study's WADO-RS resource
    assert retrieve == f"http://testserver/dicom-web/studies/{study_uid}"
    assert node.client.get(retrieve.removeprefix("http://testserver") + "/metadata", headers=auth).status_code == 200
    series = node.client.get(f"/dicom-web/studies/{study_uid}/series", headers=auth).json()
    assert sorted(s[MODALITY]["Value"][0] for s in series) == ["CT", "SEG", "SR"]
    seg = node.client.get("/dicom-web/instances", params={"Modality": "SEG", "StudyInstanceUID": study_uid},
                          headers=auth).json()
    assert [i["00080016"]["Value"][0] for i in seg] == ["1.2.840.10008.5.1.4.1.1.66.4"]
    assert seg[0]["00081190"]["Value"][0].endswith(
        f"/studies/{study_uid}/series/{seg[0]['0020000E']['Value'][0]}/instances/{seg[0]['00080018']['Value'][0]}")
    ignored = node.client.get("/dicom-web/studies", params={"StudyTime": "1200"}, headers=auth)
    assert ignored.status_code == 200 and "StudyTime" in ignored.headers["warning"]
    assert node.client.get("/dicom-web/studies", params={"Nonsense": "1"}, headers=auth).status_code == 400


def test_a_stow_request_beyond_the_size_limit_is_refused_with_413(
        web_node_factory: Callable[..., WebNode], ct_files: list[Path]) -> None:
    node = web_node_factory(web_admin_user=None, web_admin_password=None, web_api_tokens=[], stow_max_request_mb=1)
    body, headers = _multipart(ct_files * 8)
    assert len(body) > 2**20
    refused = node.client.post("/dicom-web/studies", content=body, headers=headers)
    assert refused.status_code == 413 and "stow_max_request_mb" in refused.text
    assert node.client.get("/dicom-web/studies").status_code == 204  # nothing was stored
