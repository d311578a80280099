"""The generalist model behind vLLM's CPU build on loopback: the same study gives the same SRs as
in-process transformers, the classification probability comes from vLLM's logprobs and agrees
with the answer, an 85-slice CT turn goes through, and the refusals hold.

vLLM runs from a venv of its own (``.venv-vllm``, made by ``make test`` / ``make vllm-venv``; it
pins its own torch). One server per module, started once (~25-60 s on 2 cores), serves the tiny
Gemma 3 of :mod:`tests.trained_models` built with ``serving=True`` (the four things vLLM checks,
see :func:`tests.models.build_tiny_gemma3`) and trained to answer the product's prompts with real
text, a box and a confident "yes": a random-weight model emits byte fragments, which the two
engines' detokenisers render differently (vLLM holds back an incomplete UTF-8 sequence and drops
special tokens), so equal SRs would not be a fair test there.

Both sides compute in float32 (``--dtype float32``): greedy decoding of a random tiny model in
bfloat16 on vLLM already picks another token than float32 transformers within 12 tokens.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from inference.errors import ModelNotConfiguredError, ModelServerUnavailableError
from inference.results import LabelResult, ReportResult
from inference.tasks import parse_tasks
from inference.vlm import VLM, VLMConfig, load_vlm
from inference.vlm.server import ServerConfig, ServerVLM
from inference.vlm.volume_recipe import MEDGEMMA_MAX_SLICES, medgemma_ct_rgb
from tests.integration.test_model_server import _check_same_srs, _texts
from tests.models import build_tiny_gemma3, build_tiny_qwen2_vl, to_checkpoint_layout
from tests.peers.model_servers import vllm_python, vllm_server, vllm_server_process
from tests.peers.processes import ManagedProcess, ToolMissingError, in_ci
from tests.trained_models import DEFAULT_TARGETS, prepare_radiographs, train_tiny_grounding_model


def _require_vllm() -> None:
    try:
        vllm_python()
    except ToolMissingError as exc:
        if in_ci():
            pytest.fail(f"CI must have every real peer: {exc}")
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def served_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tiny Gemma 3, in a checkpoint vLLM loads."""
    _require_vllm()  # before a minute of training
    root = tmp_path_factory.mktemp("vllm-model")
    trained = train_tiny_grounding_model(build_tiny_gemma3(root / "base", serving=True), root / "trained",
                                         family="medgemma", targets=DEFAULT_TARGETS)
    return to_checkpoint_layout(trained)


@pytest.fixture(scope="module")
def vllm_process(served_model_dir: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, ManagedProcess]]:
    _require_vllm()
    with vllm_server_process(served_model_dir, tmp_path_factory.mktemp("vllm-home")) as served:
        yield served


@pytest.fixture(scope="module")
def vllm(vllm_process: tuple[str, ManagedProcess]) -> str:
    return vllm_process[0]


@pytest.fixture(scope="module")
def in_process(served_model_dir: Path) -> VLM:
    return load_vlm(VLMConfig(path=str(served_model_dir), family="medgemma", device="cpu",
                              dtype="float32", max_new_tokens=48, batch_size=4))


def _client(url: str, model: str, **kwargs: object) -> ServerVLM:
    return ServerVLM(ServerConfig(server=url, model=model, family="medgemma", **kwargs))  # type: ignore[arg-type]


def test_same_study_same_sr_texts_through_vllm(vllm: str, served_model_dir: Path, tmp_path: Path,
                                               shared_dicom: Path) -> None:
    """The node's VLM stage (radiograph and a CT series → prepared images → tasks → SRs) gives
    the same SR texts, boxes and labels through vLLM as in-process; SRs valid (dciodvfy)."""
    boxes = _check_same_srs(vllm, served_model_dir, tmp_path, shared_dicom, max_new_tokens=48)
    assert boxes, "the trained model drew no box: the box path went untested"


def test_label_probability_from_vllm_logprobs_agrees_with_the_answer(vllm: str, served_model_dir: Path,
                                                                     in_process: VLM) -> None:
    tasks = parse_tasks([{"classify": {"labels": list(DEFAULT_TARGETS["classify"])}}])  # type: ignore[arg-type]
    images = prepare_radiographs(in_process)
    [local] = in_process.run(images, tasks)
    client = _client(vllm, str(served_model_dir), max_new_tokens=48)
    try:
        [remote] = client.run(images, tasks)
    finally:
        client.close()
    assert isinstance(remote, LabelResult) and isinstance(local, LabelResult)
    assert local.state == "present" and local.probability is not None
    assert remote.state == "present", remote.raw_text
    assert remote.probability is not None, "vLLM returned no usable logprobs"
    assert remote.probability >= 0.5  # agrees with the "yes" it said
    # the server sums only the spellings among its top logprobs: a hair below the in-process sum
    assert remote.probability == pytest.approx(local.probability, abs=1e-2)


def test_concurrent_requests_answer_as_in_process(vllm: str, served_model_dir: Path, in_process: VLM) -> None:
    """16 units sent at once (one client batch → 16 concurrent requests, batched by vLLM)."""
    images = prepare_radiographs(in_process, variants=True)
    tasks = parse_tasks([{"ground": {"phrases": ["right lung"]}},
                         {"report": {"language": "en"}},
                         {"classify": {"labels": ["pleural effusion"]}}])
    requests = [(images[i % len(images):i % len(images) + 1], task) for i in range(6) for task in tasks]
    local = in_process.run_batch(requests)
    client = _client(vllm, str(served_model_dir), max_new_tokens=48, batch_size=16)
    try:
        remote = client.run_batch(requests)
    finally:
        client.close()
    assert [_texts(r) for r in remote] == [_texts(r) for r in local]
    assert client.generate_calls == 2  # 18 units: one batch of 16, one of 2


