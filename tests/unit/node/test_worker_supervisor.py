"""The embedded workers ``mednode serve`` starts: which queues each consumes."""

from __future__ import annotations

from pathlib import Path

from node.celery_app import ALL_QUEUES, inference_queue
from node.service import WorkerSupervisor


def queues_of(supervisor: WorkerSupervisor) -> list[list[str]]:
    return [command[command.index("--queues") + 1].split(",") for command in supervisor.commands]


def test_by_default_the_inference_worker_takes_urgent_jobs_on_slots_of_its_own() -> None:
    """One process holds the models (urgent jobs run on its urgent slots: node.urgent_slots)."""
    supervisor = WorkerSupervisor(None, 1)
    assert queues_of(supervisor) == [["inference.urgent", "inference"], ["delivery"]]
    assert all("--config" not in c for c in supervisor.commands)


def test_an_urgent_worker_of_its_own_when_asked() -> None:
    supervisor = WorkerSupervisor(Path("/etc/mednode.yaml"), 2, urgent_worker=True)
    assert queues_of(supervisor) == [["inference"], ["inference.urgent"], ["delivery"]]
    inference, urgent, _ = supervisor.commands
    assert inference[inference.index("--concurrency") + 1] == "2"
    assert urgent[urgent.index("--concurrency") + 1] == "1"
    assert all(c[c.index("--config") + 1] == "/etc/mednode.yaml" for c in supervisor.commands)


def test_every_queue_a_job_can_go_to_is_consumed() -> None:
    routed = {inference_queue(priority) for priority in range(10)}
    for urgent_worker in (True, False):
        consumed = {q for qs in queues_of(WorkerSupervisor(None, 1, urgent_worker=urgent_worker)) for q in qs}
        assert routed | {"delivery"} == consumed == set(ALL_QUEUES)
