"""The study page lines result versions up side by side: a late slice makes v2, v1 is superseded
and its deliveries that had not gone out are shown cancelled, with the reason."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from sqlalchemy import select

from storage.models import Delivery, DeliveryState, Result
from tests.unit.web.conftest import WebNode


def _uids(node: WebNode, job_id: int) -> dict[str, str]:
    with node.ctx.sessions() as session:
        return {r.kind: r.sop_instance_uid for r in session.scalars(select(Result).where(Result.job_pk == job_id))}


def test_study_page_shows_result_versions_side_by_side(web_node_factory: Callable[..., WebNode],
                                                       ct_files: list[Path]) -> None:
    node = web_node_factory(destination="PACS@127.0.0.1:104")  # never reached: deliveries stay pending
    study_uid = node.ingest(ct_files[:2])
    [v1] = node.complete()
    node.run(v1)
    page = node.client.get(f"/studies/{study_uid}").text
    assert "Result versions" not in page  # one version: nothing to compare

    node.ingest(ct_files[2:])
    [v2] = node.complete()
    node.run(v2)
    with node.ctx.sessions() as session:
        states = {d.result.job_pk: d.state for d in session.scalars(select(Delivery))}
    assert states == {v1: DeliveryState.CANCELLED, v2: DeliveryState.PENDING}

    page = node.client.get(f"/studies/{study_uid}").text
    section = page[page.index("Result versions"):page.index("Jobs and results")]
    head = section[section.index("<thead>"):section.index("</thead>")]
    assert re.search(rf"v1</a> · job {v1} .*superseded.*v2</a> · job {v2} .*current", head, re.DOTALL)
    rows = {m[0]: m[1] for m in re.findall(r"<tr><td>(SEG|SR)</td>(.*?)</tr>", section, re.DOTALL)}
    assert set(rows) == {"SEG", "SR"}
    old, new = _uids(node, v1), _uids(node, v2)
    for kind in ("seg", "sr"):
        cells = rows[kind.upper()].split("</td>")
        assert old[kind] in cells[0] and new[kind] in cells[1]
        assert "cancelled" in cells[0] and f"(job {v2}) replaces this one" in cells[0]
        assert "pending" in cells[1] and "cancelled" not in cells[1]
