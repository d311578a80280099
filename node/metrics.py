"""Prometheus metrics of the node (served at ``/metrics``).

``mednode serve`` and ``mednode worker`` write these to the shared multiprocess directory
(:mod:`node.multiprocess_metrics`), so the web process serves the workers' job, stage, delivery and
model-load observations too; a process that imports this module before that is set up (tests in
one process) reports its own. The job and queue gauges are read from the database on each scrape
(:mod:`node.web.collector`). A Gauge added here needs a ``multiprocess_mode`` (e.g.
``"livesum"``): the web process sums every process's file.
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

INSTANCES_RECEIVED = Counter(
    "mednode_instances_received_total", "Instances received by C-STORE", ["outcome"]
)
BYTES_RECEIVED = Counter("mednode_bytes_received_total", "Bytes of instances received")
STORE_FAILURES = Counter(
    "mednode_store_failures_total", "C-STORE requests and STOW-RS instances answered with a failure status",
    ["status"]
)
STUDIES_COMPLETED = Counter("mednode_studies_completed_total", "Studies that became complete")
JOB_DURATION = Histogram(
    "mednode_job_duration_seconds",
    "Wall time of a job's inference stage",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800),
)
STAGE_DURATION = Histogram(
    "mednode_stage_duration_seconds",
    "Wall time of pipeline stages",
    ["stage"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
VOLUME_PRELOADS = Counter(
    "mednode_volume_preloads_total",
    "Series read ahead by an idle worker while their study was quiet (node.preloaded), by outcome: "
    "read, skipped (worker busy, study complete, too large), stopped (another job started), "
    "failed; then used (a job took it), discarded (another job started) or expired (never taken)",
    ["outcome"],
)
DELIVERY_FAILURES = Counter(
    "mednode_delivery_failures_total", "Failed C-STORE and STOW-RS attempts to destinations"
)
MODEL_LOAD_SECONDS = Histogram(
    "mednode_model_load_seconds", "Time to load a model into a worker", ["model"]
)
VLM_BATCH_SIZE = Histogram(
    "mednode_vlm_batch_size",
    "Prompts per in-process generate call (from every job the worker runs at once)",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64),
)
VLM_BATCH_JOBS = Histogram(
    "mednode_vlm_batch_jobs",
    "Jobs whose prompts shared one in-process generate call",
    buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32),
)
DELIVERY_DURATION = Histogram(
    "mednode_delivery_duration_seconds",
    "Wall time of one delivery attempt (association, C-STORE, release) by outcome",
    ["outcome"],  # delivered, retry (a transient failure), failed (given up)
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)
STUDY_CLOCK = Histogram(
    "mednode_study_clock_seconds",
    "Where the time from a study's last instance to its results in the PACS goes, by stage "
    "(node.clock.STAGES: last instance to complete, complete to queued, queued to started, load, "
    "model, write, store, delivery)",
    ["stage"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300),
)
