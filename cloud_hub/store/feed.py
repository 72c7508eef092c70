"""The change feed a site pulls: cloud-side edits, conflict outcomes, model assignments and
rollback orders, as :class:`hub_protocol.Change` entries. Writers in the other parts add
their entry with :func:`write_change` inside their own transaction.

**A feed that never skips.** A site reads "every entry after my cursor". Positions from one
global sequence would be handed out when rows are inserted, not when they commit: a reader
could see position 12 committed while 11's transaction is still open, move its cursor to 12
and never see 11. So positions are per site and allocated from the site's row
(``sites.feed_last``) inside the writing transaction: the increment takes that row's lock
until commit, so the next position for the site is handed out only after the previous one's
transaction committed (or rolled back, and then the number is reused). Whatever a reader
sees of a site's feed is therefore a prefix in position order; a held writer delays what
comes after it and hides nothing. (Chosen over PostgreSQL's snapshot horizon because it
holds on SQLite too and costs one row update that the writer's site lock already owns.)

**How far behind a site is.** A site asks for the entries after the cursor it has applied
(the edge advances its cursor in the transaction that applies a page), so each pull records
that cursor in ``feed_acks``: the feed lag (entries not yet applied, age of the oldest) is
what the hub's metrics report. That row is apart from the site's row, so a pull never waits
for the site's lock held by a push.
"""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud_hub.store.base import StoreBase
from cloud_hub.store.schema import changes, feed_acks, sites
from hub_protocol import Change, ChangeType


def _upsert(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(feed_acks)
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(feed_acks)


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
    its position (what the site's cursor counts)."""
    conn.execute(
        sites.update().where(sites.c.site_id == site_id).values(feed_last=sites.c.feed_last + 1)
    )
    pos = conn.execute(sa.select(sites.c.feed_last).where(sites.c.site_id == site_id)).scalar()
    if pos is None:
        raise KeyError(f"no site {site_id}")
    conn.execute(
        changes.insert().values(
            site_id=site_id,
            pos=int(pos),
            type=type.value,
            key=key,
            version=version,
            payload=json.dumps(payload, sort_keys=True),
            created_at=now,
        )
    )
    return int(pos)


class FeedStore(StoreBase):
    """Reading a site's feed, and adding to it outside another write."""

    def changes_after(
        self, site_id: str, cursor: int, limit: int = 500, *, now: float | None = None
    ) -> list[Change]:
        """The entries of ``site_id``'s feed after ``cursor``, in position order; records
        ``cursor`` as what the site has applied (a position only grows)."""
        with self.engine.connect() as conn:
            if cursor > 0:
                at = time.time() if now is None else now
                ins = _upsert(conn.dialect.name).values(site_id=site_id, pos=cursor, at=at)
                conn.execute(
                    ins.on_conflict_do_update(
                        index_elements=[feed_acks.c.site_id],
                        set_={"pos": ins.excluded.pos, "at": ins.excluded.at},
                        where=feed_acks.c.pos < ins.excluded.pos,
                    )
                )
                conn.commit()
            return [
                Change(
                    cursor=int(r["pos"]),
                    site_id=r["site_id"],
                    type=ChangeType(r["type"]),
                    key=r["key"],
                    version=int(r["version"]),
                    payload=json.loads(r["payload"]),
                    created_at=float(r["created_at"]),
                )
                for r in conn.execute(
                    sa.select(changes)
                    .where(changes.c.site_id == site_id, changes.c.pos > cursor)
                    .order_by(changes.c.pos)
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
        with self.writing() as conn:
            return write_change(
                conn,
                site_id,
                type=type,
                key=key,
                version=version,
                payload=payload,
                now=time.time() if now is None else now,
            )
