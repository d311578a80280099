"""The Celery application: three queues, task messages that carry only ids.

``inference`` holds GPU/CPU-heavy jobs, ``delivery`` holds C-STORE sends, so a slow PACS never
holds up the model and a long inference never delays sending finished results.
``inference.urgent`` holds jobs at priority :data:`URGENT_PRIORITY` or above (on-demand asks, STAT
rules) and is consumed by a worker of its own: message priorities alone cannot start an urgent job
while a long one holds the only inference worker, and kombu's SQLAlchemy transport (the embedded
default) ignores them altogether.
"""

from __future__ import annotations

from celery import Celery
from kombu import Queue

from node.config import Settings

INFERENCE_QUEUE = "inference"
DELIVERY_QUEUE = "delivery"
URGENT_QUEUE = "inference.urgent"
#: Jobs at this priority (0–9) or above go to :data:`URGENT_QUEUE`.
URGENT_PRIORITY = 8
#: What ``mednode worker`` consumes without ``--queues``: everything, urgent first.
ALL_QUEUES = (URGENT_QUEUE, INFERENCE_QUEUE, DELIVERY_QUEUE)

app = Celery("mednode", include=["node.tasks"])


def inference_queue(priority: int) -> str:
    """The queue of a job at ``priority``: the urgent one from :data:`URGENT_PRIORITY` up.

    Every path that enqueues a job (routing, asks, retries, priority changes, the sweep) goes
    through :func:`node.jobs.enqueue_job`, which asks this, so a re-enqueued job keeps its queue.
    """
    return URGENT_QUEUE if priority >= URGENT_PRIORITY else INFERENCE_QUEUE


def configure_celery(settings: Settings) -> Celery:
    """Point the module-level app at the configured broker with mednode's queue policy."""
    broker = settings.broker
    if broker.startswith("sqla+"):
        # kombu's SQLAlchemy transport polls: 0.2 s added up to 0.2 s to every hop, 0.05 s had
        # each idle worker use 2.6 % of a core (docs/BENCHMARKS.md). Its consumers are woken when
        # a message is committed instead, and poll once a second as a safety net.
        from node import embedded_broker

        embedded_broker.install()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    max_priority = 9
    app.conf.update(
        broker_url=broker,
        broker_connection_retry_on_startup=True,
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=INFERENCE_QUEUE,
        task_queues=[
            Queue(URGENT_QUEUE, queue_arguments={"x-max-priority": max_priority}),
            Queue(INFERENCE_QUEUE, queue_arguments={"x-max-priority": max_priority}),
            Queue(DELIVERY_QUEUE, queue_arguments={"x-max-priority": max_priority}),
        ],
        task_routes={
            "mednode.run_job": {"queue": INFERENCE_QUEUE},  # enqueue_job names the queue per priority
            "mednode.deliver": {"queue": DELIVERY_QUEUE},
        },
        # Redis: the visibility timeout must outlast the longest job, or it is redelivered mid-run
        broker_transport_options={"visibility_timeout": 6 * 3600}
        if broker.startswith(("redis", "rediss"))
        else {},
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app
