"""The audit log: who did or saw what, when, from where; every row is chained to the one
before it.

Each row holds ``prev_sha256`` (the previous row's hash, :data:`GENESIS` for the first) and
``sha256``, the SHA-256 of the row's id, its fields and ``prev_sha256``. An edited, deleted or
inserted row breaks the chain at that point, which :func:`verify` (``edge-agent users audit
--verify``) reports. Removing rows from the end, or rewriting the whole chain, needs the
head hash kept somewhere else to be seen: :func:`verify` prints it, for the operator's
records. Rows from before the chain existed are chained, as they then were, by the first
row written after the upgrade (or by ``--verify``).

Rows are written only inside a writer transaction (``BEGIN IMMEDIATE``), so two writers,
threads or processes, can never chain onto the same row.

CSV exports (:func:`write_csv`) neutralise cells a spreadsheet would run as a formula
(``=``, ``+``, ``-``, ``@``, tab, carriage return first): a username like
``=HYPERLINK(...)`` is exported as ``'=HYPERLINK(...)``.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TextIO

GENESIS = "0" * 64
FIELDS = ("at", "username", "action", "target", "remote", "request_id", "detail")
COLUMNS = ("id", *FIELDS, "prev_sha256", "sha256")
MAX_DETAIL = 1000
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def row_hash(row_id: int, fields: Mapping[str, Any], prev: str) -> str:
    """The hash a row with ``row_id``, ``fields`` (:data:`FIELDS`) and ``prev`` must hold."""
    doc = [row_id, *(fields[f] for f in FIELDS), prev]
    data = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(data.encode()).hexdigest()


def append(
    conn: sqlite3.Connection,
    *,
    at: float,
    username: str,
    action: str,
    target: str,
    remote: str,
    request_id: str,
    detail: str = "",
) -> int:
    """Write one audit row in the caller's (writer) transaction; returns its id."""
    prev_id, prev = _chain_tail(conn)
    fields = {
        "at": float(at),
        "username": username,
        "action": action,
        "target": target,
        "remote": remote,
        "request_id": request_id,
        "detail": detail[:MAX_DETAIL],
    }
    row_id = prev_id + 1
    conn.execute(
        "INSERT INTO audit_log (id, at, username, action, target, remote, request_id, detail, "
        "prev_sha256, sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (row_id, *(fields[f] for f in FIELDS), prev, row_hash(row_id, fields, prev)),
    )
    return row_id


def seal(conn: sqlite3.Connection) -> None:
    """Chain the rows from before the chain existed (in a writer transaction)."""
    _chain_tail(conn)


def _chain_tail(conn: sqlite3.Connection) -> tuple[int, str]:
    """The last row's id and hash, after chaining any rows from before the chain existed."""
    last = conn.execute("SELECT id, sha256 FROM audit_log ORDER BY id DESC LIMIT 1").fetchone()
    if last is None:
        return 0, GENESIS
    if last[1] is not None:
        return int(last[0]), str(last[1])
    # rows written by a version without the chain: chain them now, as they are
    start = conn.execute(
        "SELECT id, sha256 FROM audit_log WHERE sha256 IS NOT NULL ORDER BY id DESC LIMIT 1"
    ).fetchone()
    prev = str(start[1]) if start else GENESIS
    for r in conn.execute(
        "SELECT id, at, username, action, target, remote, request_id, detail FROM audit_log "
        "WHERE id > ? ORDER BY id",
        (int(start[0]) if start else 0,),
    ).fetchall():
        h = row_hash(int(r[0]), dict(zip(FIELDS, r[1:], strict=True)), prev)
        conn.execute(
            "UPDATE audit_log SET prev_sha256 = ?, sha256 = ? WHERE id = ?", (prev, h, r[0])
        )
        prev = h
    return int(last[0]), prev


@dataclass(frozen=True)
class Verdict:
    """What :func:`verify` found: ``rows`` checked, the chain's ``head`` hash, and the first
    row where it breaks (``broken_at`` id and ``reason``), if any."""

    rows: int
    head: str
    broken_at: int | None = None
    reason: str = ""

    @property
    def intact(self) -> bool:
        return self.broken_at is None


def verify(conn: sqlite3.Connection) -> Verdict:
    """Recompute the chain from the first row; stop at the first break."""
    prev, n = GENESIS, 0
    cur = conn.execute(
        "SELECT id, at, username, action, target, remote, request_id, detail, prev_sha256, "
        "sha256 FROM audit_log ORDER BY id"
    )
    for r in cur:
        row = dict(zip(COLUMNS, r, strict=True))
        n += 1
        if row["sha256"] is None:
            return Verdict(n, prev, row["id"], "a row without a hash")
        if row["prev_sha256"] != prev:
            why = "it does not follow the row before it (a row was removed or inserted)"
            return Verdict(n, prev, row["id"], why)
        if row_hash(int(row["id"]), row, prev) != row["sha256"]:
            return Verdict(n, prev, row["id"], "its content does not match its hash (edited)")
        prev = str(row["sha256"])
    return Verdict(n, prev)


def csv_cell(value: Any) -> Any:
    """``value``, with a leading ``'`` if a spreadsheet would read it as a formula."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_csv(rows: Iterable[Mapping[str, Any]], out: TextIO) -> int:
    """The rows as CSV with :data:`COLUMNS` (formula cells neutralised); returns the count."""
    w = csv.DictWriter(out, fieldnames=list(COLUMNS), extrasaction="ignore")
    w.writeheader()
    n = 0
    for r in rows:
        w.writerow({k: csv_cell(r.get(k)) for k in COLUMNS})
        n += 1
    return n
