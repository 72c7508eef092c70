"""Factories of the composition root: each builds one part from config, the same way for the
running agent (:mod:`edge_agent.app`) and for the commands that work on a stopped or running
agent's data (:mod:`edge_agent.cli`), so no part is put together twice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from edge_agent.clock import Clock
from edge_agent.config import Config
from edge_agent.errors import EdgeError
from edge_agent.inference.registry import Registry
from edge_agent.lifecycle.manager import Lifecycle
from edge_agent.lifecycle.tiers import Tiers
from edge_agent.metrics import Metrics
from edge_agent.store import Store
from edge_agent.sync.client import Credential, HttpHubClient
from edge_agent.sync.state import load_hlc
from edge_agent.web.accounts import Accounts, load_blocklist
from hub_protocol import HybridClock


def database_path(cfg: Config) -> Path:
    """Where the store's SQLite file lives."""
    return Path(cfg.storage.data_dir) / cfg.storage.database


def open_store(cfg: Config, *, must_exist: bool = True, fsync_dirs: bool = True) -> Store:
    """The store of ``cfg``'s data folder. ``must_exist``: raise :class:`EdgeError` when the
    agent has not created its database yet (instead of creating an empty one)."""
    db = database_path(cfg)
    if must_exist and not db.exists():
        raise EdgeError(f"no database at {db}: has the agent run yet? (edge-agent run)")
    return Store(db, fsync_dirs=fsync_dirs)


def registry(cfg: Config, store: Store, clock: Clock) -> Registry:
    """The installed model packages under ``cfg.models_dir()``."""
    return Registry(store=store, models_dir=cfg.models_dir(), clock=clock)


def hybrid_clock(cfg: Config, store: Store, clock: Clock) -> HybridClock:
    """This node's HLC, resumed from the last one handed out (it never goes back)."""
    with store.read() as conn:
        last = load_hlc(conn)
    return HybridClock(cfg.sync.node_id, wall=clock.now, last=last)


def hub_client(cfg: Config) -> HttpHubClient | None:
    """The hub client with this site's credential; None before enrollment."""
    path = cfg.sync.credential_path(cfg.storage.data_dir)
    if not path.exists():
        return None
    return HttpHubClient(Credential.load(path), ca_file=cfg.sync.hub_ca_file)


def lifecycle(
    cfg: Config,
    store: Store,
    *,
    clock: Clock,
    metrics: Metrics,
    archive: HttpHubClient | None,
    hlc: HybridClock,
    tiers: Tiers | None = None,
    is_idle: Callable[[], bool] = lambda: True,
) -> Lifecycle:
    """The storage lifecycle (tiers, archive to ``archive``, restores, integrity, upkeep)."""
    return Lifecycle(
        cfg,
        store=store,
        tiers=tiers or Tiers(cfg, store),
        clock=clock,
        metrics=metrics,
        archive=archive,
        hlc=hlc,
        is_idle=is_idle,
    )


def accounts(cfg: Config, store: Store, metrics: Metrics | None = None) -> Accounts:
    """Local web accounts, sessions and API tokens, with ``cfg.web``'s lockout, throttle
    and TTL; login outcomes are counted on ``metrics`` if given."""
    w = cfg.web
    return Accounts(
        store,
        metrics=metrics,
        session_ttl_s=w.session_ttl_s,
        lockout_attempts=w.lockout_attempts,
        lockout_s=w.lockout_s,
        throttle_attempts=w.login_throttle_attempts,
        throttle_window_s=w.login_throttle_window_s,
        token_ttl_s=w.api_token_ttl_days * 86400.0,
        blocklist=load_blocklist(w.password_blocklist_file),
    )
