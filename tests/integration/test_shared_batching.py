"""On the embedded node, jobs that run at once on the inference worker share one model and its batches.

One inference worker (no urgent worker, four job slots) gets four asks at once about a CT it has
analysed; each asks a tiny real-architecture VLM (loaded by the product loader) one question with
a long token budget, so the first ``generate`` call is still running when the other jobs' prompts
arrive. ``/metrics`` must then show one model load and a ``generate`` call that served several jobs,
and every ask its own answer SR.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.integration.conftest import MednodeFactory
from tests.integration.e2e import poll
from tests.integration.node_jobs import (  # noqa: F401
    SMALL_CT,
    TOKEN,
    api,
    job,
    send_phantom,
    study_job,
    tiny_qwen2_vl,
)
from tests.integration.test_metrics import scrape

ASKS = 4


def test_asks_running_at_once_share_the_model_and_its_generate_calls(
    tmp_path: Path, mednode_factory: MednodeFactory, tiny_qwen2_vl: Path,  # noqa: F811
) -> None:
    config = tmp_path / "mednode.yaml"
    config.write_text(yaml.safe_dump({
        "models": {"vlm": {"path": str(tiny_qwen2_vl), "family": "qwen2_vl", "max_new_tokens": 128,
                           "slices_per_series": 1, "device": "cpu", "batch_size": 8}},
        "rules": [{"name": "ct", "match": {"modality": "CT"}, "tasks": ["ct_analysis"], "destinations": []}],
    }))
    node = mednode_factory(quiet_period_s=1.0, config=config, extra_env={
        "MEDNODE_WEB_API_TOKENS": json.dumps([TOKEN]), "MEDNODE_EMBEDDED_URGENT_WORKER": "false",
        "MEDNODE_WORKER_CONCURRENCY": str(ASKS)})
    with api(node) as client:
        study_uid = send_phantom(tmp_path, node, SMALL_CT, "ct")
        poll(lambda: study_job(client, study_uid, "succeeded"), 120, what="the CT job done")
        ids = []
        for i in range(ASKS):
            answer = client.post(f"/api/v1/studies/{study_uid}/ask",
                                 json={"kind": "vqa", "text": f"Question number {i}: any effusion?"})
            assert answer.status_code == 202, answer.text
            ids.append(answer.json()["job"]["id"])
        done = [poll(lambda i=i: (j := job(client, i))["state"] in ("succeeded", "failed") and j, 180,
                     what=f"ask {i} answered") for i in ids]
        assert [d["state"] for d in done] == ["succeeded"] * ASKS, [d["reason"] for d in done]
        assert len({d["worker"] for d in done}) == 1, "one inference worker ran every ask"

    metrics = scrape(node.web_url)
    assert sum(metrics["mednode_model_load_seconds_count"].values()) == 1
    calls = metrics["mednode_vlm_batch_size_count"][()]
    assert metrics["mednode_vlm_batch_jobs_sum"][()] == ASKS  # each ask's one prompt, once
    alone = metrics["mednode_vlm_batch_jobs_bucket"][(("le", "1.0"),)]
    assert calls < ASKS and alone < calls, (
        f"{calls} generate calls, {alone} of them for one job: the asks never shared a call")
    print([line for line in node.logs().splitlines() if "generate: " in line])
