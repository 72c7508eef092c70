"""Each site's archive: which objects (encrypted at the site, opaque here) the hub holds, and
the chunked uploads in progress.

An upload's state is here, not on a replica's disk: any replica can take the next chunk.
Its bytes are in part objects in the blob store (:mod:`cloud_hub.artifacts`); this table
says which parts, in order, hold bytes ``0 .. received``. A chunk is accepted when it starts
at ``received`` (the next bytes) or lies inside what is held already (a resend: nothing
changes, the answer is the same); anything else is refused with the offset the hub holds.
Each change runs under the site's lock (:mod:`cloud_hub.store.base`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud_hub.store.base import StoreBase, lock_site
from cloud_hub.store.schema import archive_objects, archive_uploads


@dataclass(frozen=True)
class Upload:
    """An upload in progress: ``parts`` are (offset, length, part name), in order."""

    total: int
    received: int
    parts: tuple[tuple[int, int, str], ...]


@dataclass(frozen=True)
class ChunkResult:
    """What the hub holds after a chunk: ``accepted`` False means the chunk did not fit
    (the sender should continue from ``received``); ``upload`` is None once archived."""

    accepted: bool
    received: int
    upload: Upload | None


def _size(conn: Connection, site_id: str, sha256: str) -> int | None:
    row = conn.execute(
        sa.select(archive_objects.c.size).where(
            archive_objects.c.site_id == site_id, archive_objects.c.sha256 == sha256
        )
    ).first()
    return None if row is None else int(row[0])


def _upload(conn: Connection, site_id: str, sha256: str) -> Upload | None:
    row = conn.execute(
        sa.select(
            archive_uploads.c.total, archive_uploads.c.received, archive_uploads.c.parts
        ).where(archive_uploads.c.site_id == site_id, archive_uploads.c.sha256 == sha256)
    ).first()
    if row is None:
        return None
    parts = tuple((int(o), int(n), str(name)) for o, n, name in json.loads(row[2]))
    return Upload(total=int(row[0]), received=int(row[1]), parts=parts)


class ArchiveStore(StoreBase):
    """The objects of a site's archive, their sizes, and uploads in progress."""

    def archived_size(self, site_id: str, sha256: str) -> int | None:
        """The size of ``sha256`` in this site's archive, None if it has no such object."""
        with self.engine.connect() as conn:
            return _size(conn, site_id, sha256)

    def upload_state(self, site_id: str, sha256: str) -> Upload | None:
        with self.engine.connect() as conn:
            return _upload(conn, site_id, sha256)

    def add_upload_chunk(
        self,
        site_id: str,
        sha256: str,
        *,
        offset: int,
        length: int,
        total: int,
        part: str,
        now: float | None = None,
    ) -> ChunkResult:
        """Record that ``part`` (already written to the blob store) holds bytes
        ``offset .. offset + length`` of an object of ``total`` bytes."""
        now = time.time() if now is None else now
        with self.writing() as conn:
            lock_site(conn, site_id)
            if _size(conn, site_id, sha256) is not None:
                return ChunkResult(True, total, None)
            up = _upload(conn, site_id, sha256)
            if up is None or up.total != total:  # a new upload (or one restarted at a new size)
                if offset != 0:
                    return ChunkResult(False, 0 if up is None else up.received, up)
                if up is not None:
                    conn.execute(
                        archive_uploads.delete().where(
                            archive_uploads.c.site_id == site_id,
                            archive_uploads.c.sha256 == sha256,
                        )
                    )
                up = Upload(total=total, received=length, parts=((0, length, part),))
                conn.execute(
                    archive_uploads.insert().values(
                        site_id=site_id,
                        sha256=sha256,
                        total=total,
                        received=length,
                        parts=json.dumps([list(p) for p in up.parts]),
                        started_at=now,
                        updated_at=now,
                    )
                )
                return ChunkResult(True, length, up)
            if offset + length <= up.received:  # a resend of what is held
                return ChunkResult(True, up.received, up)
            if offset != up.received:
                return ChunkResult(False, up.received, up)
            up = Upload(
                total=total, received=offset + length, parts=(*up.parts, (offset, length, part))
            )
            conn.execute(
                archive_uploads.update()
                .where(archive_uploads.c.site_id == site_id, archive_uploads.c.sha256 == sha256)
                .values(
                    received=up.received,
                    parts=json.dumps([list(p) for p in up.parts]),
                    updated_at=now,
                )
            )
            return ChunkResult(True, up.received, up)

    def drop_upload(self, site_id: str, sha256: str) -> Upload | None:
        """Forget an upload (its bytes did not match their hash); returns what it held."""
        with self.writing() as conn:
            lock_site(conn, site_id)
            up = _upload(conn, site_id, sha256)
            conn.execute(
                archive_uploads.delete().where(
                    archive_uploads.c.site_id == site_id, archive_uploads.c.sha256 == sha256
                )
            )
        return up

    def record_archived(
        self, site_id: str, sha256: str, size: int, *, now: float | None = None
    ) -> Upload | None:
        """The object is stored and verified: it is in the site's archive from now on, and
        its upload (if any) is over. Returns the upload whose parts may now go."""
        with self.writing() as conn:
            lock_site(conn, site_id)
            up = _upload(conn, site_id, sha256)
            if up is not None:
                conn.execute(
                    archive_uploads.delete().where(
                        archive_uploads.c.site_id == site_id,
                        archive_uploads.c.sha256 == sha256,
                    )
                )
            if _size(conn, site_id, sha256) is None:
                conn.execute(
                    archive_objects.insert().values(
                        site_id=site_id,
                        sha256=sha256,
                        size=size,
                        stored_at=time.time() if now is None else now,
                    )
                )
        return up
