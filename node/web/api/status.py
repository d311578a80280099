"""``/api/v1/status``: counts by state and queue depth (``mednode status`` prints the same)."""

from __future__ import annotations

from fastapi import APIRouter

from node import jobs, queries
from node.web.deps import SessionDep
from node.web.schemas import StatusOut
from storage.models import utcnow

router = APIRouter(tags=["status"])


@router.get("/status", response_model=StatusOut)
def status(session: SessionDep) -> StatusOut:
    counts = jobs.status_counts(session)
    return StatusOut(**counts, queue_depth=queries.queue_depth(session),
                     oldest_queued_age_s=queries.oldest_queued_age_s(session, utcnow()))
