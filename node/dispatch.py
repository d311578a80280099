"""Delivering a job's result objects to one destination over one association: the delivery
queue's whole job.

Kept apart from :mod:`node.pipeline` so a delivery worker never imports the model runtime (torch,
transformers): sending files needs only the index, the store and pynetdicom.
"""

from __future__ import annotations

import logging
import time
from dataclasses import astuple, dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.orm import joinedload, selectinload

from node import audit, clock, dicomweb_delivery, jobs, metrics
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
from storage.models import Delivery, DeliveryState, Job, Result, utcnow

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
    [(ok, permanent, error, _)] = attempt_all(destination, [path], calling_ae_title, timeouts)
    return ok, permanent, error


def attempt_all(destination: AnyDestination, paths: list[Path], calling_ae_title: str,
                timeouts: Timeouts) -> list[tuple[bool, bool, str | None, float]]:
    """Send ``paths`` to ``destination`` over one association; per file, in order, return
    (stored, refused for good, why not, seconds from the start of the attempt to its answer).

    A failure to associate fails every file alike; a file left unsent because the peer dropped
    the association is a transient failure.
    """
    started = time.perf_counter()
    answered: list[float] = []
    try:
        if isinstance(destination, DicomWebDestination):  # one STOW-RS request for them all
            statuses = dicomweb_delivery.send_files(destination, paths)
            answered.extend(time.perf_counter() - started for _ in statuses)
        else:
            statuses = send_files(destination, paths, calling_ae_title=calling_ae_title, timeouts=timeouts,
                                  progress=lambda _: answered.append(time.perf_counter() - started))
    except PermanentDeliveryError as exc:
        return _all(paths, False, True, f"{jobs.REFUSED_PREFIX}{destination}: {exc}", started)
    except ConfigError as exc:  # the destination's TLS files: nothing will change by itself
        return _all(paths, False, True, f"{jobs.REFUSED_PREFIX}{destination}: configuration: {exc}", started)
    except (DeliveryError, OSError, RuntimeError) as exc:
        return _all(paths, False, False, f"{type(exc).__name__}: {exc}", started)
    outcomes: list[tuple[bool, bool, str | None, float]] = []
    for status, elapsed in zip(statuses, answered, strict=True):
        if status.ok:
            outcomes.append((True, False, None, elapsed))
        elif status.outcome is Outcome.PERMANENT:
            outcomes.append((False, True, f"{jobs.REFUSED_PREFIX}{destination}: {status.describe()}", elapsed))
        else:
            outcomes.append((False, False, f"{destination}: {status.describe()}", elapsed))
    lost = f"{destination}: association lost before this object was sent"
    outcomes += _all(paths[len(statuses):], False, False, lost, started)
    return outcomes


def _all(paths: list[Path], ok: bool, permanent: bool, error: str | None,
         started: float) -> list[tuple[bool, bool, str | None, float]]:
    elapsed = time.perf_counter() - started
    return [(ok, permanent, error, elapsed) for _ in paths]


@dataclass(frozen=True)
class _Pending:
    """One claimed delivery of a batch, with what its outcome is recorded with."""

    id: int
    path: Path
    sop_instance_uid: str
    kind: str
    attempts: int


