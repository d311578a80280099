"""Jobs that a worker runs at once (its job threads) share one loaded model and its batches.

Four jobs go through the node's VLM stage from four threads at once, as the inference worker's
thread pool runs them: the model loads once (``mednode_model_load_seconds``) and the prompts of
several jobs share a ``generate`` call (``mednode_vlm_batch_size`` / ``mednode_vlm_batch_jobs``).
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from inference.tasks import TaskSpec
from inference.vlm import clear_vlm_cache
from inference.vlm.loader import loaded_models
from inference.vlm.runtime import VLM
from node.config import VLMSettings
from node.vlm_stage import load_model, read_series, run_vlm_tasks
from tests.models import tiny_vlm_dirs  # noqa: F401  (session fixture)
from tests.shared_data import SHARED_DICOM

XR = SHARED_DICOM / "xr"
JOBS = 4


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_concurrent_jobs_load_the_model_once_and_share_its_batches(
    tiny_vlm_dirs, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
) -> None:
    clear_vlm_cache()
    settings = VLMSettings(path=tiny_vlm_dirs["gemma3"], family="gemma3", device="cpu", max_new_tokens=6,
                           batch_size=8, name="shared-tiny-gemma3")
    series = read_series({"s": [str(XR / "highdicom_dx_thorax.dcm")]}, lambda p: Path(p))
    # hold the first job's generate call until every other job's prompts wait in the queue
    real = VLM._generate
    entered, release = threading.Event(), threading.Event()

    def held(self: VLM, units):  # type: ignore[no-untyped-def]
        if not entered.is_set():
            entered.set()
            assert release.wait(60)
        return real(self, units)

    monkeypatch.setattr(VLM, "_generate", held)
    loads_before = sample("mednode_model_load_seconds_count", model="shared-tiny-gemma3")
    batches_before = sample("mednode_vlm_batch_size_count")
    shared_before = sample("mednode_vlm_batch_jobs_sum")
    outputs: list[object] = []
    errors: list[BaseException] = []

    def job(i: int) -> None:
        try:
            outputs.append(run_vlm_tasks(settings, series, [TaskSpec(kind="vqa", questions=(f"Question {i}?",))],
                                         job_key=f"1.2.3/{i}/shared"))
        except BaseException as exc:  # noqa: BLE001 (re-raised below)
            errors.append(exc)

    # the jobs' threads ask for the model at the same moment: one load, one object
    barrier, got = threading.Barrier(JOBS), []
    loaders = [threading.Thread(target=lambda: (barrier.wait(), got.append(load_model(settings))))
               for _ in range(JOBS)]
    for thread in loaders:
        thread.start()
    for thread in loaders:
        thread.join(120)
    assert len(got) == JOBS and len({id(v) for v in got}) == 1

    threads = [threading.Thread(target=job, args=(i,)) for i in range(JOBS)]
    threads[0].start()  # its generate call is held
    assert entered.wait(120), "no job reached generate"
    for thread in threads[1:]:
        thread.start()
    vlm = load_model(settings)  # loaded by now: the same object the jobs use
    for _ in range(1200):
        if vlm.generation_queue().pending() >= JOBS - 1:
            break
        threading.Event().wait(0.05)
    release.set()
    for thread in threads:
        thread.join(120)
    assert not errors, errors
    assert len(outputs) == JOBS and all(len(o) == 1 for o in outputs)

    assert [m.name for m in loaded_models()] == ["shared-tiny-gemma3"]
    assert sample("mednode_model_load_seconds_count", model="shared-tiny-gemma3") - loads_before == 1
    # one call for the first job, one for the three that waited together
    assert sample("mednode_vlm_batch_size_count") - batches_before == 2
    assert sample("mednode_vlm_batch_jobs_sum") - shared_before == JOBS
    assert sample("mednode_vlm_batch_jobs_bucket", le="1.0") < sample("mednode_vlm_batch_jobs_count")
    clear_vlm_cache()
