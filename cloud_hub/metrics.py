"""Prometheus metrics of the hub, on a registry owned by the app (no module globals).

Two kinds:

* **per replica** (sum them across replicas): requests by route, method and status, their
  latency, pushed records by outcome, conflict resolutions made through this replica's API,
  requests answered 503 by cause, and this replica's database pool;
* **fleet-wide**, read from the database at scrape time by :class:`StoreCollector` (the same
  on every replica: take ``max`` across replicas): enrolled sites, conflicts opened and
  resolved, and the change-feed lag. When the database does not answer, only
  ``hub_database_up 0`` is reported for them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy.pool import QueuePool

from cloud_hub.store import HubStore

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class HubMetrics:
    registry: CollectorRegistry
    requests: Counter
    request_seconds: Histogram
    push_records: Counter
    conflict_resolutions: Counter
    unavailable: Counter


class StoreCollector(Collector):
    """The database pool of this replica and the fleet-wide figures, read when scraped
    (the scrape runs in a worker thread: these are blocking queries)."""

    def __init__(
        self, store: Callable[[], HubStore | None], *, pool_limit: int, timeout_s: float
    ) -> None:
        self._store = store
        self._pool_limit = pool_limit
        self._timeout_s = timeout_s

    def collect(self) -> Iterator[Metric]:
        store = self._store()
        if store is None:  # not started yet
            return
        pool = store.engine.pool
        in_use = GaugeMetricFamily(
            "hub_db_pool_connections",
            "This replica's database connections, by state (in_use: checked out by a request)",
            labels=["state"],
        )
        if isinstance(pool, QueuePool):
            in_use.add_metric(["in_use"], pool.checkedout())
            in_use.add_metric(["idle"], pool.checkedin())
        yield in_use
        yield GaugeMetricFamily(
            "hub_db_pool_limit",
            "Most connections this replica opens (pool size + overflow)",
            value=self._pool_limit,
        )
        try:
            stats = store.fleet_stats(timeout_s=self._timeout_s)
        except Exception:  # the scrape still answers: the failure is a metric, details logged
            log.warning("metrics: fleet figures unavailable", exc_info=True)
            yield GaugeMetricFamily("hub_database_up", "1 if the database answered", value=0)
            return
        yield GaugeMetricFamily("hub_database_up", "1 if the database answered", value=1)
        yield GaugeMetricFamily("hub_sites", "Enrolled sites (fleet-wide)", value=stats.sites)
        yield CounterMetricFamily(
            "hub_conflicts_opened",
            "Conflicts queued for manual review (fleet-wide)",
            value=stats.conflicts_opened,
        )
        yield CounterMetricFamily(
            "hub_conflicts_resolved",
            "Queued conflicts resolved (fleet-wide, by API or CLI)",
            value=stats.conflicts_resolved,
        )
        yield GaugeMetricFamily(
            "hub_feed_pending_changes",
            "Change-feed entries not yet applied by their site, summed over sites",
            value=stats.feed_pending,
        )
        yield GaugeMetricFamily(
            "hub_feed_max_pending_changes",
            "Change-feed entries not yet applied by the site furthest behind",
            value=stats.feed_max_pending,
        )
        yield GaugeMetricFamily(
            "hub_feed_sites_behind",
            "Sites with change-feed entries they have not applied",
            value=stats.sites_behind,
        )
        yield GaugeMetricFamily(
            "hub_feed_oldest_pending_seconds",
            "Age of the oldest change-feed entry a site has not applied (0: none)",
            value=stats.feed_oldest_s,
        )


def create_metrics(
    store: Callable[[], HubStore | None], *, pool_limit: int, timeout_s: float
) -> HubMetrics:
    """Every metric of the hub on a new registry; ``store`` gives the app's store once it
    is open (None before)."""
    reg = CollectorRegistry()
    reg.register(StoreCollector(store, pool_limit=pool_limit, timeout_s=timeout_s))
    return HubMetrics(
        registry=reg,
        requests=Counter(
            "hub_http_requests",
            "Requests by route (the path pattern), method and status",
            ["route", "method", "status"],
            registry=reg,
        ),
        request_seconds=Histogram(
            "hub_http_request_seconds",
            "Time from request received to response ready, by route",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=reg,
        ),
        push_records=Counter(
            "hub_push_records",
            "Pushed records by outcome (applied, duplicate, conflict, rejected)",
            ["outcome"],
            registry=reg,
        ),
        conflict_resolutions=Counter(
            "hub_conflict_resolutions",
            "Conflicts resolved through this replica's API, by the version kept (edge, cloud)",
            ["take"],
            registry=reg,
        ),
        unavailable=Counter(
            "hub_unavailable",
            "Requests answered 503, by cause (database, db_pool_timeout, blob_store)",
            ["cause"],
            registry=reg,
        ),
    )
