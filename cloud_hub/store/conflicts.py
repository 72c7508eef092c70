"""The manual-review queue: conflicts kept with both versions until a person takes one;
the decision is logged and sent to the site through its change feed."""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa

from cloud_hub.store.base import StoreBase
from cloud_hub.store.feed import write_change
from cloud_hub.store.schema import conflict_queue, records
from hub_protocol import ChangeType


class ConflictStore(StoreBase):
    """Listing and resolving queued conflicts."""

    def conflicts(self, site_id: str | None, *, open_only: bool = True) -> list[dict[str, Any]]:
        """The manual-review queue (one site's, or all for ops)."""
        q = sa.select(conflict_queue)
        if site_id is not None:
            q = q.where(conflict_queue.c.site_id == site_id)
        if open_only:
            q = q.where(conflict_queue.c.resolved_at.is_(None))
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q.order_by(conflict_queue.c.id)).mappings()]

    def resolve_conflict(
        self, site_id: str | None, conflict_id: int, *, take: str, by: str, now: float | None = None
    ) -> int:
        """Resolve a queued conflict by taking the edge or the cloud version; the decision is
        logged (who, when) and goes to the site through the change feed. Returns the record's
        new version. KeyError if unknown/already resolved (or another site's)."""
        if take not in ("edge", "cloud"):
            raise ValueError("take must be 'edge' or 'cloud'")
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            q = sa.select(conflict_queue).where(
                conflict_queue.c.id == conflict_id, conflict_queue.c.resolved_at.is_(None)
            )
            if site_id is not None:
                q = q.where(conflict_queue.c.site_id == site_id)
            c = conn.execute(q).mappings().first()
            if c is None:
                raise KeyError(f"no open conflict {conflict_id}")
            payload = c["edge_payload"] if take == "edge" else c["cloud_payload"]
            (current,) = conn.execute(
                sa.select(records.c.version).where(
                    records.c.site_id == c["site_id"], records.c.key == c["key"]
                )
            ).one()
            version = int(current) + 1
            conn.execute(
                records.update()
                .where(records.c.site_id == c["site_id"], records.c.key == c["key"])
                .values(payload=payload, version=version, received_at=now)
            )
            conn.execute(
                conflict_queue.update()
                .where(conflict_queue.c.id == conflict_id)
                .values(resolved_at=now, resolution=take, resolved_by=by)
            )
            write_change(
                conn,
                c["site_id"],
                type=ChangeType.CONFLICT_RESOLUTION,
                key=c["key"],
                version=version,
                payload={
                    "conflict_id": conflict_id,
                    "take": take,
                    "by": by,
                    "value": json.loads(payload),
                },
                now=now,
            )
        return version
