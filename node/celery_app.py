"""The Celery application: the queues, task messages that carry only ids.

``inference`` holds GPU/CPU-heavy jobs, ``delivery`` holds C-STORE sends, so a slow PACS never
holds up the model and a long inference never delays sending finished results.
``inference.urgent`` holds jobs at priority :data:`URGENT_PRIORITY` or above (on-demand asks, STAT
rules) and is consumed by a worker of its own: message priorities alone cannot start an urgent job
while a long one holds the only inference worker, and kombu's SQLAlchemy transport (the embedded
default) ignores them altogether.

A job that needs a model goes to a queue named for the models it needs (:func:`job_queue`):
``inference.vlm``, ``inference.monai.<bundle>``, ``inference.monai.spleen+vlm``, each with its
``.urgent`` twin; ``inference`` keeps the jobs no model runs (the built-in analyzer). A worker
consumes only the queues of the models it holds (:func:`worker_queues`), so on several hosts a
job never waits on, or fails at, a worker without its model.
"""

from __future__ import annotations

from collections.abc import Iterable

from celery import Celery
from kombu import Queue

from node.config import Settings, plan_tasks

INFERENCE_QUEUE = "inference"
DELIVERY_QUEUE = "delivery"
URGENT_QUEUE = "inference.urgent"
#: Jobs at this priority (0–9) or above go to :data:`URGENT_QUEUE`.
URGENT_PRIORITY = 8
#: What ``mednode worker`` consumes without ``--queues``: everything, urgent first (the inference
#: names stand for the queues of every model the worker holds: :func:`worker_queues`).
ALL_QUEUES = (URGENT_QUEUE, INFERENCE_QUEUE, DELIVERY_QUEUE)
URGENT_SUFFIX = ".urgent"
#: The longest a job may run holding its message unacknowledged (``acks_late``): the Redis
#: visibility timeout, and RabbitMQ's per-consumer ``x-consumer-timeout`` (RabbitMQ ≥ 3.12;
#: older servers apply their server-wide ``consumer_timeout``, 30 min by default: README).
LONGEST_JOB_S = 6 * 3600

app = Celery("mednode", include=["node.tasks"])


def inference_queue(priority: int, models: Iterable[str] = ()) -> str:
    """The queue of a job at ``priority`` that needs ``models`` (:func:`job_models`): named for
    them (none: ``inference``), and its urgent twin from :data:`URGENT_PRIORITY` up.

    Every path that enqueues a job (routing, asks, retries, priority changes, the sweep) goes
    through :func:`node.jobs.enqueue_job`, which asks this, so a re-enqueued job keeps its queue.
    """
    needed = sorted(set(models))
    base = f"{INFERENCE_QUEUE}.{'+'.join(needed)}" if needed else INFERENCE_QUEUE
    return base + URGENT_SUFFIX if priority >= URGENT_PRIORITY else base


def is_urgent_queue(queue: str | None) -> bool:
    return queue is not None and queue.startswith(INFERENCE_QUEUE) and queue.endswith(URGENT_SUFFIX)


def job_models(tasks: list[object]) -> frozenset[str]:
    """The models a job's tasks need: ``vlm`` for vision-language tasks, ``monai.<bundle>`` for
    each bundle; none for the built-in analyzer."""
    plan = plan_tasks(list(tasks))
    return frozenset({f"monai.{b}" for b in plan.bundles} | ({"vlm"} if plan.model_tasks else set()))


def held_models(settings: Settings) -> frozenset[str]:
    """The models a worker with ``settings`` holds (loads, or reaches through a model server)."""
    bundles = {f"monai.{name}" for name in settings.models.bundles}
    return frozenset(bundles | ({"vlm"} if settings.models.vlm is not None else set()))


def model_sets(settings: Settings) -> set[frozenset[str]]:
    """Every set of models a job may need under ``settings``: each rule's, an ask's (the VLM),
    and none."""
    sets: set[frozenset[str]] = {frozenset()}
    for rule in settings.effective_rules:
        try:
            sets.add(job_models(list(rule.tasks)))
        except ValueError:  # a malformed rule is refused by the settings' own validation
            continue
    if settings.models.vlm is not None:
        sets.add(frozenset({"vlm"}))
    return sets


def worker_queues(names: Iterable[str], settings: Settings) -> list[str]:
    """The queues a worker consumes for ``--queues names``: ``inference`` and ``inference.urgent``
    stand for every queue of their kind whose models the worker holds (:func:`held_models`);
    any other name is taken as it is (``inference.vlm`` consumes that queue only)."""
    held = held_models(settings)
    usable = sorted((m for m in model_sets(settings) if m <= held), key=lambda m: (len(m), sorted(m)))
    queues: list[str] = []
    for name in names:
        if name in (INFERENCE_QUEUE, URGENT_QUEUE):
            priority = URGENT_PRIORITY if name == URGENT_QUEUE else 0
            expanded = [inference_queue(priority, models) for models in usable]
        else:
            expanded = [name]
        queues.extend(q for q in expanded if q not in queues)
    return queues


