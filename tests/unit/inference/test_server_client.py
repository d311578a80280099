"""What :class:`inference.vlm.server.ServerVLM` asks a model server for, and how it reads the
answer, without a server: the request body of a unit and the mapping of one chat-completion
answer to raw text, clean text and label probability (the integration tests run it against
``transformers serve`` and vLLM)."""

from __future__ import annotations

import math

import numpy as np

from inference.results import RegionResult
from inference.tasks import parse_tasks
from inference.vlm.server import ServerConfig, ServerVLM

QWEN2_ANSWER = ("<|object_ref_start|>right lung<|object_ref_end|>"
                "<|box_start|>(100,200),(400,800)<|box_end|>")


def _client(family: str) -> ServerVLM:
    return ServerVLM(ServerConfig(server="http://127.0.0.1:9", model="m", family=family))


def _units(client: ServerVLM, task: dict) -> list:
    images = [client.prepare(np.zeros((56, 56), np.float32))]
    [spec] = parse_tasks([task])
    return client._units(0, images, spec)


def test_qwen2_vl_asks_the_server_to_keep_its_special_box_tokens() -> None:
    client = _client("qwen2_vl")
    [unit] = _units(client, {"ground": {"phrases": ["right lung"]}})
    body = client._body(unit)
    assert body["skip_special_tokens"] is False and body["spaces_between_special_tokens"] is False
    generation = client._generation({"choices": [{"message": {"content": QWEN2_ANSWER}}]}, unit)
    assert generation.raw_text == QWEN2_ANSWER  # the box parser reads the markup
    assert generation.clean_text == "right lung(100,200),(400,800)"  # as decoding without specials
    result = unit.finish(generation.raw_text, generation.clean_text, generation.yes_probability)
    assert isinstance(result, RegionResult) and len(result.boxes) == 1
    assert result.boxes[0].label == "right lung"


def test_families_with_text_markup_keep_the_servers_default() -> None:
    client = _client("medgemma")
    [unit] = _units(client, {"ground": {"phrases": ["right lung"]}})
    assert "skip_special_tokens" not in client._body(unit)


def test_a_classification_asks_for_logprobs_and_reads_the_probability_from_them() -> None:
    client = _client("medgemma")
    [unit] = _units(client, {"classify": {"labels": ["effusion"]}})
    body = client._body(unit)
    assert body["logprobs"] is True and body["top_logprobs"] >= 2
    answer = {"choices": [{"message": {"content": "Yes"}, "logprobs": {"content": [
        {"token": "Yes", "logprob": math.log(0.6),
         "top_logprobs": [{"token": "Yes", "logprob": math.log(0.6)},
                          {"token": "yes", "logprob": math.log(0.2)},
                          {"token": "No", "logprob": math.log(0.2)}]}]}}]}
    generation = client._generation(answer, unit)
    assert generation.yes_probability is not None and abs(generation.yes_probability - 0.8) < 1e-9
    # a server that ignores logprobs (transformers serve): no probability, the text still counts
    plain = client._generation({"choices": [{"message": {"content": "Yes"}}]}, unit)
    assert plain.yes_probability is None and plain.clean_text == "Yes"
