"""What the hub's readiness probe and metrics read from the database: a cheap liveness query
and fleet-wide figures (sites, conflicts, feed lag). These are the same on every replica (they
come from the one database), so dashboards take ``max`` of them across replicas."""

from __future__ import annotations

import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud_hub.store.base import StoreBase
from cloud_hub.store.schema import changes, conflict_queue, feed_acks, hub_migrations, sites


@dataclass(frozen=True, kw_only=True)
class FleetStats:
    """``feed_pending``: feed entries written for sites and not yet applied by them (summed
    over sites); ``feed_max_pending``: the most any one site has; ``feed_oldest_s``: age in
    seconds of the oldest entry a site has not applied (0 when none)."""

    sites: int
    sites_behind: int
    feed_pending: int
    feed_max_pending: int
    feed_oldest_s: float
    conflicts_opened: int
    conflicts_resolved: int


def _statement_timeout(conn: Connection, timeout_s: float) -> None:
    if conn.dialect.name == "postgresql":  # SQLite has no statement timeout (busy_timeout)
        conn.execute(sa.text(f"SET LOCAL statement_timeout = {max(1, int(timeout_s * 1000))}"))


class StatsStore(StoreBase):
    """The readiness query and the figures of :class:`FleetStats`."""

    def ping(self, *, timeout_s: float = 3.0) -> None:
        """One cheap read of a hub table (not just ``SELECT 1``: SQLite answers that without
        its file); raises what the driver raises when the database cannot be read."""
        with self.engine.connect() as conn, conn.begin():
            _statement_timeout(conn, timeout_s)
            conn.execute(sa.select(hub_migrations.c.name).limit(1)).first()

    def fleet_stats(self, *, timeout_s: float = 3.0, now: float | None = None) -> FleetStats:
        """Fleet-wide figures, each query bounded by ``timeout_s`` on PostgreSQL."""
        now = time.time() if now is None else now
        acked = sa.func.coalesce(feed_acks.c.pos, 0)
        behind = sites.c.feed_last - acked
        joined = sites.outerjoin(feed_acks, feed_acks.c.site_id == sites.c.site_id)
        with self.engine.connect() as conn, conn.begin():
            _statement_timeout(conn, timeout_s)
            n, n_behind, pending, most = conn.execute(
                sa.select(
                    sa.func.count(),
                    sa.func.coalesce(sa.func.sum(sa.case((behind > 0, 1), else_=0)), 0),
                    sa.func.coalesce(sa.func.sum(sa.case((behind > 0, behind), else_=0)), 0),
                    sa.func.coalesce(sa.func.max(behind), 0),
                ).select_from(joined)
            ).one()
            # a site's oldest unapplied entry is the one right after what it applied
            oldest = conn.execute(
                sa.select(sa.func.min(changes.c.created_at)).select_from(
                    joined.join(
                        changes,
                        sa.and_(changes.c.site_id == sites.c.site_id, changes.c.pos == acked + 1),
                    )
                )
            ).scalar()
            opened, resolved = conn.execute(
                sa.select(sa.func.count(), sa.func.count(conflict_queue.c.resolved_at))
            ).one()
        return FleetStats(
            sites=int(n),
            sites_behind=int(n_behind),
            feed_pending=int(pending),
            feed_max_pending=max(0, int(most)),
            feed_oldest_s=max(0.0, now - float(oldest)) if oldest is not None else 0.0,
            conflicts_opened=int(opened),
            conflicts_resolved=int(resolved),
        )
