"""Prometheus gauges read from the index on each scrape: jobs, studies and deliveries by state,
queue depth, age of the oldest queued job.

The database is the truth about the queue, so these gauges are computed at scrape time (a custom
collector) instead of being kept up to date by the processes that change states.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from node import jobs, queries
from storage.models import utcnow

log = logging.getLogger(__name__)


class IndexCollector(Collector):
    """Gauges from the index, computed on each scrape with one short read transaction."""

    def __init__(self, sessions: Callable[[], Session]) -> None:
        self._sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        up = GaugeMetricFamily("mednode_index_up", "1 when the index database answered this scrape")
        try:
            with self._sessions() as session:
                counts = jobs.status_counts(session)
                depth = queries.queue_depth(session)
                oldest = queries.oldest_queued_age_s(session, utcnow())
                arrivals = queries.arrival_counts(session)
        except SQLAlchemyError as exc:
            log.warning("metrics: the index did not answer (%s)", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        for name, help_text, key in (
            ("mednode_jobs", "Jobs by state", "jobs"),
            ("mednode_studies", "Studies by state", "studies"),
            ("mednode_deliveries", "Deliveries by state", "deliveries"),
        ):
            family = GaugeMetricFamily(name, help_text, labels=["state"])
            for state, count in sorted(counts[key].items()):
                family.add_metric([state], count)
            yield family
        instances = GaugeMetricFamily("mednode_instances_stored", "Instances in the index")
        instances.add_metric([], counts["instances"])
        yield instances
        queue = GaugeMetricFamily("mednode_queue_depth",
                                  "Work waiting: queued jobs (inference), pending deliveries (delivery)",
                                  labels=["queue"])
        for name, count in depth.items():
            queue.add_metric([name], count)
        yield queue
        age = GaugeMetricFamily("mednode_oldest_queued_job_age_seconds",
                                "Seconds the oldest queued job has waited (0 when none)")
        age.add_metric([], oldest or 0.0)
        yield age
        split = GaugeMetricFamily("mednode_studies_split",
                                  "Studies completed more than once (reopened by late instances or series)")
        split.add_metric([], arrivals.split_studies)
        yield split
        late = GaugeMetricFamily("mednode_studies_late", "Studies that received an image series after completion")
        late.add_metric([], arrivals.late_studies)
        yield late
        held = GaugeMetricFamily("mednode_series_held",
                                 "Series stored without reopening their study (returned results, derived "
                                 "objects, late series no rule runs on), by origin", labels=["origin"])
        for origin, count in sorted(arrivals.held_series.items()):
            held.add_metric([origin], count)
        yield held
