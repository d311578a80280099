"""Delivering one result object to one destination: the delivery queue's whole job.

Kept apart from :mod:`node.pipeline` so a delivery worker never imports the model runtime (torch,
transformers): sending files needs only the index, the store and pynetdicom.
"""

from __future__ import annotations

import logging
import time
from dataclasses import astuple
from datetime import timedelta
from pathlib import Path

from node import audit, dicomweb_delivery, jobs, metrics
from node.config import AnyDestination, ConfigError, DicomWebDestination, parse_destination
from node.context import NodeContext
from node.delivery import (
    DeliveryError,
    Outcome,
    PermanentDeliveryError,
    Timeouts,
    destination_timeouts,
    send_files,
)
from storage.models import Delivery, DeliveryState, utcnow

log = logging.getLogger(__name__)


def backoff_s(attempts: int, initial_s: float, max_s: float) -> float:
    """Exponential backoff: ``initial_s`` doubled per failed attempt, capped at ``max_s``."""
    return float(min(max_s, initial_s * 2 ** max(0, attempts - 1)))


def attempt(destination: AnyDestination, path: Path, calling_ae_title: str,
             timeouts: Timeouts) -> tuple[bool, bool, str | None]:
    """Send one file to ``destination``; return (stored, refused for good, why not).

    A DIMSE destination gets a C-STORE, a DICOMweb one a STOW-RS request
    (:mod:`node.dicomweb_delivery`); both answer in the same terms. A refusal's reason starts
    ``refused by <destination>:`` (:data:`jobs.REFUSED_PREFIX`) and carries the status with the
    standard's words and the peer's comment, e.g. ``refused by PACS@10.0.0.5:104: status 0xA900
    (data set does not match SOP class): <comment>``, or ``refused by https://archive/dicom-web:
    STOW-RS … refused: HTTP 401 Unauthorized …``.
    """
    try:
        if isinstance(destination, DicomWebDestination):
            [status] = dicomweb_delivery.send_files(destination, [path])
        else:
            [status] = send_files(destination, [path], calling_ae_title=calling_ae_title, timeouts=timeouts)
    except PermanentDeliveryError as exc:
        return False, True, f"{jobs.REFUSED_PREFIX}{destination}: {exc}"
    except ConfigError as exc:  # the destination's TLS files: nothing will change by itself
        return False, True, f"{jobs.REFUSED_PREFIX}{destination}: configuration: {exc}"
    except (DeliveryError, OSError, RuntimeError) as exc:
        return False, False, f"{type(exc).__name__}: {exc}"
    if status.ok:
        return True, False, None
    if status.outcome is Outcome.PERMANENT:
        return False, True, f"{jobs.REFUSED_PREFIX}{destination}: {status.describe()}"
    return False, False, f"{destination}: {status.describe()}"


def deliver(ctx: NodeContext, delivery_id: int) -> float | None:
    """Try one delivery; return the delay before the next attempt, or None when done."""
    with ctx.sessions() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None or delivery.state != DeliveryState.PENDING:
            return None
        # a configured destination's options (calling AE title, timeouts, TLS) as they are now
        destination = ctx.settings.find_destination(delivery.destination) or parse_destination(delivery.destination)
        path = ctx.store.absolute(delivery.result.path)
        sop_uid = delivery.result.sop_instance_uid
        attempts = delivery.attempts
        kind = delivery.result.kind
        study_uid = delivery.result.job.study.study_instance_uid
        job_id = delivery.result.job_pk
    settings = ctx.settings.delivery
    timeouts = Timeouts(settings.acse_timeout_s, settings.dimse_timeout_s, settings.network_timeout_s)
    if isinstance(destination, DicomWebDestination):  # connect, then one read of the answer
        longest_s = 2 * destination.dicomweb.timeout_s
    else:
        timeouts = destination_timeouts(destination, timeouts)
        longest_s = sum(astuple(timeouts))
    # one attempt at a time, however many messages name this delivery; the lease outlasts the
    # longest an attempt can take (connect, associate, one C-STORE or STOW-RS request)
    if not jobs.claim_delivery(ctx.sessions, delivery_id, lease_s=2 * longest_s + 60):
        log.debug("delivery %d is being tried elsewhere or not due yet; skipped", delivery_id)
        return None
    started = time.perf_counter()
    ok, permanent, error = attempt(destination, path, ctx.settings.ae_title, timeouts)
    delay = None if ok or permanent else backoff_s(attempts + 1, settings.retry_initial_s, settings.retry_max_s)
    next_at = utcnow() + timedelta(seconds=delay) if delay is not None else None
    elapsed = time.perf_counter() - started
    state = jobs.finish_delivery(
        ctx.sessions, delivery_id, ok=ok, error=error, give_up_after_s=settings.give_up_after_s,
        next_attempt_at=next_at, permanent=permanent,
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
