"""Jobs through a running node's API: a CT analyzer rule, a tiny VLM for asks, phantom studies
sent with dcmtk storescu, jobs read back from ``/api/v1/jobs``."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from pydicom.uid import generate_uid

from tests.integration.conftest import MednodeNode
from tests.models import build_tiny_qwen2_vl
from tests.peers import storescu
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series

TOKEN = "node-jobs-test-token-5521"
SMALL_CT = PhantomGeometry(rows=128, columns=128, pixel_spacing_mm=(3.2, 3.2), slice_spacing_mm=10.0,
                           num_slices=20)


@pytest.fixture(scope="module")
def tiny_qwen2_vl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp("tiny-qwen2-vl"))


def node_config(tmp_path: Path, model_dir: Path, destinations: list[str] | None = None) -> Path:
    """A CT analyzer rule on every CT, and a tiny VLM for asks."""
    rule = {"name": "ct", "match": {"modality": "CT"}, "tasks": ["ct_analysis"], "destinations": destinations or []}
    config = {
        "models": {"vlm": {"path": str(model_dir), "family": "qwen2_vl", "max_new_tokens": 8,
                           "slices_per_series": 1, "device": "cpu"}},
        "rules": [rule],
    }
    path = tmp_path / "mednode.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def api(node: MednodeNode) -> httpx.Client:
    return httpx.Client(base_url=node.web_url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


def when(value: str | None) -> datetime | None:
    if value is None:
        return None
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def study_job(client: httpx.Client, study_uid: str, state: str | None = None) -> dict[str, Any] | None:
    """The study's routed job (not an ask), when it is in ``state`` (any state when None)."""
    rows = [j for j in client.get("/api/v1/jobs", params={"study": study_uid}).json() if not j["on_demand"]]
    if len(rows) == 1 and (state is None or rows[0]["state"] == state):
        return dict(rows[0])
    return None


def job(client: httpx.Client, job_id: int) -> dict[str, Any]:
    answer = client.get(f"/api/v1/jobs/{job_id}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def send_phantom(tmp_path: Path, node: MednodeNode, geometry: PhantomGeometry, name: str) -> str:
    study_uid = generate_uid()
    files = write_series(make_ct_phantom(geometry=geometry, study_instance_uid=study_uid), tmp_path / name)
    sent = storescu("127.0.0.1", node.dicom_port, [tmp_path / name], called=node.ae_title, extra=["+sd"])
    assert sent.all_ok and len(sent.statuses) == len(files), sent.describe()
    return study_uid
