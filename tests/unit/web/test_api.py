"""The JSON API against a real index (SQLite and PostgreSQL) after a real CT study went through
the node in-process: ingest → completion → routing → pipeline (CT analyzer → SEG + SR)."""

from __future__ import annotations

from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image

from node.web.imaging import PALETTE
from tests.unit.web.conftest import (
    CANARY_ACCESSION,
    CANARY_ID,
    CANARY_NAME,
    TOKEN,
    WebNode,
    csrf_of,
)

BEARER = {"Authorization": f"Bearer {TOKEN}"}
CANARIES = (CANARY_NAME, "Webfield7Q", CANARY_ID, CANARY_ACCESSION)


def _no_canary(text: str) -> None:
    for secret in CANARIES:
        assert secret not in text, f"patient field {secret!r} leaked to an anonymous caller"


def test_status_counts_queue_depth_and_metrics(processed: tuple[WebNode, str, int]) -> None:
    node, _, _ = processed
    status = node.client.get("/api/v1/status").json()
    assert status["instances"] == 3
    assert status["studies"]["routed"] == 1
    assert status["jobs"]["succeeded"] == 1  # no destination configured: nothing to deliver
    assert status["queue_depth"] == {"inference": 0, "delivery": 0}
    metrics = node.client.get("/metrics").text
    assert 'mednode_jobs{state="succeeded"} 1.0' in metrics
    assert 'mednode_jobs{state="queued"} 0.0' in metrics
    assert 'mednode_queue_depth{queue="inference"} 0.0' in metrics
    assert "mednode_index_up 1.0" in metrics
    assert "mednode_instances_stored 3.0" in metrics
    assert "mednode_job_duration_seconds" in metrics  # the process's own histograms are there too


def test_anonymous_callers_never_see_patient_fields(processed: tuple[WebNode, str, int]) -> None:
    node, study_uid, job_id = processed
    listing = node.client.get("/api/v1/studies")
    assert listing.status_code == 200
    [item] = listing.json()["items"]
    assert item["study_instance_uid"] == study_uid and item["patient"] is None
    detail = node.client.get(f"/api/v1/studies/{study_uid}")
    assert detail.json()["patient"] is None
    for response in (listing, detail, node.client.get(f"/api/v1/jobs/{job_id}"),
                     node.client.get("/api/v1/jobs"), node.client.get(f"/studies/{study_uid}"),
                     node.client.get("/studies"), node.client.get("/queue")):
        assert response.status_code == 200
        _no_canary(response.text)
    # searching by patient is itself a patient field
    assert node.client.get("/api/v1/studies", params={"patient": "Canary"}).status_code == 401


def test_logged_in_callers_see_patient_fields(processed: tuple[WebNode, str, int]) -> None:
    node, study_uid, _ = processed
    detail = node.client.get(f"/api/v1/studies/{study_uid}", headers=BEARER).json()
    assert detail["patient"]["patient_name"] == CANARY_NAME
    assert detail["patient"]["patient_id"] == CANARY_ID
    assert detail["patient"]["accession_number"] == CANARY_ACCESSION
    found = node.client.get("/api/v1/studies", params={"patient": "webfield"}, headers=BEARER).json()
    assert [s["study_instance_uid"] for s in found["items"]] == [study_uid]
    node.login()
    assert CANARY_NAME in node.client.get(f"/studies/{study_uid}").text
    assert CANARY_ID in node.client.get("/studies").text


