"""Queues per model: a job goes to the queue of the models its tasks need, and a worker consumes
only the queues of the models its configuration holds."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from node.celery_app import (
    declared_queues,
    held_models,
    inference_queue,
    is_urgent_queue,
    job_models,
    worker_queues,
)
from node.config import Settings

VLM = {"path": "/models/vlm", "family": "qwen2_vl"}
RULES = [
    {"name": "ct", "match": {"modality": ["CT"]}, "tasks": ["ct_analysis"], "destinations": []},
    {"name": "spleen", "match": {"modality": ["CT"]}, "tasks": [{"segment": {"bundle": "spleen"}}],
     "destinations": []},
    {"name": "both", "match": {"modality": ["CT"]}, "destinations": [],
     "tasks": [{"segment": {"bundle": "spleen"}}, {"report": {"language": "en"}}]},
    {"name": "cxr", "match": {"modality": ["DX"]}, "tasks": [{"report": {"language": "en"}}], "destinations": []},
]


def _settings(settings_for: Callable[..., Settings], tmp_path: Path, *, vlm: bool, spleen: bool,
              rules: list[dict[str, object]] | None = None) -> Settings:
    bundle = tmp_path / "spleen"
    bundle.mkdir(exist_ok=True)
    usable = [r for r in (RULES if rules is None else rules)
              if (vlm or r["name"] not in ("both", "cxr")) and (spleen or r["name"] not in ("both", "spleen"))]
    return settings_for(models={"vlm": VLM if vlm else None, "bundles": {"spleen": bundle} if spleen else {}},
                        rules=usable)


def test_a_job_goes_to_the_queue_of_the_models_it_needs() -> None:
    assert job_models(["ct_analysis"]) == frozenset()
    assert job_models([{"report": {"language": "en"}}, "ct_analysis"]) == {"vlm"}
    assert job_models([{"segment": {"bundle": "spleen"}}, {"vqa": {"questions": ["?"]}}]) == {"monai.spleen", "vlm"}
    assert inference_queue(5) == "inference"
    assert inference_queue(9) == "inference.urgent"
    assert inference_queue(5, {"vlm"}) == "inference.vlm"
    assert inference_queue(8, {"vlm", "monai.spleen"}) == "inference.monai.spleen+vlm.urgent"
    assert is_urgent_queue("inference.vlm.urgent") and is_urgent_queue("inference.urgent")
    assert not is_urgent_queue("inference.vlm") and not is_urgent_queue(None)


def test_a_worker_holding_every_model_consumes_every_queue_a_job_can_go_to(settings_for, tmp_path) -> None:
    settings = _settings(settings_for, tmp_path, vlm=True, spleen=True)
    assert held_models(settings) == {"vlm", "monai.spleen"}
    consumed = worker_queues(["inference.urgent", "inference", "delivery"], settings)
    assert consumed == [
        "inference.urgent", "inference.monai.spleen.urgent", "inference.vlm.urgent",
        "inference.monai.spleen+vlm.urgent",
        "inference", "inference.monai.spleen", "inference.vlm", "inference.monai.spleen+vlm", "delivery",
    ]
    assert set(consumed) == set(declared_queues(settings))
    routed = {inference_queue(p, job_models(r["tasks"])) for r in RULES for p in (5, 9)}  # type: ignore[arg-type]
    assert routed <= set(consumed)


def test_a_worker_without_a_model_never_takes_its_jobs(settings_for, tmp_path) -> None:
    everything = _settings(settings_for, tmp_path, vlm=True, spleen=True)
    # a CPU host: the same rules, but only the bundle configured (its own file)
    cpu = _settings(settings_for, tmp_path, vlm=False, spleen=True, rules=RULES[:2])
    assert worker_queues(["inference"], cpu) == ["inference", "inference.monai.spleen"]
    # a worker named for one queue takes that queue only
    assert worker_queues(["inference.vlm"], everything) == ["inference.vlm"]
    assert worker_queues(["delivery"], everything) == ["delivery"]
