"""Studies that run at once in one process share ``generate`` calls, and each gets what it would
have got alone; CUDA out-of-memory halves the batch; a large checkpoint is refused on a CPU worker.

Models are tiny random-weight checkpoints of real architectures loaded through the product loader.
Concurrency is made deterministic by holding the first ``generate`` call until the other studies'
prompts are waiting in the model's queue.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import pydicom
import pytest
import torch

from inference.errors import ModelLoadError, ModelOutOfMemoryError
from inference.tasks import TaskSpec
from inference.vlm import VLMConfig, load_vlm
from inference.vlm.batching import GenerationQueue, Restart
from inference.vlm.runtime import VLM, Request
from tests.models import tiny_vlm_dirs  # noqa: F401  (session fixture)
from tests.shared_data import SHARED_DICOM

XR = SHARED_DICOM / "xr"
#: Gemma 3 (MedGemma: bidirectional attention among image tokens) and a Qwen2-VL (native
#: resolution, images of different sizes in one batch)
FAMILIES = ["gemma3", "qwen2_vl"]


def studies(vlm: VLM) -> list[Request]:
    """Three studies with prompts of different lengths and images of different sizes (left padding)."""
    cr = pydicom.dcmread(XR / "RG1_J2KI_chest_PA.dcm")
    dx = pydicom.dcmread(XR / "highdicom_dx_thorax.dcm")
    a = vlm.prepare(cr.pixel_array, photometric=cr.PhotometricInterpretation,
                    window=(float(cr.WindowCenter), float(cr.WindowWidth)))
    b = vlm.prepare(dx.pixel_array, photometric=dx.PhotometricInterpretation)
    return [
        ([a, b], TaskSpec(kind="vqa", questions=("Is there a pleural effusion?",
                                                 "Which side is the nodule on, left or right?"))),
        ([b], TaskSpec(kind="vqa", questions=("Heart?",))),
        ([a], TaskSpec(kind="classify", labels=("cardiomegaly", "consolidation", "pneumothorax"))),
    ]


def budget(tasks: list[Request], tokens: int = 10) -> list[Request]:
    """One token budget for all (only units with equal budgets share a call)."""
    return [(images, TaskSpec(kind=t.kind, questions=t.questions, labels=t.labels, max_new_tokens=tokens))
            for images, t in tasks]


class HeldGenerate:
    """Wraps ``model.generate``: the first call waits until released; records batch sizes."""

    def __init__(self, model: torch.nn.Module, *, oom_above: int | None = None) -> None:
        self.real: Callable[..., object] = model.generate  # type: ignore[assignment]
        self.entered, self.release = threading.Event(), threading.Event()
        self.sizes: list[int] = []
        self.oom_above = oom_above
        model.generate = self  # type: ignore[method-assign]

    def __call__(self, **inputs: object) -> object:
        size = int(inputs["input_ids"].shape[0])  # type: ignore[attr-defined]
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(60), "the test never released the first generate call"
        if self.oom_above is not None and size > self.oom_above:
            raise torch.OutOfMemoryError(f"CUDA out of memory (forced by the test at batch {size})")
        self.sizes.append(size)
        return self.real(**inputs)


def run_concurrently(vlm: VLM, requests: Sequence[Request], held: HeldGenerate) -> list[list[object]]:
    """Run each request from its own thread (as a worker's job threads do): the first one's first
    call is held until every other request's prompts wait in the queue, then released."""
    results: list[list[object]] = [[] for _ in requests]
    errors: list[BaseException] = []

    def job(i: int) -> None:
        try:
            results[i] = vlm.run_batch([requests[i]])[0]
        except BaseException as exc:  # noqa: BLE001 (re-raised by the test)
            errors.append(exc)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(len(requests))]
    threads[0].start()
    assert held.entered.wait(60)
    for thread in threads[1:]:
        thread.start()
    queue = vlm.generation_queue()
    expected = sum(len(vlm._units(i, *r)) for i, r in enumerate(requests[1:]))
    first_rest = len(vlm._units(0, *requests[0])) - min(len(vlm._units(0, *requests[0])), queue.max_batch)
    for _ in range(600):
        if queue.pending() >= expected + first_rest:
            break
        threading.Event().wait(0.05)
    held.release.set()
    for thread in threads:
        thread.join(120)
    if errors:
        raise errors[0]
    return results


def texts(results: Sequence[Sequence[object]]) -> list[list[str]]:
    return [[r.raw_text for r in rs] for rs in results]  # type: ignore[attr-defined]


