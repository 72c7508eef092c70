"""The outbox: changes bound for the hub, written in the same transaction as the change.

Every row has a lane (urgent > normal > batch) and a per-lane sequence without gaps, so the
hub's per-lane high-water mark says exactly what it holds. Batches are drained lane by lane
in that order, oldest first. A receipt acknowledges rows; a rejected row is dead-lettered
with its reason (and stays visible); the outbox is bounded by bytes: when full, enqueueing
raises OutOfResources (the caller's transaction fails and is retried later) instead of
dropping anything.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edge_agent.errors import OutOfResources
from edge_agent.sync.state import save_hlc
from hub_protocol import HLC, Lane, PushReceipt, ReceiptStatus, Record, RecordType

PENDING, ACKED, DEAD = "PENDING", "ACKED", "DEAD"


@dataclass(frozen=True)
class OutboxStats:
    depth: Mapping[Lane, int]
    pending_bytes: int
    oldest_pending_at: float | None
    dead: int


def enqueue(
    conn: sqlite3.Connection,
    *,
    key: str,
    type: RecordType,
    lane: Lane,
    payload: Mapping[str, Any],
    hlc: HLC,
    now: float,
    base_version: int = 0,
    max_pending_bytes: int | None = None,
) -> int:
    """Append a record inside the caller's transaction and remember ``hlc`` as the latest
    handed out (so it never goes back after a restart); returns its per-lane seq.

    Raises OutOfResources when the pending bytes would exceed ``max_pending_bytes``.
    """
    body = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    size = len(body.encode())
    if max_pending_bytes is not None:
        (pending,) = conn.execute(
            "SELECT coalesce(sum(size_bytes), 0) FROM outbox WHERE state = ?", (PENDING,)
        ).fetchone()
        if pending + size > max_pending_bytes:
            raise OutOfResources(f"outbox full: {pending} bytes pending, limit {max_pending_bytes}")
    conn.execute(
        "INSERT INTO outbox_lanes (lane, last_seq) VALUES (?, 1) "
        "ON CONFLICT(lane) DO UPDATE SET last_seq = last_seq + 1",
        (lane.value,),
    )
    (seq,) = conn.execute(
        "SELECT last_seq FROM outbox_lanes WHERE lane = ?", (lane.value,)
    ).fetchone()
    conn.execute(
        "INSERT INTO outbox (lane, seq, key, type, hlc, base_version, payload, size_bytes,"
        " state, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (lane.value, seq, key, type.value, hlc.encode(), base_version, body, size, PENDING, now),
    )
    save_hlc(conn, hlc)
    return int(seq)


def next_batch(
    conn: sqlite3.Connection, *, max_records: int = 500, max_bytes: int = 4 * 1024 * 1024
) -> list[Record]:
    """Pending records, urgent lane first, each lane in seq order; at least one record if
    any is pending, then up to ``max_records`` and ``max_bytes`` of payload."""
    out: list[Record] = []
    used = 0
    for lane in sorted(Lane, key=lambda x: x.rank):
        rows = conn.execute(
            "SELECT * FROM outbox WHERE state = ? AND lane = ? ORDER BY seq LIMIT ?",
            (PENDING, lane.value, max_records - len(out)),
        ).fetchall()
        for r in rows:
            if out and used + r["size_bytes"] > max_bytes:
                return out
            out.append(
                Record(
                    key=r["key"],
                    seq=r["seq"],
                    type=RecordType(r["type"]),
                    lane=lane,
                    hlc=HLC.decode(r["hlc"]),
                    base_version=r["base_version"],
                    payload=json.loads(r["payload"]),
                )
            )
            used += r["size_bytes"]
        if len(out) >= max_records:
            break
    return out


def apply_receipt(conn: sqlite3.Connection, receipt: PushReceipt, *, now: float) -> tuple[int, int]:
    """Acknowledge what the hub applied/held, dead-letter what it rejected, and record its
    high-water marks (everything at or below them is held). Returns (acked, dead)."""
    ok = [
        (ACKED, now, r.key, r.seq, PENDING)
        for r in receipt.receipts
        if r.status is not ReceiptStatus.REJECTED
    ]
    bad = [
        (DEAD, r.error[:1000] or "rejected", r.key, r.seq, PENDING)
        for r in receipt.receipts
        if r.status is ReceiptStatus.REJECTED
    ]
    acked = (
        conn.executemany(
            "UPDATE outbox SET state = ?, acked_at = ? WHERE key = ? AND seq = ? AND state = ?", ok
        ).rowcount
        if ok
        else 0
    )
    dead = (
        conn.executemany(
            "UPDATE outbox SET state = ?, error = ?, attempts = attempts + 1 "
            "WHERE key = ? AND seq = ? AND state = ?",
            bad,
        ).rowcount
        if bad
        else 0
    )
    for lane_, hw in receipt.high_water.items():
        cur = conn.execute(
            "UPDATE outbox SET state = ?, acked_at = ? WHERE lane = ? AND seq <= ? AND state = ?",
            (ACKED, now, lane_.value, hw, PENDING),
        )
        acked += cur.rowcount
        conn.execute(
            "UPDATE outbox_lanes SET high_water = max(high_water, ?) WHERE lane = ?",
            (hw, lane_.value),
        )
    return acked, dead


def stats(conn: sqlite3.Connection) -> OutboxStats:
    depth = dict.fromkeys(Lane, 0)
    for lane, n in conn.execute(
        "SELECT lane, count(*) FROM outbox WHERE state = ? GROUP BY lane", (PENDING,)
    ):
        depth[Lane(lane)] = int(n)
    pending_bytes, oldest = conn.execute(
        "SELECT coalesce(sum(size_bytes), 0), min(created_at) FROM outbox WHERE state = ?",
        (PENDING,),
    ).fetchone()
    (dead,) = conn.execute("SELECT count(*) FROM outbox WHERE state = ?", (DEAD,)).fetchone()
    return OutboxStats(depth, int(pending_bytes), oldest, int(dead))


def prune(conn: sqlite3.Connection, *, acked_before: float) -> int:
    """Delete acknowledged rows older than ``acked_before`` (the lane counters stay)."""
    return conn.execute(
        "DELETE FROM outbox WHERE state = ? AND acked_at < ?", (ACKED, acked_before)
    ).rowcount
