"""The manual-review queue: conflicts kept with both versions until a person takes one;
the decision is logged and sent to the site through its change feed. A conflict is resolved
once: the resolution runs under the site's lock (:mod:`cloud_hub.store.base`), and a second
one finds the first's outcome and raises :class:`AlreadyResolved` with it."""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa

from cloud_hub.store.base import StoreBase, cas_record, lock_site
from cloud_hub.store.feed import write_change
from cloud_hub.store.schema import conflict_queue, records
from hub_protocol import ChangeType


class AlreadyResolved(Exception):
    """The conflict was resolved already (by someone else, a moment ago perhaps): nothing
    was changed. ``outcome`` is the first resolution (take, by, at)."""

    def __init__(self, conflict_id: int, outcome: dict[str, Any]) -> None:
        super().__init__(
            f"conflict {conflict_id} was already resolved: {outcome['resolution']} version "
            f"kept by {outcome['resolved_by']}"
        )
        self.conflict_id = conflict_id
        self.outcome = outcome


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
        new version. KeyError if unknown (or another site's); :class:`AlreadyResolved` if it
        was resolved before."""
        if take not in ("edge", "cloud"):
            raise ValueError("take must be 'edge' or 'cloud'")
        now = time.time() if now is None else now
        q = sa.select(conflict_queue).where(conflict_queue.c.id == conflict_id)
        if site_id is not None:
            q = q.where(conflict_queue.c.site_id == site_id)
        with self.writing() as conn:
            owner = conn.execute(q.with_only_columns(conflict_queue.c.site_id)).scalar()
            if owner is None:
                raise KeyError(f"no conflict {conflict_id}")
            lock_site(conn, owner)
            c = conn.execute(q).mappings().one()  # read again, under the lock
            if c["resolved_at"] is not None:
                raise AlreadyResolved(
                    conflict_id,
                    {
                        k: c[k]
                        for k in ("resolution", "resolved_by", "resolved_at", "site_id", "key")
                    },
                )
            payload = c["edge_payload"] if take == "edge" else c["cloud_payload"]
            (current,) = conn.execute(
                sa.select(records.c.version).where(
                    records.c.site_id == c["site_id"], records.c.key == c["key"]
                )
            ).one()
            version = cas_record(
                conn, c["site_id"], c["key"], int(current), payload=payload, received_at=now
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
