"""The web's read model: every query the pages and the API show (read connections only;
what they change goes through domain functions)."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from edge_agent.inference.store import study_jobs
from edge_agent.results.reviews import finding_names
from edge_agent.results.store import study_forwards

# -- worklist -------------------------------------------------------------------------------

_FILTER = """
  (:q = '' OR s.patient_name LIKE :pat ESCAPE '\\' OR s.patient_id LIKE :pat ESCAPE '\\'
   OR s.accession_number LIKE :pat ESCAPE '\\' OR s.study_uid LIKE :pat ESCAPE '\\')
  AND (:state = '' OR s.state = :state)
  AND (:modality = '' OR s.modality = :modality)
  AND (:critical < 0 OR (s.study_uid IN crit) = :critical)
"""

# The page is chosen on cheap columns first (critical = member of a small indexed set), then
# the per-study counts are computed for the rows of that page only.
WORKLIST_SQL = (
    """
WITH crit AS (SELECT study_uid FROM results WHERE critical = 1 AND superseded_by IS NULL),
page AS (
  SELECT s.study_uid, s.patient_name, s.patient_id, s.accession_number, s.modality,
         s.study_date, s.description, s.state, s.last_received_at, s.instance_count,
         (s.study_uid IN crit) AS critical
  FROM studies s WHERE"""
    + _FILTER
    + """
  ORDER BY critical DESC, s.last_received_at DESC LIMIT :limit OFFSET :offset
)
SELECT page.*,
  (SELECT count(*) FROM results r WHERE r.study_uid = page.study_uid
    AND r.superseded_by IS NULL) AS results,
  (SELECT count(*) FROM reviews v JOIN results r USING (result_id)
    WHERE r.study_uid = page.study_uid AND r.superseded_by IS NULL) AS reviews
FROM page ORDER BY critical DESC, last_received_at DESC
"""
)

COUNT_SQL = (
    """
