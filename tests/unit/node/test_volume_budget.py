"""Volume jobs of one worker wait for their memory instead of holding more than the budget."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from node.volume_budget import VolumeBudget, memory_limit_bytes, process_budget, resident_bytes


def _until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_reservations_beyond_the_limit_wait_and_go_in_arrival_order() -> None:
    budget = VolumeBudget(limit_bytes=100)
    order: list[str] = []
    peak = [0]
    first_in = threading.Event()
    release_first = threading.Event()

    def job(name: str, nbytes: int, hold: threading.Event | None = None) -> None:
        with budget.reserve(nbytes, name):
            order.append(name)
            peak[0] = max(peak[0], budget.held_bytes)
            if hold is not None:
                first_in.set()
                hold.wait(5)

    first = threading.Thread(target=job, args=("first", 60, release_first))
    first.start()
    assert first_in.wait(5)
    # 60 held: the second (95) must wait; the third (10) would fit beside the first but arrived
    # later, and does not fit beside the second, so the order of the appends is the order of grants
    second = threading.Thread(target=job, args=("second", 95))
    second.start()
    _until(lambda: budget.waiting == 1)
    third = threading.Thread(target=job, args=("third", 10))
    third.start()
    _until(lambda: budget.waiting == 2)
    time.sleep(0.05)  # a third let through out of order would have appended by now
    assert order == ["first"]
    release_first.set()
    for thread in (first, second, third):
        thread.join(5)
    assert order == ["first", "second", "third"]
    assert peak[0] <= 100
    assert budget.held_bytes == 0


def test_a_job_larger_than_the_budget_runs_alone() -> None:
    budget = VolumeBudget(limit_bytes=100)
    with budget.reserve(500, "huge") as waited_s:
        assert waited_s < 1
        assert budget.held_bytes == 100


def test_no_limit_never_waits_and_a_failed_job_gives_its_share_back() -> None:
    with VolumeBudget(None).reserve(10**12, "any") as waited_s:
        assert waited_s == 0.0
    budget = VolumeBudget(limit_bytes=100)
    with pytest.raises(RuntimeError), budget.reserve(80, "failing"):
        raise RuntimeError("model crashed")
    assert budget.held_bytes == 0


def test_the_process_budget_follows_the_configured_limit() -> None:
    assert process_budget(100) is process_budget(100)
    assert process_budget(200).limit_bytes == 200


def _system(root: Path, cgroup: str, files: dict[str, str], mem_total_kb: int = 24_000_000) -> Path:
    """A ``/proc`` and ``/sys`` tree as a machine shows them (only what the limit reads)."""
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/meminfo").write_text(f"MemTotal:       {mem_total_kb} kB\nMemFree:        1000 kB\n")
    (root / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        (root / "sys/fs/cgroup" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "sys/fs/cgroup" / name).write_text(text + "\n")
    return root


def test_the_memory_limit_is_the_machine_or_the_tightest_control_group(tmp_path: Path) -> None:
    gib = 1024**3
    # cgroup v2: a container's group under a parent with a tighter limit; "max" is no limit
    v2 = _system(tmp_path / "v2", "0::/kubepods/pod1/box\n", {
        "memory.max": "max", "kubepods/memory.max": "max", "kubepods/pod1/memory.max": str(6 * gib),
        "kubepods/pod1/box/memory.max": str(8 * gib)})
    assert memory_limit_bytes(v2) == 6 * gib
    # cgroup v1 (and a hybrid machine's empty unified line): "no limit" is written as ~2**63
    v1 = _system(tmp_path / "v1", "4:memory:/process_api/abc\n0::/\n", {
        "memory/memory.limit_in_bytes": "9223372036854771712",
        "memory/process_api/abc/memory.limit_in_bytes": str(3 * gib)})
    assert memory_limit_bytes(v1) == 3 * gib
    unlimited = _system(tmp_path / "none", "4:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712"},
                        mem_total_kb=16 * 1024 * 1024)
    assert memory_limit_bytes(unlimited) == 16 * gib
    assert memory_limit_bytes(tmp_path / "nothing") is None


def test_this_machine_has_a_memory_limit_above_what_this_process_holds() -> None:
    limit = memory_limit_bytes()
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        total = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1]) * 1024
    assert limit is not None and resident_bytes() < limit <= total


def _received_ct_job(tmp_path: Path, **settings_kwargs: object):  # type: ignore[no-untyped-def]
    from datetime import timedelta

    from node.config import load_settings
    from node.context import NodeContext
    from storage.db import upgrade
    from storage.models import utcnow
    from tests.received import receive_and_complete
    from tests.shared_data import SHARED_DICOM

    series = SHARED_DICOM / "ct" / "dcmqi_ct3slice"
    if not series.is_dir():
        pytest.skip(f"sample series {series} is missing")
    settings = load_settings(data_dir=tmp_path / "var", quiet_period_s=1,
                             destinations={"pacs": "PACS@127.0.0.1:104"},
                             rules=[{"name": "ct", "match": {"modality": "CT"}, "tasks": ["ct_analysis"],
                                     "destinations": ["pacs"]}], **settings_kwargs)
    ctx = NodeContext.create(settings)
    upgrade(ctx.engine)
    now = utcnow() - timedelta(hours=1)
    return ctx, receive_and_complete(ctx, (p.read_bytes() for p in sorted(series.glob("*.dcm"))), now)


def test_a_series_the_worker_cannot_hold_fails_its_job_before_loading(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A worker whose memory (machine or container) is a little above what it holds already:
    the 3-slice CT's job (2 × 1.5 MB estimated) fails with the reason, nothing loaded, nothing
    delivered, and the budget is free."""
    from node import pipeline
    from storage.models import Job, JobState

    ctx, job_id = _received_ct_job(tmp_path)
    try:
        monkeypatch.setattr(pipeline, "memory_limit_bytes", lambda: resident_bytes() + 1024 * 1024)
        monkeypatch.setattr(pipeline, "load_volume", lambda *a, **k: pytest.fail("the volume was loaded"))
        assert pipeline.run_job(ctx, job_id) == []
        with ctx.sessions() as session:
            job = session.get(Job, job_id)
            assert job is not None and job.state == JobState.FAILED
            assert "needs about 3 MB to process (2× its 1 MB of int16 pixels)" in (job.reason or "")
            assert "worker with more memory" in (job.reason or "")
        assert pipeline.volume_budget(ctx).held_bytes == 0
    finally:
        ctx.close()


def test_a_ct_job_waits_for_the_budget_before_loading_its_volume(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from node import pipeline

    ctx, job_id = _received_ct_job(tmp_path, volume_memory_budget_mb=1)
    try:
        loaded = threading.Event()
        load_volume = pipeline.load_volume

        def recording_load(*args, **kwargs):  # type: ignore[no-untyped-def]
            loaded.set()
            return load_volume(*args, **kwargs)

        monkeypatch.setattr(pipeline, "load_volume", recording_load)
        deliveries: list[int] = []
        budget = pipeline.volume_budget(ctx)
        with budget.reserve(1, "another job"):
            worker = threading.Thread(target=lambda: deliveries.extend(pipeline.run_job(ctx, job_id)))
            worker.start()
            assert not loaded.wait(1.0), "the job loaded its volume while the budget was held"
        worker.join(60)
        assert loaded.is_set() and not worker.is_alive()
        assert len(deliveries) == 2  # SEG and SR, each to the PACS
        assert budget.held_bytes == 0
    finally:
        ctx.close()