@pytest.mark.parametrize("family", FAMILIES)
def test_concurrent_studies_share_generate_calls_and_each_gets_what_it_gets_alone(
    tiny_vlm_dirs, family: str,  # noqa: F811
) -> None:
    cfg = VLMConfig(path=str(tiny_vlm_dirs[family]), family=family, device="cpu", batch_size=8)
    alone = load_vlm(VLMConfig(path=cfg.path, family=family, device="cpu", batch_size=1))
    shared = load_vlm(cfg)
    requests = budget(studies(shared))
    expected = [alone.run_batch([r])[0] for r in requests]  # one prompt per generate call
    observed: list[tuple[int, int]] = []
    shared.batch_observer = lambda units, jobs, _s: observed.append((units, jobs))
    held = HeldGenerate(shared.model)
    got = run_concurrently(shared, requests, held)

    assert texts(got) == texts(expected)
    probabilities = [getattr(r, "probability", None) for r in got[2]]
    for p, q in zip(probabilities, [getattr(r, "probability", None) for r in expected[2]], strict=True):
        assert p == pytest.approx(q, abs=1e-4)
    # the first study's call (held) had room: when the others' 1 + 3 prompts were waiting, it
    # stopped at its first decoding step and ran again with them, all six in one call
    assert observed == [(6, 3)]
    assert held.sizes == [2, 6] and shared.generate_calls == 1
    assert shared.generation_queue().restarts == 1


def test_one_study_alone_is_chunked_as_before(tiny_vlm_dirs) -> None:  # noqa: F811
    """A single job gives the same calls as the sequential runtime did: per budget, in order."""
    vlm = load_vlm(VLMConfig(path=str(tiny_vlm_dirs["gemma3"]), family="gemma3", device="cpu", batch_size=2))
    images, _ = studies(vlm)[0]
    task = TaskSpec(kind="vqa", questions=("a?", "b b?", "c c c?"), max_new_tokens=6)
    held = HeldGenerate(vlm.model)
    held.release.set()
    vlm.run(images, [task, TaskSpec(kind="classify", labels=("x",), max_new_tokens=3)])
    assert held.sizes == [2, 1, 1]


@pytest.mark.parametrize("family", ["gemma3"])
def test_cuda_out_of_memory_halves_the_batch_and_results_stay_the_same(tiny_vlm_dirs, family: str) -> None:  # noqa: F811
    alone = load_vlm(VLMConfig(path=str(tiny_vlm_dirs[family]), family=family, device="cpu", batch_size=1))
    vlm = load_vlm(VLMConfig(path=str(tiny_vlm_dirs[family]), family=family, device="cpu", batch_size=8))
    requests = budget(studies(vlm))
    expected = [alone.run_batch([r])[0] for r in requests]
    held = HeldGenerate(vlm.model, oom_above=1)  # only one prompt at a time fits
    got = run_concurrently(vlm, requests, held)
    assert texts(got) == texts(expected)
    assert held.sizes and set(held.sizes) == {1}


def test_out_of_memory_at_batch_1_is_a_transient_error_for_that_job_only(tiny_vlm_dirs) -> None:  # noqa: F811
    vlm = load_vlm(VLMConfig(path=str(tiny_vlm_dirs["gemma3"]), family="gemma3", device="cpu", batch_size=4))
    requests = budget(studies(vlm))
    held = HeldGenerate(vlm.model, oom_above=0)  # nothing fits
    held.release.set()
    with pytest.raises(ModelOutOfMemoryError, match="retried"):
        vlm.run_batch(requests[:1])
    assert isinstance(ModelOutOfMemoryError("x"), MemoryError)
    held.oom_above = None
    assert len(vlm.run_batch(requests[1:2])[0]) == 1, "the queue keeps serving after an OOM"


def test_a_failing_unit_fails_only_its_own_job() -> None:
    def generate(units: Sequence[str]) -> list[str]:
        if "bad" in units:
            raise ValueError("this unit cannot be processed")
        return [u.upper() for u in units]

    gate, entered = threading.Event(), threading.Event()

    def slow_first(units: Sequence[str]) -> list[str]:
        if not entered.is_set():
            entered.set()
            gate.wait(10)
        return generate(units)

    queue: GenerationQueue[str, str] = GenerationQueue(slow_first, key=lambda u: 0, max_batch=8)
    out: dict[str, object] = {}

    def job(name: str, units: list[str]) -> None:
        try:
            out[name] = queue.run(units)
        except ValueError as exc:
            out[name] = exc

    first = threading.Thread(target=job, args=("first", ["a"]))
    first.start()
    assert entered.wait(10)
    threads = [threading.Thread(target=job, args=("good", ["b", "c"])),
               threading.Thread(target=job, args=("bad", ["d", "bad"]))]
    for thread in threads:
        thread.start()
    while queue.pending() < 4:
        threading.Event().wait(0.01)
    gate.set()
    for thread in [first, *threads]:
        thread.join(10)
    assert out["first"] == ["A"] and out["good"] == ["B", "C"]
    assert isinstance(out["bad"], ValueError)


