"""Job slots of an inference worker kept for urgent jobs, so one process per GPU serves both.

An inference worker runs ``worker_concurrency`` jobs as threads sharing one copy of each model
(:mod:`inference.vlm.batching`). If it consumed the urgent queues (``inference…urgent``: asks,
priority 8-9) with the same slots, an ask would wait until one of the long jobs ended; a second
worker process for urgent queues starts it at once, but loads a second copy of the model on its
first urgent VLM job. Here the inference worker's main consumer takes the routine queues only,
and a second consumer, on a channel of its own, the urgent queues, up to ``urgent_slots`` jobs at
once, run through Celery's own request machinery (the task's strategy, its ``Request`` with late
acknowledgement, retries, events) on a thread pool of that size. The urgent job's prompts then go
into the model's next ``generate`` call first (a higher priority in the generation queue).

The two consumers take disjoint queues: kombu's virtual transports (the embedded SQLAlchemy
broker, Redis) keep one message callback per queue name and connection, so a queue consumed on two
channels of one connection has its messages handed to whichever consumer registered last — an
urgent message fetched by this consumer ran on the busy main pool (seen in a test of this module).
So urgent jobs never take a routine slot, even a free one: ``urgent_slots`` is how many urgent
jobs run at once.

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
            consumer = self._consumer
            app: Celery = consumer.app
            declared = app.amqp.queues
            strategies: dict[str, Any] = {}

            def on_message(message: Any) -> None:
                name = (message.headers or {}).get("task")
                strategy = strategies.get(name)
                if strategy is None:  # not a task this worker knows: back to the queue for another
                    log.error("urgent slots: message for unknown task %r requeued", name)
                    message.reject_log_error(log, consumer.connection_errors, requeue=True)
                    return
                strategy(message, None, message.ack_log_error, message.reject_log_error, [])

            urgent = Consumer(channel, queues=[declared[q] for q in queues], on_message=on_message,
                              accept=app.conf.accept_content, prefetch_count=slots)
            qos = QoS(urgent.qos, slots)  # a retry's countdown holds a message: one more meanwhile
            if self.pool is None:  # start() runs again after a lost connection: one pool for good
                self.pool = TaskPool(limit=slots)
                self.pool.start()
            view = _SlotConsumer(consumer, self.pool, qos)
            strategies.update({name: task.start_strategy(app, view) for name, task in app.tasks.items()
                               if name.startswith("mednode.")})
            log.info("urgent slots: %d for %s", slots, ", ".join(queues))
            return [urgent]

        def start(self, c: Any) -> None:
            self._consumer = c
            super().start(c)

        def shutdown(self, c: Any) -> None:
            super().shutdown(c)
            if self.pool is not None:
                self.pool.stop()

    return UrgentSlots
