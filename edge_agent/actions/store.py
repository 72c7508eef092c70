"""SQL of the study actions (inside the writer's transaction): the audit row each writes."""

from __future__ import annotations

import sqlite3

from edge_agent.actions.models import Actor
from edge_agent.audit import append


def audit(
    conn: sqlite3.Connection, actor: Actor, *, action: str, target: str, detail: str, now: float
) -> None:
    """The audit row of an action, in the action's own transaction (both or neither)."""
    append(
        conn,
        at=now,
        username=actor.username,
        action=action,
        target=target,
        remote=actor.remote,
        request_id=actor.request_id,
        detail=detail,
    )