def test_an_85_slice_ct_turn_through_vllm(vllm: str, served_model_dir: Path, in_process: VLM) -> None:
    """MedGemma's CT recipe at full length (85 windowed slices, each followed by ``SLICE n``):
    vLLM takes the turn, counts the same prompt tokens as the in-process encoding and answers the
    same report."""
    rng = np.random.default_rng(3)
    images = []
    for _ in range(MEDGEMMA_MAX_SLICES):
        hu = rng.normal(40.0, 300.0, size=(64, 64)).astype(np.float32)
        images.append(replace(in_process.prepare(medgemma_ct_rgb(hu), photometric="RGB"), volume_modality="CT"))
    tasks = parse_tasks([{"report": {"language": "en"}}])
    [local] = in_process.run(images, tasks)
    client = _client(vllm, str(served_model_dir), max_new_tokens=48)
    try:
        [remote] = client.run(images, tasks)
    finally:
        client.close()
    assert isinstance(remote, ReportResult) and isinstance(local, ReportResult)
    [unit] = in_process._units(0, images, tasks[0])
    assert client.prompt_tokens == [int(in_process.encode([unit])["input_ids"].shape[1])]
    assert client.prompt_tokens[0] > MEDGEMMA_MAX_SLICES * 6  # every slice went in as image tokens
    assert (remote.findings, remote.impression) == (local.findings, local.impression)


def test_unknown_model_name_is_a_clear_error_with_vllm(vllm: str, served_model_dir: Path) -> None:
    client = _client(vllm, "medgemma-does-not-exist")
    images = [client.prepare(np.zeros((32, 32), np.float32))]
    try:
        with pytest.raises(ModelNotConfiguredError) as caught:
            client.run(images, parse_tasks([{"report": {"language": "en"}}]))
    finally:
        client.close()
    message = str(caught.value)
    assert "models.vlm.model" in message and "medgemma-does-not-exist" in message
    assert str(served_model_dir) in message  # what vLLM does serve


def test_a_vllm_timeout_is_a_retryable_error(vllm_process: tuple[str, ManagedProcess],
                                              served_model_dir: Path) -> None:
    """A server that accepts the request and does not answer in time (vLLM's API process paused:
    the kernel still accepts the connection) is a retryable error, and the server serves again
    once it goes on. A 1 ms timeout against a running server was not enough: on two busy cores
    the client's wake-up came after the answer (seen once in a full run of the suite)."""
    url, process = vllm_process
    assert process.pid is not None
    client = _client(url, str(served_model_dir), max_new_tokens=8, timeout_s=1.0)
    client.check_model()
    images = [client.prepare(np.zeros((32, 32), np.float32))]
    tasks = parse_tasks([{"report": {"language": "en"}}])
    try:
        os.kill(process.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ModelServerUnavailableError, match="ReadTimeout"):
                client.run(images, tasks)
        finally:
            os.kill(process.pid, signal.SIGCONT)
        (after,) = client.run(images, tasks)  # vLLM serves again once it goes on
        assert isinstance(after, ReportResult) and after.findings
    finally:
        client.close()


@pytest.fixture(scope="module")
def qwen2_vl_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_vllm()
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("vllm-qwen2-vl") / "qwen2_vl", serving=True)


def test_qwen2_vl_special_markup_survives_vllm(qwen2_vl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Qwen2-VL's box markup (``<|object_ref_start|>``, ``<|box_start|>``…) is special tokens,
    which vLLM drops unless asked (``skip_special_tokens: false``, sent for this family). The
    random tiny Qwen2-VL emits ``<|object_ref_start|>`` here: the raw answers through vLLM keep it
    and equal the in-process decode with special tokens. The one difference: in-process decoding
    renders a trailing incomplete UTF-8 sequence as U+FFFD, vLLM withholds it."""
    local = load_vlm(VLMConfig(path=str(qwen2_vl_dir), family="qwen2_vl", device="cpu", dtype="float32",
                               max_new_tokens=24, batch_size=1))
    rng = np.random.default_rng(7)
    frames = [rng.integers(0, 4096, size=(96, 80)).astype(np.float32) for _ in range(2)]
    images = [local.prepare(f, photometric="MONOCHROME2", window=(2048.0, 4096.0)) for f in frames]
    tasks = parse_tasks([{"ground": {"phrases": ["right lung", "heart", "nodule"]}},
                         {"vqa": {"questions": ["Where is the heart?"]}}])
    expected = local.run(images, tasks)
    with vllm_server(qwen2_vl_dir, tmp_path_factory.mktemp("vllm-qwen-home")) as url:
        client = ServerVLM(ServerConfig(server=url, model=str(qwen2_vl_dir), family="qwen2_vl",
                                        max_new_tokens=24, image_size=local.input_size, batch_size=8))
        try:
            answers = client.run(images, tasks)
        finally:
            client.close()
    units = [u for task in tasks for u in local._units(0, images, task)]
    assert sorted(client.prompt_tokens) == sorted(int(local.encode([u])["input_ids"].shape[1]) for u in units)
    assert [a.raw_text.rstrip("\ufffd") for a in answers] == [e.raw_text.rstrip("\ufffd") for e in expected]
    assert any("<|object_ref_start|>" in a.raw_text for a in answers), "no special token to check"