def declared_queues(settings: Settings) -> list[str]:
    """Every queue a job or delivery may be sent to under ``settings``."""
    names = [DELIVERY_QUEUE]
    for models in sorted(model_sets(settings), key=lambda m: (len(m), sorted(m))):
        names += [inference_queue(0, models), inference_queue(URGENT_PRIORITY, models)]
    return names


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
        # RabbitMQ ≥ 3.12 closes a consumer's channel when a message stays unacknowledged past
        # its consumer timeout; a per-consumer argument lets a job run up to LONGEST_JOB_S (an
        # older server ignores it and applies its server-wide consumer_timeout)
        task_queues=[
            Queue(name, queue_arguments={"x-max-priority": max_priority},
                  consumer_arguments={"x-consumer-timeout": LONGEST_JOB_S * 1000}
                  if broker.startswith(("amqp", "pyamqp")) else None)
            for name in declared_queues(settings)
        ],
        # a worker asked for a queue of models this configuration's rules never need still
        # declares it like the others
        task_queue_max_priority=max_priority,
        task_routes={
            "mednode.run_job": {"queue": INFERENCE_QUEUE},  # enqueue_job names the queue per priority
            "mednode.deliver": {"queue": DELIVERY_QUEUE},
        },
        # Redis: the visibility timeout must outlast the longest job, or it is redelivered mid-run
        broker_transport_options={"visibility_timeout": LONGEST_JOB_S}
        if broker.startswith(("redis", "rediss"))
        else {},
        # each worker's remote-control queue (``<name>.celery.pidbox``) is exclusive to its
        # connection by default: a worker cut off from RabbitMQ that reconnects before the server
        # has given up the old connection (heartbeat timeout, ~60 s) is refused that queue
        # (405 RESOURCE_LOCKED) and Celery stops the worker ("Unrecoverable error"), as seen in
        # the multi-host test (tests/integration/test_multi_host.py). Shared, it is redeclared.
        control_queue_exclusive=False,
        # a channel closed by the server, such as RabbitMQ's consumer timeout (its server-wide
        # consumer_timeout on < 3.12) cutting a job that outlasts it, is by default an
        # "Unrecoverable error" that stops the worker once its running jobs end. Reconnect instead:
        # the job runs on (its connection's loss does not cancel it), and its message, delivered
        # again, finds the job held under a live lease and is acknowledged as done (jobs.claim)
        # — one run, one result (tests/integration/test_model_queues.py).
        broker_channel_error_retry=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        worker_hijack_root_logger=False,
        worker_send_task_events=True,
        task_send_sent_event=True,
    )
    return app


#: The first RabbitMQ release that honours ``x-consumer-timeout`` per consumer (3.12; 3.11.15
#: has it too).
PER_CONSUMER_TIMEOUT_SINCE = (3, 12)


def consumer_timeout_warning(server_version: str) -> str | None:
    """What to tell the operator about a RabbitMQ server of ``server_version``: None when it
    honours mednode's per-consumer timeout, else how to keep it from cutting long jobs."""
    try:
        parts = tuple(int(p) for p in server_version.split(".")[:3])
    except ValueError:
        return None  # not RabbitMQ's numbering: nothing known
    if parts[:2] >= PER_CONSUMER_TIMEOUT_SINCE or parts >= (3, 11, 15):
        return None
    return (
        f"RabbitMQ {server_version} ignores the per-consumer x-consumer-timeout: its server-wide "
        "consumer_timeout (30 min by default) closes a worker's channel when a job runs longer; the "
        "worker reconnects and the job runs on, but each cut drops the worker's connection. Set "
        f"consumer_timeout = {LONGEST_JOB_S * 1000} (or more) in rabbitmq.conf, or upgrade "
        "RabbitMQ to 3.12 or later"
    )


def broker_server_version(celery: Celery) -> str | None:
    """The AMQP server's version (RabbitMQ's), or None for another broker or one not reachable."""
    if not str(celery.conf.broker_url or "").startswith(("amqp", "pyamqp")):
        return None
    try:
        with celery.connection_for_read() as connection:
            connection.ensure_connection(max_retries=1)
            properties = getattr(connection.connection, "server_properties", None) or {}
    except Exception:  # noqa: BLE001 (a broker down at start is the worker's own retry loop's business)
        return None
    version = properties.get("version")
    return version.decode() if isinstance(version, bytes) else version
