"""SQL for instances, series and studies. Write functions take the writer's connection and
run inside its transaction; read functions take any connection."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass
from enum import StrEnum

from edge_agent.studies.models import InvalidTransition, Study, StudyState, check_transition
from edge_agent.studies.parse import InstanceInfo


class RecordOutcome(StrEnum):
    STORED = "stored"  # a new SOP instance
    DUPLICATE = "duplicate"  # same SOP instance, identical bytes: nothing new kept
    NEW_VERSION = "new_version"  # same SOP instance, different bytes: kept as version N


@dataclass(frozen=True)
class Recorded:
    outcome: RecordOutcome
    instance_id: int | None
    version: int
    late: bool


#: What entering a state sets besides ``state``.
_ENTER: dict[StudyState, str] = {
    # re-opened by a late arrival: a new round, and the completion it had is void
    StudyState.RECEIVING: "UPDATE studies SET state = :state, reopen_count = reopen_count + 1, "
    "completed_at = NULL, completed_reason = NULL WHERE study_uid = :uid",
    StudyState.COMPLETE: "UPDATE studies SET state = :state, completed_at = :now, "
    "completed_reason = :reason WHERE study_uid = :uid",
}
_SET_STATE = "UPDATE studies SET state = :state WHERE study_uid = :uid"


def transition(
    conn: sqlite3.Connection,
    study_uid: str,
    old: StudyState | None,
    new: StudyState,
    *,
    now: float,
    reason: str,
) -> None:
    """The one place a study changes state (inside the writer's transaction): check the
    transition table, set the state and what entering it resets or stamps, and write the
    event row. ``old`` None: the study row was just inserted in ``new`` (its first event)."""
    if old is None:
        if new is not StudyState.RECEIVING:
            raise InvalidTransition(f"a study starts in {StudyState.RECEIVING}, not {new}")
    else:
        check_transition(old, new)
        conn.execute(
            _ENTER.get(new, _SET_STATE),
            {"state": new.value, "now": now, "reason": reason, "uid": study_uid},
        )
    conn.execute(
        "INSERT INTO study_events (study_uid, at, from_state, to_state, reason) "
        "VALUES (?, ?, ?, ?, ?)",
        (study_uid, now, None if old is None else old.value, new.value, reason),
    )


@dataclass(frozen=True, kw_only=True)
class StoredObject:
    sha256: str
    size_bytes: int
    tier: str
    path: str


def sop_versions(conn: sqlite3.Connection, sop_instance_uid: str) -> list[tuple[int, str, str]]:
    """``[(version, sha256, transfer syntax), ...]`` already held for a SOP Instance UID."""
    rows = conn.execute(
        "SELECT version, sha256, transfer_syntax FROM instances WHERE sop_instance_uid = ?"
        " ORDER BY version",
        (sop_instance_uid,),
    ).fetchall()
    return [(int(r[0]), str(r[1]), str(r[2])) for r in rows]


def record_instance(
    conn: sqlite3.Connection,
    info: InstanceInfo,
    obj: StoredObject,
    *,
    now: float,
    association_id: str | None,
    calling_ae: str,
) -> Recorded:
    """Insert one received instance and update its series and study (inside the writer's
    transaction). Identical bytes for a known SOP instance record nothing; different bytes
    add a new version. An instance for a study past RECEIVING re-opens it (late arrival).
    """
    versions = sop_versions(conn, info.sop_instance_uid)
    for version, sha, ts in versions:
        if sha == obj.sha256 and ts == info.transfer_syntax:
            return Recorded(RecordOutcome.DUPLICATE, None, version, late=False)
    version = (versions[-1][0] + 1) if versions else 1
    new_sop = not versions

    row = conn.execute(
        "SELECT state FROM studies WHERE study_uid = ?", (info.study_uid,)
    ).fetchone()
    late = False
    if row is None:
        conn.execute(
            """INSERT INTO studies (study_uid, patient_id, patient_name, study_date,
                   accession_number, description, modality, state, first_received_at,
                   last_received_at, expected_instances, instance_count)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 0)""",
            (
                info.study_uid,
                info.patient_id,
                info.patient_name,
                info.study_date,
                info.accession_number,
                info.study_description,
                info.modality,
                StudyState.RECEIVING.value,
                now,
                now,
                info.expected_study_instances,
            ),
        )
        transition(
            conn, info.study_uid, None, StudyState.RECEIVING, now=now, reason="first instance"
        )
    else:
        state = StudyState(row[0])
        if state is not StudyState.RECEIVING:
            late = True
            transition(
                conn,
                info.study_uid,
                state,
                StudyState.RECEIVING,
                now=now,
                reason=f"late arrival {info.sop_instance_uid}"
                + (f" (version {version})" if version > 1 else ""),
            )
    conn.execute(
        """UPDATE studies SET last_received_at = ?,
               instance_count = instance_count + ?,
               late_arrivals = late_arrivals + ?,
               expected_instances = coalesce(?, expected_instances),
               modality = CASE WHEN modality = '' THEN ? ELSE modality END
           WHERE study_uid = ?""",
        (
            now,
            1 if new_sop else 0,
            1 if late else 0,
            info.expected_study_instances,
            info.modality,
            info.study_uid,
        ),
    )
    conn.execute(
        """INSERT INTO series (series_uid, study_uid, modality, series_number, description,
               body_part, instance_count, first_received_at, last_received_at)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(series_uid) DO UPDATE SET
               instance_count = instance_count + excluded.instance_count,
               last_received_at = excluded.last_received_at""",
        (
            info.series_uid,
            info.study_uid,
            info.modality,
            info.series_number,
            info.series_description,
            info.body_part,
            1 if new_sop else 0,
            now,
            now,
        ),
    )
    cur = conn.execute(
        """INSERT INTO instances (sop_instance_uid, version, sop_class_uid, series_uid,
               study_uid, instance_number, transfer_syntax, sha256, size_bytes, tier, path,
               received_at, association_id, calling_ae, late)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            info.sop_instance_uid,
            version,
            info.sop_class_uid,
            info.series_uid,
            info.study_uid,
            info.instance_number,
            info.transfer_syntax,
            obj.sha256,
            obj.size_bytes,
            obj.tier,
            obj.path,
            now,
            association_id,
            calling_ae,
            int(late),
        ),
    )
    outcome = RecordOutcome.STORED if new_sop else RecordOutcome.NEW_VERSION
    return Recorded(outcome, cur.lastrowid, version, late)