def deliver(ctx: NodeContext, delivery_id: int, attempts: int | None = None) -> list[tuple[int, float, int]]:
    """Try delivery ``delivery_id`` together with every other pending delivery of the same job to
    the same destination that is due, over one association; return (delivery id, delay before
    its next attempt, attempts so far) for each that is to be tried again.

    The others' own messages then find them tried: a message sent when its delivery had
    ``attempts`` attempts is skipped once it has more (a batch served it), or while it is taken
    (:func:`jobs.claim_delivery`). Without ``attempts`` (the sweep, a manual retry) it is tried
    whenever it is due.
    """
    with ctx.sessions() as session:
        # the delivery, its result, job and study in one query, the job's results and their
        # deliveries in two more, not one lazy load each (a fresh node's first delivery of a SEG
        # and SR: 0.044-0.054 s of lookup before, 0.031-0.039 s with it)
        delivery = session.get(Delivery, delivery_id, options=[
            joinedload(Delivery.result).joinedload(Result.job).options(
                joinedload(Job.study), selectinload(Job.results).selectinload(Result.deliveries))])
        if delivery is None or delivery.state != DeliveryState.PENDING:
            return []
        if attempts is not None and delivery.attempts != attempts:
            log.debug("delivery %d was tried with its job's other objects; message skipped", delivery_id)
            return []
        # a configured destination's options (calling AE title, timeouts, TLS) as they are now
        destination_text = delivery.destination
        destination = ctx.settings.find_destination(destination_text) or parse_destination(destination_text)
        job = delivery.result.job
        study_uid = job.study.study_instance_uid
        job_id = job.id
        job_finished_at = job.finished_at
        # the requested delivery first, then its job's other objects for the same destination
        candidates = [delivery] + sorted(
            (d for r in job.results for d in r.deliveries
             if d.destination == destination_text and d.state == DeliveryState.PENDING and d.id != delivery_id),
            key=lambda d: d.id)
        batch = [_Pending(d.id, ctx.store.absolute(d.result.path), d.result.sop_instance_uid, d.result.kind,
                          d.attempts) for d in candidates]
    settings = ctx.settings.delivery
    timeouts = Timeouts(settings.acse_timeout_s, settings.dimse_timeout_s, settings.network_timeout_s)
    if isinstance(destination, DicomWebDestination):  # connect, then one read of the answer
        longest_s = 2 * destination.dicomweb.timeout_s
    else:
        timeouts = destination_timeouts(destination, timeouts)
        longest_s = sum(astuple(timeouts))
    # one attempt at a time, however many messages name a delivery; the lease outlasts the
    # longest an attempt can take (connect, associate, one C-STORE or STOW-RS request per object)
    lease_s = 2 * longest_s * len(batch) + 60
    claimed = [p for p in batch if jobs.claim_delivery(ctx.sessions, p.id, lease_s=lease_s)]
    if not claimed:
        log.debug("delivery %d is being tried elsewhere or not due yet; skipped", delivery_id)
        return []
    outcomes = attempt_all(destination, [p.path for p in claimed], ctx.settings.ae_title, timeouts)
    retries: list[tuple[int, float, int]] = []
    for pending, (ok, permanent, error, elapsed) in zip(claimed, outcomes, strict=True):
        delay = None if ok or permanent else backoff_s(pending.attempts + 1, settings.retry_initial_s,
                                                       settings.retry_max_s)
        next_at = utcnow() + timedelta(seconds=delay) if delay is not None else None
        state = jobs.finish_delivery(
            ctx.sessions, pending.id, ok=ok, error=error, give_up_after_s=settings.give_up_after_s,
            next_attempt_at=next_at, permanent=permanent,
        )
        outcome = "delivered" if ok else "retry" if state == DeliveryState.PENDING else "failed"
        metrics.DELIVERY_DURATION.labels(outcome=outcome).observe(elapsed)
        if ok:
            clock.observe(clock.DELIVERY, clock.span_s(job_finished_at, utcnow()))
            log.info("delivered %s to %s", pending.sop_instance_uid, destination)
            audit.record(ctx.sessions, audit.SYSTEM_ACTOR, audit.SENT, study_uid,
                         f"job {job_id}: {pending.kind} {pending.sop_instance_uid} to {destination}")
            continue
        metrics.DELIVERY_FAILURES.inc()
        log.warning("delivery %d of %s to %s failed: %s", pending.id, pending.sop_instance_uid, destination, error)
        if state == DeliveryState.PENDING and delay is not None:
            retries.append((pending.id, delay, pending.attempts + 1))
    return retries
