"""``edge-agent sync``: enroll with the hub; the sync backlog and connectivity."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

from edge_agent.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    add_command,
    config_arg,
    load,
    open_store,
)
from edge_agent.config import Config
from edge_agent.units import fmt_bytes


def add_sync(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "sync",
        "enroll with the hub; show the sync backlog and connectivity",
        "edge-agent sync enroll --hub https://hub.example:8443 --token TOKEN",
    )
    ssub = sp.add_subparsers(title="sync commands", metavar="ACTION")
    en = ssub.add_parser(
        "enroll",
        help="trade a one-time token from ops for this site's "
        "credential (written to sync.credential_file, mode 0600)",
    )
    config_arg(en)
    en.add_argument("--hub", required=True, help="hub base URL")
    en.add_argument("--token", required=True, help="one-time enrollment token")
    en.set_defaults(func=lambda a: enroll(load(a), hub=a.hub, token=a.token))
    stp = ssub.add_parser(
        "status",
        help="outbox depth per lane, oldest unsynced, dead letters, last known connectivity",
    )
    config_arg(stp)
    stp.add_argument("--json", action="store_true")
    stp.set_defaults(func=lambda a: status(load(a), as_json=a.json))


def enroll(cfg: Config, *, hub: str, token: str) -> int:
    """Trade the one-time ``token`` for this site's credential at ``hub`` and save it (mode
    0600); 1 if this site is already enrolled."""
    from edge_agent.sync.client import enroll as enroll_site

    path = cfg.sync.credential_path(cfg.storage.data_dir)
    if path.exists():
        print(f"edge-agent: already enrolled ({path}); remove it to enroll again", file=sys.stderr)
        return EXIT_ERROR
    cred = asyncio.run(enroll_site(hub, token, ca_file=cfg.sync.hub_ca_file))
    path.parent.mkdir(parents=True, exist_ok=True)
    cred.save(path)
    print(f"enrolled as {cred.site_id} with {cred.hub_url}; credential in {path}")
    print("restart the agent (edge-agent run) to start syncing")
    return EXIT_OK


def status(cfg: Config, *, as_json: bool = False) -> int:
    """Print enrollment, connectivity, the backlog per lane, oldest unsynced, dead letters."""
    from edge_agent import status as node_status
    from edge_agent.sync.client import Credential

    path = cfg.sync.credential_path(cfg.storage.data_dir)
    store = open_store(cfg)
    try:
        cred = Credential.load(path) if path.exists() else None
        with store.read() as conn:
            out = node_status.sync_status(conn, credential=cred, now=time.time())
    finally:
        store.close()
    if as_json:
        print(json.dumps(out, indent=2))
        return EXIT_OK
    if cred is None:
        print("not enrolled (edge-agent sync enroll --hub URL --token TOKEN)")
    else:
        print(f"site {cred.site_id} -> {cred.hub_url}: {out['connectivity']}")
    if out["last_error"]:
        print(f"  last error: {out['last_error']}")
    p = out["pending"]
    print(
        f"  pending: urgent {p['urgent']}, normal {p['normal']}, batch {p['batch']} "
        f"({fmt_bytes(out['pending_bytes'])}); oldest unsynced {out['oldest_unsynced_age_s']} s; "
        f"dead letters {out['dead_letters']}"
    )
    return EXIT_OK
