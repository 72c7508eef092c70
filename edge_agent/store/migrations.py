"""Named, transactional schema migrations.

Each migration runs in its own transaction together with the row that records it in
``_migrations``, so a crash mid-migration leaves the database at the previous version.
Migrations are append-only: never edit one that has shipped, add a new one.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

from edge_agent.errors import StoreError


@dataclass(frozen=True)
class Migration:
    name: str
    sql: str


MIGRATIONS: Sequence[Migration] = (
    Migration(
        "0001_ingest",
        """
        CREATE TABLE associations (
            id              TEXT PRIMARY KEY,          -- UUID
            calling_ae      TEXT NOT NULL,
            called_ae       TEXT NOT NULL,
            peer_host       TEXT NOT NULL,
            peer_port       INTEGER NOT NULL,
            tls             INTEGER NOT NULL DEFAULT 0,
            started_at      REAL NOT NULL,             -- epoch seconds, UTC
            ended_at        REAL,
            outcome         TEXT NOT NULL,             -- open|released|aborted|rejected
            reject_reason   TEXT,
            received        INTEGER NOT NULL DEFAULT 0,
            duplicates      INTEGER NOT NULL DEFAULT 0,
            failed          INTEGER NOT NULL DEFAULT 0,
            refused         INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX associations_started ON associations(started_at);

        CREATE TABLE studies (
            study_uid           TEXT PRIMARY KEY,
            patient_id          TEXT NOT NULL DEFAULT '',
            patient_name        TEXT NOT NULL DEFAULT '',
            study_date          TEXT NOT NULL DEFAULT '',
            accession_number    TEXT NOT NULL DEFAULT '',
            description         TEXT NOT NULL DEFAULT '',
            modality            TEXT NOT NULL DEFAULT '',
            state               TEXT NOT NULL,
            first_received_at   REAL NOT NULL,
            last_received_at    REAL NOT NULL,
            completed_at        REAL,
            completed_reason    TEXT,
            expected_instances  INTEGER,
            instance_count      INTEGER NOT NULL DEFAULT 0,
            late_arrivals       INTEGER NOT NULL DEFAULT 0,
            reopen_count        INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX studies_state ON studies(state, last_received_at);

        CREATE TABLE series (
            series_uid          TEXT PRIMARY KEY,
            study_uid           TEXT NOT NULL REFERENCES studies(study_uid),
            modality            TEXT NOT NULL DEFAULT '',
            series_number       TEXT NOT NULL DEFAULT '',
            description         TEXT NOT NULL DEFAULT '',
            body_part           TEXT NOT NULL DEFAULT '',
            instance_count      INTEGER NOT NULL DEFAULT 0,
            first_received_at   REAL NOT NULL,
            last_received_at    REAL NOT NULL
        );
        CREATE INDEX series_study ON series(study_uid);

        CREATE TABLE instances (
            id                  INTEGER PRIMARY KEY,
            sop_instance_uid    TEXT NOT NULL,
            version             INTEGER NOT NULL,      -- 1, 2, ... when different bytes arrive
            sop_class_uid       TEXT NOT NULL,
            series_uid          TEXT NOT NULL REFERENCES series(series_uid),
            study_uid           TEXT NOT NULL REFERENCES studies(study_uid),
            instance_number     TEXT NOT NULL DEFAULT '',
            transfer_syntax     TEXT NOT NULL,
            sha256              TEXT NOT NULL,         -- of the dataset bytes as received
            size_bytes          INTEGER NOT NULL,      -- of the stored file
            tier                TEXT NOT NULL,         -- hot|warm|cold
            path                TEXT NOT NULL,         -- relative to the tier folder
            received_at         REAL NOT NULL,
            association_id      TEXT REFERENCES associations(id),
            calling_ae          TEXT NOT NULL,
            late                INTEGER NOT NULL DEFAULT 0,
            UNIQUE (sop_instance_uid, version)
        );
        CREATE INDEX instances_series ON instances(series_uid);
        CREATE INDEX instances_study ON instances(study_uid);
        CREATE INDEX instances_sha ON instances(sha256);

        CREATE TABLE quarantine (
            id                  INTEGER PRIMARY KEY,
            received_at         REAL NOT NULL,
            association_id      TEXT,
            calling_ae          TEXT NOT NULL DEFAULT '',
            peer_host           TEXT NOT NULL DEFAULT '',
            status              INTEGER NOT NULL,      -- DIMSE status answered
            reason              TEXT NOT NULL,
            sop_class_uid       TEXT NOT NULL DEFAULT '',
            sop_instance_uid    TEXT NOT NULL DEFAULT '',
            sha256              TEXT NOT NULL,
            size_bytes          INTEGER NOT NULL,
            path                TEXT NOT NULL          -- relative to the quarantine folder
        );

        CREATE TABLE study_events (
            id          INTEGER PRIMARY KEY,
            study_uid   TEXT NOT NULL,
            at          REAL NOT NULL,
            from_state  TEXT,
            to_state    TEXT NOT NULL,
            reason      TEXT NOT NULL
        );
        CREATE INDEX study_events_study ON study_events(study_uid);
        """,
    ),
    Migration(
        "0002_inference",
        """
        CREATE TABLE model_versions (
            name            TEXT NOT NULL,
            version         TEXT NOT NULL,
            task            TEXT NOT NULL,
            manifest_sha256 TEXT NOT NULL,
            model_sha256    TEXT NOT NULL,
            path            TEXT NOT NULL,             -- package folder, relative to models_dir
            manifest        TEXT NOT NULL,             -- manifest.json as installed
            installed_at    REAL NOT NULL,
            active          INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (name, version)
        );
        CREATE UNIQUE INDEX model_versions_one_active ON model_versions(name) WHERE active = 1;

        CREATE TABLE inference_jobs (
            id              INTEGER PRIMARY KEY,
            study_uid       TEXT NOT NULL REFERENCES studies(study_uid),
            series_uid      TEXT NOT NULL,
            model_name      TEXT NOT NULL,
            model_version   TEXT NOT NULL,
            state           TEXT NOT NULL,             -- PENDING|RUNNING|DONE|FAILED|CANCELLED
            round           INTEGER NOT NULL,          -- studies.reopen_count when created
            attempts        INTEGER NOT NULL DEFAULT 0,
            created_at      REAL NOT NULL,
            started_at      REAL,
            finished_at     REAL,
            error           TEXT,
            result_id       TEXT
        );
        CREATE INDEX inference_jobs_state ON inference_jobs(state, id);
        CREATE INDEX inference_jobs_study ON inference_jobs(study_uid);

        CREATE TABLE results (
            result_id       TEXT PRIMARY KEY,          -- UUIDv7
            job_id          INTEGER NOT NULL REFERENCES inference_jobs(id),
            study_uid       TEXT NOT NULL,
            series_uid      TEXT NOT NULL,
            model_name      TEXT NOT NULL,
            model_version   TEXT NOT NULL,
            model_sha256    TEXT NOT NULL,
            provider        TEXT NOT NULL,
            task            TEXT NOT NULL,
            findings        TEXT NOT NULL,             -- JSON
            critical        INTEGER NOT NULL,
            instances       INTEGER NOT NULL,
            preprocess_ms   REAL NOT NULL,
            inference_ms    REAL NOT NULL,
            created_at      REAL NOT NULL,
            supersedes      TEXT,                      -- the result this one replaces
            superseded_by   TEXT                       -- set once, never the findings
        );
        CREATE INDEX results_study ON results(study_uid, model_name);
        """,
    ),
    Migration(
        "0003_result_objects",
        """
        CREATE TABLE result_objects (
            result_id        TEXT NOT NULL REFERENCES results(result_id),
            kind             TEXT NOT NULL,            -- SEG|SR
            sop_class_uid    TEXT NOT NULL,
            sop_instance_uid TEXT NOT NULL,
            path             TEXT NOT NULL,            -- relative to data_dir
            PRIMARY KEY (result_id, kind)
        );

        CREATE TABLE forwards (
            id               INTEGER PRIMARY KEY,
            result_id        TEXT NOT NULL,
            kind             TEXT NOT NULL,
            destination      TEXT NOT NULL,            -- AE@host:port
            state            TEXT NOT NULL,            -- PENDING|SENT|DEAD
            attempts         INTEGER NOT NULL DEFAULT 0,
            next_attempt_at  REAL NOT NULL,
            last_error       TEXT,
            created_at       REAL NOT NULL,
            sent_at          REAL,
            FOREIGN KEY (result_id, kind) REFERENCES result_objects(result_id, kind)
        );
        CREATE INDEX forwards_due ON forwards(state, next_attempt_at);
        """,
    ),
    Migration(
        "0004_outbox",
        """
        CREATE TABLE outbox (
            id              INTEGER PRIMARY KEY,
            lane            TEXT NOT NULL,             -- urgent|normal|batch
            seq             INTEGER NOT NULL,          -- 1, 2, ... per lane, no gaps
            key             TEXT NOT NULL,
            type            TEXT NOT NULL,
            hlc             TEXT NOT NULL,
            base_version    INTEGER NOT NULL,
            payload         TEXT NOT NULL,             -- JSON
            size_bytes      INTEGER NOT NULL,
            state           TEXT NOT NULL,             -- PENDING|ACKED|DEAD
            attempts        INTEGER NOT NULL DEFAULT 0,
            created_at      REAL NOT NULL,
            acked_at        REAL,
            error           TEXT,
            UNIQUE (lane, seq)
        );
        CREATE INDEX outbox_pending ON outbox(state, lane, seq);
        CREATE INDEX outbox_key ON outbox(key, seq);

        CREATE TABLE outbox_lanes (
            lane            TEXT PRIMARY KEY,
            last_seq        INTEGER NOT NULL,          -- last seq handed out
            high_water      INTEGER NOT NULL DEFAULT 0 -- what the hub said it holds
        );

        CREATE TABLE sync_state (
            name            TEXT PRIMARY KEY,          -- e.g. hlc
            value           TEXT NOT NULL
        );
        """,
    ),
    Migration(
        "0005_replica",
        """
        CREATE TABLE replica (                         -- cloud-side state pulled from the hub
            key             TEXT PRIMARY KEY,
            type            TEXT NOT NULL,
            version         INTEGER NOT NULL,
            payload         TEXT NOT NULL,             -- JSON
            feed_cursor     INTEGER NOT NULL,
            applied_at      REAL NOT NULL
        );
        """,
    ),
    Migration(
        "0006_model_updates",
        """
        CREATE TABLE model_updates (                   -- every release decision, with reason
            name            TEXT NOT NULL,
            version         TEXT NOT NULL,
            status          TEXT NOT NULL,             -- accepted|refused
            reason          TEXT NOT NULL,
            decided_at      REAL NOT NULL,
            PRIMARY KEY (name, version)
        );
        """,
    ),
    Migration(
        "0007_model_watch",
        """
        -- shadow: installed and self-tested, runs beside the active version on live series,
        -- publishes nothing (at most one per model); activated_at: start of the error-rate
        -- window of the active version
        ALTER TABLE model_versions ADD COLUMN shadow INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE model_versions ADD COLUMN activated_at REAL;
        UPDATE model_versions SET activated_at = installed_at WHERE active = 1;
        CREATE UNIQUE INDEX model_versions_one_shadow ON model_versions(name) WHERE shadow = 1;
        CREATE INDEX inference_jobs_model ON inference_jobs(model_name, model_version, finished_at);

        CREATE TABLE shadow_runs (                     -- one per series the shadow also ran on
            id              INTEGER PRIMARY KEY,
            job_id          INTEGER NOT NULL,
            name            TEXT NOT NULL,
            active_version  TEXT NOT NULL,
            shadow_version  TEXT NOT NULL,
            agree           INTEGER NOT NULL,
            score           REAL NOT NULL,             -- dice (masks) / top-1 match (classes)
            error           TEXT,                      -- the shadow failed (counts as disagree)
            at              REAL NOT NULL
        );
        CREATE INDEX shadow_runs_model ON shadow_runs(name, shadow_version, id);

        -- 0 until the hub has the decision (re-sent after each successful pull)
        ALTER TABLE model_updates ADD COLUMN reported INTEGER NOT NULL DEFAULT 0;
        UPDATE model_updates SET reported = 1;
        """,
    ),
    Migration(
        "0008_lifecycle",
        """
        -- instances.tier: hot|warm|cold (local files) or archived (only at the hub: path is
        -- then the archive blob's sha256); archive_sha256 set = the hub confirmed a copy
        ALTER TABLE instances ADD COLUMN archive_sha256 TEXT;
        ALTER TABLE instances ADD COLUMN archived_at REAL;
        CREATE INDEX instances_tier ON instances(tier, study_uid);
        -- a restored study ages from its restore, not from its reception
        ALTER TABLE studies ADD COLUMN restored_at REAL;

        CREATE TABLE tier_moves (                      -- journal of moves in progress
            instance_id     INTEGER PRIMARY KEY REFERENCES instances(id),
            src_tier        TEXT NOT NULL,
            src_path        TEXT NOT NULL,
            dst_tier        TEXT NOT NULL,
            dst_path        TEXT NOT NULL,
            started_at      REAL NOT NULL
        );

        CREATE TABLE restore_requests (
            study_uid       TEXT PRIMARY KEY,
            requested_at    REAL NOT NULL,
            requested_by    TEXT NOT NULL,
            finished_at     REAL,
            error           TEXT
        );

        CREATE TABLE lifecycle_jobs (                  -- schedule state survives restarts
            name            TEXT PRIMARY KEY,
            next_run_at     REAL,
            last_started_at REAL,
            last_finished_at REAL,
            last_status     TEXT,                      -- ok|error
            last_detail     TEXT
        );

        CREATE TABLE integrity_reports (
            id              INTEGER PRIMARY KEY,
            at              REAL NOT NULL,
            instance_id     INTEGER NOT NULL,
            tier            TEXT NOT NULL,
            path            TEXT NOT NULL,
            problem         TEXT NOT NULL
        );
        """,
    ),
    Migration(
        "0009_web",
        """
        CREATE TABLE users (
            username        TEXT PRIMARY KEY,
            role            TEXT NOT NULL,             -- radiologist|operator|admin
            password_hash   TEXT NOT NULL,             -- scrypt$n$r$p$salt$hash (base64)
            failed_logins   INTEGER NOT NULL DEFAULT 0,
            locked_until    REAL NOT NULL DEFAULT 0,
            created_at      REAL NOT NULL,
            disabled        INTEGER NOT NULL DEFAULT 0
        );
        CREATE TABLE sessions (
            token_sha256    TEXT PRIMARY KEY,          -- the cookie value is never stored
            username        TEXT NOT NULL REFERENCES users(username),
            csrf_token      TEXT NOT NULL,
            created_at      REAL NOT NULL,
            expires_at      REAL NOT NULL,
            remote          TEXT NOT NULL
        );
        CREATE TABLE api_tokens (
            token_sha256    TEXT PRIMARY KEY,
            name            TEXT NOT NULL UNIQUE,
            username        TEXT NOT NULL REFERENCES users(username),
            created_at      REAL NOT NULL,
            revoked_at      REAL
        );
        CREATE TABLE audit_log (                       -- who did or saw what, when, from where
            id              INTEGER PRIMARY KEY,
            at              REAL NOT NULL,
            username        TEXT NOT NULL,
            action          TEXT NOT NULL,             -- e.g. study.view, review.create, login
            target          TEXT NOT NULL,
            remote          TEXT NOT NULL,
            request_id      TEXT NOT NULL,
            detail          TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX audit_log_at ON audit_log(at);
        CREATE TABLE reviews (                         -- a radiologist's verdict on a finding
            review_id       TEXT PRIMARY KEY,          -- UUIDv7
            result_id       TEXT NOT NULL REFERENCES results(result_id),
            finding         TEXT NOT NULL,             -- label / measurement name
            decision        TEXT NOT NULL,             -- accept|reject|comment
            comment         TEXT NOT NULL DEFAULT '',
            username        TEXT NOT NULL,
            created_at      REAL NOT NULL
        );
        CREATE INDEX reviews_result ON reviews(result_id);
        -- the worklist: critical studies, and current results per study
        CREATE INDEX results_critical ON results(study_uid)
            WHERE critical = 1 AND superseded_by IS NULL;
        CREATE INDEX studies_received ON studies(last_received_at);
        """,
    ),
    Migration(
        "0010_association_audit",
        """
        -- every TCP connection is audited (outcome 'dropped' when it never became an
        -- association); who the peer said it was, beyond its AE title
        ALTER TABLE associations ADD COLUMN user_identity TEXT NOT NULL DEFAULT '';
        ALTER TABLE associations ADD COLUMN peer_implementation TEXT NOT NULL DEFAULT '';
        """,
    ),
    Migration(
        "0011_ingest_journal",
        """
        -- every ingest journal record before (segment, offset) is in the spool and here
        CREATE TABLE ingest_checkpoint (
            id          INTEGER PRIMARY KEY CHECK (id = 1),
            segment     INTEGER NOT NULL,
            offset      INTEGER NOT NULL,
            at          REAL NOT NULL
        );
        """,
    ),
    Migration(
        "0012_job_errors",
        """
        -- why a job failed: the stage it was in (read, preprocess, inference, postprocess,
        -- encode, store, model) and when; kept on a retry too (the last attempt's)
        ALTER TABLE inference_jobs ADD COLUMN error_stage TEXT;
        ALTER TABLE inference_jobs ADD COLUMN error_at REAL;
        UPDATE inference_jobs SET error_at = finished_at WHERE error IS NOT NULL;
        """,
    ),
    Migration(
        "0013_rerun",
        """
        -- a re-run a person asked for: the study is COMPLETE again in a new round
        -- (reopen_count + 1); set = only this model's jobs are scheduled
        ALTER TABLE studies ADD COLUMN rerun_model TEXT;
        """,
    ),
    Migration(
        "0014_audit_chain",
        """
        -- each audit row holds the previous row's hash and its own (edge_agent/audit.py);
        -- rows from before are chained by the next row written
        ALTER TABLE audit_log ADD COLUMN prev_sha256 TEXT;
        ALTER TABLE audit_log ADD COLUMN sha256 TEXT;
        """,
    ),
    Migration(
        "0015_account_controls",
        """
        -- a password someone else set (an admin's reset, a new account) must be changed at
        -- the next login; API tokens expire
        ALTER TABLE users ADD COLUMN must_change_password INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE users ADD COLUMN password_changed_at REAL;
        ALTER TABLE api_tokens ADD COLUMN expires_at REAL;
        UPDATE api_tokens SET expires_at = created_at + 365 * 86400;  -- older ones: a year
        """,
    ),
)


def apply_migrations(conn: sqlite3.Connection, now: float | None = None) -> list[str]:
    """Apply every pending migration in order; return the names applied.

    ``conn`` must be in autocommit mode (``isolation_level=None``). Raises :class:`StoreError`
    if a migration fails (that migration is rolled back) or the database knows a migration
    this code does not (a downgrade).
    """
    conn.execute(
        "CREATE TABLE IF NOT EXISTS _migrations (name TEXT PRIMARY KEY, applied_at REAL NOT NULL)"
    )
    done = {r[0] for r in conn.execute("SELECT name FROM _migrations")}
    known = {m.name for m in MIGRATIONS}
    unknown = sorted(done - known)
    if unknown:
        raise StoreError(
            f"database has migrations this version does not know ({', '.join(unknown)}): "
            "it was written by a newer edge-agent; refusing to run"
        )
    applied: list[str] = []
    for m in MIGRATIONS:
        if m.name in done:
            continue
        try:
            conn.execute("BEGIN IMMEDIATE")
            for statement in _statements(m.sql):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO _migrations (name, applied_at) VALUES (?, ?)",
                (m.name, time.time() if now is None else now),
            )
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise StoreError(f"migration {m.name} failed: {exc}") from exc
        applied.append(m.name)
    return applied


def _statements(sql: str) -> list[str]:
    # executescript() would COMMIT implicitly; split instead (no ';' inside our DDL strings).
    lines = [ln.split("--", 1)[0] for ln in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
