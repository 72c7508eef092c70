"""``edge-agent backup`` and ``restore``: an online backup of everything the agent holds, and
restoring one into an empty agent."""

from __future__ import annotations

import argparse
from pathlib import Path

from edge_agent.cli.common import EXIT_OK, add_command, config_arg, load
from edge_agent.config import Config


def add_backup(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "backup",
        "online backup: the store, every file it names, the key ring and credentials",
        "edge-agent backup /backups/edge-2026-11-26 --config /srv/edge/edge-agent.toml",
    )
    config_arg(sp)
    sp.add_argument("dest", type=Path, help="a new (or empty) folder")
    sp.set_defaults(func=lambda a: backup(load(a), a.dest))


def add_restore(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "restore",
        "restore a backup into an empty agent (every file checked against the manifest)",
        "edge-agent restore /backups/edge-2026-11-26 --config /srv/edge/edge-agent.toml",
    )
    config_arg(sp)
    sp.add_argument("source", type=Path, help="a folder written by edge-agent backup")
    sp.set_defaults(func=lambda a: restore(load(a), a.source))


def backup(cfg: Config, dest: Path) -> int:
    """Back the agent of ``cfg`` up into ``dest`` (new or empty) while it runs."""
    from edge_agent.store.backup import backup as write_backup

    rep = write_backup(cfg, dest)
    print(
        f"backed up {rep.instances} instance rows, {rep.files} files ({rep.bytes} bytes) "
        f"to {dest} in {rep.seconds:.1f} s; it holds credentials and the cold-tier "
        "key ring: keep it encrypted and access-controlled"
    )
    return EXIT_OK


def restore(cfg: Config, source: Path) -> int:
    """Restore the backup in ``source`` into the (empty, stopped) agent of ``cfg``."""
    from edge_agent.store.backup import restore as restore_backup
    from edge_agent.store.lock import DataDirLock

    lock = DataDirLock.acquire(Path(cfg.storage.data_dir), what="edge-agent restore")
    try:
        rep = restore_backup(source, cfg)
    finally:
        lock.release()
    print(
        f"restored {rep.instances} instance rows and {rep.files} files ({rep.bytes} bytes), "
        f"every one checked against the backup's manifest, in {rep.seconds:.1f} s"
    )
    return EXIT_OK
