"""``edge-agent storage``: usage per tier and the lifecycle jobs; run jobs now; add a key."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    add_command,
    config_arg,
    fmt_time,
    load,
    open_store,
)
from edge_agent.config import Config
from edge_agent.errors import EdgeError
from edge_agent.units import fmt_bytes

if TYPE_CHECKING:
    from edge_agent.lifecycle.manager import Lifecycle
    from edge_agent.store import Store
    from edge_agent.sync.client import HttpHubClient

JOBS = ["tiers", "archive", "integrity", "maintenance"]


def add_storage(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "storage",
        "storage tiers: usage, pending archive, jobs; run jobs now; add a cold-tier key",
        "edge-agent storage status --config /srv/edge/edge-agent.toml",
    )
    ssub = sp.add_subparsers(title="storage commands", metavar="ACTION")
    st = ssub.add_parser("status", help="usage per tier, oldest data, pending archive, jobs")
    config_arg(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=lambda a: status(load(a), as_json=a.json))
    st = ssub.add_parser(
        "run", help="run lifecycle jobs now (tiers, archive, integrity, maintenance)"
    )
    config_arg(st)
    st.add_argument("jobs", nargs="*", metavar="JOB", help="tiers|archive|integrity|maintenance")
    st.set_defaults(func=lambda a: run_jobs(load(a), a.jobs))
    st = ssub.add_parser("new-key", help="add a cold-tier key; new cold files use it")
    config_arg(st)
    st.set_defaults(func=lambda a: new_key(load(a)))


def _lifecycle(cfg: Config, store: Store, hub: HttpHubClient | None) -> Lifecycle:
    from edge_agent import compose
    from edge_agent.clock import SystemClock
    from edge_agent.metrics import create_metrics

    clock = SystemClock()
    return compose.lifecycle(
        cfg,
        store,
        clock=clock,
        metrics=create_metrics(),
        archive=hub,
        hlc=compose.hybrid_clock(cfg, store, clock),
    )


def status(cfg: Config, *, as_json: bool = False) -> int:
    """Print usage per tier, the hub archive, restores, integrity reports and the jobs."""
    from edge_agent import compose

    store = open_store(cfg)
    try:
        st = _lifecycle(cfg, store, compose.hub_client(cfg)).status()
    finally:
        store.close()
    if as_json:
        print(json.dumps(st, indent=2, default=str))
        return EXIT_OK
    print(f"{'TIER':<6} {'INSTANCES':>9} {'SIZE':>10} {'FS USED':>7} {'FS FREE':>10}  OLDEST")
    for t in st["tiers"]:
        oldest = fmt_time(t["oldest_received_at"]) if t["oldest_received_at"] else "-"
        print(
            f"{t['tier']:<6} {t['instances']:>9} {fmt_bytes(t['bytes']):>10} "
            f"{t['fs_used']:>7.0%} {fmt_bytes(t['fs_free']):>10}  {oldest}  ({t['root']})"
        )
    print(
        f"archived at the hub: {st['archived_instances']} instance(s); pending archive: "
        f"{st['pending_archive']}" + ("" if st["archive_enabled"] else " (archive off)")
    )
    for r in st["restores"]:
        done = "done" if r["finished_at"] and not r["error"] else r["error"] or "waiting"
        print(f"restore {r['study_uid']}: {done}")
    if st["integrity_reports"]:
        print(f"CORRUPT FILES FOUND: {st['integrity_reports']} (see the agent log)")
    for name, j in sorted(st["jobs"].items()):
        nxt = fmt_time(j["next_run_at"]) if j["next_run_at"] else "-"
        print(
            f"job {name:<12} last {j['last_status'] or '-':<5} next {nxt}  {j['last_detail'] or ''}"
        )
    return EXIT_OK


def run_jobs(cfg: Config, jobs: Sequence[str]) -> int:
    """Run the named lifecycle jobs (all when none) now; 1 unless every one ends ok."""
    from edge_agent import compose

    store = open_store(cfg)
    hub = compose.hub_client(cfg)
    lc = _lifecycle(cfg, store, hub)
    only = list(jobs) or JOBS
    if set(only) - set(JOBS):
        raise EdgeError(f"unknown job(s) {sorted(set(only) - set(JOBS))}; jobs: {JOBS}")

    async def go() -> dict[str, str]:
        try:
            ran: dict[str, str] = await lc.run_due(only=only)
            return ran
        finally:
            if hub is not None:
                await hub.close()

    try:
        ran = asyncio.run(go())
    finally:
        store.close()
    for name, outcome in ran.items():
        status, _, detail = outcome.partition(": ")
        print(f"{name:<12} {status:<6} {detail}")
    return EXIT_OK if all(v.startswith("ok") for v in ran.values()) else EXIT_ERROR


def new_key(cfg: Config) -> int:
    """Add a key to the cold-tier key ring; new cold files are encrypted with it."""
    from edge_agent.lifecycle.coldcrypt import add_key

    path = Path(cfg.lifecycle.cold_key_file)
    if not path.is_absolute():
        path = Path(cfg.storage.data_dir) / path
    kid = add_key(path)
    print(f"added cold-tier key {kid} to {path}; new cold files use it, older ones keep theirs")
    print("back this file up apart from the data: without it cold data cannot be read")
    return EXIT_OK
