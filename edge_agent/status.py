"""The node's status, built in one place: the health summary the heartbeat sends (and the web's
node status and the ``edge-agent sync status`` command start from), the web's node status,
and the sync status the CLI shows.

Every function reads inside the caller's read connection or store; nothing here writes.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

from edge_agent import __version__
from edge_agent.store import Store
from edge_agent.sync import outbox
from edge_agent.sync.client import Credential


def _age_s(now: float, since: float | None) -> float:
    """Seconds since ``since``, to 0.1 s; 0 when there is nothing pending."""
    return round(now - since, 1) if since else 0


def sync_state(conn: sqlite3.Connection) -> dict[str, str]:
    """The persisted sync state (connectivity, last_error, hlc, ...) by name."""
    return dict(conn.execute("SELECT name, value FROM sync_state"))


def health_summary(
    conn: sqlite3.Connection,
    *,
    now: float,
    devices: Sequence[int],
    storage: dict[str, Any],
) -> dict[str, object]:
    """The summary sent in heartbeats: outbox depth per lane, dead letters, age of the oldest
    unsynced record (s), studies per state, inference devices, storage per tier, version."""
    ob = outbox.stats(conn)
    studies = dict(conn.execute("SELECT state, count(*) FROM studies GROUP BY state"))
    return {
        "outbox": {lane.value: n for lane, n in ob.depth.items()},
        "outbox_dead": ob.dead,
        "oldest_unsynced_age_s": _age_s(now, ob.oldest_pending_at),
        "studies": studies,
        "inference_devices": list(devices),
        "storage": storage,
        "version": __version__,
    }


def node_status(store: Store, *, health: dict[str, Any], storage: dict[str, Any]) -> dict[str, Any]:
    """The web's node status: ``health`` with the full ``storage`` status, the execution
    providers, installed models, connectivity ("not enrolled" before any sync) and the 20 most
    recent errors (failed inference jobs, dead forwards)."""
    import onnxruntime

    out = dict(health)
    out["storage"] = storage
    out["execution_providers"] = onnxruntime.get_available_providers()
    with store.read() as conn:
        out["models"] = [
            dict(r)
            for r in conn.execute(
                "SELECT name, version, task, model_sha256, active, shadow, installed_at "
                "FROM model_versions ORDER BY name, installed_at"
            )
        ]
        out["connectivity"] = sync_state(conn).get("connectivity", "not enrolled")
        out["recent_errors"] = [
            dict(r)
            for r in conn.execute(
                "SELECT 'inference' AS source, finished_at AS at, error, study_uid AS target "
                "FROM inference_jobs WHERE state = 'FAILED' UNION ALL SELECT 'forward', "
                "next_attempt_at, last_error, destination FROM forwards WHERE state = 'DEAD' "
                "ORDER BY at DESC LIMIT 20"
            )
        ]
    return out


def sync_status(
    conn: sqlite3.Connection, *, credential: Credential | None, now: float
) -> dict[str, Any]:
    """What ``edge-agent sync status`` shows: enrollment, connectivity ("unknown" before any
    sync), the last error, pending records per lane and bytes, age of the oldest unsynced
    record (s) and dead letters."""
    st = outbox.stats(conn)
    state = sync_state(conn)
    return {
        "enrolled": credential is not None,
        "site_id": credential.site_id if credential else None,
        "hub_url": credential.hub_url if credential else None,
        "connectivity": state.get("connectivity", "unknown"),
        "last_error": state.get("last_error", ""),
        "pending": {lane.value: n for lane, n in st.depth.items()},
        "pending_bytes": st.pending_bytes,
        "oldest_unsynced_age_s": _age_s(now, st.oldest_pending_at),
        "dead_letters": st.dead,
    }