def stepping(queue_ref: list[GenerationQueue[str, str]], calls: list[list[str]], *, steps: int, window: int,
             entered: threading.Event, gate: threading.Event) -> Callable[[Sequence[str]], list[str]]:
    """A ``generate`` of ``steps`` decoding steps that, as the runtime's does, stops to let waiting
    units join while fewer than ``window`` steps are done; the first call waits for ``gate``."""
    def generate(units: Sequence[str]) -> list[str]:
        calls.append(list(units))
        if not entered.is_set():
            entered.set()
            gate.wait(10)
        for step in range(steps):
            if step < window and queue_ref[0].should_restart():
                raise Restart
        return [u.upper() for u in units]
    return generate


def run_two_jobs(max_batch: int, first: list[str], second: list[str], *, window: int) -> tuple[
        list[list[str]], dict[str, list[str]], int]:
    calls: list[list[str]] = []
    entered, gate = threading.Event(), threading.Event()
    ref: list[GenerationQueue[str, str]] = []
    queue: GenerationQueue[str, str] = GenerationQueue(
        stepping(ref, calls, steps=8, window=window, entered=entered, gate=gate), key=lambda u: 0,
        max_batch=max_batch)
    ref.append(queue)
    out: dict[str, list[str]] = {}
    a = threading.Thread(target=lambda: out.__setitem__("first", queue.run(first)))
    a.start()
    assert entered.wait(10)
    b = threading.Thread(target=lambda: out.__setitem__("second", queue.run(second)))
    b.start()
    while queue.pending() < len(second):
        threading.Event().wait(0.01)
    gate.set()
    a.join(10)
    b.join(10)
    return calls, out, queue.restarts


def test_units_arriving_early_in_a_call_with_room_restart_it_with_them() -> None:
    calls, out, restarts = run_two_jobs(4, ["a"], ["b", "c"], window=2)
    assert calls == [["a"], ["a", "b", "c"]] and restarts == 1
    assert out == {"first": ["A"], "second": ["B", "C"]}


def test_a_full_call_or_one_past_its_window_is_not_restarted() -> None:
    calls, out, restarts = run_two_jobs(1, ["a"], ["b"], window=8)  # no room
    assert calls == [["a"], ["b"]] and restarts == 0 and out == {"first": ["A"], "second": ["B"]}
    calls, out, restarts = run_two_jobs(4, ["a"], ["b"], window=0)  # generate never asks
    assert calls == [["a"], ["b"]] and restarts == 0 and out == {"first": ["A"], "second": ["B"]}


def test_a_large_checkpoint_is_refused_on_a_worker_without_cuda(tiny_vlm_dirs) -> None:  # noqa: F811
    path = str(tiny_vlm_dirs["gemma3"])
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: device auto picks it")
    with pytest.raises(ModelLoadError, match="models.vlm.device: cpu"):
        load_vlm(VLMConfig(path=path, family="gemma3", cpu_max_weights_mb=0))
    assert load_vlm(VLMConfig(path=path, family="gemma3", device="cpu", cpu_max_weights_mb=0)).device == "cpu"
    assert load_vlm(VLMConfig(path=path, family="gemma3", cpu_max_weights_mb=None)).device == "cpu"


def test_an_urgent_jobs_units_go_into_the_next_call_first() -> None:
    """An ask (priority 9) queued behind a routine job's prompts rides in the next call, filled up
    with the routine prompts; each job still gets its own results."""
    gate, entered = threading.Event(), threading.Event()
    calls: list[list[str]] = []

    def generate(units: Sequence[str]) -> list[str]:
        if not entered.is_set():
            entered.set()
            gate.wait(10)
        calls.append(list(units))
        return [u.upper() for u in units]

    queue: GenerationQueue[str, str] = GenerationQueue(generate, key=lambda u: 0, max_batch=2)
    out: dict[str, list[str]] = {}
    jobs = [("running", ["r"], 5), ("routine", ["a", "b", "c"], 5), ("ask", ["q"], 9)]
    threads = [threading.Thread(target=lambda n=n, u=u, p=p: out.__setitem__(n, queue.run(u, priority=p)))
               for n, u, p in jobs]
    threads[0].start()
    assert entered.wait(10)
    threads[1].start()
    while queue.pending() < 3:
        threading.Event().wait(0.01)
    threads[2].start()
    while queue.pending() < 4:
        threading.Event().wait(0.01)
    gate.set()
    for thread in threads:
        thread.join(10)
    assert calls == [["r"], ["q", "a"], ["b", "c"]]
    assert out == {"running": ["R"], "routine": ["A", "B", "C"], "ask": ["Q"]}
