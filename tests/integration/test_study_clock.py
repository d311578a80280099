"""The study clock through a running node: every stage from the last instance to the results in a
real PACS (dcmtk storescp), in the timeline, the API and ``/metrics`` — and the gaps that are the
node's own overhead stay small: completion when the quiet period ends, a queued job picked up at
once by a free worker, a job's objects sent over one association.

The bounds are generous (a loaded 2-core machine); the figures themselves come from
``bench/latency.py``.
"""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MednodeFactory
from tests.integration.e2e import poll
from tests.integration.node_jobs import SMALL_CT, send_phantom
from tests.integration.test_metrics import scrape
from tests.peers import StoreSCP

QUIET_S = 1.0
STUDIES = 3
WORKER_STAGES = ("load", "model", "write", "store")


@pytest.mark.parametrize("broker", ["embedded", "rabbitmq"])
def test_every_stage_is_clocked_and_the_overhead_is_small(tmp_path: Path, mednode_factory: MednodeFactory,
                                                          broker: str, request: pytest.FixtureRequest) -> None:
    services = {"broker_url": request.getfixturevalue("rabbitmq_url")} if broker == "rabbitmq" else {}
    with StoreSCP(tmp_path / "pacs") as pacs:
        # the completion poll is as long as the quiet period: only the wake-up completes on time
        node = mednode_factory(quiet_period_s=QUIET_S, destination=f"{pacs.aet}@127.0.0.1:{pacs.port}",
                               extra_env={"MEDNODE_COMPLETION_POLL_S": str(QUIET_S)}, **services)
        uids = []
        for n in range(STUDIES):
            # one at a time, each once the worker is free (the first also waits for it to start)
            uids.append(send_phantom(tmp_path, node, SMALL_CT, f"ct{n}"))
            poll(lambda: node.status()["jobs"]["delivered"] == len(uids), 180, what=f"study {n} delivered")
        assert len(pacs.received()) == 2 * STUDIES
        associations = len(re.findall(r"Association Acknowledged", pacs.log_text()))

        studies = [httpx.get(f"{node.web_url}/api/v1/studies/{uid}", timeout=10).json() for uid in uids]

    # every stage, once per study (two deliveries), with a plausible value
    for study in studies:
        clock = study["clock"]
        stages = [s["stage"] for s in clock]
        assert stages == ["last_instance_to_complete", "complete_to_queued", "queued_to_started",
                          *WORKER_STAGES, "delivery", "delivery"], clock
        seconds = {s["stage"]: s["seconds"] for s in clock}
        assert all(s["seconds"] is not None and 0 <= s["seconds"] < 120 for s in clock), [(s["stage"], s["seconds"]) for s in clock]
        assert QUIET_S <= seconds["last_instance_to_complete"], clock
        assert sorted(s["detail"].split()[0] for s in clock if s["stage"] == "delivery") == ["SEG", "SR"]
        # the timeline's moments are in the same order, and agree with the clock
        events = [e["event"] for e in study["timeline"]]
        job_id = clock[1]["job_id"]
        order = ["last instance received", "complete (version 1)", "routed: rule ct-analysis",
                 f"job {job_id} queued", f"job {job_id} started", f"job {job_id} wrote 2 object(s)"]
        assert [e for e in events if e in order] == order, events
        # the worker's stages fit in its run
        job = study["jobs"][0]
        run_s = (httpx_time(job["finished_at"]) - httpx_time(job["started_at"]))
        assert sum(seconds[s] for s in WORKER_STAGES) <= run_s + 0.01

    for study in studies:  # for the record (pytest -s); the figures are bench/latency.py's
        print(broker, [(s["stage"], s["seconds"]) for s in study["clock"]])
    # the node's own overhead, on a free worker (studies 2 and 3; the first may wait for its start)
    for study in studies[1:]:
        seconds = {s["stage"]: s["seconds"] for s in study["clock"]}
        # the poll alone would complete anywhere up to a whole poll (1 s) late
        assert seconds["last_instance_to_complete"] < QUIET_S + 0.5, study["clock"]
        assert seconds["complete_to_queued"] < 0.5, study["clock"]
        assert seconds["queued_to_started"] < 0.5, study["clock"]
    # one association per job and destination (not one per object)
    assert associations == STUDIES, pacs.log_text()[-3000:]

    # studies 2 and 3, sent to a free worker, were read ahead half-way through their quiet
    # period, and their jobs took the volume instead of reading the series again
    scraped = scrape(node.web_url)
    preloads = {dict(labels)["outcome"]: value
                for labels, value in scraped.get("mednode_volume_preloads_total", {}).items()}
    assert preloads.get("used", 0) >= STUDIES - 1, preloads
    assert preloads.get("used", 0) <= preloads.get("read", 0), preloads

    # /metrics counts each stage of each study
    metrics = scraped["mednode_study_clock_seconds_count"]
    counts = {dict(labels)["stage"]: value for labels, value in metrics.items()}
    assert counts == {"last_instance_to_complete": STUDIES, "complete_to_queued": STUDIES,
                      "queued_to_started": STUDIES, **dict.fromkeys(WORKER_STAGES, STUDIES),
                      "delivery": 2 * STUDIES}, counts


def httpx_time(value: str) -> float:
    from tests.integration.node_jobs import when

    moment = when(value)
    assert moment is not None
    return moment.timestamp()
