"""De-identification before a remote model, checked on the wire: a real ``transformers serve``
(the tiny Gemma 3 of :mod:`tests.models`) on loopback, and every request body mednode's client
sends to it recorded by an httpx event hook on that client (the request as it leaves, not what
mednode meant to send).

- ``models.vlm.remote: true``: a study and a prior report carrying a canary patient name, ID and
  accession reach the server without any of them; the job's SRs come from the server; the audit
  trail has a "sent to model" row with counts and the server URL and no patient data.
- an image with Burned In Annotation YES is refused (``burned_in_text: refuse``) and nothing
  reaches the server; an ultrasound with regions (``mask``) goes, black outside its regions.
- ``remote: false`` (the default): the same inputs are sent as before (unmasked, report as is).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Iterator
from datetime import date, timedelta
from io import BytesIO
from pathlib import Path

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from dicom_io.deidentify import ultrasound_regions
from dicom_io.slice_stack import read_frame
from inference.errors import InvalidInputError
from inference.tasks import TaskSpec, parse_tasks
from inference.vlm.server import ServerVLM
from node import audit
from node.config import VLMSettings, load_settings
from node.context import NodeContext
from node.pipeline import run_job
from node.vlm_stage import _SERVER_CLIENTS, PriorInput, run_vlm_tasks, server_config
from storage.db import upgrade
from storage.models import Job, JobState, Result, utcnow
from tests.integration.test_model_server import _transformers_serve
from tests.models import TINY_IMAGE_SIZE, build_tiny_gemma3
from tests.received import receive_and_complete

MAX_NEW_TOKENS = 4
#: larger than the tiny model's input: the sent PNG shows the mask at a useful resolution (the
#: server resizes it to the model's size)
SENT_IMAGE_SIZE = 4 * TINY_IMAGE_SIZE
NAME, GIVEN, PATIENT_ID, ACCESSION = "Canaryfield", "Zebediah", "CANARY-7731", "ACC-CANARY-99"
REFERRER = "Finchley^Hortensia"
CANARIES = (NAME, GIVEN, PATIENT_ID, ACCESSION, "Finchley", "Hortensia")
PRIOR_REPORT = f"Zebediah Canaryfield ({PATIENT_ID}, {ACCESSION}): heart size stable since last year."


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    model_dir = build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3") / "gemma3")
    with _transformers_serve(model_dir, tmp_path_factory.mktemp("hf-home")) as url:
        yield url, model_dir


def _vlm(served: tuple[str, Path], **extra: object) -> dict[str, object]:
    url, model_dir = served
    return {"server": url, "model": str(model_dir), "family": "medgemma", "max_new_tokens": MAX_NEW_TOKENS,
            "image_size": SENT_IMAGE_SIZE, "server_timeout_s": 60, **extra}


@pytest.fixture
def sent(served: tuple[str, Path]) -> Iterator[list[bytes]]:
    """Every request body the node's client of the server sends (the client the node's VLM
    stage uses for these settings, remote or not: ``remote`` is not part of the client's key)."""
    bodies: list[bytes] = []

    def record(request: httpx.Request) -> None:
        bodies.append(request.read())

    cfg = server_config(VLMSettings(**_vlm(served)))  # type: ignore[arg-type]
    client = httpx.Client(base_url=cfg.base_url, timeout=cfg.timeout_s, event_hooks={"request": [record]})
    previous = _SERVER_CLIENTS.get(cfg)
    _SERVER_CLIENTS[cfg] = ServerVLM(cfg, client=client)
    try:
        yield bodies
    finally:
        _SERVER_CLIENTS[cfg].close()
        if previous is None:
            _SERVER_CLIENTS.pop(cfg, None)
        else:
            _SERVER_CLIENTS[cfg] = previous


def _canary_dx(shared_dicom: Path) -> pydicom.Dataset:
    ds = pydicom.dcmread(shared_dicom / "xr" / "highdicom_dx_thorax.dcm")
    ds.PatientName, ds.PatientID, ds.AccessionNumber = f"{NAME}^{GIVEN}", PATIENT_ID, ACCESSION
    ds.ReferringPhysicianName = REFERRER
    # free text quoting them all (a request's reason is typed by hand)
    ds.ReasonForTheRequestedProcedure = f"cough, {GIVEN} {NAME} {PATIENT_ID} {ACCESSION}, ask Dr Finchley"
    return ds


