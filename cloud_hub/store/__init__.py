"""The hub's storage: SQLAlchemy Core, the same tables and migrations on SQLite (embedded
default) and PostgreSQL (production). Every query is scoped by ``site_id``: a site can read
and write only its own rows.

:class:`HubStore` is the one façade callers use; each domain lives in its own module:

* :mod:`~cloud_hub.store.schema`: tables, migrations, :func:`connect`
* :mod:`~cloud_hub.store.sites`: enrollment, authentication, site list, heartbeats
* :mod:`~cloud_hub.store.sync`: push, high-water marks, records, edits at the hub
* :mod:`~cloud_hub.store.conflicts`: the manual-review queue
* :mod:`~cloud_hub.store.releases`: model releases, assignments, staged rollouts
* :mod:`~cloud_hub.store.archive`: each site's archived objects
* :mod:`~cloud_hub.store.feed`: the change feed sites pull
* :mod:`~cloud_hub.store.stats`: the readiness query and fleet-wide figures for metrics
"""

from __future__ import annotations

from sqlalchemy.engine import Engine

from cloud_hub.store.archive import ArchiveStore
from cloud_hub.store.base import ConcurrentUpdate
from cloud_hub.store.conflicts import AlreadyResolved, ConflictStore
from cloud_hub.store.feed import FeedStore
from cloud_hub.store.releases import ReleaseStore
from cloud_hub.store.schema import SchemaTooNew, connect, migrate
from cloud_hub.store.sites import AuthError, Enrolled, SitesStore
from cloud_hub.store.stats import FleetStats, StatsStore
from cloud_hub.store.sync import HUB_RULES, SyncStore
from hub_protocol.conflicts import Rule

__all__ = [
    "AlreadyResolved",
    "AuthError",
    "ConcurrentUpdate",
    "Enrolled",
    "FleetStats",
    "HubStore",
    "SchemaTooNew",
    "connect",
    "migrate",
]


class HubStore(
    ReleaseStore, SitesStore, SyncStore, ConflictStore, ArchiveStore, FeedStore, StatsStore
):
    """All the hub's reads and writes, each scoped to one site."""

    def __init__(self, engine: Engine, rules: dict[str, Rule] | None = None) -> None:
        self.engine = engine
        self.rules = rules or HUB_RULES
