"""The destination PACS (Orthanc) is down when the results are ready and comes back on the same
port later: deliveries retry, all arrive, and no delivery is marked delivered before it is in the
PACS.

The downtime is ``MEDNODE_RELIABILITY_PACS_DOWN_S`` seconds (default 120, the issue's two
minutes; the test mostly sleeps, so it costs wall time, not CPU).
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from storage.models import DeliveryState, JobState
from tests.peers import LOOPBACK, port_accepts, storescu
from tests.phantom import PhantomGeometry, make_ct_phantom, write_series
from tests.reliability.conftest import NodeRunFactory, poll

pytestmark = pytest.mark.integration

DOWN_S = float(os.environ.get("MEDNODE_RELIABILITY_PACS_DOWN_S", "120"))
GEOMETRY = PhantomGeometry(rows=96, columns=96, pixel_spacing_mm=(3.2, 3.2), slice_spacing_mm=10.0, num_slices=18)
RETRY_MAX_S = 5.0


def test_pacs_down_then_back_on_the_same_port_gets_every_result_once(
    node_run: NodeRunFactory, orthanc_factory, tmp_path: Path, dcmtk
) -> None:  # type: ignore[no-untyped-def]
    files = write_series(make_ct_phantom(geometry=GEOMETRY), tmp_path / "ct")
    orthanc = orthanc_factory()
    port = orthanc.dicom_port
    node = node_run(destination=f"ORTHANC@{LOOPBACK}:{port}", quiet_period_s=1.0,
                    extra_env={"MEDNODE_DELIVERY__RETRY_MAX_S": str(RETRY_MAX_S)})
    node.start_serve()
    orthanc.stop()  # the PACS goes down before any result is ready
    down_at = time.monotonic()
    assert not port_accepts(port)

    sent = storescu(LOOPBACK, node.dicom_port, files, called=node.ae_title)
    assert sent.all_ok, sent.describe()

    # while it is down: attempts fail and are retried; nothing is marked delivered
    max_attempts = 0
    while time.monotonic() - down_at < DOWN_S:
        jobs, deliveries = node.jobs(), node.deliveries()
        assert all(d.state is DeliveryState.PENDING for d in deliveries), "delivered to a PACS that is down"
        assert all(j.state not in (JobState.DELIVERED, JobState.FAILED) for j in jobs), [j.reason for j in jobs]
        max_attempts = max([max_attempts, *(d.attempts for d in deliveries)])
        time.sleep(0.5)
    assert [j.state for j in node.jobs()] == [JobState.DELIVERING]
    assert max_attempts >= 2, "deliveries were not retried while the PACS was down"

    up_at = datetime.now(UTC)
    orthanc.start()  # same configuration, same ports, same storage
    poll(lambda: [j.state for j in node.jobs()] == [JobState.DELIVERED], RETRY_MAX_S * 4 + 60, 0.3,
         "the job delivered after the PACS came back", on_timeout=lambda: node.serve.log_tail())

    deliveries = node.deliveries()
    assert len(deliveries) == 2
    assert all(d.state is DeliveryState.DELIVERED and d.delivered_at >= up_at for d in deliveries)
    with node.sessions() as session:
        from storage.models import Delivery

        delivered_uids = {session.get(Delivery, d.id).result.sop_instance_uid for d in deliveries}
    in_pacs = {i["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.get("/instances?expand")}
    assert in_pacs == delivered_uids  # every delivered object is there, once, and nothing else
    print(
        f"\nRELIABILITY pacs-down: down_s={DOWN_S:.0f} attempts_while_down={max_attempts} "
        f"deliveries={len(deliveries)} delivered={sum(d.state is DeliveryState.DELIVERED for d in deliveries)} "
        f"in_pacs={len(in_pacs)} final_attempts={[d.attempts for d in deliveries]}"
    )