def _chats(bodies: list[bytes]) -> list[dict]:
    chats = [json.loads(b) for b in bodies if b]
    return [c for c in chats if "messages" in c]


def _texts(bodies: list[bytes]) -> str:
    return "\n".join(p["text"] for c in _chats(bodies) for m in c["messages"] for p in m["content"]
                     if p["type"] == "text")


def _sent_images(bodies: list[bytes]) -> list[np.ndarray]:
    images = []
    for chat in _chats(bodies):
        for part in chat["messages"][0]["content"]:
            if part["type"] == "image_url":
                data = re.sub(r"^data:image/png;base64,", "", part["image_url"]["url"])
                images.append(np.asarray(Image.open(BytesIO(base64.b64decode(data))).convert("L")))
    return images


def _assert_no_canary(bodies: list[bytes]) -> None:
    assert bodies, "nothing was sent: the check would be empty"
    for body in bodies:
        for canary in CANARIES:
            assert canary.encode() not in body and canary.lower().encode() not in body, canary


def _node(tmp_path: Path, vlm: dict[str, object]) -> NodeContext:
    settings = load_settings(
        data_dir=tmp_path / "var", quiet_period_s=1, destinations={"pacs": "PACS@127.0.0.1:104"},
        models={"vlm": vlm},
        rules=[{"name": "dx-vlm", "match": {"modality": "DX"}, "destinations": ["pacs"],
                "tasks": [{"report": {"language": "en"}}, {"classify": {"labels": ["effusion"]}}]}],
    )
    context = NodeContext.create(settings)
    upgrade(context.engine)
    return context


def _queue(ctx: NodeContext, ds: pydicom.Dataset) -> int:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return receive_and_complete(ctx, [buffer.getvalue()], utcnow() - timedelta(minutes=5))


def test_a_remote_job_sends_no_identifier_and_audits_the_send(
    served: tuple[str, Path], sent: list[bytes], tmp_path: Path, shared_dicom: Path
) -> None:
    ctx = _node(tmp_path, _vlm(served, remote=True))
    try:
        job_id = _queue(ctx, _canary_dx(shared_dicom))
        run_job(ctx, job_id)
        with ctx.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.state in (JobState.SUCCEEDED, JobState.DELIVERING), job.reason
            kinds = {r.kind for r in session.scalars(select(Result).where(Result.job_pk == job_id))}
            events, _ = audit.list_events(session, audit.AuditFilter(action=audit.SENT_TO_MODEL))
            details = [e.detail or "" for e in events]
    finally:
        ctx.close()
    assert {"report", "regions"} <= kinds  # the server's answers made the SRs
    _assert_no_canary(sent)
    assert "cough" in _texts(sent)  # the clinical context went, without the identifiers it quoted
    assert len(_sent_images(sent)) >= 2  # report and label prompts, each with the image
    assert len(details) == 1, details
    detail = details[0]
    assert f"job {job_id}: 1 image(s) (0 masked" in detail and served[0] in detail and "report" in detail
    assert not any(c.lower() in detail.lower() for c in CANARIES)
    # the accession number and the referrer's name that the request's reason quoted
    assert int(re.search(r"(\d+) identifier\(s\) removed", detail).group(1)) >= 2  # type: ignore[union-attr]


def test_a_prior_report_loses_identifiers_on_the_wire_remote_only(
    served: tuple[str, Path], sent: list[bytes], shared_dicom: Path
) -> None:
    current = _canary_dx(shared_dicom)
    series = {str(current.SeriesInstanceUID): [current]}
    prior = PriorInput((), date(2025, 3, 1), PRIOR_REPORT)
    specs = [TaskSpec(kind="report")]
    audited: list[str] = []
    outputs = run_vlm_tasks(VLMSettings(**_vlm(served, remote=True)), series, specs,  # type: ignore[arg-type]
                            job_key="remote/1/prior", priors=prior, audit_send=audited.append)
    assert [o.kind for o in outputs] == ["report"]
    _assert_no_canary(sent)
    assert "heart size stable since last year" in _texts(sent)  # the report went, scrubbed
    assert len(audited) == 1 and "identifier(s) removed" in audited[0]
    assert int(re.search(r"(\d+) identifier\(s\) removed", audited[0]).group(1)) >= 4  # type: ignore[union-attr]

    # remote: false (the default): sent as before, the report as it is, nothing audited
    sent.clear()
    run_vlm_tasks(VLMSettings(**_vlm(served)), series, specs, job_key="local/1/prior", priors=prior,  # type: ignore[arg-type]
                  audit_send=audited.append)
    assert PRIOR_REPORT in _texts(sent)
    assert len(audited) == 1


