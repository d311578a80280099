"""Job slots of an inference worker kept for urgent jobs, so one process per GPU serves both.

An inference worker runs ``worker_concurrency`` jobs as threads sharing one copy of each model
(:mod:`inference.vlm.batching`). If it consumed the urgent queues (``inference…urgent``: asks,
priority 8-9) with the same slots, an ask would wait until one of the long jobs ended; a second
worker process for urgent queues starts it at once, but loads a second copy of the model on its
first urgent VLM job. Here the inference worker consumes the urgent queues a second time, on a
channel of its own with ``urgent_slots`` more threads: the main consumer takes urgent and routine
messages while it has a free slot (prefetch = its concurrency, acknowledged late, so a full
worker takes nothing more); this one takes urgent messages only, up to ``urgent_slots`` at once,
and runs them through Celery's own request machinery (the task's strategy, its ``Request`` with
late acknowledgement, retries, events) on a thread pool of that size. The urgent job's prompts
then go into the model's next ``generate`` call first (a higher priority in the generation queue).

Celery has no per-queue concurrency (one prefetch count per consumer channel, one pool per
worker), hence a consumer bootstep (``celery.bootsteps.ConsumerStep``) with its own channel,
prefetch count and pool, sharing the worker's connection and event loop.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, bootsteps
from celery.concurrency.thread import TaskPool
from celery.worker.state import task_reserved
from kombu import Consumer
from kombu.common import QoS

log = logging.getLogger(__name__)


class _SlotConsumer:
    """The worker's consumer as a task strategy sees it, with this step's pool and prefetch count:
    requests it hands on run on the urgent slots."""

    def __init__(self, consumer: Any, pool: TaskPool, qos: QoS) -> None:
        self._consumer, self.pool, self.qos = consumer, pool, qos
        self.disable_rate_limits = True  # mednode's tasks have none; the buckets are the main pool's

    def __getattr__(self, name: str) -> Any:
        return getattr(self._consumer, name)

    def on_task_request(self, request: Any) -> None:
        request.execute_using_pool(self.pool)

    def apply_eta_task(self, request: Any) -> None:
        """A retry's countdown ended (the timer's thread): run it here, as the worker's own does."""
        task_reserved(request)
        self.on_task_request(request)
        self.qos.decrement_eventually()


def urgent_slots_step(queues: list[str], slots: int) -> type[bootsteps.ConsumerStep]:
    """A consumer bootstep running messages of ``queues`` on ``slots`` threads of their own
    (``app.steps['consumer'].add(...)`` before the worker starts)."""
    if slots < 1:
        raise ValueError(f"urgent slots must be at least 1, got {slots}")

    class UrgentSlots(bootsteps.ConsumerStep):
        """Urgent jobs on slots of their own (:mod:`node.urgent_slots`)."""

        name = "mednode urgent slots"

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.pool: TaskPool | None = None

        def get_consumers(self, channel: Any) -> list[Consumer]:
            consumer = self._consumer_of(channel)
            app: Celery = consumer.app
            qos = QoS(channel.basic_qos, slots)
            qos.update()
            if self.pool is None:  # start() runs again after a lost connection: one pool for good
                self.pool = TaskPool(limit=slots)
                self.pool.start()
            view = _SlotConsumer(consumer, self.pool, qos)
            strategies = {name: task.start_strategy(app, view) for name, task in app.tasks.items()
                          if name.startswith("mednode.")}

            def on_message(message: Any) -> None:
                name = (message.headers or {}).get("task")
                strategy = strategies.get(name)
                if strategy is None:  # not a task this worker knows: back to the queue for another
                    log.error("urgent slots: message for unknown task %r requeued", name)
                    message.reject_log_error(log, consumer.connection_errors, requeue=True)
                    return
                strategy(message, None, message.ack_log_error, message.reject_log_error, [])

            declared = consumer.app.amqp.queues
            log.info("urgent slots: %d for %s", slots, ", ".join(queues))
            return [Consumer(channel, queues=[declared[q] for q in queues], on_message=on_message,
                             accept=app.conf.accept_content, prefetch_count=slots)]

        def start(self, c: Any) -> None:
            self._consumer = c
            super().start(c)

        def _consumer_of(self, channel: Any) -> Any:
            return self._consumer

        def shutdown(self, c: Any) -> None:
            super().shutdown(c)
            if self.pool is not None:
                self.pool.stop()

    return UrgentSlots
