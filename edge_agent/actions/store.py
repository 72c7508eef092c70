"""SQL of the study actions (inside the writer's transaction): the audit row each writes."""

from __future__ import annotations

import sqlite3

from edge_agent.actions.models import Actor


def audit(
    conn: sqlite3.Connection, actor: Actor, *, action: str, target: str, detail: str, now: float
) -> None:
    """The audit row of an action, in the action's own transaction (both or neither)."""
    conn.execute(
        "INSERT INTO audit_log (at, username, action, target, remote, request_id, detail) "
        "VALUES (?, ?, ?, ?, ?, ?, ?)",
        (now, actor.username, action, target, actor.remote, actor.request_id, detail[:1000]),
    )
