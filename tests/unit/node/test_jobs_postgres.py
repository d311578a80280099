"""Job bookkeeping on PostgreSQL where several workers write at once: a job's last deliveries
finished by two workers at the same time still roll the job up to delivered."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from node import jobs
from storage.db import make_session_factory, upgrade
from storage.models import DeliveryState, JobState
from tests.unit.node.test_jobs import _job, _results, routed_job  # noqa: F401 (fixture)


@pytest.fixture
def sessions(postgres_engine: Engine) -> sessionmaker[Session]:
    """The index on PostgreSQL (the name the node tests' fixtures ask for)."""
    upgrade(postgres_engine)
    return make_session_factory(postgres_engine)


def test_the_last_deliveries_finished_at_once_roll_the_job_up(sessions: sessionmaker[Session],
                                                              routed_job: int) -> None:  # noqa: F811
    """Two workers record the job's last two deliveries at once (a threads pool took both
    messages): each writes its delivery, then looks at the job's others. Here each waits, after
    its write, until the other has written too (up to 2 s): without one finisher at a time, both
    saw the other's delivery still pending and the job stayed delivering for good."""
    jobs.claim(sessions, routed_job)
    ids = jobs.record_results(sessions, routed_job, _results(routed_job))
    assert len(ids) == 4  # two objects, two destinations
    for delivery_id in ids[:-2]:
        jobs.finish_delivery(sessions, delivery_id, ok=True, error=None, give_up_after_s=60, next_attempt_at=None)

    written = {name: threading.Event() for name in ("first", "second")}

    def after_flush(_session: Session, _context: object) -> None:
        name = threading.current_thread().name
        if name in written:
            written[name].set()
            other = "second" if name == "first" else "first"
            written[other].wait(timeout=2)

    event.listen(sessions, "after_flush", after_flush)
    states: dict[str, DeliveryState] = {}

    def finish(name: str, delivery_id: int) -> None:
        states[name] = jobs.finish_delivery(sessions, delivery_id, ok=True, error=None, give_up_after_s=60,
                                            next_attempt_at=None)

    threads = [threading.Thread(target=finish, args=(name, delivery_id), name=name)
               for name, delivery_id in zip(("first", "second"), ids[-2:], strict=True)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        event.remove(sessions, "after_flush", after_flush)
    assert states == {"first": DeliveryState.DELIVERED, "second": DeliveryState.DELIVERED}
    assert _job(sessions, routed_job).state is JobState.DELIVERED
