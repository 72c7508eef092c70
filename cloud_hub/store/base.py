"""What every part of :class:`cloud_hub.store.HubStore` shares, and the one locking rule.

**Every transaction that writes a site's rows takes that site's row lock first**
(:func:`lock_site`): ``SELECT ... FOR UPDATE`` on PostgreSQL, a no-op write on SQLite (which
takes the database's write lock, SQLite's only granularity). So two writers for one site, on
any replica, run one after the other, and each reads what the previous one committed: a
read-modify-write of a record, a conflict's resolution, a lane's high-water mark and the
site's feed position cannot be interleaved. Transactions that write several sites lock them
in sorted order, so two of them cannot deadlock. Updates of a record are compare-and-set on
its version as well (:func:`cas_record`), so a writer that did not take the lock fails
loudly instead of losing an update.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cloud_hub.store.schema import records, sites


class StoreBase:
    """The engine every domain part of the hub store reads and writes through."""

    engine: Engine

    @contextmanager
    def writing(self) -> Iterator[Connection]:
        """A write transaction. On SQLite it takes the database's write lock at its start
        (``BEGIN IMMEDIATE``): one that read first and wrote later would be refused
        ("database is locked") when another writer came in between, instead of waiting."""
        with self.engine.connect() as conn:
            conn.execution_options(sqlite_begin="BEGIN IMMEDIATE")
            with conn.begin():
                yield conn


class ConcurrentUpdate(RuntimeError):
    """A compare-and-set found another version than the one it read: a writer broke the
    locking rule. The transaction is rolled back; nothing was written."""


def lock_site(conn: Connection, site_id: str) -> bool:
    """Take ``site_id``'s row lock for the rest of ``conn``'s transaction; False if there is
    no such site."""
    if conn.dialect.name == "postgresql":
        row = conn.execute(
            sa.select(sites.c.site_id).where(sites.c.site_id == site_id).with_for_update()
        ).first()
        return row is not None
    res = conn.execute(
        sites.update().where(sites.c.site_id == site_id).values(site_id=sites.c.site_id)
    )
    return res.rowcount > 0


def lock_sites(conn: Connection, site_ids: list[str]) -> None:
    """Lock several sites, in sorted order (the same order in every transaction)."""
    for site in sorted(set(site_ids)):
        lock_site(conn, site)


def cas_record(conn: Connection, site_id: str, key: str, base: int, **values: Any) -> int:
    """Write ``values`` to the record at version ``base`` and make it ``base + 1``; raises
    :class:`ConcurrentUpdate` if the record is not at ``base``. Returns the new version."""
    res = conn.execute(
        records.update()
        .where(records.c.site_id == site_id, records.c.key == key, records.c.version == base)
        .values(version=base + 1, **values)
    )
    if res.rowcount != 1:
        raise ConcurrentUpdate(f"{key} of {site_id} is no longer at version {base}")
    return base + 1
