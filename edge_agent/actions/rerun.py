"""Re-run a study: every model that applies, or one model."""

from __future__ import annotations

import sqlite3

from edge_agent.actions.models import Actor
from edge_agent.actions.store import audit
from edge_agent.inference.store import request_rerun
from edge_agent.store import Store


def rerun(store: Store, study_uid: str, *, model: str | None, actor: Actor, now: float) -> int:
    """Put the study back in line for inference (the running agent's scheduler routes it
    again with the active model versions; each new result supersedes the previous one of its
    series and model), audited as ``study.rerun``. Returns the new round.

    Raises NotFound, Conflict (``busy``: receiving or running) or InvalidRequest (``model``
    has no active version)."""

    def tx(conn: sqlite3.Connection) -> int:
        round_ = request_rerun(conn, study_uid=study_uid, model=model, now=now, by=actor.username)
        audit(
            conn,
            actor,
            action="study.rerun",
            target=study_uid,
            detail=f"model {model}" if model else "every model that applies",
            now=now,
        )
        return round_

    result: int = store.writer.call(tx)
    return result