def receiving_studies(conn: sqlite3.Connection) -> list[sqlite3.Row]:
    """Studies in RECEIVING, with what the completeness rules need."""
    return conn.execute(
        "SELECT study_uid, modality, last_received_at, instance_count, expected_instances "
        "FROM studies WHERE state = ?",
        (StudyState.RECEIVING.value,),
    ).fetchall()


def complete_study(
    conn: sqlite3.Connection,
    study_uid: str,
    *,
    seen_last_received_at: float,
    now: float,
    reason: str,
) -> bool:
    """Move a study RECEIVING -> COMPLETE, unless an instance arrived since the caller looked
    (``last_received_at`` changed) or it is no longer RECEIVING. Returns True if moved."""
    row = conn.execute(
        "SELECT state, last_received_at FROM studies WHERE study_uid = ?", (study_uid,)
    ).fetchone()
    if row is None or row[0] != StudyState.RECEIVING.value or row[1] != seen_last_received_at:
        return False
    transition(conn, study_uid, StudyState.RECEIVING, StudyState.COMPLETE, now=now, reason=reason)
    return True


def rebase_study_clock(
    conn: sqlite3.Connection, study_uid: str, *, seen_last_received_at: float, now: float
) -> bool:
    """The wall clock went backwards past a study's last arrival: restart its quiet period at
    ``now`` so it does not wait for the clock to catch up. Returns True if changed."""
    cur = conn.execute(
        "UPDATE studies SET last_received_at = ? WHERE study_uid = ? AND state = ? "
        "AND last_received_at = ?",
        (now, study_uid, StudyState.RECEIVING.value, seen_last_received_at),
    )
    return cur.rowcount == 1


_STUDY_COLUMNS = """s.study_uid, s.patient_id, s.patient_name, s.study_date, s.accession_number,
    s.description, s.modality, s.state, s.first_received_at, s.last_received_at,
    s.completed_at, s.completed_reason, s.expected_instances, s.instance_count,
    (SELECT count(*) FROM series se WHERE se.study_uid = s.study_uid) AS series_count,
    s.late_arrivals, s.reopen_count"""


def _study(row: sqlite3.Row) -> Study:
    return Study(
        study_uid=row["study_uid"],
        patient_id=row["patient_id"],
        patient_name=row["patient_name"],
        study_date=row["study_date"],
        accession_number=row["accession_number"],
        description=row["description"],
        modality=row["modality"],
        state=StudyState(row["state"]),
        first_received_at=row["first_received_at"],
        last_received_at=row["last_received_at"],
        completed_at=row["completed_at"],
        completed_reason=row["completed_reason"],
        expected_instances=row["expected_instances"],
        instance_count=row["instance_count"],
        series_count=row["series_count"],
        late_arrivals=row["late_arrivals"],
        reopen_count=row["reopen_count"],
    )


def list_studies(
    conn: sqlite3.Connection, *, state: StudyState | None = None, limit: int = 1000
) -> list[Study]:
    """Studies, most recently received first."""
    sql = f"SELECT {_STUDY_COLUMNS} FROM studies s"  # noqa: S608 - constant columns
    params: tuple[object, ...] = ()
    if state is not None:
        sql += " WHERE s.state = ?"
        params = (state.value,)
    sql += " ORDER BY s.last_received_at DESC LIMIT ?"
    return [_study(r) for r in conn.execute(sql, (*params, limit))]


