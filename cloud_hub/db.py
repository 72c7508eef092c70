"""The hub's storage: SQLAlchemy Core, the same tables and migrations on SQLite (embedded
default) and PostgreSQL (production). Every query is scoped by ``site_id``: a site can read
and write only its own rows.

Push is applied in one transaction per batch: each ``(site, key)`` at most once, each
``(site, lane, seq)`` at most once; the lane's high-water mark is the highest seq with every
lower seq of the lane held (applied or rejected).
"""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from cloud_hub.artifacts import ArtifactStore, open_artifacts
from hub_protocol import (
    HLC,
    Change,
    ChangeType,
    Lane,
    PushBatch,
    PushReceipt,
    Receipt,
    ReceiptStatus,
    Record,
    RecordType,
)
from hub_protocol.conflicts import DEFAULT_RULES, Outcome, Rule, Version, resolve
from hub_protocol.releases import Release, verify_archive

metadata = sa.MetaData()

hub_migrations = sa.Table(
    "hub_migrations",
    metadata,
    sa.Column("name", sa.String(100), primary_key=True),
    sa.Column("applied_at", sa.Float, nullable=False),
)
sites = sa.Table(
    "sites",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(200), nullable=False),
    sa.Column("credential_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("enrolled_at", sa.Float, nullable=False),
    sa.Column("last_seen_at", sa.Float),
    sa.Column("health", sa.Text),  # last heartbeat payload (JSON)
)
enrollment_tokens = sa.Table(
    "enrollment_tokens",
    metadata,
    sa.Column("token_sha256", sa.String(64), primary_key=True),
    sa.Column("site_name", sa.String(200), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("expires_at", sa.Float, nullable=False),
    sa.Column("used_at", sa.Float),
    sa.Column("site_id", sa.String(64)),
)
records = sa.Table(
    "records",
    metadata,
    sa.Column("site_id", sa.String(64), sa.ForeignKey("sites.site_id"), primary_key=True),
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("type", sa.String(40), nullable=False),
    sa.Column("lane", sa.String(10), nullable=False),
    sa.Column("seq", sa.BigInteger, nullable=False),
    sa.Column("hlc", sa.String(100), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
)
lane_seqs = sa.Table(  # every (site, lane, seq) the hub has processed, applied or rejected
    "lane_seqs",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("lane", sa.String(10), primary_key=True),
    sa.Column("seq", sa.BigInteger, primary_key=True),
    sa.Column("status", sa.String(12), nullable=False),
)
lanes = sa.Table(
    "lanes",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("lane", sa.String(10), primary_key=True),
    sa.Column("high_water", sa.BigInteger, nullable=False),
)
changes = sa.Table(  # the change feed a site pulls (cloud-side edits, assignments, ...)
    "changes",
    metadata,
    sa.Column(
        "cursor",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("site_id", sa.String(64), nullable=False, index=True),
    sa.Column("type", sa.String(40), nullable=False),
    sa.Column("key", sa.String(200), nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
)

conflict_queue = sa.Table(  # manual review: both versions kept until a person decides
    "conflicts",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("site_id", sa.String(64), nullable=False, index=True),
    sa.Column("key", sa.String(200), nullable=False),
    sa.Column("type", sa.String(40), nullable=False),
    sa.Column("edge_payload", sa.Text, nullable=False),
    sa.Column("edge_hlc", sa.String(100), nullable=False),
    sa.Column("cloud_payload", sa.Text, nullable=False),
    sa.Column("cloud_hlc", sa.String(100), nullable=False),
    sa.Column("cloud_version", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("resolved_at", sa.Float),
    sa.Column("resolution", sa.String(10)),
    sa.Column("resolved_by", sa.String(200)),
)

releases = sa.Table(  # signed model releases (the hub stores, it cannot forge)
    "releases",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("document", sa.Text, nullable=False),  # the signed JSON, as published
    sa.Column("archive_sha256", sa.String(64), nullable=False),
    sa.Column("archive_size", sa.BigInteger, nullable=False),
    sa.Column("published_at", sa.Float, nullable=False),
)
assignments = sa.Table(
    "assignments",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("assigned_at", sa.Float, nullable=False),
)
shadow_assignments = sa.Table(  # versions sites run beside the active one, publishing nothing
    "shadow_assignments",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("assigned_at", sa.Float, nullable=False),
)
install_status = sa.Table(
    "install_status",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)

rollouts = sa.Table(  # staged rollout of one release: canary -> percentage -> all
    "rollouts",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("stage", sa.String(12), nullable=False),  # canary|percent|all|paused|rolled_back
    sa.Column("canary", sa.Text, nullable=False),  # JSON list of site ids
    sa.Column("percent", sa.Integer, nullable=False),
    sa.Column("previous", sa.String(64)),  # version to roll back to
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

archive_objects = sa.Table(  # each site's archived instances (encrypted at the site, opaque here)
    "archive_objects",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("stored_at", sa.Float, nullable=False),
)

#: install steps a site reports while it works on a version (not a decision yet)
IN_PROGRESS = frozenset({"downloading", "verifying", "self_test"})

MIGRATIONS: tuple[tuple[str, Sequence[sa.Table]], ...] = (
    ("0001_sites_records_feed", (sites, enrollment_tokens, records, lane_seqs, lanes, changes)),
    ("0002_conflicts", (conflict_queue,)),
    ("0003_releases", (releases, assignments, install_status)),
    ("0004_rollouts", (rollouts,)),
    ("0005_shadow_assignments", (shadow_assignments,)),
    ("0006_archive", (archive_objects,)),
)

#: Record types -> the data type whose conflict rule applies.
DATA_TYPE = {
    RecordType.RESULT: "ai_results",
    RecordType.REVIEW: "review",
    RecordType.PATIENT_DATA: "patient_data",
    RecordType.STUDY_METADATA: "study_metadata",
    RecordType.USER_PREFERENCES: "user_preferences",
    RecordType.SYSTEM_CONFIG: "system_config",
    RecordType.HEARTBEAT: "operational",
    RecordType.TOMBSTONE: "operational",
    RecordType.CONFLICT_RESOLUTION: "operational",
}
HUB_RULES = {**DEFAULT_RULES, "operational": Rule.EDGE_WINS}


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def connect(url: str) -> Engine:
    """An engine for ``url`` with every pending migration applied (each in a transaction,
    recorded in ``hub_migrations``)."""
    engine = sa.create_engine(url, future=True, pool_pre_ping=True)
    with engine.begin() as conn:
        hub_migrations.create(conn, checkfirst=True)
    for name, tables in MIGRATIONS:
        with engine.begin() as conn:
            done = conn.execute(
                sa.select(hub_migrations.c.name).where(hub_migrations.c.name == name)
            ).first()
            if done:
                continue
            for t in tables:
                t.create(conn, checkfirst=True)
            conn.execute(hub_migrations.insert().values(name=name, applied_at=time.time()))
    return engine


class AuthError(Exception):
    """Bad or missing credential / token (HTTP 401)."""


@dataclass(frozen=True)
class Enrolled:
    site_id: str
    credential: str


class HubStore:
    """All the hub's reads and writes, each scoped to one site."""

    def __init__(self, engine: Engine, rules: dict[str, Rule] | None = None) -> None:
        self.engine = engine
        self.rules = rules or HUB_RULES

    # -- enrollment and auth -----------------------------------------------------------------

    def create_enrollment_token(
        self, site_name: str, *, ttl_s: float = 7 * 86400, now: float | None = None
    ) -> str:
        """A one-time token for ops to hand to a new site (stored hashed)."""
        now = time.time() if now is None else now
        # prefixed: a token starting with "-" would read as an option on a command line
        token = "enroll_" + secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(
                enrollment_tokens.insert().values(
                    token_sha256=_sha(token),
                    site_name=site_name,
                    created_at=now,
                    expires_at=now + ttl_s,
                )
            )
        return token

    def enroll(self, token: str, *, now: float | None = None) -> Enrolled:
        """Trade a one-time token for a site id and its own credential. A used, unknown or
        expired token raises AuthError (a replayed token never enrolls twice)."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            row = (
                conn.execute(
                    sa.select(enrollment_tokens).where(
                        enrollment_tokens.c.token_sha256 == _sha(token)
                    )
                )
                .mappings()
                .first()
            )
            if row is None or row["used_at"] is not None or row["expires_at"] < now:
                raise AuthError("enrollment token unknown, already used or expired")
            site_id = "site-" + secrets.token_hex(8)
            credential = secrets.token_urlsafe(32)
            # the conditional update makes a concurrent replay lose the race
            used = conn.execute(
                enrollment_tokens.update()
                .where(
                    enrollment_tokens.c.token_sha256 == _sha(token),
                    enrollment_tokens.c.used_at.is_(None),
                )
                .values(used_at=now, site_id=site_id)
            )
            if used.rowcount != 1:
                raise AuthError("enrollment token already used")
            conn.execute(
                sites.insert().values(
                    site_id=site_id,
                    name=row["site_name"],
                    credential_sha256=_sha(credential),
                    enrolled_at=now,
                )
            )
        return Enrolled(site_id, credential)

    def authenticate(self, credential: str) -> str:
        """The site id a credential belongs to; AuthError otherwise."""
        with self.engine.connect() as conn:
            row = conn.execute(
                sa.select(sites.c.site_id).where(sites.c.credential_sha256 == _sha(credential))
            ).first()
        if row is None:
            raise AuthError("unknown credential")
        return str(row[0])

    # -- archive ------------------------------------------------------------------------

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
        with self.engine.begin() as conn:
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

    def list_sites(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            return [
                dict(r)
                for r in conn.execute(
                    sa.select(
                        sites.c.site_id,
                        sites.c.name,
                        sites.c.enrolled_at,
                        sites.c.last_seen_at,
                        sites.c.health,
                    ).order_by(sites.c.enrolled_at)
                ).mappings()
            ]

    # -- push ------------------------------------------------------------------------------------

    def _high_water(self, conn: Connection, site_id: str) -> dict[Lane, int]:
        return {
            Lane(r[0]): int(r[1])
            for r in conn.execute(
                sa.select(lanes.c.lane, lanes.c.high_water).where(lanes.c.site_id == site_id)
            )
        }

    def high_water(self, site_id: str) -> dict[Lane, int]:
        with self.engine.connect() as conn:
            return self._high_water(conn, site_id)

    def push(self, site_id: str, batch: PushBatch, *, now: float | None = None) -> PushReceipt:
        """Apply a batch for ``site_id`` (at most once per key and per lane seq).

        Set-based: one query for the lane seqs already held, one for the keys that exist,
        then bulk inserts, so the cost per record stays flat as batches grow.
        """
        now = time.time() if now is None else now
        out: list[Receipt] = []
        with self.engine.begin() as conn:
            hw = self._high_water(conn, site_id)
            held: set[tuple[str, int]] = set()
            for lane in {r.lane for r in batch.records}:
                lane_recs = [r.seq for r in batch.records if r.lane is lane]
                held.update(
                    (lane.value, int(s))
                    for s in conn.execute(
                        sa.select(lane_seqs.c.seq).where(
                            lane_seqs.c.site_id == site_id,
                            lane_seqs.c.lane == lane.value,
                            lane_seqs.c.seq >= min(lane_recs),
                            lane_seqs.c.seq <= max(lane_recs),
                        )
                    ).scalars()
                )
            keys = list({r.key for r in batch.records})
            existing: dict[str, int] = {}
            for i in range(0, len(keys), 500):
                existing.update(
                    (str(k), int(v))
                    for k, v in conn.execute(
                        sa.select(records.c.key, records.c.version).where(
                            records.c.site_id == site_id, records.c.key.in_(keys[i : i + 500])
                        )
                    )
                )
            inserts: list[dict[str, Any]] = []
            seq_rows: list[dict[str, Any]] = []
            touched: set[Lane] = set()
            for rec in batch.records:
                if (rec.lane.value, rec.seq) in held or rec.seq <= hw.get(rec.lane, 0):
                    out.append(Receipt(key=rec.key, seq=rec.seq, status=ReceiptStatus.DUPLICATE))
                    continue
                body = json.dumps(dict(rec.payload), sort_keys=True)
                current = existing.get(rec.key)
                error = ""
                if current is not None and rec.type is RecordType.RESULT:
                    status, version = ReceiptStatus.REJECTED, current
                    error = "results are immutable: a new result supersedes, it never replaces"
                elif current is not None:
                    status, version, error = self._update(conn, site_id, rec, current, now)
                else:
                    version, status = 1, ReceiptStatus.APPLIED
                    inserts.append(
                        {
                            "site_id": site_id,
                            "key": rec.key,
                            "type": rec.type.value,
                            "lane": rec.lane.value,
                            "seq": rec.seq,
                            "hlc": rec.hlc.encode(),
                            "version": 1,
                            "payload": body,
                            "received_at": now,
                        }
                    )
                existing[rec.key] = version
                held.add((rec.lane.value, rec.seq))
                seq_rows.append(
                    {
                        "site_id": site_id,
                        "lane": rec.lane.value,
                        "seq": rec.seq,
                        "status": status.value,
                    }
                )
                touched.add(rec.lane)
                out.append(
                    Receipt(key=rec.key, seq=rec.seq, status=status, version=version, error=error)
                )
            if inserts:
                conn.execute(records.insert(), inserts)
            if seq_rows:
                conn.execute(lane_seqs.insert(), seq_rows)
            for lane in touched:
                hw[lane] = self._advance(conn, site_id, lane, hw.get(lane, 0))
            conn.execute(sites.update().where(sites.c.site_id == site_id).values(last_seen_at=now))
        return PushReceipt(receipts=tuple(out), high_water=hw)

    def _update(
        self, conn: Connection, site_id: str, rec: Record, current: int, now: float
    ) -> tuple[ReceiptStatus, int, str]:
        """A change to an existing record: applied when based on the current version, else
        resolved by the conflict rule of its data type (manual review keeps both)."""
        row = conn.execute(
            sa.select(records.c.payload, records.c.hlc).where(
                records.c.site_id == site_id, records.c.key == rec.key
            )
        ).one()

        def write(payload: dict[str, Any], hlc: str) -> int:
            conn.execute(
                records.update()
                .where(records.c.site_id == site_id, records.c.key == rec.key)
                .values(
                    type=rec.type.value,
                    lane=rec.lane.value,
                    seq=rec.seq,
                    hlc=hlc,
                    version=current + 1,
                    payload=json.dumps(payload, sort_keys=True),
                    received_at=now,
                )
            )
            return current + 1

        if rec.base_version == current:
            return ReceiptStatus.APPLIED, write(dict(rec.payload), rec.hlc.encode()), ""
        cloud_hlc = HLC.decode(row.hlc)
        edge = Version(origin="edge", hlc=rec.hlc, fields=dict(rec.payload))
        cloud = Version(origin="cloud", hlc=cloud_hlc, fields=json.loads(row.payload))
        res = resolve(DATA_TYPE[rec.type], edge, cloud, self.rules)
        if res.outcome is Outcome.MANUAL:
            cid = conn.execute(
                conflict_queue.insert().values(
                    site_id=site_id,
                    key=rec.key,
                    type=rec.type.value,
                    edge_payload=json.dumps(dict(rec.payload), sort_keys=True),
                    edge_hlc=rec.hlc.encode(),
                    cloud_payload=row.payload,
                    cloud_hlc=row.hlc,
                    cloud_version=current,
                    created_at=now,
                )
            ).inserted_primary_key
            assert cid is not None
            return ReceiptStatus.CONFLICT, current, f"kept for manual review (conflict {cid[0]})"
        version = current
        if res.outcome is not Outcome.CLOUD and res.value is not None:
            version = write(dict(res.value), max(rec.hlc, cloud_hlc).encode())
        if res.value != dict(rec.payload):  # tell the edge what won
            self._change(
                conn,
                site_id,
                type=ChangeType.RECORD,
                key=rec.key,
                version=version,
                payload={"value": res.value, "reason": res.reason},
                now=now,
            )
        return ReceiptStatus.CONFLICT, version, res.reason

    def cloud_edit(
        self,
        site_id: str,
        *,
        key: str,
        type: RecordType,
        payload: dict[str, Any],
        now: float | None = None,
    ) -> int:
        """A change made at the hub (ops, a cloud service) to one site's record: stored as the
        next version and sent to the site through its change feed. Returns the version."""
        now = time.time() if now is None else now
        body = json.dumps(payload, sort_keys=True)
        hlc = HLC(int(now * 1000), 0, "hub").encode()
        with self.engine.begin() as conn:
            if (
                conn.execute(sa.select(sites.c.site_id).where(sites.c.site_id == site_id)).first()
                is None
            ):
                raise KeyError(f"no site {site_id}")
            row = conn.execute(
                sa.select(records.c.version).where(
                    records.c.site_id == site_id, records.c.key == key
                )
            ).first()
            if row is None:
                version = 1
                conn.execute(
                    records.insert().values(
                        site_id=site_id,
                        key=key,
                        type=type.value,
                        lane=Lane.BATCH.value,
                        seq=0,
                        hlc=hlc,
                        version=1,
                        payload=body,
                        received_at=now,
                    )
                )
            else:
                version = int(row[0]) + 1
                conn.execute(
                    records.update()
                    .where(records.c.site_id == site_id, records.c.key == key)
                    .values(hlc=hlc, version=version, payload=body, received_at=now)
                )
            self._change(
                conn,
                site_id,
                type=ChangeType.RECORD,
                key=key,
                version=version,
                payload={"value": payload, "reason": "cloud edit"},
                now=now,
            )
        return version

    # -- model releases ---------------------------------------------------------------------

    def publish(
        self,
        document: bytes,
        archive: bytes,
        artifacts: Path | str | ArtifactStore,
        *,
        now: float | None = None,
    ) -> Release:
        """Store a signed release and its archive (content-addressed in ``artifacts``: a
        folder, ``s3://bucket/prefix``, or a store). The hub checks the archive against the
        signed size and hash so it never serves garbage, but trust is decided by the edges,
        which verify the signatures."""
        doc = json.loads(document)
        release = Release.from_json(doc["signed"])
        verify_archive(archive, release)
        if isinstance(artifacts, (str, Path)):
            artifacts = open_artifacts(artifacts)
        artifacts.put(release.archive_sha256, archive)
        with self.engine.begin() as conn:
            exists = conn.execute(
                sa.select(releases.c.archive_sha256).where(
                    releases.c.name == release.name, releases.c.version == release.version
                )
            ).first()
            if exists is not None and exists[0] != release.archive_sha256:
                raise ValueError(
                    f"{release.name} {release.version} was already published with another archive"
                )
            if exists is None:
                conn.execute(
                    releases.insert().values(
                        name=release.name,
                        version=release.version,
                        document=document.decode(),
                        archive_sha256=release.archive_sha256,
                        archive_size=release.archive_size,
                        published_at=time.time() if now is None else now,
                    )
                )
            else:  # more signatures (k of n) arrive as a new document for the same archive
                conn.execute(
                    releases.update()
                    .where(releases.c.name == release.name, releases.c.version == release.version)
                    .values(document=document.decode())
                )
        return release

    def assign(
        self,
        name: str,
        version: str,
        site_ids: Sequence[str],
        *,
        shadow: bool = False,
        now: float | None = None,
    ) -> int:
        """Assign a published release to sites; each gets it through its change feed.
        ``shadow``: the sites run it beside their active version without publishing its
        results, and report how far the two agree; assigning it normally later promotes it."""
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            rel = (
                conn.execute(
                    sa.select(releases).where(
                        releases.c.name == name, releases.c.version == version
                    )
                )
                .mappings()
                .first()
            )
            if rel is None:
                raise KeyError(f"{name} {version} is not published")
            table = shadow_assignments if shadow else assignments
            for site in site_ids:
                conn.execute(table.delete().where(table.c.site_id == site, table.c.name == name))
                conn.execute(
                    table.insert().values(site_id=site, name=name, version=version, assigned_at=now)
                )
                self._change(
                    conn,
                    site,
                    type=ChangeType.MODEL_ASSIGNMENT,
                    key=f"model/{name}",
                    version=int(now * 1000),
                    now=now,
                    payload={
                        "name": name,
                        "version": version,
                        "document": rel["document"],
                        "archive": f"/v1/artifacts/{rel['archive_sha256']}",
                        "archive_size": rel["archive_size"],
                        "mode": "shadow" if shadow else "active",
                    },
                )
        return len(site_ids)

    def report_install(
        self,
        site_id: str,
        name: str,
        version: str,
        status: str,
        detail: str,
        *,
        now: float | None = None,
    ) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                install_status.delete().where(
                    install_status.c.site_id == site_id,
                    install_status.c.name == name,
                    install_status.c.version == version,
                )
            )
            conn.execute(
                install_status.insert().values(
                    site_id=site_id,
                    name=name,
                    version=version,
                    status=status,
                    detail=detail[:2000],
                    at=time.time() if now is None else now,
                )
            )

    # -- staged rollouts ------------------------------------------------------------------

    def start_rollout(
        self,
        name: str,
        version: str,
        *,
        canary: Sequence[str],
        percent: int,
        previous: str | None = None,
        now: float | None = None,
    ) -> None:
        """Stage 1: assign to the canary sites only."""
        if not canary:
            raise ValueError("a rollout needs at least one canary site")
        if not 1 <= percent <= 100:
            raise ValueError("percent must be 1..100")
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            conn.execute(
                rollouts.delete().where(rollouts.c.name == name, rollouts.c.version == version)
            )
            conn.execute(
                rollouts.insert().values(
                    name=name,
                    version=version,
                    stage="canary",
                    canary=json.dumps(list(canary)),
                    percent=percent,
                    previous=previous,
                    reason="",
                    updated_at=now,
                )
            )
        self.assign(name, version, list(canary), now=now)

    def _rollout(self, name: str, version: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(rollouts).where(
                        rollouts.c.name == name, rollouts.c.version == version
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise KeyError(f"no rollout of {name} {version}")
        return dict(row)

    def _set_stage(self, name: str, version: str, stage: str, reason: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                rollouts.update()
                .where(rollouts.c.name == name, rollouts.c.version == version)
                .values(stage=stage, reason=reason, updated_at=time.time())
            )

    def advance_rollout(self, name: str, version: str) -> str:
        """Move to the next stage once every site of the current one reports the version
        active; pause at the first refusal. Returns the stage after the call."""
        r = self._rollout(name, version)
        if r["stage"] in ("paused", "rolled_back", "all"):
            return str(r["stage"])
        with self.engine.connect() as conn:
            targets = [
                s
                for (s,) in conn.execute(
                    sa.select(assignments.c.site_id).where(
                        assignments.c.name == name, assignments.c.version == version
                    )
                )
            ]
            reports = {
                row.site_id: (row.status, row.detail)
                for row in conn.execute(
                    sa.select(install_status).where(
                        install_status.c.name == name, install_status.c.version == version
                    )
                )
            }
        reports = {s: r for s, r in reports.items() if r[0] not in IN_PROGRESS}  # not yet
        refused = {s: reports[s][1] for s in targets if s in reports and reports[s][0] != "active"}
        if refused:
            site, why = next(iter(refused.items()))
            self._set_stage(name, version, "paused", f"{site}: {why}")
            return "paused"
        if any(s not in reports for s in targets):
            return str(r["stage"])  # still waiting for reports
        everyone = sorted(s["site_id"] for s in self.list_sites())
        if r["stage"] == "canary":
            rest = sorted(
                (s for s in everyone if s not in targets),
                key=lambda s: hashlib.sha256(f"{s}/{version}".encode()).hexdigest(),
            )
            take = rest[: max(1, len(rest) * int(r["percent"]) // 100)] if rest else []
            if take:
                self.assign(name, version, take)
            self._set_stage(name, version, "percent", f"{len(take)} more site(s)")
            return "percent"
        rest = [s for s in everyone if s not in targets]
        if rest:
            self.assign(name, version, rest)
        self._set_stage(name, version, "all", "every site")
        return "all"

    def pause_rollout(self, name: str, version: str, reason: str = "paused by ops") -> None:
        self._rollout(name, version)
        self._set_stage(name, version, "paused", reason)

    def rollback_rollout(self, name: str, version: str, *, now: float | None = None) -> int:
        """Tell every site that got ``version`` to re-activate the previous version it has
        installed (no new release is needed, so edge rollback protection is not bypassed).
        Returns how many sites were told."""
        r = self._rollout(name, version)
        now = time.time() if now is None else now
        with self.engine.begin() as conn:
            # every site that has it or had it assigned (a later assignment replaces the
            # assignment row; the install reports stay)
            sites_ = sorted(
                {
                    s
                    for (s,) in conn.execute(
                        sa.select(assignments.c.site_id).where(
                            assignments.c.name == name, assignments.c.version == version
                        )
                    )
                }
                | {
                    s
                    for (s,) in conn.execute(
                        sa.select(install_status.c.site_id).where(
                            install_status.c.name == name, install_status.c.version == version
                        )
                    )
                }
            )
            for site in sites_:
                self._change(
                    conn,
                    site,
                    type=ChangeType.MODEL_ROLLBACK,
                    key=f"model/{name}",
                    version=int(now * 1000),
                    now=now,
                    payload={"name": name, "from_version": version, "to_version": r["previous"]},
                )
        self._set_stage(name, version, "rolled_back", f"{len(sites_)} site(s) told")
        return len(sites_)

    def rollout_status(self, name: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(install_status)
        if name is not None:
            q = q.where(install_status.c.name == name)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q.order_by(install_status.c.at)).mappings()]

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
            self._change(
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

    def _change(
        self,
        conn: Connection,
        site_id: str,
        *,
        type: ChangeType,
        key: str,
        version: int,
        payload: dict[str, Any],
        now: float,
    ) -> None:
        conn.execute(
            changes.insert().values(
                site_id=site_id,
                type=type.value,
                key=key,
                version=version,
                payload=json.dumps(payload, sort_keys=True),
                created_at=now,
            )
        )

    def _advance(self, conn: Connection, site_id: str, lane: Lane, hw: int) -> int:
        seqs = [
            int(r[0])
            for r in conn.execute(
                sa.select(lane_seqs.c.seq)
                .where(
                    lane_seqs.c.site_id == site_id,
                    lane_seqs.c.lane == lane.value,
                    lane_seqs.c.seq > hw,
                )
                .order_by(lane_seqs.c.seq)
            )
        ]
        for s in seqs:
            if s != hw + 1:
                break
            hw = s
        updated = conn.execute(
            lanes.update()
            .where(lanes.c.site_id == site_id, lanes.c.lane == lane.value)
            .values(high_water=hw)
        )
        if updated.rowcount == 0:
            conn.execute(lanes.insert().values(site_id=site_id, lane=lane.value, high_water=hw))
        return hw

    # -- reads -----------------------------------------------------------------------------------

    def heartbeat(self, site_id: str, health: dict[str, Any], *, now: float | None = None) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sites.update()
                .where(sites.c.site_id == site_id)
                .values(
                    last_seen_at=time.time() if now is None else now,
                    health=json.dumps(health, sort_keys=True),
                )
            )

    def results(
        self, site_id: str, *, study_uid: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        q = sa.select(
            records.c.key, records.c.payload, records.c.lane, records.c.seq, records.c.received_at
        ).where(records.c.site_id == site_id, records.c.type == RecordType.RESULT.value)
        with self.engine.connect() as conn:
            rows = [
                dict(r)
                for r in conn.execute(
                    q.order_by(records.c.received_at.desc()).limit(limit)
                ).mappings()
            ]
        out = []
        for r in rows:
            payload = json.loads(r.pop("payload"))
            if study_uid is None or payload.get("study_uid") == study_uid:
                out.append({**r, "result": payload})
        return out

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
            res = conn.execute(
                changes.insert().values(
                    site_id=site_id,
                    type=type.value,
                    key=key,
                    version=version,
                    payload=json.dumps(payload, sort_keys=True),
                    created_at=time.time() if now is None else now,
                )
            )
            pk = res.inserted_primary_key
            assert pk is not None
            return int(pk[0])