def test_every_mutation_answers_401_without_login(processed: tuple[WebNode, str, int]) -> None:
    node, study_uid, job_id = processed
    calls = [
        ("post", f"/api/v1/jobs/{job_id}/retry", {}),
        ("post", f"/api/v1/jobs/{job_id}/cancel", {}),
        ("post", f"/api/v1/jobs/{job_id}/priority", {"json": {"priority": 9}}),
        ("post", f"/api/v1/studies/{study_uid}/ask", {"json": {"kind": "vqa", "text": "effusion?"}}),
        ("post", f"/api/v1/studies/{study_uid}/rerun", {"json": {"rule": "ct-analysis"}}),
        ("post", "/api/v1/destinations/default/echo", {}),
        ("post", "/api/v1/rules/dry-run", {"files": {"file": ("x.dcm", b"not dicom")}}),
        ("get", "/api/v1/results/1/dicom", {}),
        ("post", f"/ui/jobs/{job_id}/retry", {"data": {"csrf_token": "x"}}),
        ("post", f"/ui/jobs/{job_id}/cancel", {"data": {}}),
        ("post", f"/ui/jobs/{job_id}/priority", {"data": {"priority": "9"}}),
        ("post", f"/ui/studies/{study_uid}/ask", {"data": {"text": "effusion?"}}),
        ("post", f"/ui/studies/{study_uid}/rerun", {"data": {"rule": "ct-analysis"}}),
        ("post", "/ui/destinations/default/echo", {"data": {}}),
        ("post", "/logout", {}),
    ]
    for method, url, kwargs in calls:
        response = getattr(node.client, method)(url, **kwargs)
        assert response.status_code == 401, (url, response.status_code, response.text)
    bad_token = node.client.post(f"/api/v1/jobs/{job_id}/cancel", headers={"Authorization": "Bearer nope"})
    assert bad_token.status_code == 401
    bad_basic = node.client.post(f"/api/v1/jobs/{job_id}/cancel", auth=("admin", "wrong"))
    assert bad_basic.status_code == 401
    # nothing changed
    assert node.client.get(f"/api/v1/jobs/{job_id}").json()["state"] == "succeeded"
    assert node.client.get("/api/v1/jobs").json()[0]["id"] == job_id


def test_cookie_sessions_need_the_csrf_token(processed: tuple[WebNode, str, int]) -> None:
    node, _, _ = processed
    node.ingest(*_second_study(node))
    [queued] = node.complete()
    node.login()
    assert node.client.post(f"/api/v1/jobs/{queued}/cancel").status_code == 403
    assert node.client.post(f"/ui/jobs/{queued}/cancel", data={"csrf_token": "forged"}).status_code == 403
    token = node.csrf()
    done = node.client.post(f"/ui/jobs/{queued}/cancel", data={"csrf_token": token, "next": "/queue"},
                            follow_redirects=False)
    assert done.status_code == 303 and done.headers["location"].startswith("/queue?msg=")
    assert node.client.get(f"/api/v1/jobs/{queued}").json()["state"] == "cancelled"
    # a tampered session cookie is anonymous
    tampered = node.client.cookies["mednode_session"][:-2] + "00"
    node.client.cookies.delete("mednode_session")
    node.client.cookies.set("mednode_session", tampered)
    assert node.client.post(f"/api/v1/jobs/{queued}/retry", headers={"X-CSRF-Token": token}).status_code == 401


def _second_study(node: WebNode) -> tuple[list[Path], ...]:
    # the same CT under new UIDs: a second study that routing queues but nobody runs
    import pydicom
    from pydicom.uid import generate_uid

    files = node._ct_files  # type: ignore[attr-defined]
    out = node.settings.data_dir / "second"
    out.mkdir(exist_ok=True)
    study, series = generate_uid(), generate_uid()
    paths = []
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, series, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        target = out / f"{i}.dcm"
        ds.save_as(target, enforce_file_format=True)
        paths.append(target)
    return (paths,)