def count_studies(conn: sqlite3.Connection) -> int:
    """How many studies the store holds (any state)."""
    return int(conn.execute("SELECT count(*) FROM studies").fetchone()[0])


def get_study(conn: sqlite3.Connection, study_uid: str) -> Study | None:
    row = conn.execute(
        f"SELECT {_STUDY_COLUMNS} FROM studies s WHERE s.study_uid = ?",  # noqa: S608
        (study_uid,),
    ).fetchone()
    return None if row is None else _study(row)


def series_for_routing(conn: sqlite3.Connection, study_uid: str) -> list[sqlite3.Row]:
    """series_uid, modality, body_part, description, instance_count of a study's series."""
    return conn.execute(
        "SELECT series_uid, modality, body_part, description, instance_count "
        "FROM series WHERE study_uid = ?",
        (study_uid,),
    ).fetchall()


def series_sop_classes(conn: sqlite3.Connection, series_uid: str) -> frozenset[str]:
    return frozenset(
        str(r[0])
        for r in conn.execute(
            "SELECT DISTINCT sop_class_uid FROM instances WHERE series_uid = ?", (series_uid,)
        )
    )


def path_in_use(conn: sqlite3.Connection, tier: str, path: str) -> bool:
    """True if an instance row names the file ``path`` on ``tier``."""
    row = conn.execute(
        "SELECT 1 FROM instances WHERE tier = ? AND path = ? LIMIT 1", (tier, path)
    ).fetchone()
    return row is not None


# -- the ingest journal's checkpoint ----------------------------------------------------------


def save_checkpoint(conn: sqlite3.Connection, *, segment: int, offset: int, now: float) -> None:
    """Every journal record before (``segment``, ``offset``) is in the store."""
    conn.execute(
        "INSERT INTO ingest_checkpoint (id, segment, offset, at) VALUES (1, ?, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET segment = excluded.segment, "
        "offset = excluded.offset, at = excluded.at",
        (segment, offset, now),
    )


def load_checkpoint(conn: sqlite3.Connection) -> tuple[int, int]:
    row = conn.execute("SELECT segment, offset FROM ingest_checkpoint WHERE id = 1").fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


# -- the association audit trail and the quarantine -------------------------------------------


@dataclass(frozen=True, kw_only=True)
class AssociationOpened:
    id: str
    calling_ae: str
    called_ae: str
    peer_host: str
    peer_port: int
    tls: bool
    started_at: float
    ended_at: float | None
    outcome: str
    reject_reason: str | None
    user_identity: str | None
    peer_implementation: str | None


def open_association(conn: sqlite3.Connection, a: AssociationOpened) -> None:
    conn.execute(
        """INSERT INTO associations (id, calling_ae, called_ae, peer_host, peer_port,
               tls, started_at, ended_at, outcome, reject_reason, user_identity,
               peer_implementation)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            a.id, a.calling_ae, a.called_ae, a.peer_host, a.peer_port, int(a.tls),
            a.started_at, a.ended_at, a.outcome, a.reject_reason, a.user_identity,
            a.peer_implementation,
        ),
    )  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class AssociationClosed:
    id: str
    ended_at: float
    outcome: str
    reject_reason: str | None
    received: int
    duplicates: int
    failed: int
    refused: int


def close_association(conn: sqlite3.Connection, a: AssociationClosed) -> None:
    conn.execute(
        """UPDATE associations SET ended_at = ?, outcome = ?, reject_reason = ?,
               received = ?, duplicates = ?, failed = ?, refused = ? WHERE id = ?""",
        (
            a.ended_at, a.outcome, a.reject_reason, a.received, a.duplicates, a.failed,
            a.refused, a.id,
        ),
    )  # fmt: skip


def known_associations(conn: sqlite3.Connection, ids: list[str]) -> set[str]:
    """Of ``ids``, those with an audit row."""
    if not ids:
        return set()
    rows = conn.execute(
        "SELECT id FROM associations WHERE id IN (SELECT value FROM json_each(?))",
        (json.dumps(ids),),
    )
    return {str(r[0]) for r in rows}


@dataclass(frozen=True, kw_only=True)
class Quarantined:
    received_at: float
    association_id: str | None
    calling_ae: str
    peer_host: str
    status: int
    reason: str
    sop_class_uid: str
    sop_instance_uid: str
    sha256: str
    size_bytes: int
    path: str


def insert_quarantine(conn: sqlite3.Connection, q: Quarantined) -> None:
    conn.execute(
        """INSERT INTO quarantine (received_at, association_id, calling_ae, peer_host, status,
               reason, sop_class_uid, sop_instance_uid, sha256, size_bytes, path)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            q.received_at, q.association_id, q.calling_ae, q.peer_host, q.status, q.reason,
            q.sop_class_uid, q.sop_instance_uid, q.sha256, q.size_bytes, q.path,
        ),
    )  # fmt: skip
