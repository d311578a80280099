"""``/metrics`` of the embedded node carries what its worker processes observed.

Jobs, stages, deliveries and model loads happen in the worker children of ``mednode serve``, while
``/metrics`` is served by the web process. A CT job and an on-demand ask run and are delivered to a
real dcmtk storescp; each observation must then be in ``/metrics`` with the exact count that the
node's own bookkeeping (``/api/v1/status``) gives, so a missing worker-side sample fails the test.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.conftest import MednodeFactory
from tests.integration.e2e import poll
from tests.integration.node_jobs import SMALL_CT, TOKEN, node_config, send_phantom, tiny_qwen2_vl  # noqa: F401
from tests.peers import StoreSCP

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(url: str) -> Samples:
    """Every sample of ``/metrics``: name → (sorted label pairs) → value."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    samples: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][tuple(sorted(sample.labels.items()))] = sample.value
    return samples


@pytest.mark.parametrize("layout", ["embedded", "separate"])
def test_worker_observations_reach_metrics(tmp_path: Path, mednode_factory: MednodeFactory,
                                           tiny_qwen2_vl: Path, layout: str,  # noqa: F811
                                           request: pytest.FixtureRequest) -> None:
    """``embedded``: SQLite, ``mednode serve`` with its worker children; ``separate``: the layout of
    docker-compose.yml — PostgreSQL, RabbitMQ and a ``mednode worker`` of its own, sharing only
    ``MEDNODE_DATA_DIR`` (a volume there) with the node."""
    separate = layout == "separate"
    services = ({"database_url": request.getfixturevalue("postgres_url"),
                 "broker_url": request.getfixturevalue("rabbitmq_url"), "separate_worker": True}
                if separate else {})
    with StoreSCP(tmp_path / "pacs") as pacs:
        destination = f"{pacs.aet}@127.0.0.1:{pacs.port}"
        node = mednode_factory(quiet_period_s=1.0, destination=destination,
                               config=node_config(tmp_path, tiny_qwen2_vl, ["default"]),
                               extra_env={"MEDNODE_WEB_API_TOKENS": json.dumps([TOKEN])}, **services)
        study_uid = send_phantom(tmp_path, node, SMALL_CT, "ct")
        poll(lambda: node.status()["jobs"]["delivered"] == 1, 180, what="the CT job delivered",
             on_timeout=node.state)
        with httpx.Client(base_url=node.web_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as api:
            answer = api.post(f"/api/v1/studies/{study_uid}/ask",
                              json={"kind": "vqa", "text": "Is there a pleural effusion?", "send_to_pacs": True})
            assert answer.status_code == 202, answer.text
        counts = poll(lambda: (c := node.status())["jobs"]["delivered"] == 2 and c, 180,
                      what="the ask delivered", on_timeout=node.state)
        assert len(pacs.received()) == counts["deliveries"]["delivered"] == 3  # SEG, SR, answer SR

        # /workers (API and page) shows the worker that holds the model: its device, batch size
        # and GPU memory (none on this CPU) — by broadcast on RabbitMQ, from the workers' status
        # files on the embedded broker (no broadcast there)
        with httpx.Client(base_url=node.web_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as api:
            workers = poll(lambda: (w := api.get("/api/v1/workers").json())["ok"] and any(
                x["model"] for x in w["workers"]) and w, 30, what="a worker showing its model")
            page = api.get("/workers").text
    holding = [w for w in workers["workers"] if w["model"]]
    assert len(holding) == 1, workers
    (worker,) = holding
    assert worker["model"].startswith(f"{tiny_qwen2_vl.name} (qwen2_vl, "), worker
    assert (worker["device"], worker["batch_size"]) == ("cpu", 8), worker
    assert worker["gpu_memory_mb"] is None and worker["gpu_memory_reserved_mb"] is None
    assert any(q.startswith("inference") for q in worker["queues"]), worker
    assert len(workers["workers"]) >= (1 if separate else 2), workers  # embedded: inference (with urgent slots), delivery
    assert "— (no GPU)" in page and tiny_qwen2_vl.name in page

    metrics = scrape(node.web_url)

    # the serve process (listener) and the workers share one directory under data_dir
    files = sorted((node.data_dir / "var" / "metrics").glob("*.db"))
    writers = {f.stem.split("_", 1)[1] for f in files}
    assert len(writers) >= (2 if separate else 3), f"metrics files of too few processes: {files}"

    # listener (serve process)
    assert metrics["mednode_instances_received_total"][(("outcome", "new"),)] == SMALL_CT.num_slices

    # inference workers: both jobs (embedded: the CT job on the inference worker, the ask on the
    # urgent one; separate: one worker for every queue)
    assert metrics["mednode_job_duration_seconds_count"][()] == 2
    assert metrics["mednode_job_duration_seconds_sum"][()] > 0
    stages = {dict(labels)["stage"]: value for labels, value in metrics["mednode_stage_duration_seconds_count"].items()}
    assert stages["load_volume"] >= 1
    for stage in ("ct_analyzer", "write_seg", "write_sr", "vlm"):
        assert stages.get(stage) == 1, f"stage {stage}: {stages}"
    stage_sums = {dict(labels)["stage"]: value for labels, value in metrics["mednode_stage_duration_seconds_sum"].items()}
    assert all(stage_sums[stage] > 0 for stage in ("ct_analyzer", "write_seg", "vlm")), stage_sums

    # the model was loaded once, by the worker that answered the ask
    loads = metrics["mednode_model_load_seconds_count"]
    assert sum(loads.values()) == 1, loads
    assert sum(metrics["mednode_model_load_seconds_sum"].values()) > 0

    # the ask's prompt went through the model's shared batch queue: one generate call
    assert metrics["mednode_vlm_batch_size_count"][()] == 1
    assert metrics["mednode_vlm_batch_jobs_sum"][()] == 1

    # the delivery worker: one observation per object sent, none failed
    delivered = (("outcome", "delivered"),)
    assert metrics["mednode_delivery_duration_seconds_count"][delivered] == 3
    assert metrics["mednode_delivery_duration_seconds_sum"][delivered] > 0
    assert sum(metrics["mednode_delivery_failures_total"].values()) == 0

    # the index gauges are still there, from the web process
    assert metrics["mednode_jobs"][(("state", "delivered"),)] == 2