def test_retry_cancel_and_priority_use_the_job_service(processed: tuple[WebNode, str, int]) -> None:
    node, _, done_job = processed
    node.ingest(*_second_study(node))
    [queued] = node.complete()
    raised = node.client.post(f"/api/v1/jobs/{queued}/priority", json={"priority": 9}, headers=BEARER)
    assert raised.status_code == 200 and raised.json()["job"]["priority"] == 9
    assert node.client.post(f"/api/v1/jobs/{queued}/priority", json={"priority": 10},
                            headers=BEARER).status_code == 422
    cancelled = node.client.post(f"/api/v1/jobs/{queued}/cancel", headers=BEARER)
    assert cancelled.json()["job"]["state"] == "cancelled"
    assert cancelled.json()["job"]["reason"] == "cancelled by an administrator"
    # the same rules as the CLI: a finished job cannot be cancelled, a queued one not retried
    assert node.client.post(f"/api/v1/jobs/{done_job}/retry", headers=BEARER).status_code == 409
    assert node.client.post(f"/api/v1/jobs/{queued}/priority", json={"priority": 3},
                            headers=BEARER).status_code == 409
    retried = node.client.post(f"/api/v1/jobs/{queued}/retry", auth=("admin", "s3cret-pass"))
    assert retried.status_code == 200 and retried.json()["job"]["state"] == "queued"
    assert node.client.post("/api/v1/jobs/999/retry", headers=BEARER).status_code == 404
    listed = node.client.get("/api/v1/jobs", params={"state": "queued"}).json()
    assert [j["id"] for j in listed] == [queued]


def test_study_timeline_series_jobs_and_results(processed: tuple[WebNode, str, int]) -> None:
    node, study_uid, job_id = processed
    study = node.client.get(f"/api/v1/studies/{study_uid}", headers=BEARER).json()
    assert study["state"] == "routed" and study["modalities"] == ["CT"]
    assert [s["instance_count"] for s in study["series"]] == [3]
    events = [e["event"] for e in study["timeline"]]
    for expected in ("first instance received", "last instance received", "complete (version 1)",
                     "routed: rule ct-analysis", f"job {job_id} started", f"job {job_id} wrote 2 object(s)"):
        assert expected in events, events
    assert events.index("complete (version 1)") < events.index(f"job {job_id} started")
    assert study["timeline"][0]["since_previous_s"] is None
    assert all(e["since_start_s"] >= 0 for e in study["timeline"])
    [job] = study["jobs"]
    assert job["id"] == job_id and job["state"] == "succeeded"
    assert sorted(r["kind"] for r in job["results"]) == ["seg", "sr"]
    structures = job["results"][0]["summary"]["structures"]
    assert {s["label"] for s in structures} >= {"body"}
    assert all(s["volume_ml"] > 0 for s in structures)
    result = node.client.get(f"/api/v1/results/{job['results'][0]['id']}", headers=BEARER).json()
    assert result["sop_instance_uid"] == job["results"][0]["sop_instance_uid"]
    dicom = node.client.get(f"/api/v1/results/{result['id']}/dicom", headers=BEARER)
    assert dicom.status_code == 200 and dicom.content[128:132] == b"DICM"


def test_key_images_show_the_seg_overlay(processed: tuple[WebNode, str, int]) -> None:
    node, study_uid, job_id = processed
    images = node.client.get(f"/api/v1/jobs/{job_id}/key-images", headers=BEARER).json()
    assert images, "a CT analysis job has key images"
    assert all(img["segments"] for img in images)
    png = node.client.get(images[0]["url"], headers=BEARER)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    pixels = np.asarray(Image.open(BytesIO(png.content)).convert("RGB")).astype(int)
    assert min(pixels.shape[:2]) >= 512
    # CT is grey (R == G == B); the overlay fill and outline are the segments' colours
    coloured = (np.abs(pixels[..., 0] - pixels[..., 1]) + np.abs(pixels[..., 1] - pixels[..., 2])) > 30
    assert coloured.mean() > 0.01
    assert any((pixels == np.array(colour)).all(axis=2).any() for colour in PALETTE)
    assert node.client.get(f"/api/v1/jobs/{job_id}/key-images/99.png", headers=BEARER).status_code == 404
    node.login()
    page = node.client.get(f"/studies/{study_uid}").text
    assert images[0]["url"] in page and "volume ml" in page


