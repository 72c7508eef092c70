"""Reviews: a radiologist accepts, rejects or comments on one finding of a current result.
The review and its outbox record for the hub are written in one transaction."""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from edge_agent.errors import Conflict, InvalidRequest, NotFound
from edge_agent.results.models import uuid7
from edge_agent.results.store import insert_review, result_for_review
from edge_agent.sync.outbox import enqueue
from hub_protocol import HybridClock, Lane, RecordType

DECISIONS = ("accept", "reject", "comment")


def finding_names(task: str, findings: dict[str, Any]) -> list[str]:
    """The findings of a result a review can name."""
    if task == "segmentation":
        return [str(findings.get("label", "finding"))]
    return sorted(findings.get("probabilities", {}))


def check_decision(decision: str) -> None:
    if decision not in DECISIONS:
        raise InvalidRequest(f"decision must be one of {', '.join(DECISIONS)}")


def create_review(
    conn: sqlite3.Connection,
    *,
    result_id: str,
    finding: str,
    decision: str,
    comment: str,
    username: str,
    now: float,
    hlc: HybridClock | None,
) -> dict[str, Any]:
    """Record a review of ``finding`` of a current result (inside the writer's transaction)
    and queue it for the hub when the hybrid clock ``hlc`` is given. Raises NotFound (no
    such result), Conflict ``superseded`` (review the newer result), InvalidRequest (no such
    finding or decision)."""
    check_decision(decision)
    r = result_for_review(conn, result_id)
    if r is None:
        raise NotFound("no such result")
    if r["superseded_by"]:
        raise Conflict("superseded", "this result was superseded; review the new one")
    if finding not in finding_names(r["task"], json.loads(r["findings"])):
        raise InvalidRequest(f"the result has no finding {finding!r}")
    review: dict[str, Any] = {
        "review_id": uuid7(now),
        "result_id": result_id,
        "study_uid": r["study_uid"],
        "finding": finding,
        "decision": decision,
        "comment": comment,
        "reviewer": username,
        "created_at": now,
    }
    insert_review(
        conn,
        review_id=review["review_id"],
        result_id=result_id,
        finding=finding,
        decision=decision,
        comment=comment,
        username=username,
        now=now,
    )
    if hlc is not None:
        enqueue(
            conn,
            key=f"review/{review['review_id']}",
            type=RecordType.REVIEW,
            lane=Lane.NORMAL,
            payload=review,
            hlc=hlc.now(),
            now=now,
        )
    return review
