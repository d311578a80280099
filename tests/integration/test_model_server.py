"""The generalist model behind a real OpenAI-compatible server on loopback (``transformers serve``
running the tiny Gemma 3 of :mod:`tests.models`): the same prepared images and the same user turn
give the same answers as in-process; a server that is down is a retryable error; a model name the
server does not serve is a clear error naming ``models.vlm.model``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from io import BytesIO
from pathlib import Path

import numpy as np
import pytest
import yaml
from sqlalchemy import select

from dicom_io.volume import read_dataset
from inference.errors import ModelNotConfiguredError, ModelServerUnavailableError
from inference.results import (
    AnswerResult,
    GroundedReportResult,
    LabelResult,
    RegionResult,
    ReportResult,
)
from inference.tasks import parse_tasks
from inference.vlm import VLM, VLMConfig, load_vlm
from inference.vlm.server import ServerConfig, ServerVLM
from node.config import VLMSettings, load_settings
from node.context import NodeContext
from node.pipeline import TransientError, run_job
from node.vlm_stage import check_server_at_start, run_vlm_tasks
from storage.db import upgrade
from storage.models import Job, JobState, Result, utcnow
from tests.integration.e2e import assert_valid
from tests.integration.test_vlm_end_to_end import _sr_texts
from tests.models import TINY_IMAGE_SIZE, build_tiny_gemma3
from tests.peers import free_port
from tests.peers.model_servers import transformers_serve
from tests.peers.processes import ToolMissingError, in_ci
from tests.received import receive_and_complete
from tests.trained_models import tiny_grounding_model_dir  # noqa: F401  (session fixture)

MAX_NEW_TOKENS = 12
TASKS = parse_tasks([
    {"report": {"language": "en"}},
    {"report": {"language": "zh"}},
    {"vqa": {"questions": ["Is there a pleural effusion?", "Where is the heart?"]}},
    {"classify": {"labels": ["cardiomegaly", "pneumothorax"]}},
    {"ground": {"phrases": ["right lung"]}},
])


@pytest.fixture(scope="module")
def gemma3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_gemma3(tmp_path_factory.mktemp("tiny-gemma3") / "gemma3")


@contextmanager
def _transformers_serve(model_dir: Path, home: Path) -> Iterator[str]:
    """``transformers serve`` of ``model_dir`` on a free loopback port, stopped by its PID."""
    try:
        server = transformers_serve(model_dir, home)
        url = server.__enter__()
    except ToolMissingError as exc:
        if in_ci():
            pytest.fail(f"CI must have every real peer: {exc}")
        pytest.skip(str(exc))
    try:
        yield url
    finally:
        server.__exit__(None, None, None)


@pytest.fixture(scope="module")
def model_server(gemma3_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with _transformers_serve(gemma3_dir, tmp_path_factory.mktemp("hf-home")) as url:
        yield url


@pytest.fixture(scope="module")
def in_process(gemma3_dir: Path) -> VLM:
    return load_vlm(VLMConfig(path=str(gemma3_dir), family="medgemma", device="cpu", dtype="float32",
                              max_new_tokens=MAX_NEW_TOKENS, batch_size=1))


def _images(vlm: VLM) -> list:
    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 4096, size=(96, 80)).astype(np.float32) for _ in range(2)]
    return [vlm.prepare(f, photometric="MONOCHROME2", window=(2048.0, 4096.0)) for f in frames]


def _texts(results: list) -> list[tuple[str, ...]]:
    """What each result says, as the SR writers take it."""
    out: list[tuple[str, ...]] = []
    for r in results:
        if isinstance(r, ReportResult):
            out.append(("report", r.language, r.findings, r.impression or ""))
        elif isinstance(r, AnswerResult):
            out.append(("vqa", r.question, r.answer))
        elif isinstance(r, LabelResult):
            out.append(("label", r.label, r.raw_text.strip()))
        elif isinstance(r, RegionResult):
            out.append(("region", r.query, repr([(b.x0, b.y0, b.x1, b.y1, b.label) for b in r.boxes])))
        elif isinstance(r, GroundedReportResult):
            out.append(("grounded", repr(r.sentences)))
    return out


def test_same_prepared_inputs_same_answers_through_the_server(model_server: str, gemma3_dir: Path,
                                                               in_process: VLM) -> None:
    images = _images(in_process)
    local = in_process.run(images, TASKS)
    client = ServerVLM(ServerConfig(server=model_server, model=str(gemma3_dir), family="medgemma",
                                    max_new_tokens=MAX_NEW_TOKENS, batch_size=4))
    try:
        remote = client.run(images, TASKS)
    finally:
        client.close()
    assert len(remote) == len(local) == 8
    assert [type(r) for r in remote] == [type(r) for r in local]
    assert any(t[-1] for t in _texts(local)), "the tiny model said nothing: the comparison would be empty"
    assert _texts(remote) == _texts(local)
    # the random tiny model answers the same whatever the pixels: the token counts show that the
    # server saw the same turn (template, text, and every image as the same number of tokens)
    units = [u for task in TASKS for u in in_process._units(0, images, task)]
    local_tokens = [int(in_process.encode([u])["input_ids"].shape[1]) for u in units]
    assert sorted(client.prompt_tokens) == sorted(local_tokens)


def test_server_down_is_a_retryable_error() -> None:
    port = free_port()  # nothing listens there
    client = ServerVLM(ServerConfig(server=f"http://127.0.0.1:{port}", model="m", family="medgemma",
                                    timeout_s=5))
    images = [client.prepare(np.zeros((32, 32), np.float32))]
    with pytest.raises(ModelServerUnavailableError, match="did not answer"):
        client.run(images, TASKS[:1])


def test_unknown_model_name_is_a_clear_error(model_server: str, gemma3_dir: Path) -> None:
    client = ServerVLM(ServerConfig(server=model_server, model="medgemma-does-not-exist",
                                    family="medgemma"))
    images = [client.prepare(np.zeros((32, 32), np.float32))]
    with pytest.raises(ModelNotConfiguredError) as caught:
        client.run(images, TASKS[:1])
    message = str(caught.value)
    assert "models.vlm.model" in message and "medgemma-does-not-exist" in message
    assert str(gemma3_dir) in message  # what the server does serve


@pytest.mark.parametrize("model", ["random", "trained"])
def test_same_study_same_sr_texts_through_the_server(model: str, request: pytest.FixtureRequest,
                                                      tmp_path: Path, shared_dicom: Path) -> None:
    """The node's VLM stage (DICOM → prepared images → tasks → SRs) with ``models.vlm.server``:
    the SRs say what the in-process SRs say, and are valid (dciodvfy: no errors). ``trained`` is
    the tiny Gemma 3 trained to ground "right lung" with a real box on the radiograph, so its
    answer depends on the pixels, and boxes go through the server path too."""
    if model == "random":
        gemma3_dir, server = request.getfixturevalue("gemma3_dir"), request.getfixturevalue("model_server")
        _check_same_srs(server, gemma3_dir, tmp_path, shared_dicom)
    else:
        trained = request.getfixturevalue("tiny_grounding_model_dir")
        with _transformers_serve(trained, tmp_path / "hf-home") as server:
            boxes = _check_same_srs(server, trained, tmp_path, shared_dicom, max_new_tokens=48)
        assert boxes, "the trained model drew no box: the box path went untested"


def _check_same_srs(model_server: str, gemma3_dir: Path, tmp_path: Path, shared_dicom: Path, *,
                    max_new_tokens: int = MAX_NEW_TOKENS) -> int:
    """Compare the SRs of both paths; return how many boxes the regions SRs hold."""
    boxes = 0
    studies = {
        "xr": [shared_dicom / "xr" / "RG1_J2KI_chest_PA.dcm"],
        "ct": sorted((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm")),
    }
    common = {"family": "medgemma", "max_new_tokens": max_new_tokens, "slices_per_series": 3}
    local_settings = VLMSettings(path=gemma3_dir, device="cpu", dtype="float32", **common)
    server_settings = VLMSettings(server=model_server, model=str(gemma3_dir), image_size=TINY_IMAGE_SIZE,
                                  **common)
    for name, files in studies.items():
        datasets = [read_dataset(f) for f in files]
        series = {datasets[0].SeriesInstanceUID: datasets}
        key = f"{datasets[0].StudyInstanceUID}/1/{name}"
        local = run_vlm_tasks(local_settings, series, TASKS, job_key=key)
        remote = run_vlm_tasks(server_settings, series, TASKS, job_key=key)
        assert [o.kind for o in remote] == [o.kind for o in local] and remote
        for index, (mine, theirs) in enumerate(zip(remote, local, strict=True)):
            encoded = {}
            for label, output in (("server", mine), ("local", theirs)):
                buffer = BytesIO()
                output.dataset.save_as(buffer, enforce_file_format=True)
                encoded[label] = buffer.getvalue()
            assert_valid(tmp_path, f"{name}-{index}-{mine.kind}-server", encoded["server"])
            # the one legitimate difference: the weights' version, which only the in-process path
            # can read (the server path says "server")
            version = theirs.summary["model"]["version"]
            expected = ["server" if text == version else text for text in _sr_texts(encoded["local"])]
            assert _sr_texts(encoded["server"]) == expected, f"{name} {mine.kind}"
            # label probabilities come from logprobs, which `transformers serve` does not return
            # (it accepts and ignores `logprobs`): None there; a server that returns them must agree
            for label, expected_label in zip(mine.summary.get("labels", []), theirs.summary.get("labels", []),
                                             strict=True):
                assert (label["name"], label["state"]) == (expected_label["name"], expected_label["state"])
                if label["probability"] is not None:
                    assert label["probability"] == pytest.approx(expected_label["probability"], abs=1e-3)

            def same(summary: dict) -> dict:
                return {k: v for k, v in summary.items() if k not in ("model", "labels")}
            assert same(mine.summary) == same(theirs.summary)
            boxes += len(mine.summary.get("boxes", []))
    return boxes


def _node(tmp_path: Path, server: str, model: str) -> NodeContext:
    settings = load_settings(
        data_dir=tmp_path / "var", quiet_period_s=1, destinations={"pacs": "PACS@127.0.0.1:104"},
        models={"vlm": {"server": server, "model": model, "family": "medgemma",
                        "max_new_tokens": MAX_NEW_TOKENS, "slices_per_series": 3,
                        "image_size": TINY_IMAGE_SIZE, "server_timeout_s": 10}},
        rules=[{"name": "ct-vlm", "match": {"modality": "CT"}, "destinations": ["pacs"],
                "tasks": [{"report": {"language": "en"}}, {"classify": {"labels": ["effusion"]}}]}],
    )
    context = NodeContext.create(settings)
    upgrade(context.engine)
    return context


def _queue_ct(ctx: NodeContext, files: list[Path]) -> int:
    return receive_and_complete(ctx, (path.read_bytes() for path in files), utcnow() - timedelta(minutes=5))


def test_a_job_waits_while_the_server_is_down_then_runs_through_it(
    model_server: str, gemma3_dir: Path, tmp_path: Path, shared_dicom: Path
) -> None:
    """Server down: the job goes back to the queue (TransientError), never failed; the same job
    through the live server stores valid SRs."""
    files = sorted((shared_dicom / "ct" / "dcmqi_ct3slice").glob("*.dcm"))
    down = _node(tmp_path / "down", f"http://127.0.0.1:{free_port()}", str(gemma3_dir))
    try:
        job_id = _queue_ct(down, files)
        with pytest.raises(TransientError, match="did not answer"):
            run_job(down, job_id)
        with down.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.state == JobState.QUEUED
            assert "retrying after: ModelServerUnavailableError" in (job.reason or "")
    finally:
        down.close()

    up = _node(tmp_path / "up", model_server, str(gemma3_dir))
    try:
        job_id = _queue_ct(up, files)
        assert run_job(up, job_id)  # deliveries to enqueue
        with up.sessions() as session:
            assert session.get(Job, job_id).state in (JobState.SUCCEEDED, JobState.DELIVERING)  # type: ignore[union-attr]
            results = session.scalars(select(Result).where(Result.job_pk == job_id)).all()
            paths = {r.kind: r.path for r in results}
        assert {"report", "regions"} <= set(paths)
        for kind, path in paths.items():
            assert_valid(tmp_path, f"pipeline-{kind}", up.store.absolute(path).read_bytes())
    finally:
        up.close()


def test_a_server_timeout_is_a_retryable_error(model_server: str, gemma3_dir: Path) -> None:
    """The live server, asked with a timeout far shorter than one generation takes."""
    client = ServerVLM(ServerConfig(server=model_server, model=str(gemma3_dir), family="medgemma",
                                    max_new_tokens=64, timeout_s=0.001))
    client._checked = True  # the model check would time out first; this is about generation
    images = [client.prepare(np.zeros((32, 32), np.float32))]
    with pytest.raises(ModelServerUnavailableError, match="Timeout"):
        client.run(images, TASKS[:1])


def test_a_worker_refuses_to_start_with_a_model_the_server_does_not_serve(
    model_server: str, gemma3_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "mednode.yaml"
    config.write_text(yaml.safe_dump({
        "data_dir": str(tmp_path / "var"),
        "models": {"vlm": {"server": model_server, "model": "no-such-model", "family": "medgemma"}},
    }))
    done = subprocess.run([sys.executable, "-m", "node.cli", "worker", "--config", str(config)],
                          check=False, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "COLUMNS": "400"})
    output = done.stdout + done.stderr
    assert done.returncode == 2, output
    assert "models.vlm.model" in output and "no-such-model" in output and str(gemma3_dir) in output
    assert not (tmp_path / "var").exists()  # refused before touching the data directory


def test_a_server_down_at_start_up_is_only_a_warning() -> None:
    settings = VLMSettings(server=f"http://127.0.0.1:{free_port()}", model="m", family="medgemma",
                           server_timeout_s=5)
    warning = check_server_at_start(settings)
    assert warning is not None and "did not answer" in warning and "retry" in warning
