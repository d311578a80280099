"""Urgent work starts while a long job holds the inference worker, on the embedded default (SQLite
and kombu's SQLAlchemy transport, which ignores message priorities) and on RabbitMQ.

A large synthetic CT keeps the built-in CT analyzer busy on the inference worker. While it runs, a
queued job raised to priority 9 and then an on-demand ask (a question to a tiny real-architecture
VLM, loaded by the product's loader) must each start within 2 s: both go to the urgent queues,
which the embedded node's inference worker consumes on job slots kept for them
(``urgent_slots``, :mod:`node.urgent_slots`), in the same process as the long job: one copy of
each model per worker.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import MednodeFactory
from tests.integration.e2e import poll
from tests.integration.node_jobs import (  # noqa: F401  (tiny_qwen2_vl: a fixture)
    SMALL_CT,
    TOKEN,
    api,
    job,
    node_config,
    send_phantom,
    study_job,
    tiny_qwen2_vl,
    when,
)
from tests.phantom import PhantomGeometry

START_WITHIN_S = 2.0
#: ~210 MB of CT: reading it, the analyzer and the SEG writer took 11-49 s (320 slices) on a
#: shared 2-core machine; what the test does meanwhile takes ~5 s
LONG_CT = PhantomGeometry(rows=512, columns=512, pixel_spacing_mm=(0.8, 0.8), slice_spacing_mm=0.75,
                          num_slices=400)


@pytest.mark.parametrize("broker", ["embedded", "rabbitmq"])
def test_priority_9_job_and_ask_start_within_2_s_while_a_long_job_runs(
    tmp_path: Path, mednode_factory: MednodeFactory, tiny_qwen2_vl: Path, broker: str,  # noqa: F811
    request: pytest.FixtureRequest,
) -> None:
    """``embedded``: kombu's SQLAlchemy transport, no message priorities at all; ``rabbitmq``:
    priorities exist, but a busy single worker could not start a second job with them alone."""
    broker_url = request.getfixturevalue("rabbitmq_url") if broker == "rabbitmq" else None
    # one job slot on the inference worker, so the small study's job queues behind the long one
    node = mednode_factory(quiet_period_s=1.0, config=node_config(tmp_path, tiny_qwen2_vl), broker_url=broker_url,
                           extra_env={"MEDNODE_WEB_API_TOKENS": json.dumps([TOKEN]),
                                      "MEDNODE_WORKER_CONCURRENCY": "1"})
    with api(node) as client:
        long_uid = send_phantom(tmp_path, node, LONG_CT, "long")
        long_job = poll(lambda: study_job(client, long_uid, "running"), 120, what="the long job running")

        # a routine job queued behind the long one, then raised to 9 (the queue page's button)
        small_uid = send_phantom(tmp_path, node, SMALL_CT, "small")
        queued = poll(lambda: study_job(client, small_uid, "queued"), 60, what="the small study's job queued")
        raised_at = datetime.now(UTC)
        answer = client.post(f"/api/v1/jobs/{queued['id']}/priority", json={"priority": 9})
        assert answer.status_code == 200, answer.text
        raised = poll(lambda: (j := job(client, queued["id"]))["started_at"] and j, 30, interval_s=0.05,
                      what="the raised job started")
        waited_s = (when(raised["started_at"]) - raised_at).total_seconds()  # type: ignore[operator]
        print(f"priority-9 job started {waited_s:.2f} s after it was raised")
        assert waited_s <= START_WITHIN_S
        poll(lambda: job(client, queued["id"])["state"] == "succeeded", 120, what="the raised job done")

        # an on-demand question on the small study
        answer = client.post(f"/api/v1/studies/{small_uid}/ask",
                             json={"kind": "vqa", "text": "Is there a pleural effusion?"})
        assert answer.status_code == 202, answer.text
        ask_id = answer.json()["job"]["id"]
        asked = poll(lambda: (j := job(client, ask_id))["started_at"] and j, 30, interval_s=0.05,
                     what="the ask started")
        waited_s = (when(asked["started_at"]) - when(asked["created_at"])).total_seconds()  # type: ignore[operator]
        print(f"ask started {waited_s:.2f} s after it was asked")
        assert waited_s <= START_WITHIN_S
        done = poll(lambda: (j := job(client, ask_id))["state"] in ("succeeded", "failed") and j, 180,
                    what="the ask answered")
        assert done["state"] == "succeeded", done["reason"]
        assert [r["kind"] for r in done["results"]], "the ask wrote no answer"

        # all of that happened while the long job ran, in the same worker process (its urgent slots)
        long_done = poll(lambda: (j := job(client, long_job["id"]))["finished_at"] and j, 300,
                         what="the long job finished")
        assert long_done["state"] == "succeeded", long_done["reason"]
        long_start, long_end = when(long_done["started_at"]), when(long_done["finished_at"])
        for urgent in (raised, asked):
            assert long_start < when(urgent["started_at"]) < long_end  # type: ignore[operator]
            assert urgent["worker"] == long_done["worker"]
        print(f"long job ran {(long_end - long_start).total_seconds():.1f} s; the ask started "  # type: ignore[operator]
              f"{(when(asked['started_at']) - long_start).total_seconds():.1f} s into it")  # type: ignore[operator]


@pytest.mark.parametrize("broker", ["embedded", "rabbitmq"])
def test_one_process_holds_the_vlm_for_routine_jobs_and_asks(
    tmp_path: Path, mednode_factory: MednodeFactory, tiny_qwen2_vl: Path, broker: str,  # noqa: F811
    request: pytest.FixtureRequest,
) -> None:
    """``mednode serve``'s workers: a routine VLM job and an ask run in one worker process, the only
    one that loads the model. The Workers view shows one process holding it, with its urgent slots
    and their queues: from the workers' status files on the embedded broker, from their broadcast
    answer on RabbitMQ (where Celery's ``active_queues`` lists only the main consumer's)."""
    broker_url = request.getfixturevalue("rabbitmq_url") if broker == "rabbitmq" else None
    config = node_config(tmp_path, tiny_qwen2_vl)
    settings = yaml.safe_load(config.read_text())
    settings["rules"][0]["tasks"] = ["ct_analysis", {"report": {"language": "en"}}]
    config.write_text(yaml.safe_dump(settings))
    node = mednode_factory(quiet_period_s=1.0, config=config, broker_url=broker_url,
                           extra_env={"MEDNODE_WEB_API_TOKENS": json.dumps([TOKEN])})
    with api(node) as client:
        study_uid = send_phantom(tmp_path, node, SMALL_CT, "small")
        routed = poll(lambda: study_job(client, study_uid, "succeeded"), 120, what="the CT job done")
        results = job(client, routed["id"])["results"]
        assert any(r["kind"] == "report" for r in results), results
        answer = client.post(f"/api/v1/studies/{study_uid}/ask", json={"kind": "vqa", "text": "Any effusion?"})
        assert answer.status_code == 202, answer.text
        ask_id = answer.json()["job"]["id"]
        done = poll(lambda: (j := job(client, ask_id))["state"] in ("succeeded", "failed") and j, 180,
                    what="the ask answered")
        assert done["state"] == "succeeded", done["reason"]
        assert done["worker"] == routed["worker"]  # the one inference worker ran both

        def holding() -> list[dict[str, Any]] | None:
            workers = client.get("/api/v1/workers").json()["workers"]
            loaded = [w for w in workers if w["model"]]
            return loaded if len(workers) == 2 and loaded else None  # inference and delivery

        loaded = poll(holding, 30, what="the workers' status with the model loaded")
        assert len(loaded) == 1, loaded
        assert loaded[0]["stats"]["pid"] == int(done["worker"].rsplit(":", 1)[1])
        assert loaded[0]["urgent_slots"] == 2 and loaded[0]["concurrency"] == 8
        assert {"inference.vlm", "inference.vlm.urgent"} <= set(loaded[0]["queues"])
    logs = node.logs()
    assert "started embedded worker for inference.urgent,inference (pid" in logs
    assert "started embedded worker for inference.urgent (pid" not in logs
