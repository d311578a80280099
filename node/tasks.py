"""Celery tasks: thin shells with stable names around :mod:`node.pipeline` and :mod:`node.dispatch`.

Messages carry ids only. Tasks are idempotent (every state change is conditional), so
``acks_late`` redelivery after a worker crash is safe.
"""

from __future__ import annotations

import logging
from typing import Any

from celery.worker.control import inspect_command

from node import context, dispatch, jobs, metrics
from node.celery_app import app, is_urgent_queue

log = logging.getLogger(__name__)


@app.task(name="mednode.run_job", bind=True, max_retries=None)
def run_job(self, job_id: int) -> None:  # type: ignore[no-untyped-def]
    from node import pipeline  # the model runtime: imported where jobs run, not in delivery workers

    ctx = context.current()
    queue = (self.request.delivery_info or {}).get("routing_key")
    if is_urgent_queue(queue) and jobs.lowered_below_urgent(ctx.sessions, job_id):
        log.info("job %d is no longer urgent; its message on the inference queue runs it", job_id)
        return
    try:
        delivery_ids = pipeline.run_job(ctx, job_id)
    except pipeline.TransientError as exc:
        countdown = dispatch.backoff_s(self.request.retries + 1, ctx.settings.job_retry_backoff_s, 600)
        log.warning("job %d hit a transient error; retrying in %.0f s", job_id, countdown)
        raise self.retry(exc=exc, countdown=countdown)
    for delivery_id in delivery_ids:
        jobs.enqueue_delivery(ctx.sessions, delivery_id, attempts=0)


@app.task(name="mednode.preload_volume")
def preload_volume(study_uid: str, series_uids: list[str], modalities: list[str], due_in_s: float = 0.0,
                   while_receiving: bool = False) -> None:
    """Read a quiet (or, ``while_receiving``, a still arriving) study's series ahead of its job
    (:mod:`node.preloaded`), if this worker is idle."""
    from node import pipeline  # the model runtime: imported where jobs run, not in delivery workers

    ctx = context.current()
    try:
        outcome = pipeline.preload_series(ctx, study_uid, series_uids, tuple(modalities), due_in_s,
                                          while_receiving=while_receiving)
    except Exception as exc:  # noqa: BLE001 (boundary: only a guess; the job reads the series itself)
        metrics.VOLUME_PRELOADS.labels(outcome="failed").inc()
        log.warning("read-ahead of study %s failed (%s); its job reads the series", study_uid,
                    type(exc).__name__)
        return
    if outcome != "read":
        log.info("read-ahead of study %s: %s", study_uid, outcome)


@app.task(name="mednode.deliver")
def deliver(delivery_id: int, attempts: int | None = None) -> None:
    ctx = context.current()
    # the job's other objects for the same destination go over the same association
    for retry_id, delay, tried in dispatch.deliver(ctx, delivery_id, attempts):
        jobs.enqueue_delivery(ctx.sessions, retry_id, countdown_s=delay, attempts=tried)


@inspect_command(name="mednode_info")
def mednode_info(state: Any) -> dict[str, Any]:
    """Remote-control answer for the dashboard (RabbitMQ, Redis): the queues this worker consumes
    (urgent slots included), the models it holds, their device, batch size and GPU memory
    (:func:`node.worker_status.process_info`).

    Answered by the worker's main process, which is where an inference worker's jobs run (solo
    pool, or the threads pool for several jobs at once), so it sees the model they share.
    """
    from node.worker_status import consumed_queues, process_info

    return process_info(queues=consumed_queues(state.consumer))
