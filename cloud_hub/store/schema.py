"""The hub's tables and their migrations: SQLAlchemy Core, the same on SQLite (embedded
default) and PostgreSQL (production). :func:`connect` applies every pending migration, each in
its own transaction and recorded in ``hub_migrations``, under a lock that makes one replica do
it while the others wait (PostgreSQL: a session advisory lock; SQLite: an exclusive
transaction), so every replica can start at the same moment. A database whose schema is newer
than this code (a migration it does not know) is refused with :class:`SchemaTooNew`.

The tables below are the current schema: a fresh database gets them whole from the first
migrations (``create(checkfirst=True)``); later migrations that change existing tables are
functions that look before they alter, so they are no-ops on a fresh database.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

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
    # the last feed position handed out for this site (feed.write_change): taken under this
    # row's lock inside the writing transaction, so positions are in commit order
    sa.Column("feed_last", sa.BigInteger, nullable=False, server_default="0"),
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
    sa.Column("version", sa.BigInteger, nullable=False),
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
    # the site's feed position (what a site's cursor counts): per site, in commit order
    sa.Column("pos", sa.BigInteger, nullable=False),
    sa.Column("type", sa.String(40), nullable=False),
    sa.Column("key", sa.String(200), nullable=False),
    sa.Column("version", sa.BigInteger, nullable=False),  # model changes use milliseconds
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.UniqueConstraint("site_id", "pos", name="changes_site_pos"),
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
    sa.Column("cloud_version", sa.BigInteger, nullable=False),
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


archive_uploads = sa.Table(  # chunked uploads in progress: which parts hold which bytes
    "archive_uploads",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("sha256", sa.String(64), primary_key=True),
    sa.Column("total", sa.BigInteger, nullable=False),
    sa.Column("received", sa.BigInteger, nullable=False),  # bytes 0 .. received are held
    sa.Column("parts", sa.Text, nullable=False),  # JSON [[offset, length, part name], ...]
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
)

feed_acks = sa.Table(  # how far each site has applied its feed (the cursor it last pulled after)
    "feed_acks",
    metadata,
    sa.Column("site_id", sa.String(64), primary_key=True),
    sa.Column("pos", sa.BigInteger, nullable=False),
    sa.Column("at", sa.Float, nullable=False),
)


class SchemaTooNew(RuntimeError):
    """The database holds migrations this code does not know: it was upgraded by a newer
    hub. Starting would write rows the newer schema does not expect."""


def _columns(conn: Connection, table: str) -> dict[str, Any]:
    return {c["name"]: c for c in sa.inspect(conn).get_columns(table)}


def _wide_versions_and_site_feed(conn: Connection) -> None:
    """Versions as 64-bit integers (model changes carry milliseconds since the epoch, which a
    32-bit column cannot hold on PostgreSQL), and feed positions per site, assigned in commit
    order (see :mod:`cloud_hub.store.feed`). Existing positions keep their values (a site's
    stored cursor stays valid); new ones continue after the site's highest."""
    if conn.dialect.name == "postgresql":
        for table, column in (
            ("records", "version"),
            ("changes", "version"),
            ("conflicts", "cloud_version"),
        ):
            conn.execute(sa.text(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE BIGINT"))
    # (SQLite's INTEGER is 64-bit whatever the declared type)
    if "feed_last" not in _columns(conn, "sites"):
        conn.execute(sa.text("ALTER TABLE sites ADD COLUMN feed_last BIGINT NOT NULL DEFAULT 0"))
    if "pos" not in _columns(conn, "changes"):
        conn.execute(sa.text("ALTER TABLE changes ADD COLUMN pos BIGINT"))
        conn.execute(sa.text('UPDATE changes SET pos = "cursor"'))
        if conn.dialect.name == "postgresql":
            conn.execute(sa.text("ALTER TABLE changes ALTER COLUMN pos SET NOT NULL"))
        conn.execute(sa.text("CREATE UNIQUE INDEX changes_site_pos ON changes (site_id, pos)"))
        conn.execute(
            sa.text(
                "UPDATE sites SET feed_last = COALESCE("
                "(SELECT MAX(pos) FROM changes WHERE changes.site_id = sites.site_id), 0)"
            )
        )


Migration = Sequence[sa.Table] | Callable[[Connection], None]

MIGRATIONS: tuple[tuple[str, Migration], ...] = (
    ("0001_sites_records_feed", (sites, enrollment_tokens, records, lane_seqs, lanes, changes)),
    ("0002_conflicts", (conflict_queue,)),
    ("0003_releases", (releases, assignments, install_status)),
    ("0004_rollouts", (rollouts,)),
    ("0005_shadow_assignments", (shadow_assignments,)),
    ("0006_archive", (archive_objects,)),
    ("0007_wide_versions_site_feed", _wide_versions_and_site_feed),
    ("0008_archive_uploads", (archive_uploads,)),
    ("0009_feed_acks", (feed_acks,)),
)

#: the advisory lock key replicas take while migrating (any constant shared by all of them)
MIGRATION_LOCK = 0x6875625F6D6967  # "hub_mig"


def migrate(engine: Engine) -> list[str]:
    """Apply every pending migration, one replica at a time; returns the names applied.
    Raises :class:`SchemaTooNew` when the database knows migrations this code does not."""
    applied: list[str] = []
    pg = engine.dialect.name == "postgresql"
    # SQLite: each step in an exclusive transaction (another process waits for it)
    opts = {} if pg else {"sqlite_begin": "BEGIN EXCLUSIVE"}
    with engine.connect().execution_options(**opts) as conn:
        if pg:  # a session lock: the other replicas wait here, then find everything done
            conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": MIGRATION_LOCK})
            conn.commit()
        try:
            with conn.begin():
                hub_migrations.create(conn, checkfirst=True)
                done = set(conn.execute(sa.select(hub_migrations.c.name)).scalars())
            unknown = sorted(done - {name for name, _ in MIGRATIONS})
            if unknown:
                raise SchemaTooNew(
                    "the hub database has migrations this cloud-hub does not know "
                    f"({', '.join(unknown)}): it was upgraded by a newer version; run that "
                    "version or a later one"
                )
            for name, step in MIGRATIONS:
                with conn.begin():
                    if conn.execute(
                        sa.select(hub_migrations.c.name).where(hub_migrations.c.name == name)
                    ).first():
                        continue
                    if callable(step):
                        step(conn)
                    else:
                        for t in step:
                            t.create(conn, checkfirst=True)
                    conn.execute(hub_migrations.insert().values(name=name, applied_at=time.time()))
                    applied.append(name)
        finally:
            if pg:
                conn.rollback()
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": MIGRATION_LOCK})
                conn.commit()
    return applied


def _sqlite_transactions(engine: Engine) -> None:
    """Real transactions on SQLite: the driver's own implicit ones begin only before a
    write, so a read and the write it decides would not be atomic. Every transaction
    begins explicitly (``BEGIN``, or what the connection's ``sqlite_begin`` execution
    option says), and waits up to 30 s for another writer."""

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA busy_timeout = 30000")

    @sa.event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN"))


def connect(url: str, **engine_options: Any) -> Engine:
    """An engine for ``url`` with every pending migration applied (:func:`migrate`).
    ``engine_options`` go to :func:`sqlalchemy.create_engine` (pool sizes)."""
    engine = sa.create_engine(url, future=True, pool_pre_ping=True, **engine_options)
    if engine.dialect.name == "sqlite":
        _sqlite_transactions(engine)
    try:
        migrate(engine)
    except BaseException:
        engine.dispose()
        raise
    return engine