def test_ask_queues_an_on_demand_job_and_shows_why_it_failed(processed: tuple[WebNode, str, int]) -> None:
    node, study_uid, _ = processed
    asked = node.client.post(f"/api/v1/studies/{study_uid}/ask", headers=BEARER,
                             json={"kind": "vqa", "text": "有胸腔积液吗？", "language": "zh"})
    assert asked.status_code == 202, asked.text
    job = asked.json()["job"]
    assert job["on_demand"] and job["priority"] == 9 and job["state"] == "queued"
    assert job["tasks"] == [{"vqa": {"language": "zh", "questions": ["有胸腔积液吗？"]}}]
    assert job["rule_name"] == f"ask-{job['id']}" and job["destinations"] == []
    node.run(job["id"])  # no VLM configured yet: the job fails with the reason
    failed = node.client.get(f"/api/v1/jobs/{job['id']}", headers=BEARER).json()
    assert failed["state"] == "failed" and "vision-language model" in failed["reason"]
    node.login()
    page = node.client.get(f"/studies/{study_uid}").text
    assert "vision-language model" in page and f'id="job-{job["id"]}"' in page
    # the page shows the frame the question was about even without results
    images = node.client.get(f"/api/v1/jobs/{job['id']}/key-images", headers=BEARER).json()
    assert len(images) == 1 and images[0]["segments"] == []
    assert node.client.get(images[0]["url"], headers=BEARER).status_code == 200
    # invalid requests say what is wrong
    empty = node.client.post(f"/api/v1/studies/{study_uid}/ask", headers=BEARER, json={"kind": "vqa"})
    assert empty.status_code == 422 and "questions" in empty.text
    no_pacs = node.client.post(f"/api/v1/studies/{study_uid}/ask", headers=BEARER,
                               json={"kind": "report", "send_to_pacs": True})
    assert no_pacs.status_code == 409 and "destination" in no_pacs.text
    missing = node.client.post("/api/v1/studies/1.2.3/ask", headers=BEARER, json={"kind": "report"})
    assert missing.status_code == 404


def test_rerun_with_another_rule(web_node_factory, ct_files: list[Path]) -> None:  # type: ignore[no-untyped-def]
    from node.config import Rule, RuleMatch

    rules = [Rule(name="ct-analysis", match=RuleMatch(modality=["CT"]), tasks=["ct_analysis"], destinations=[]),
             Rule(name="ct-report", match=RuleMatch(modality=["MR"]), tasks=[{"report": {"language": "en"}}],
                  destinations=[])]
    node = web_node_factory(rules=rules)
    study_uid = node.ingest(ct_files)
    [first] = node.complete()
    rerun = node.client.post(f"/api/v1/studies/{study_uid}/rerun", headers=BEARER, json={"rule": "ct-report"})
    assert rerun.status_code == 202, rerun.text
    job = rerun.json()["job"]
    assert job["rule_name"] == "ct-report" and job["id"] != first and job["series_uids"]
    again = node.client.post(f"/api/v1/studies/{study_uid}/rerun", headers=BEARER, json={"rule": "ct-report"})
    assert again.status_code == 409 and f"job {job['id']}" in again.text
    unknown = node.client.post(f"/api/v1/studies/{study_uid}/rerun", headers=BEARER, json={"rule": "nope"})
    assert unknown.status_code == 409 and "ct-analysis" in unknown.text


