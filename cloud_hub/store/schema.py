"""The hub's tables and their migrations: SQLAlchemy Core, the same on SQLite (embedded
default) and PostgreSQL (production). :func:`connect` applies every pending migration, each in
its own transaction and recorded in ``hub_migrations``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Engine

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

MIGRATIONS: tuple[tuple[str, Sequence[sa.Table]], ...] = (
    ("0001_sites_records_feed", (sites, enrollment_tokens, records, lane_seqs, lanes, changes)),
    ("0002_conflicts", (conflict_queue,)),
    ("0003_releases", (releases, assignments, install_status)),
    ("0004_rollouts", (rollouts,)),
    ("0005_shadow_assignments", (shadow_assignments,)),
    ("0006_archive", (archive_objects,)),
)


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