def test_burned_in_annotation_is_refused_before_any_request(
    served: tuple[str, Path], sent: list[bytes], shared_dicom: Path
) -> None:
    ds = _canary_dx(shared_dicom)
    ds.BurnedInAnnotation = "YES"
    series = {str(ds.SeriesInstanceUID): [ds]}
    audited: list[str] = []
    with pytest.raises(InvalidInputError, match="not sent to the remote model server: Burned In Annotation is YES"):
        run_vlm_tasks(VLMSettings(**_vlm(served, remote=True)), series, parse_tasks([{"report": {}}]),  # type: ignore[arg-type]
                      job_key="remote/1/burned", audit_send=audited.append)
    assert sent == [] and audited == []
    # remote: false: the same image goes as before
    run_vlm_tasks(VLMSettings(**_vlm(served)), series, parse_tasks([{"report": {}}]),  # type: ignore[arg-type]
                  job_key="local/1/burned")
    assert len(_sent_images(sent)) == 1


def test_ultrasound_goes_black_outside_its_regions(
    served: tuple[str, Path], sent: list[bytes], shared_dicom: Path
) -> None:
    ds = pydicom.dcmread(shared_dicom / "compressed" / "US_multiframe_jpeg_baseline_nobot.dcm")
    ds.SpecificCharacterSet = "ISO_IR 100"  # the file says 'ISO-IR 100', which the SR writer refuses
    series = {str(ds.SeriesInstanceUID): [ds]}
    regions = ultrasound_regions(ds)
    top, bottom = min(r[1] for r in regions), max(r[3] for r in regions)
    assert all(r[0] == 0 and r[2] == int(ds.Columns) - 1 for r in regions)  # full width: rows are the test
    original = np.asarray(read_frame(ds, 0))
    assert original[:top].any(), "the rows outside the regions hold nothing: the check could not fail"
    specs = parse_tasks([{"report": {}}])

    def rows_outside(image: np.ndarray) -> np.ndarray:
        """The sent image's rows that lie wholly outside the regions (1 sent row of margin for
        resampling), mapped through the same geometry as the client's prepare."""
        transform = _SERVER_CLIENTS[server_config(VLMSettings(**_vlm(served)))].prepare(  # type: ignore[arg-type]
            np.zeros(original.shape[:2], np.float32)).transform
        ys = np.arange(image.shape[0])
        lo = np.array([transform.input_to_original(0, y - 1)[1] for y in ys])
        hi = np.array([transform.input_to_original(0, y + 2)[1] for y in ys])
        outside = (hi <= top) | (lo >= bottom + 1)
        return image[outside & (lo >= 0) & (hi <= original.shape[0])]

    with pytest.raises(InvalidInputError, match="burned_in_text: mask"):
        run_vlm_tasks(VLMSettings(**_vlm(served, remote=True)), series, specs, job_key="r/1/us")  # type: ignore[arg-type]
    assert sent == []

    run_vlm_tasks(VLMSettings(**_vlm(served, remote=True, burned_in_text="mask")), series, specs,  # type: ignore[arg-type]
                  job_key="r/1/us-mask")
    [masked] = _sent_images(sent)
    outside = rows_outside(masked)
    assert outside.size and not outside.any()  # black where the scanner writes its text
    assert masked.any()  # the image regions went

    sent.clear()  # remote: false: the same image unmasked
    run_vlm_tasks(VLMSettings(**_vlm(served)), series, specs, job_key="l/1/us")  # type: ignore[arg-type]
    [plain] = _sent_images(sent)
    assert plain.shape == masked.shape and rows_outside(plain).any()
