"""Patient-derived content needs a login on a dashboard reachable from other hosts; each look at
it is audited; failed logins are locked out.

A real node in-process (web_host 0.0.0.0, a real secret) after a real CT study went through it:
ingest → completion → routing → CT analyzer (SEG + SR) → and an on-demand question that failed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select

from node import audit
from storage.models import AuditEvent
from tests.unit.web.conftest import ADMIN, CANARY_ID, CANARY_NAME, TOKEN, WebNode, csrf_of

BEARER = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "unit-test-secret-key-0123456789-abcdefgh"
DESCRIPTION = "Thorax Desc Canary 5521"
SERIES_DESCRIPTION = "Lung Kernel Canary 7730"
STUDY_DATE = "19870611"
QUESTION = "Is there a canary-question 9911 effusion?"
#: what the CT analyzer's summary (the SR's findings) puts in a response
SUMMARY_MARKERS = ("volume_ml", "mean_hu", "volume ml")
#: the failure reason of the question (no model configured)
REASON = "vision-language model"


@pytest.fixture
def exposed(web_node_factory: Callable[..., WebNode], ct_files: list[Path]) -> tuple[WebNode, str, int, int]:
    """A node bound to 0.0.0.0 with a processed CT study and a failed question: (node, study, job, ask job)."""
    node = web_node_factory(web_host="0.0.0.0", web_secret_key=SECRET)
    node._ct_files = ct_files  # type: ignore[attr-defined]
    study_uid = node.ingest(ct_files, PatientName=CANARY_NAME, PatientID=CANARY_ID, StudyDate=STUDY_DATE,
                            StudyDescription=DESCRIPTION, SeriesDescription=SERIES_DESCRIPTION)
    [job_id] = node.complete()
    node.run(job_id)
    asked = node.client.post(f"/api/v1/studies/{study_uid}/ask", headers=BEARER,
                             json={"kind": "vqa", "text": QUESTION})
    assert asked.status_code == 202, asked.text
    ask_id = asked.json()["job"]["id"]
    node.run(ask_id)  # no model configured: fails, with a reason
    return node, study_uid, job_id, ask_id


def _events(node: WebNode, action: str | None = None) -> list[AuditEvent]:
    with node.ctx.sessions() as session:
        query = select(AuditEvent).order_by(AuditEvent.id)
        if action:
            query = query.where(AuditEvent.action == action)
        return list(session.scalars(query))


def _views(node: WebNode) -> list[AuditEvent]:
    return [e for e in _events(node) if e.action in (audit.VIEWED, audit.VIEWED_IMAGES, audit.DOWNLOADED)]


def _no_patient_data(text: str, where: str) -> None:
    secrets = (DESCRIPTION, "Canary 5521", SERIES_DESCRIPTION, STUDY_DATE, "1987-06-11", QUESTION, "canary-question",
               REASON, CANARY_NAME, CANARY_ID, "key-images/", *SUMMARY_MARKERS)
    for secret in secrets:
        assert secret not in text, f"{secret!r} reached an anonymous caller in {where}"


def test_anonymous_callers_see_counts_and_states_only(exposed: tuple[WebNode, str, int, int]) -> None:
    node, study_uid, job_id, ask_id = exposed
    png = node.client.get(f"/api/v1/jobs/{job_id}/key-images/0.png", headers=BEARER).content
    [result] = [r for r in node.client.get(f"/api/v1/jobs/{job_id}", headers=BEARER).json()["results"]
                if r["kind"] == "sr"]
    before = len(_views(node))

    anonymous = node.client
    readable = {
        "/api/v1/status": anonymous.get("/api/v1/status"),
        "/api/v1/studies": anonymous.get("/api/v1/studies"),
        "/api/v1/studies/{uid}": anonymous.get(f"/api/v1/studies/{study_uid}"),
        "/api/v1/jobs": anonymous.get("/api/v1/jobs"),
        "/api/v1/jobs/{id}": anonymous.get(f"/api/v1/jobs/{job_id}"),
        "/api/v1/jobs/{ask}": anonymous.get(f"/api/v1/jobs/{ask_id}"),
        "/api/v1/results/{id}": anonymous.get(f"/api/v1/results/{result['id']}"),
        "/queue": anonymous.get("/queue"),
        "/studies": anonymous.get("/studies"),
        "/studies/{uid}": anonymous.get(f"/studies/{study_uid}"),
        "/rules?study": anonymous.get("/rules", params={"study": study_uid}),
        "/workers": anonymous.get("/workers"),
    }
    for where, response in readable.items():
        assert response.status_code == 200, (where, response.status_code)
        _no_patient_data(response.text, where)
        assert png not in response.content
    # what is left: UIDs, states, counts, modality
    study = readable["/api/v1/studies/{uid}"].json()
    assert study["state"] == "routed" and study["modalities"] == ["CT"] and study["instance_count"] == 3
    assert study["patient_data_hidden"] and study["study_date"] is None and study["study_description"] is None
    assert [s["series_description"] for s in study["series"]] == [None]
    jobs = {j["id"]: j for j in study["jobs"]}
    assert jobs[job_id]["state"] == "succeeded" and jobs[ask_id]["state"] == "failed"
    assert jobs[ask_id]["reason"] is None and jobs[ask_id]["tasks"] == ["vqa"]
    assert all(r["summary"] is None for r in jobs[job_id]["results"]) and len(jobs[job_id]["results"]) == 2
    assert study_uid in readable["/studies/{uid}"].text and "succeeded" in readable["/studies/{uid}"].text
    assert "log in" in readable["/rules?study"].text

    gated = {
        "key images": anonymous.get(f"/api/v1/jobs/{job_id}/key-images"),
        "key image PNG": anonymous.get(f"/api/v1/jobs/{job_id}/key-images/0.png"),
        "DICOM download": anonymous.get(f"/api/v1/results/{result['id']}/dicom"),
        "dry run": anonymous.get("/api/v1/rules/dry-run", params={"study": study_uid}),
        "date search": anonymous.get("/api/v1/studies", params={"date_from": STUDY_DATE}),
        "patient search": anonymous.get("/api/v1/studies", params={"patient": "Canary"}),
    }
    for where, response in gated.items():
        assert response.status_code == 401, (where, response.status_code)
        assert png not in response.content and b"DICM" not in response.content
        _no_patient_data(response.text, where)
    # the date filter of the page is ignored, not an oracle: both dates list the study
    for date in (STUDY_DATE, "20990101"):
        assert study_uid in anonymous.get("/studies", params={"date_from": date, "date_to": date}).text
    assert len(_views(node)) == before  # nothing patient-derived was shown, nothing to audit


def test_logged_in_callers_see_it_and_every_look_is_audited(exposed: tuple[WebNode, str, int, int]) -> None:
    node, study_uid, job_id, ask_id = exposed
    # API token: the study, its key images, a result and its DICOM file
    study = node.client.get(f"/api/v1/studies/{study_uid}", headers=BEARER).json()
    assert not study["patient_data_hidden"]
    assert study["study_description"] == DESCRIPTION and study["study_date"] == STUDY_DATE
    assert study["series"][0]["series_description"] == SERIES_DESCRIPTION
    jobs = {j["id"]: j for j in study["jobs"]}
    assert REASON in jobs[ask_id]["reason"] and QUESTION in str(jobs[ask_id]["tasks"])
    assert any("structures" in (r["summary"] or {}) for r in jobs[job_id]["results"])
    result_uids = sorted(r["sop_instance_uid"] for r in jobs[job_id]["results"])

    images = node.client.get(f"/api/v1/jobs/{job_id}/key-images", headers=BEARER).json()
    assert len(images) >= 2
    for image in images:
        answer = node.client.get(image["url"], headers=BEARER)
        assert answer.status_code == 200 and answer.content.startswith(b"\x89PNG")
    sr = next(r for r in jobs[job_id]["results"] if r["kind"] == "sr")
    assert node.client.get(f"/api/v1/results/{sr['id']}", headers=BEARER).json()["summary"]
    for _ in range(2):
        dicom = node.client.get(f"/api/v1/results/{sr['id']}/dicom", headers=BEARER)
        assert dicom.status_code == 200 and dicom.content[128:132] == b"DICM"

    events = [(e.actor, e.action, e.study_instance_uid, e.detail) for e in _views(node)]
    assert ("token", audit.VIEWED, study_uid,
            f"api (token): study and results [{', '.join(_uids(node, study_uid))}]") in events
    # the list and every PNG of the job: one grouped row, naming the job's result objects
    image_rows = [e for e in events if e[1] == audit.VIEWED_IMAGES]
    assert image_rows == [("token", audit.VIEWED_IMAGES, study_uid,
                           f"api (token): key images of job {job_id} [{', '.join(_job_uids(node, job_id))}]")]
    assert sorted(_job_uids(node, job_id)) == result_uids
    assert ("token", audit.VIEWED, study_uid, f"api (token): result {sr['id']} [{sr['sop_instance_uid']}]") in events
    downloads = [e for e in events if e[1] == audit.DOWNLOADED]
    assert downloads == [("token", audit.DOWNLOADED, study_uid,
                          f"api (token): DICOM of result {sr['id']} [{sr['sop_instance_uid']}]")] * 2

    # a browser session: the page with its key images, audited as the user
    node.login()
    page = node.client.get(f"/studies/{study_uid}")
    assert DESCRIPTION in page.text and SERIES_DESCRIPTION in page.text and "1987-06-11" in page.text
    assert QUESTION in page.text and REASON in page.text and "volume ml" in page.text
    assert f"/api/v1/jobs/{job_id}/key-images/0.png" in page.text
    assert node.client.get(f"/api/v1/jobs/{job_id}/key-images/0.png").status_code == 200
    assert node.client.get(f"/studies/{study_uid}").status_code == 200  # a refresh: grouped
    mine = [(e.action, e.detail) for e in _views(node) if e.actor == ADMIN[0]]
    assert (audit.VIEWED, f"dashboard: study and results [{', '.join(_uids(node, study_uid))}]") in mine
    images_detail = f"dashboard: key images of job {job_id} [{', '.join(_job_uids(node, job_id))}]"
    assert (audit.VIEWED_IMAGES, images_detail) in mine
    assert len(mine) == len(set(mine)), mine
    assert DESCRIPTION in node.client.get("/studies").text
    assert (audit.VIEWED, "dashboard: study list (1 studies from 0)") in [
        (e.action, e.detail) for e in _views(node) if e.actor == ADMIN[0]]

    for event in _events(node):  # identifiers only, never values
        text = f"{event.actor} {event.detail}"
        for secret in (DESCRIPTION, SERIES_DESCRIPTION, STUDY_DATE, QUESTION, CANARY_NAME, CANARY_ID):
            assert secret not in text, (secret, text)


def _uids(node: WebNode, study_uid: str) -> list[str]:
    from node import queries

    with node.ctx.sessions() as session:
        study = queries.get_study(session, study_uid)
        assert study is not None
        return [r.sop_instance_uid for j in study.jobs for r in j.results]


def _job_uids(node: WebNode, job_id: int) -> list[str]:
    from node import queries

    with node.ctx.sessions() as session:
        job = queries.get_job(session, job_id)
        assert job is not None
        return [r.sop_instance_uid for r in job.results]


def _login_form(node: WebNode, password: str, user: str = ADMIN[0], **headers: str):  # type: ignore[no-untyped-def]
    token = csrf_of(node.client.get("/login").text)
    return node.client.post("/login", data={"username": user, "password": password, "csrf_token": token,
                                            "next": "/queue"}, headers=headers, follow_redirects=False)


def test_failed_logins_are_locked_out_with_a_growing_lockout(web_node_factory: Callable[..., WebNode]) -> None:
    # lockouts of seconds, not one: on a loaded machine (PostgreSQL, CI) a 1 s lockout could end
    # between two requests of the test
    node = web_node_factory(web_host="0.0.0.0", web_secret_key=SECRET, web_login_lockout_s=3.0,
                            web_login_max_lockout_s=60.0)
    for attempt in range(5):
        assert _login_form(node, f"guess-{attempt}").status_code == 401
    locked = _login_form(node, ADMIN[1])  # even the right password: guessing must not go on
    assert locked.status_code == 429 and locked.headers["Retry-After"] == "3"
    assert "too many failed logins" in locked.text
    assert node.client.get("/api/v1/audit", auth=ADMIN).status_code == 429  # HTTP Basic too
    # a spoofed X-Forwarded-For is not believed (no trusted proxy configured)
    assert _login_form(node, ADMIN[1], **{"X-Forwarded-For": "203.0.113.9"}).status_code == 429
    [lockout_row, *_] = _events(node, audit.LOGIN_LOCKED)
    assert lockout_row.actor == "web:testclient"
    assert lockout_row.detail is not None and "5 failed logins" in lockout_row.detail
    assert {"guess-0", "guess-4", ADMIN[1]}.isdisjoint(lockout_row.detail.split())

    time.sleep(3.2)  # the lockout is over
    assert _login_form(node, ADMIN[1]).status_code == 303
    node.client.cookies.clear()
    for attempt in range(4):  # the success reset the count: four more failures do not lock
        assert _login_form(node, f"again-{attempt}").status_code == 401
    assert _login_form(node, ADMIN[1]).status_code == 303
    node.client.cookies.clear()

    # wrong HTTP Basic passwords count too; the second lockout of a key lasts twice as long
    for _ in range(5):
        assert node.client.get("/api/v1/audit", auth=(ADMIN[0], "nope")).status_code == 401
    first = node.client.get("/api/v1/audit", auth=ADMIN)
    assert first.status_code == 429 and first.headers["Retry-After"] == "3"
    time.sleep(3.2)
    for _ in range(5):
        assert node.client.get("/api/v1/audit", auth=(ADMIN[0], "nope")).status_code == 401
    second = node.client.get("/api/v1/audit", auth=ADMIN)
    assert second.status_code == 429 and second.headers["Retry-After"] == "6"
    assert len(_events(node, audit.LOGIN_LOCKED)) >= 3
    # wrong API tokens count per address
    time.sleep(6.2)
    for _ in range(5):
        assert node.client.get("/api/v1/audit", headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert node.client.get("/api/v1/audit", headers=BEARER).status_code == 429


def test_loopback_without_a_login_shows_results_but_not_identity(
        web_node_factory: Callable[..., WebNode], ct_files: list[Path]) -> None:
    """No login configured on loopback: nobody could log in, so the single-user view stays —
    audited as ``anonymous`` — but names, IDs and DICOM files are never shown without a login."""
    node = web_node_factory(web_admin_user=None, web_admin_password=None, web_api_tokens=[])
    study_uid = node.ingest(ct_files, PatientName=CANARY_NAME, PatientID=CANARY_ID,
                            StudyDescription=DESCRIPTION)
    [job_id] = node.complete()
    node.run(job_id)
    study = node.client.get(f"/api/v1/studies/{study_uid}").json()
    assert study["study_description"] == DESCRIPTION and study["patient"] is None
    assert node.client.get(f"/api/v1/jobs/{job_id}/key-images/0.png").status_code == 200
    result_id = study["jobs"][0]["results"][0]["id"]
    assert node.client.get(f"/api/v1/results/{result_id}/dicom").status_code == 401
    page = node.client.get(f"/studies/{study_uid}").text
    assert DESCRIPTION in page and CANARY_NAME not in page and CANARY_ID not in page
    assert {(e.actor, e.action) for e in _views(node)} == {("anonymous", audit.VIEWED),
                                                          ("anonymous", audit.VIEWED_IMAGES)}


def test_loopback_with_a_login_gates_like_an_exposed_node(processed: tuple[WebNode, str, int]) -> None:
    """A login configured on loopback (perhaps behind a reverse proxy on the same host): the same gate."""
    node, study_uid, job_id = processed
    assert node.settings.web_host == "127.0.0.1"
    assert node.client.get(f"/api/v1/studies/{study_uid}").json()["patient_data_hidden"]
    assert node.client.get(f"/api/v1/jobs/{job_id}/key-images/0.png").status_code == 401
    assert node.client.get(f"/api/v1/jobs/{job_id}/key-images/0.png", headers=BEARER).status_code == 200


def test_a_wrong_password_counts_once_when_a_page_answers(web_node_factory: Callable[..., WebNode]) -> None:
    """The error page of a wrong HTTP Basic password must not check it again (two failures)."""
    node = web_node_factory(web_host="0.0.0.0", web_secret_key=SECRET)
    html = {"Accept": "text/html"}
    for _ in range(4):
        answer = node.client.get("/queue", auth=(ADMIN[0], "nope"), headers=html)
        assert answer.status_code == 401 and "<html" in answer.text.lower()
    assert node.client.get("/queue", auth=ADMIN, headers=html).status_code == 200
    assert _events(node, audit.LOGIN_LOCKED) == []
