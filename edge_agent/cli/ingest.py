"""``edge-agent quarantine`` and ``associations``: what the DICOM front door refused or kept
aside, and who connected."""

from __future__ import annotations

import argparse
import json
from typing import Any

from edge_agent.cli.common import EXIT_OK, add_command, config_arg, fmt_time, load, open_store
from edge_agent.config import Config


def add_quarantine(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "quarantine",
        "list rejected instances and why",
        "edge-agent quarantine --config /srv/edge/edge-agent.toml",
    )
    config_arg(sp)
    sp.add_argument("--limit", type=int, default=100)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=lambda a: quarantine(load(a), limit=a.limit, as_json=a.json))


def add_associations(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "associations",
        "audit trail: who connected, from where, what they sent",
        "edge-agent associations --config /srv/edge/edge-agent.toml --limit 20",
    )
    config_arg(sp)
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=lambda a: associations(load(a), limit=a.limit, as_json=a.json))


def _listing(
    cfg: Config, table: str, order_by: str, *, limit: int, as_json: bool, empty: str
) -> list[dict[str, Any]]:
    """Rows for a listing command; prints JSON or the empty message itself and then returns
    no rows, so the caller only formats a non-empty text listing."""
    store = open_store(cfg)
    try:
        rows = store.rows(table, order_by=order_by, limit=limit)
    finally:
        store.close()
    if as_json:
        print(json.dumps(rows, indent=2))
        return []
    if not rows:
        print(empty)
    return rows


def quarantine(cfg: Config, *, limit: int = 100, as_json: bool = False) -> int:
    """Print the newest ``limit`` quarantined instances: when, status, sender, why, file."""
    rows = _listing(
        cfg,
        "quarantine",
        "received_at DESC",
        limit=limit,
        as_json=as_json,
        empty="quarantine is empty",
    )
    qdir = cfg.storage.path("quarantine_dir")
    for r in rows:
        status = "none" if r["status"] < 0 else f"0x{r['status']:04X}"
        print(
            f"{fmt_time(r['received_at'])}  {status}  from {r['calling_ae'] or '-'}"
            f"@{r['peer_host'] or '-'}  {r['reason']}"
        )
        print(f"    file: {qdir / r['path']}")
    return EXIT_OK


def associations(cfg: Config, *, limit: int = 50, as_json: bool = False) -> int:
    """Print the newest ``limit`` associations: who, from where, outcome, counts."""
    rows = _listing(
        cfg,
        "associations",
        "started_at DESC",
        limit=limit,
        as_json=as_json,
        empty="no associations yet",
    )
    for r in rows:
        why = f" ({r['reject_reason']})" if r["reject_reason"] else ""
        print(
            f"{fmt_time(r['started_at'])}  {r['calling_ae']:<16} {r['peer_host']}:"
            f"{r['peer_port']:<6} {r['outcome']}{why}  stored={r['received']} "
            f"dup={r['duplicates']} failed={r['failed']} refused={r['refused']}"
        )
    return EXIT_OK
