"""SQL for results: insert (superseding the current one), list; reviews of their findings."""

from __future__ import annotations

import json
import sqlite3

from edge_agent.results.models import Result


def insert_result(conn: sqlite3.Connection, r: Result) -> str | None:
    """Insert ``r``; if a current result exists for the same study, series and model, mark it
    superseded by ``r`` (its findings are never touched). Returns the superseded id."""
    prev = conn.execute(
        "SELECT result_id FROM results WHERE study_uid = ? AND series_uid = ? AND model_name = ?"
        " AND superseded_by IS NULL",
        (r.study_uid, r.series_uid, r.model_name),
    ).fetchone()
    supersedes = prev[0] if prev else None
    conn.execute(
        """INSERT INTO results (result_id, job_id, study_uid, series_uid, model_name,
               model_version, model_sha256, provider, task, findings, critical, instances,
               preprocess_ms, inference_ms, created_at, supersedes)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
        (
            r.result_id,
            r.job_id,
            r.study_uid,
            r.series_uid,
            r.model_name,
            r.model_version,
            r.model_sha256,
            r.provider,
            r.task,
            json.dumps(r.findings, sort_keys=True),
            int(r.critical),
            r.instances,
            r.preprocess_ms,
            r.inference_ms,
            r.created_at,
            supersedes,
        ),
    )
    if supersedes:
        conn.execute(
            "UPDATE results SET superseded_by = ? WHERE result_id = ?", (r.result_id, supersedes)
        )
    return supersedes


def _result(row: sqlite3.Row) -> Result:
    return Result(
        result_id=row["result_id"],
        job_id=row["job_id"],
        study_uid=row["study_uid"],
        series_uid=row["series_uid"],
        model_name=row["model_name"],
        model_version=row["model_version"],
        model_sha256=row["model_sha256"],
        provider=row["provider"],
        task=row["task"],
        findings=json.loads(row["findings"]),
        critical=bool(row["critical"]),
        instances=row["instances"],
        preprocess_ms=row["preprocess_ms"],
        inference_ms=row["inference_ms"],
        created_at=row["created_at"],
        supersedes=row["supersedes"],
        superseded_by=row["superseded_by"],
    )


def _results_where(study_uid: str | None, include_superseded: bool) -> tuple[str, list[str]]:
    where, params = [], []
    if study_uid:
        where.append("study_uid = ?")
        params.append(study_uid)
    if not include_superseded:
        where.append("superseded_by IS NULL")
    return (" WHERE " + " AND ".join(where) if where else ""), params


def list_results(
    conn: sqlite3.Connection,
    *,
    study_uid: str | None = None,
    include_superseded: bool = False,
    limit: int = 1000,
) -> list[Result]:
    """Results, newest first; by default only current (not superseded) ones."""
    where, params = _results_where(study_uid, include_superseded)
    sql = "SELECT * FROM results" + where  # noqa: S608 - constant fragments
    sql += " ORDER BY created_at DESC, result_id DESC LIMIT ?"
    return [_result(r) for r in conn.execute(sql, (*params, limit))]


def current_object_path(
    conn: sqlite3.Connection, *, study_uid: str, series_uid: str, model_name: str, kind: str
) -> str | None:
    """The path (relative to data_dir) of the ``kind`` object (SEG, SR, KO) of the current
    result for this study, series and model: what a new result will supersede."""
    row = conn.execute(
        "SELECT o.path FROM results r JOIN result_objects o ON o.result_id = r.result_id"
        " WHERE r.study_uid = ? AND r.series_uid = ? AND r.model_name = ?"
        " AND r.superseded_by IS NULL AND o.kind = ?",
        (study_uid, series_uid, model_name, kind),
    ).fetchone()
    return str(row[0]) if row else None


def count_results(
    conn: sqlite3.Connection, *, study_uid: str | None = None, include_superseded: bool = False
) -> int:
    """How many results :func:`list_results` would give without a limit."""
    where, params = _results_where(study_uid, include_superseded)
    row = conn.execute("SELECT count(*) FROM results" + where, params).fetchone()  # noqa: S608
    return int(row[0])


def result_for_review(conn: sqlite3.Connection, result_id: str) -> sqlite3.Row | None:
    """What a review checks: study_uid, task, findings (JSON), superseded_by."""
    row: sqlite3.Row | None = conn.execute(
        "SELECT study_uid, task, findings, superseded_by FROM results WHERE result_id = ?",
        (result_id,),
    ).fetchone()
    return row


def insert_review(
    conn: sqlite3.Connection,
    *,
    review_id: str,
    result_id: str,
    finding: str,
    decision: str,
    comment: str,
    username: str,
    now: float,
) -> None:
    conn.execute(
        "INSERT INTO reviews (review_id, result_id, finding, decision, comment, username, "
        "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (review_id, result_id, finding, decision, comment, username, now),
    )


def list_forwards(
    conn: sqlite3.Connection, *, state: str | None = None, limit: int = 50
) -> list[sqlite3.Row]:
    """Result objects queued for or sent to PACS (all columns), newest first; only those in
    ``state`` (PENDING, SENT, DEAD) if given."""
    sql = "SELECT * FROM forwards" + (" WHERE state = ?" if state else "")  # noqa: S608
    sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
    params = (state, limit) if state else (limit,)
    return list(conn.execute(sql, params))


def study_forwards(conn: sqlite3.Connection, study_uid: str) -> list[dict[str, object]]:
    """The sends to PACS of a study's result objects (current and superseded results), newest
    first: id, result_id, kind, destination, state, attempts, last_error, next_attempt_at,
    created_at, sent_at."""
    return [
        dict(r)
        for r in conn.execute(
            "SELECT f.id, f.result_id, f.kind, f.destination, f.state, f.attempts, "
            "f.last_error, f.next_attempt_at, f.created_at, f.sent_at FROM forwards f "
            "JOIN results r USING (result_id) WHERE r.study_uid = ? "
            "ORDER BY f.created_at DESC, f.id DESC",
            (study_uid,),
        )
    ]
