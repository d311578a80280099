"""A worker's status (model, device, batch size, GPU memory) as the Workers page gets it on the
embedded broker: a file each worker rewrites, read back while fresh."""

from __future__ import annotations

import json
import time
from pathlib import Path

from inference.vlm import VLMConfig, clear_vlm_cache, get_vlm
from node.web.system import workers_from_status_files
from node.worker_status import STALE_S, StatusFile, process_info, read_status_files
from tests.models import tiny_vlm_dirs  # noqa: F401  (session fixture)


def test_a_cpu_worker_reports_its_model_device_and_no_gpu_memory(tmp_path: Path, tiny_vlm_dirs) -> None:  # noqa: F811
    clear_vlm_cache()
    assert process_info()["model"] is None
    get_vlm(VLMConfig(path=str(tiny_vlm_dirs["gemma3"]), family="gemma3", device="cpu", batch_size=6,
                      name="status-gemma3"))
    status = StatusFile(tmp_path, "mednode-inference-1@host", queues=["inference"], concurrency=4,
                        pool="threads").start()
    try:
        out = workers_from_status_files(tmp_path)
        assert out.ok and out.error is None
        (worker,) = out.workers
        assert worker.name == "mednode-inference-1@host" and worker.queues == ["inference"]
        assert worker.model is not None and worker.model.startswith("status-gemma3 (medgemma, ")
        assert (worker.device, worker.batch_size, worker.concurrency) == ("cpu", 6, 4)
        assert worker.gpu_memory_mb is None and worker.gpu_memory_reserved_mb is None
    finally:
        status.stop()
        clear_vlm_cache()
    assert not status.path.exists()
    assert workers_from_status_files(tmp_path).workers == []


def test_stale_and_broken_status_files_are_ignored(tmp_path: Path) -> None:
    folder = tmp_path / "workers"
    folder.mkdir()
    now = time.time()
    (folder / "fresh.json").write_text(json.dumps({"name": "fresh", "updated_at": now - 1}))
    (folder / "gone.json").write_text(json.dumps({"name": "gone", "updated_at": now - STALE_S - 1}))
    (folder / "half.json").write_text('{"name": ')
    assert list(read_status_files(tmp_path, now=now)) == ["fresh"]