WITH crit AS (SELECT study_uid FROM results WHERE critical = 1 AND superseded_by IS NULL)
SELECT count(*) FROM studies s WHERE"""
    + _FILTER
)


def like(q: str) -> str:
    """A LIKE pattern matching ``q`` anywhere, its own % and _ taken literally."""
    return "%" + q.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def worklist(
    conn: sqlite3.Connection, params: dict[str, str | int], *, limit: int, offset: int
) -> tuple[list[sqlite3.Row], int]:
    """One page of the worklist and the total matching ``params`` (q, pat, state, modality,
    critical: see ``_FILTER``)."""
    rows = conn.execute(WORKLIST_SQL, {**params, "limit": limit, "offset": offset}).fetchall()
    (total,) = conn.execute(COUNT_SQL, params).fetchone()
    return rows, int(total)


# -- a study --------------------------------------------------------------------------------


def study_exists(conn: sqlite3.Connection, study_uid: str) -> bool:
    return (
        conn.execute("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
        is not None
    )


def study_detail(conn: sqlite3.Connection, study_uid: str) -> dict[str, Any] | None:
    """Everything the study page shows (shared by the API and the page)."""
    s = conn.execute("SELECT * FROM studies WHERE study_uid = ?", (study_uid,)).fetchone()
    if s is None:
        return None
    series = []
    for se in conn.execute(
        "SELECT * FROM series WHERE study_uid = ? ORDER BY series_number", (study_uid,)
    ):
        instances = [
            {"sop_instance_uid": r[0], "tier": r[1]}
            for r in conn.execute(
                "SELECT i.sop_instance_uid, i.tier FROM instances i WHERE i.series_uid = ? AND "
                "i.version = (SELECT max(version) FROM instances j WHERE j.sop_instance_uid = "
                "i.sop_instance_uid) ORDER BY CAST(i.instance_number AS INTEGER), i.id",
                (se["series_uid"],),
            )
        ]
        series.append(
            {
                "series_uid": se["series_uid"],
                "modality": se["modality"],
                "series_number": se["series_number"],
                "description": se["description"],
                "body_part": se["body_part"],
                "instances": instances,
            }
        )
    results = []
    for r in conn.execute(
        "SELECT * FROM results WHERE study_uid = ? AND superseded_by IS NULL "
        "ORDER BY model_name, created_at",
        (study_uid,),
    ):
        findings = json.loads(r["findings"])
        results.append(
            {
                "result_id": r["result_id"],
                "series_uid": r["series_uid"],
                "model_name": r["model_name"],
                "model_version": r["model_version"],
                "model_sha256": r["model_sha256"],
                "provider": r["provider"],
                "task": r["task"],
                "critical": bool(r["critical"]),
                "created_at": r["created_at"],
                "findings": findings,
                "finding_names": finding_names(r["task"], findings),
                "objects": [
                    {"kind": o[0], "sop_instance_uid": o[1]}
                    for o in conn.execute(
                        "SELECT kind, sop_instance_uid FROM result_objects WHERE result_id = ?",
                        (r["result_id"],),
                    )
                ],
                "reviews": [
                    dict(v)
                    for v in conn.execute(
                        "SELECT review_id, finding, decision, comment, username, created_at "
                        "FROM reviews WHERE result_id = ? ORDER BY created_at",
                        (r["result_id"],),
                    )
                ],
            }
        )
    return {
        "study_uid": s["study_uid"],
        "patient_name": s["patient_name"],
        "patient_id": s["patient_id"],
        "accession_number": s["accession_number"],
        "study_date": s["study_date"],
        "description": s["description"],
        "modality": s["modality"],
        "state": s["state"],
        "received_at": s["last_received_at"],
        "instances": s["instance_count"],
        "series": series,
        "results": results,
        "jobs": study_jobs(conn, study_uid),
        "failures": failures(conn, study_uid, s["reopen_count"]),
        "forwards": study_forwards(conn, study_uid),
    }


def failures(conn: sqlite3.Connection, study_uid: str, round_: int) -> list[dict[str, Any]]:
    """Why the study's current round failed: its FAILED jobs (model, version, stage, error,
    when), empty when none did."""
    return [
        {k: j[k] for k in ("id", "series_uid", "model_name", "model_version", "attempts")}
        | {"stage": j["error_stage"] or "", "error": j["error"] or "", "at": j["error_at"]}
        for j in study_jobs(conn, study_uid)
        if j["state"] == "FAILED" and j["round"] == round_
    ]


def series_slices(conn: sqlite3.Connection, series_uid: str) -> list[tuple[str, str, str]]:
    """(sop_instance_uid, tier, path) of the latest version of each instance, in instance
    number order."""
    return [
        (r[0], r[1], r[2])
        for r in conn.execute(
            "SELECT i.sop_instance_uid, i.tier, i.path FROM instances i WHERE "
            "i.series_uid = ? AND i.version = (SELECT max(version) FROM instances j WHERE "
            "j.sop_instance_uid = i.sop_instance_uid) "
            "ORDER BY CAST(i.instance_number AS INTEGER), i.id",
            (series_uid,),
        )
    ]


def current_seg_path(conn: sqlite3.Connection, series_uid: str) -> str | None:
    """The SEG object of the newest current result on ``series_uid``."""
    row = conn.execute(
        "SELECT o.path FROM results r JOIN result_objects o USING (result_id) WHERE "
        "r.series_uid = ? AND r.superseded_by IS NULL AND o.kind = 'SEG' "
        "ORDER BY r.created_at DESC LIMIT 1",
        (series_uid,),
    ).fetchone()
    return None if row is None else str(row[0])


def result_object_path(conn: sqlite3.Connection, result_id: str, kind: str) -> str | None:
    row = conn.execute(
        "SELECT path FROM result_objects WHERE result_id = ? AND kind = ?", (result_id, kind)
    ).fetchone()
    return None if row is None else str(row[0])


def priors(conn: sqlite3.Connection, study_uid: str) -> list[dict[str, Any]]:
    """The patient's studies (this one included) with their segmentation measurements,
    oldest first. Empty when the patient ID is unknown or there is no other study."""
    row = conn.execute(
        "SELECT patient_id FROM studies WHERE study_uid = ?", (study_uid,)
    ).fetchone()
    if row is None or not row[0]:
        return []
    out = []
    for s in conn.execute(
        "SELECT study_uid, study_date, first_received_at FROM studies WHERE patient_id = ? "
        "ORDER BY study_date, first_received_at",
        (row[0],),
    ):
        for r in conn.execute(
            "SELECT model_name, model_version, findings FROM results WHERE study_uid = ? "
            "AND superseded_by IS NULL AND task = 'segmentation' ORDER BY model_name",
            (s["study_uid"],),
        ):
            f = json.loads(r["findings"])
            out.append(
                {
                    "study_uid": s["study_uid"],
                    "study_date": s["study_date"],
                    "received_at": s["first_received_at"],
                    "model": f"{r['model_name']} {r['model_version']}",
                    "label": f.get("label", ""),
                    "area_mm2_total": f.get("area_mm2_total"),
                    "volume_mm3": f.get("volume_mm3"),
                }
            )
    return out if len({p["study_uid"] for p in out}) > 1 else []


# -- the audit log --------------------------------------------------------------------------


def audit_rows(conn: sqlite3.Connection, *, since: float, limit: int) -> list[dict[str, Any]]:
    return [
        dict(r)
        for r in conn.execute(
            "SELECT id, at, username, action, target, remote, request_id, detail, prev_sha256, "
            "sha256 FROM audit_log WHERE at >= ? ORDER BY id LIMIT ?",
            (since, limit),
        )
    ]
