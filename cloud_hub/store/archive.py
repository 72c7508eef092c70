"""Each site's archive: which objects (encrypted at the site, opaque here) the hub holds."""

from __future__ import annotations

import time

import sqlalchemy as sa

from cloud_hub.store.base import StoreBase
from cloud_hub.store.schema import archive_objects


class ArchiveStore(StoreBase):
    """The objects of a site's archive and their sizes."""

    def archived_size(self, site_id: str, sha256: str) -> int | None:
        """The size of ``sha256`` in this site's archive, None if it has no such object."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(archive_objects.c.size).where(
                    archive_objects.c.site_id == site_id, archive_objects.c.sha256 == sha256
                )
            ).first()
        return None if row is None else int(row[0])

    def record_archived(
        self, site_id: str, sha256: str, size: int, *, now: float | None = None
    ) -> None:
        with self.writing() as conn:
            exists = conn.execute(
                sa.select(archive_objects.c.size).where(
                    archive_objects.c.site_id == site_id, archive_objects.c.sha256 == sha256
                )
            ).first()
            if exists is None:
                conn.execute(
                    archive_objects.insert().values(
                        site_id=site_id,
                        sha256=sha256,
                        size=size,
                        stored_at=time.time() if now is None else now,
                    )
                )
