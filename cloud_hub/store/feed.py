"""The change feed a site pulls: cloud-side edits, conflict outcomes, model assignments and
rollback orders, as :class:`hub_protocol.Change` entries. Writers in the other parts add
their entry with :func:`write_change` inside their own transaction.
"""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud_hub.store.base import StoreBase
from cloud_hub.store.schema import changes
from hub_protocol import Change, ChangeType


def write_change(
    conn: Connection,
    site_id: str,
    *,
    type: ChangeType,
    key: str,
    version: int,
    payload: dict[str, Any],
    now: float,
) -> int:
    """Add one entry to ``site_id``'s feed, in the caller's transaction ``conn``; returns
    its cursor."""
    res = conn.execute(
        changes.insert().values(
            site_id=site_id,
            type=type.value,
            key=key,
            version=version,
            payload=json.dumps(payload, sort_keys=True),
            created_at=now,
        )
    )
    pk = res.inserted_primary_key
    assert pk is not None
    return int(pk[0])


class FeedStore(StoreBase):
    """Reading a site's feed, and adding to it outside another write."""

    def changes_after(self, site_id: str, cursor: int, limit: int = 500) -> list[Change]:
        with self.engine.connect() as conn:
            return [
                Change(
                    cursor=int(r["cursor"]),
                    site_id=r["site_id"],
                    type=ChangeType(r["type"]),
                    key=r["key"],
                    version=int(r["version"]),
                    payload=json.loads(r["payload"]),
                    created_at=float(r["created_at"]),
                )
                for r in conn.execute(
                    sa.select(changes)
                    .where(changes.c.site_id == site_id, changes.c.cursor > cursor)
                    .order_by(changes.c.cursor)
                    .limit(limit)
                ).mappings()
            ]

    def add_change(
        self,
        site_id: str,
        *,
        type: ChangeType,
        key: str,
        version: int,
        payload: dict[str, Any],
        now: float | None = None,
    ) -> int:
        with self.engine.begin() as conn:
            return write_change(
                conn,
                site_id,
                type=type,
                key=key,
                version=version,
                payload=payload,
                now=time.time() if now is None else now,
            )
