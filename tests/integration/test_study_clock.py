"""probe"""
from __future__ import annotations
import json, time
from pathlib import Path
import httpx
from tests.integration.conftest import MednodeFactory
from tests.integration.e2e import poll
from tests.integration.node_jobs import SMALL_CT, send_phantom
from tests.peers import StoreSCP


def test_probe(tmp_path: Path, mednode_factory: MednodeFactory) -> None:
    with StoreSCP(tmp_path / "pacs") as pacs:
        node = mednode_factory(quiet_period_s=1.0, destination=f"{pacs.aet}@127.0.0.1:{pacs.port}")
        uid = send_phantom(tmp_path, node, SMALL_CT, "ct")
        poll(lambda: node.status()["jobs"]["delivered"] == 1, 120, what="delivered")
        time.sleep(5)
        uid = send_phantom(tmp_path, node, SMALL_CT, "ct2")
        poll(lambda: node.status()["jobs"]["delivered"] == 2, 120, what="delivered")
        study = httpx.get(f"{node.web_url}/api/v1/studies/{uid}", timeout=10).json()
        for e in study["timeline"]:
            print(e["event"], e["since_previous_s"], e["detail"])
        
