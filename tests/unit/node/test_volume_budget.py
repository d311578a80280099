"""Volume jobs of one worker wait for their memory instead of holding more than the budget."""

from __future__ import annotations

import threading
import time

import pytest

from node.volume_budget import VolumeBudget, process_budget


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
    # 60 held: the second (60) must wait; the third (10) would fit but arrived later
    second = threading.Thread(target=job, args=("second", 60))
    second.start()
    time.sleep(0.1)
    third = threading.Thread(target=job, args=("third", 10))
    third.start()
    time.sleep(0.1)
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
