"""Small persisted sync state (the last HLC handed out, so it never goes back after restart)."""

from __future__ import annotations

import sqlite3

from hub_protocol import HLC


def save_hlc(conn: sqlite3.Connection, hlc: HLC) -> None:
    """Remember ``hlc`` if it is the latest (inside the caller's transaction)."""
    row = conn.execute("SELECT value FROM sync_state WHERE name = 'hlc'").fetchone()
    if row is None or HLC.decode(row[0]) < hlc:
        conn.execute(
            "INSERT INTO sync_state (name, value) VALUES ('hlc', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (hlc.encode(),),
        )


def load_hlc(conn: sqlite3.Connection) -> HLC | None:
    row = conn.execute("SELECT value FROM sync_state WHERE name = 'hlc'").fetchone()
    return None if row is None else HLC.decode(row[0])
