"""``edge-agent models``: installed model packages; install, activate, roll back, history;
build the reference packages."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from edge_agent.cli.common import EXIT_OK, add_command, config_arg, fmt_time, load
from edge_agent.config import Config
from edge_agent.errors import EdgeError

if TYPE_CHECKING:
    from edge_agent.inference.registry import Registry
    from edge_agent.store import Store


def add_models(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "models",
        "installed model packages: list, install, activate, build the reference models",
        "edge-agent models install ./ct-lesion-seg-1.0.0 --config /srv/edge/edge-agent.toml",
    )
    msub = sp.add_subparsers(title="models commands", metavar="ACTION")
    mp = msub.add_parser("list", help="installed versions, the active one marked")
    config_arg(mp)
    mp.add_argument("--json", action="store_true")
    mp.set_defaults(func=lambda a: show(load(a), as_json=a.json))
    mp = msub.add_parser("install", help="verify and install a package folder or .tar")
    config_arg(mp)
    mp.add_argument("package", type=Path)
    mp.add_argument("--activate", action="store_true", help="make it the active version")
    mp.set_defaults(func=lambda a: install(load(a), a.package, activate=a.activate))
    mp = msub.add_parser("activate", help="make an installed version the active one")
    config_arg(mp)
    mp.add_argument("name")
    mp.add_argument("version")
    mp.set_defaults(func=lambda a: activate(load(a), a.name, a.version))
    mp = msub.add_parser(
        "history", help="release decisions (accepted/refused, why) and installed versions"
    )
    config_arg(mp)
    mp.add_argument("name", nargs="?")
    mp.set_defaults(func=lambda a: history(load(a), a.name))
    mp = msub.add_parser("rollback", help="re-activate the previous installed version")
    config_arg(mp)
    mp.add_argument("name")
    mp.set_defaults(func=lambda a: rollback(load(a), a.name))
    mp = msub.add_parser("build-reference", help="write the reference model packages to DIR")
    mp.add_argument("dir", type=Path)
    mp.add_argument("--large", action="store_true", help="also the ResNet-50-sized one (~95 MB)")
    mp.set_defaults(func=lambda a: build_reference(a.dir, large=a.large))


def _registry(cfg: Config) -> tuple[Store, Registry]:
    """The store (created if the agent has not run yet) and the model registry on it."""
    from edge_agent import compose
    from edge_agent.clock import SystemClock

    store = compose.open_store(cfg, must_exist=False)
    return store, compose.registry(cfg, store, SystemClock())


def show(cfg: Config, *, as_json: bool = False) -> int:
    """Print the installed versions: active (*), shadow (s, with its agreement so far)."""
    store, reg = _registry(cfg)
    try:
        models = reg.installed()
        if as_json:
            print(json.dumps([m.__dict__ for m in models], indent=2))
            return EXIT_OK
        if not models:
            print("no models installed (edge-agent models install PACKAGE)")
        for m in models:
            mark = "*" if m.active else ("s" if m.shadow else " ")
            print(
                f"{mark} {m.name:<24} {m.version:<12} {m.task:<15} model sha256 "
                f"{m.model_sha256[:16]}  installed {fmt_time(m.installed_at)}"
            )
            if m.shadow:
                from edge_agent.inference.store import agreement

                with store.read() as conn:
                    print(f"    {agreement(conn, m.name, m.version).summary()}")
        if models:
            print("(* active, s shadow: runs beside the active version, publishes nothing)")
        return EXIT_OK
    finally:
        store.close()


def install(cfg: Config, package: Path, *, activate: bool = False) -> int:
    """Verify and install ``package`` (folder or .tar); ``activate``: make it active (else it
    is active only if the model has no active version yet)."""
    store, reg = _registry(cfg)
    try:
        m = reg.install(package, activate=True if activate else None)
    finally:
        store.close()
    print(f"installed {m.name} {m.version} ({m.task})" + (", active" if m.active else ""))
    return EXIT_OK


def activate(cfg: Config, name: str, version: str) -> int:
    """Make installed ``name`` ``version`` the active one."""
    store, reg = _registry(cfg)
    try:
        reg.activate(name, version)
    finally:
        store.close()
    print(f"{name} {version} is now active")
    return EXIT_OK


def history(cfg: Config, name: str | None = None) -> int:
    """Print the installed versions and the hub's releases this site accepted or refused."""
    from edge_agent.inference.registry import release_decisions

    store, reg = _registry(cfg)
    try:
        with store.read() as conn:
            rows = release_decisions(conn, name)
        installed = [m for m in reg.installed() if not name or m.name == name]
    finally:
        store.close()
    print("installed:")
    for m in installed:
        print(
            f"  {'*' if m.active else ' '} {m.name} {m.version}  installed "
            f"{fmt_time(m.installed_at)}"
        )
    print("releases from the hub:")
    if not rows:
        print("  none yet")
    for r in rows:
        why = f": {r['reason']}" if r["reason"] else ""
        print(f"  {fmt_time(r['decided_at'])}  {r['name']} {r['version']}  {r['status']}{why}")
    return EXIT_OK


def rollback(cfg: Config, name: str) -> int:
    """Re-activate the newest installed version of ``name`` older than the active one."""
    from hub_protocol.semver import parse

    store, reg = _registry(cfg)
    try:
        versions = sorted(
            (m for m in reg.installed() if m.name == name), key=lambda m: parse(m.version)
        )
        active = [m for m in versions if m.active]
        if not active:
            raise EdgeError(f"{name} has no active version")
        older = [m for m in versions if parse(m.version) < parse(active[0].version)]
        if not older:
            raise EdgeError(f"{name} {active[0].version} has no older installed version")
        reg.activate(name, older[-1].version)
    finally:
        store.close()
    print(
        f"{name}: {active[0].version} -> {older[-1].version} (active); new studies use "
        "it, jobs already scheduled finish on the version they were scheduled with"
    )
    return EXIT_OK


def build_reference(root: Path, *, large: bool = False) -> int:
    """Write the reference model packages under ``root``."""
    from edge_agent.inference.reference_models import build_reference_packages

    for pkg in build_reference_packages(root, large=large):
        print(f"wrote {pkg}")
    return EXIT_OK