def test_rules_and_dry_run(processed: tuple[WebNode, str, int], ct_files: list[Path]) -> None:
    node, study_uid, _ = processed
    rules = node.client.get("/api/v1/rules").json()
    assert [r["name"] for r in rules] == ["ct-analysis"]
    dry = node.client.get("/api/v1/rules/dry-run", params={"study": study_uid}, headers=BEARER).json()
    assert dry["selected"] == ["ct-analysis"] and dry["checks"][0]["matched"]
    assert dry["checks"][0]["reasons"] == ["matched 1 series"]
    assert node.client.get("/api/v1/rules/dry-run", params={"study": "1.2.3"}, headers=BEARER).status_code == 404
    upload = node.client.post("/api/v1/rules/dry-run", headers=BEARER,
                              files={"file": ("ct.dcm", ct_files[0].read_bytes(), "application/dicom")})
    assert upload.status_code == 200 and upload.json()["source"] == "upload"
    assert upload.json()["selected"] == ["ct-analysis"]
    bad = node.client.post("/api/v1/rules/dry-run", headers=BEARER, files={"file": ("x.dcm", b"nope")})
    assert bad.status_code == 422
    node.login()
    page = node.client.get("/rules", params={"study": study_uid}).text
    assert "routing would pick" in page and "matched 1 series" in page


def test_destinations_and_echo_with_latency(web_node_factory) -> None:  # type: ignore[no-untyped-def]
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    from tests.peers import free_port

    port, dead = free_port(), free_port()
    scp = AE(ae_title="PACS")
    scp.add_supported_context(Verification)
    server = scp.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0x0000)])
    try:
        node = web_node_factory(destination=f"PACS@127.0.0.1:{port}",
                                destinations={"dead": f"DEAD@127.0.0.1:{dead}"})
        listed = node.client.get("/api/v1/destinations").json()
        assert {d["name"] for d in listed} == {"default", "dead"}
        ok = node.client.post("/api/v1/destinations/default/echo", headers=BEARER).json()
        assert ok["ok"] and ok["status"] == 0 and 0 < ok["latency_ms"] < 5000
        failed = node.client.post("/api/v1/destinations/dead/echo", headers=BEARER).json()
        assert not failed["ok"] and failed["error"]
        assert node.client.post("/api/v1/destinations/nope/echo", headers=BEARER).status_code == 404
        node.login()
        page = node.client.post("/ui/destinations/default/echo", data={"csrf_token": node.csrf("/destinations")})
        assert page.status_code == 200 and "C-ECHO default" in page.text and " ms" in page.text
    finally:
        server.shutdown()


def test_workers_answer_quickly_without_workers(web_node: WebNode) -> None:
    import time

    started = time.monotonic()
    workers = web_node.client.get("/api/v1/workers").json()
    assert time.monotonic() - started < 10
    assert workers["workers"] == [] and not workers["ok"] and workers["error"]
    assert web_node.client.get("/workers").status_code == 200


def test_openapi_lists_the_api_and_keeps_patient_fields_in_one_schema(web_node: WebNode) -> None:
    spec = web_node.client.get("/api/v1/openapi.json").json()
    for path in ("/api/v1/status", "/api/v1/jobs", "/api/v1/jobs/{job_id}/retry", "/api/v1/studies",
                 "/api/v1/studies/{study_uid}", "/api/v1/studies/{study_uid}/ask", "/api/v1/rules/dry-run",
                 "/api/v1/destinations/{name}/echo", "/api/v1/workers", "/api/v1/results/{result_id}"):
        assert path in spec["paths"], path
    holders = [name for name, schema in spec["components"]["schemas"].items()
               if "patient_name" in schema.get("properties", {})]
    assert holders == ["PatientOut"]
    assert not any(p.startswith("/ui/") or p == "/queue" for p in spec["paths"])


def test_ask_form_on_the_study_page(processed: tuple[WebNode, str, int]) -> None:
    node, study_uid, _ = processed
    anonymous = node.client.get(f"/studies/{study_uid}").text
    assert 'id="ask-form"' not in anonymous and "Log in" in anonymous
    node.login()
    page = node.client.get(f"/studies/{study_uid}").text
    assert 'id="ask-form"' in page
    from tests.unit.web.conftest import csrf_of

    answer = node.client.post(f"/ui/studies/{study_uid}/ask", follow_redirects=False, data={
        "csrf_token": csrf_of(page), "kind": "report", "text": "", "language": "zh"})
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"].startswith(f"/studies/{study_uid}?msg=")
    job_id = int(answer.headers["location"].rsplit("#job-", 1)[1])
    job = node.client.get(f"/api/v1/jobs/{job_id}").json()
    assert job["on_demand"] and job["tasks"] == [{"report": {"language": "zh"}}]
    shown = node.client.get(f"/studies/{study_uid}").text
    assert f'id="job-{job_id}"' in shown and 'data-refresh="' in shown  # refreshes until it is done


