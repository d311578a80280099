"""Delivery to a destination that is down: retries with backoff until it comes up, or a terminal
``failed`` job with the reason once the give-up time has passed. Real ``mednode serve``, real
dcmtk storescp as the destination."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from storage.db import make_engine, make_session_factory
from storage.models import Delivery, DeliveryState, Job, JobState
from tests.integration.conftest import MednodeFactory
from tests.integration.e2e import poll
from tests.peers import LOOPBACK, StoreSCP, free_port, port_accepts, storescu
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series

GEOMETRY = PhantomGeometry(rows=96, columns=96, pixel_spacing_mm=(3.2, 3.2), slice_spacing_mm=10.0, num_slices=18)


def _phantom(tmp_path: Path) -> list[Path]:
    return write_series(make_ct_phantom(geometry=GEOMETRY), tmp_path / "phantom")


def _sessions(data_dir: Path) -> sessionmaker[Session]:
    return make_session_factory(make_engine(f"sqlite:///{data_dir / 'var' / 'mednode.db'}"))


def _snapshot(sessions: sessionmaker[Session]) -> tuple[list[Job], list[Delivery]]:
    with sessions() as session:
        return (list(session.scalars(select(Job).order_by(Job.id))),
                list(session.scalars(select(Delivery).order_by(Delivery.id))))


def test_deliveries_retry_with_backoff_until_the_destination_comes_up(
    mednode_factory: MednodeFactory, tmp_path: Path, dcmtk
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    assert not port_accepts(port)
    node = mednode_factory(destination=f"STORESCP@{LOOPBACK}:{port}", quiet_period_s=1.0,
                           extra_env={"MEDNODE_DELIVERY__RETRY_INITIAL_S": "1", "MEDNODE_DELIVERY__RETRY_MAX_S": "2"})
    sessions = _sessions(node.data_dir)
    sent = storescu(LOOPBACK, node.dicom_port, _phantom(tmp_path), called=node.ae_title)
    assert sent.all_ok, sent.describe()

    # while the destination is down: attempts pile up with growing gaps, nothing is delivered
    gaps: dict[int, float] = {}

    def retried_three_times() -> bool:
        jobs, deliveries = _snapshot(sessions)
        assert all(d.state is DeliveryState.PENDING for d in deliveries), "delivered to a closed port?"
        assert all(j.state is not JobState.DELIVERED for j in jobs)
        for d in deliveries:
            if d.attempts and d.next_attempt_at and d.last_attempt_at:
                gaps.setdefault(d.attempts, (d.next_attempt_at - d.last_attempt_at).total_seconds())
        return len(deliveries) == 2 and all(d.attempts >= 3 for d in deliveries)

    poll(retried_three_times, 90, 0.1, "three failed delivery attempts")
    jobs, deliveries = _snapshot(sessions)
    assert [j.state for j in jobs] == [JobState.DELIVERING]
    assert all(d.last_error and "association" in d.last_error.lower() for d in deliveries), \
        [d.last_error for d in deliveries]
    # 1 s, then doubled, then capped at retry_max_s
    assert [gaps[n] for n in (1, 2, 3)] == [pytest.approx(s, abs=0.5) for s in (1, 2, 2)], gaps

    up_at = datetime.now(UTC)
    receiver = StoreSCP(tmp_path / "received", port=port).start()
    try:
        poll(lambda: [j.state for j in _snapshot(sessions)[0]] == [JobState.DELIVERED], 60, 0.3, "job delivered")
        jobs, deliveries = _snapshot(sessions)
        assert all(d.state is DeliveryState.DELIVERED for d in deliveries)
        assert all(d.delivered_at is not None and d.delivered_at >= up_at for d in deliveries)
        assert all(d.attempts >= 4 and d.last_error is None for d in deliveries)
        received = {pydicom.dcmread(p).Modality for p in receiver.received()}
        assert received == {"SEG", "SR"}
    finally:
        receiver.stop()


def test_delivery_gives_up_and_fails_the_job_with_the_reason(
    mednode_factory: MednodeFactory, tmp_path: Path, dcmtk
) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    node = mednode_factory(destination=f"NOWHERE@{LOOPBACK}:{port}", quiet_period_s=1.0,
                           extra_env={"MEDNODE_DELIVERY__RETRY_INITIAL_S": "1",
                                      "MEDNODE_DELIVERY__GIVE_UP_AFTER_S": "3"})
    sessions = _sessions(node.data_dir)
    sent = storescu(LOOPBACK, node.dicom_port, _phantom(tmp_path), called=node.ae_title)
    assert sent.all_ok, sent.describe()

    poll(lambda: [j.state for j in _snapshot(sessions)[0]] == [JobState.FAILED], 90, 0.3, "job failed")

    [job], deliveries = _snapshot(sessions)
    assert job.reason is not None
    assert job.reason.startswith("delivery gave up:") and f"NOWHERE@{LOOPBACK}:{port}" in job.reason, job.reason
    assert len(deliveries) == 2
    assert all(d.state is DeliveryState.FAILED and d.attempts >= 2 and d.last_error for d in deliveries)
    assert all(d.delivered_at is None for d in deliveries)
    counts = json.loads(node.cli("status", "--json").stdout)
    assert counts["jobs"]["failed"] == 1 and counts["deliveries"]["failed"] == 2
