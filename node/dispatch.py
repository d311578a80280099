"""Delivering one result object to one destination: the delivery queue's whole job.

Kept apart from :mod:`node.pipeline` so a delivery worker never imports the model runtime (torch,
transformers): sending files needs only the index, the store and pynetdicom.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta

from node import audit, jobs, metrics
from node.config import Destination
from node.context import NodeContext
from node.delivery import DeliveryError, Timeouts, send_files
from storage.models import Delivery, DeliveryState, utcnow

log = logging.getLogger(__name__)


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff: ``initial_s`` doubled per failed attempt, capped at ``max_s``."""
    return float(min(max_s, initial_s * 2 ** max(0, attempts - 1)))


def deliver(ctx: NodeContext, delivery_id: int) -> float | None:
    """Try one delivery; return the delay before the next attempt, or None when done."""
    with ctx.sessions() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None or delivery.state != DeliveryState.PENDING:
            return None
        destination = Destination.parse(delivery.destination)
        path = ctx.store.absolute(delivery.result.path)
        sop_uid = delivery.result.sop_instance_uid
        attempts = delivery.attempts
        kind = delivery.result.kind
        study_uid = delivery.result.job.study.study_instance_uid
        job_id = delivery.result.job_pk
    settings = ctx.settings.delivery
    timeouts = Timeouts(settings.acse_timeout_s, settings.dimse_timeout_s, settings.network_timeout_s)
    error: str | None = None
    started = time.perf_counter()
    try:
        [status] = send_files(destination, [path], calling_ae_title=ctx.settings.ae_title, timeouts=timeouts)
        ok = status.ok
        if not ok:
            error = f"status 0x{status.status:04X} {status.comment or ''}".strip() if status.status is not None else (status.comment or "no response")
    except (DeliveryError, OSError, RuntimeError) as exc:
        ok, error = False, f"{type(exc).__name__}: {exc}"
    delay = None if ok else backoff_s(attempts + 1, settings.retry_initial_s, settings.retry_max_s)
    next_at = utcnow() + timedelta(seconds=delay) if delay is not None else None
    elapsed = time.perf_counter() - started
    state = jobs.finish_delivery(
        ctx.sessions, delivery_id, ok=ok, error=error, give_up_after_s=settings.give_up_after_s,
        next_attempt_at=next_at,
    )
    outcome = "delivered" if ok else "retry" if state == DeliveryState.PENDING else "failed"
    metrics.DELIVERY_DURATION.labels(outcome=outcome).observe(elapsed)
    if ok:
        log.info("delivered %s to %s", sop_uid, destination)
        audit.record(ctx.sessions, audit.SYSTEM_ACTOR, audit.SENT, study_uid,
                     f"job {job_id}: {kind} {sop_uid} to {destination}")
        return None
    metrics.DELIVERY_FAILURES.inc()
    log.warning("delivery %d of %s to %s failed: %s", delivery_id, sop_uid, destination, error)
    return delay if state == DeliveryState.PENDING else None
