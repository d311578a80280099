"""The cyclic garbage collector in mednode's long-running processes.

A process that has finished its start-up holds what it imported (modules, the DICOM standard's
tables; torch and transformers in an inference worker) until it exits. CPython's full
collections walk every tracked object: in a worker 0.3–1.3 s each, landing in whichever job stage
ran; in ``mednode serve`` 0.1–0.5 s on an association's thread while it received
(docs/BENCHMARKS.md, Latency, run 5). :func:`freeze_start_up_objects` takes those objects out of
the collector's passes once the process has started.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


#: The third collector threshold once started (CPython's default 10): a full collection is considered
#: after this many collections of the middle generation. A 300-slice job runs ~15 of those: with
#: the default, once the start-up objects were frozen, a full collection of the job's own live
#: objects (0.08–0.13 s) landed in every job's SEG write. The worker collects after each job
#: instead (:func:`collect_after_job`), so the cycles a job drops are freed when it ends.
FULL_COLLECTION_EVERY = 100


def freeze_start_up_objects(full_collection_every: int | None = FULL_COLLECTION_EVERY, **_: object) -> int:
    """Collect once, then keep every object alive now out of the cyclic garbage collector's later
    passes (:func:`gc.freeze`); return how many objects were frozen.

    An inference worker holds ~0.8 million objects from its imports (torch, transformers, monai,
    pydicom's dictionaries…). CPython runs a full collection when the objects that survived
    younger collections since the last one exceed a quarter of the long-lived ones, and each one
    walked the whole heap: 0.3–1.3 s on the 2-core machine, landing in whichever stage ran (in the
    load of every third 300-slice CT; docs/BENCHMARKS.md, latency run 5). Frozen, the start-up
    objects are never walked again, and with :data:`FULL_COLLECTION_EVERY` and
    :func:`collect_after_job` the full collections run between jobs (2–8 ms each). Reference
    cycles among the frozen objects are never collected (reference counting still frees the
    rest), which is what start-up objects are for: the modules and tables a worker holds until it
    exits.

    ``full_collection_every``: the third collector threshold to set (None keeps CPython's). A
    process that does not collect after each job of its own — ``serve`` and ``listen`` — keeps
    CPython's, so the garbage cycles of its associations are not left ten times longer.

    ``mednode serve`` and ``mednode listen`` call it once their listeners and web server are
    started. A worker calls it where it has finished starting: before Celery's worker starts (so a
    prefork pool's children inherit a frozen heap and do not copy its pages by touching every
    object's collector header), and again on ``worker_ready`` (the solo and thread pools: the
    process that runs the jobs) and ``worker_process_init`` (each prefork child), where only
    what Celery's own start-up created is left to collect. Celery passes signal arguments, which
    are ignored.
    """
    started = time.perf_counter()
    gc.collect()
    gc.freeze()
    young, middle, every = gc.get_threshold()
    if full_collection_every is not None:
        every = full_collection_every
        gc.set_threshold(young, middle, every)
    frozen = gc.get_freeze_count()
    log.info("start-up objects frozen: %d kept out of the cyclic garbage collector, a full collection "
             "considered every %d middle-generation ones (%.2f s)", frozen, every,
             time.perf_counter() - started)
    return frozen


def collect_after_job(sender: object = None, **_: object) -> None:
    """Run a full collection when a ``mednode.run_job`` task has finished (``task_postrun``): its
    deliveries are already queued, and the job's objects are gone, so the collection walks little
    (the frozen start-up objects are skipped) and no job stage waits for it."""
    if getattr(sender, "name", None) == "mednode.run_job":
        gc.collect()