def test_complete_now_from_the_api_and_the_study_page(web_node_factory, ct_files: list[Path]) -> None:  # type: ignore[no-untyped-def]
    node = web_node_factory(quiet_period_s=3600)  # nothing would complete by itself during the test
    study_uid = node.ingest(ct_files)
    url = f"/api/v1/studies/{study_uid}/complete"
    assert node.client.post(url).status_code == 401  # an administrator's action
    assert node.client.get(f"/api/v1/studies/{study_uid}").json()["state"] == "receiving"

    done = node.client.post(url, headers=BEARER)

    assert done.status_code == 200, done.text
    body = done.json()
    assert (body["state"], body["version"]) == ("routed", 1)
    assert body["completion_reason"].startswith("completed by ") and len(body["jobs"]) == 1
    assert node.client.get(f"/api/v1/jobs/{body['jobs'][0]}").json()["rule_name"] == "ct-analysis"
    again = node.client.post(url, headers=BEARER)
    assert again.status_code == 409 and "complete already" in again.text
    assert node.client.post("/api/v1/studies/1.2.3.404/complete", headers=BEARER).status_code == 404

    # the study page's button: shown while receiving, CSRF-protected
    node._ct_files = ct_files  # type: ignore[attr-defined]
    second = node.ingest(*_second_study(node))
    node.login()
    page = node.client.get(f"/studies/{second}").text
    assert f'action="/ui/studies/{second}/complete"' in page
    forged = node.client.post(f"/ui/studies/{second}/complete", data={"csrf_token": "forged"})
    assert forged.status_code == 403
    clicked = node.client.post(f"/ui/studies/{second}/complete", data={"csrf_token": csrf_of(page)},
                               follow_redirects=False)
    assert clicked.status_code == 303 and "msg=" in clicked.headers["location"]
    assert node.client.get(f"/api/v1/studies/{second}").json()["state"] == "routed"
    assert f'action="/ui/studies/{second}/complete"' not in node.client.get(f"/studies/{second}").text


def test_results_returned_by_the_pacs_are_shown_as_such_and_reopen_nothing(
    processed: tuple[WebNode, str, int],
) -> None:
    from sqlalchemy import select

    from storage.models import Result

    node, study_uid, job_id = processed
    with node.ctx.sessions() as session:
        paths = [node.ctx.store.absolute(p) for p in session.scalars(select(Result.path).where(Result.job_pk == job_id))]
    assert len(paths) == 2  # SEG and SR
    before = node.client.get(f"/api/v1/studies/{study_uid}").json()

    node.ingest(paths)  # the PACS forwards the study back, with mednode's results in it

    after = node.client.get(f"/api/v1/studies/{study_uid}", headers=BEARER).json()
    assert (after["state"], after["version"]) == (before["state"], before["version"])
    returned = [s for s in after["series"] if s["origin"] == "mednode_result"]
    assert len(returned) == 2 and all(s["origin_label"] == "mednode result, returned by PACS" for s in returned)
    assert node.complete() == []  # nothing to complete: no new job
    node.login()
    assert node.client.get(f"/studies/{study_uid}").text.count("mednode result, returned by PACS") == 2
    metrics = node.client.get("/metrics").text
    assert 'mednode_series_held{origin="mednode_result"} 2.0' in metrics
    assert "mednode_studies_split 0.0" in metrics and "mednode_studies_late 0.0" in metrics
