"""The ``edge-agent`` command.

Examples::

    edge-agent init /srv/edge --port 11112 --ae-title EDGE --allow PACS@10.1.2.0/24
    edge-agent check-config --config /srv/edge/edge-agent.toml
    edge-agent run --config /srv/edge/edge-agent.toml
    edge-agent studies --config /srv/edge/edge-agent.toml --state COMPLETE
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

from edge_agent import __version__
from edge_agent.config import Config, load_config
from edge_agent.errors import ConfigError, EdgeError

if TYPE_CHECKING:
    from edge_agent.inference.registry import InstalledModel, Registry
    from edge_agent.store import Store

CONFIG_NAME = "edge-agent.toml"
EXIT_OK, EXIT_ERROR, EXIT_CONFIG = 0, 1, 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the process exit code (0 ok, 1 error, 2 bad config/usage)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_CONFIG
    try:
        code: int = args.func(args)
    except ConfigError as exc:
        print(f"edge-agent: configuration error in {exc.field}: {exc.message}", file=sys.stderr)
        return EXIT_CONFIG
    except EdgeError as exc:
        print(f"edge-agent: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # e.g. a data folder that cannot be created or written
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"edge-agent: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_ERROR
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="edge-agent",
        description="Hospital edge agent: receives DICOM, assembles studies, keeps them safe.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1] if __doc__ else None,
    )
    p.add_argument("--version", action="version", version=f"edge-agent {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    def add(name: str, help_: str, example: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_,
            description=f"{help_}\n\nexample:\n  {example}",
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )

    sp = add(
        "init",
        "write a commented default config and create the data folders",
        "edge-agent init /srv/edge --port 11112 --ae-title EDGE --allow PACS@10.0.0.0/8",
    )
    sp.add_argument("dir", type=Path, help="folder for the config file and data")
    sp.add_argument("--port", type=int, default=11112)
    sp.add_argument("--ae-title", default="EDGE_AGENT")
    sp.add_argument("--bind-address", default="0.0.0.0")
    sp.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="AE[@HOST]",
        help="allowed calling AE title, optionally @IP or @CIDR (repeatable; "
        "default: STORESCU and ECHOSCU from anywhere)",
    )
    sp.add_argument("--quiet-period", type=float, default=10.0, metavar="SECONDS")
    sp.add_argument("--min-free-mb", type=int, default=1024)
    sp.add_argument("--force", action="store_true", help="overwrite an existing config file")
    sp.set_defaults(func=_cmd_init)

    sp = add(
        "run",
        "run the agent in the foreground until SIGTERM",
        "edge-agent run --config /srv/edge/edge-agent.toml",
    )
    _config_arg(sp)
    sp.set_defaults(func=_cmd_run)

    sp = add(
        "check-config",
        "validate a config file (and EDGE_* overrides); name the bad field",
        "edge-agent check-config --config /srv/edge/edge-agent.toml",
    )
    _config_arg(sp)
    sp.set_defaults(func=_cmd_check)

    sp = add(
        "studies",
        "list studies with their state and counts",
        "edge-agent studies --config /srv/edge/edge-agent.toml --state COMPLETE",
    )
    _config_arg(sp)
    sp.add_argument(
        "action",
        nargs="?",
        choices=["list", "restore"],
        default="list",
        help="restore UID: bring an archived/cold study back to hot",
    )
    sp.add_argument("uid", nargs="?", help="study instance UID (restore)")
    sp.add_argument("--state", choices=["RECEIVING", "COMPLETE", "INFERRING", "DONE", "FAILED"])
    sp.add_argument("--limit", type=int, default=100)
    sp.add_argument("--wait", type=float, default=0.0, metavar="SECONDS", help="restore: wait")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    sp.set_defaults(func=_cmd_studies)

    sp = add(
        "storage",
        "storage tiers: usage, pending archive, jobs; run jobs now; add a cold-tier key",
        "edge-agent storage status --config /srv/edge/edge-agent.toml",
    )
    ssub = sp.add_subparsers(title="storage commands", metavar="ACTION")
    st = ssub.add_parser("status", help="usage per tier, oldest data, pending archive, jobs")
    _config_arg(st)
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_cmd_storage_status)
    st = ssub.add_parser(
        "run", help="run lifecycle jobs now (tiers, archive, integrity, maintenance)"
    )
    _config_arg(st)
    st.add_argument("jobs", nargs="*", metavar="JOB", help="tiers|archive|integrity|maintenance")
    st.set_defaults(func=_cmd_storage_run)
    st = ssub.add_parser("new-key", help="add a cold-tier key; new cold files use it")
    _config_arg(st)
    st.set_defaults(func=_cmd_storage_new_key)

    sp = add(
        "quarantine",
        "list rejected instances and why",
        "edge-agent quarantine --config /srv/edge/edge-agent.toml",
    )
    _config_arg(sp)
    sp.add_argument("--limit", type=int, default=100)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_quarantine)

    sp = add(
        "demo",
        "run the end-to-end demo: agent + sample studies sent with storescu",
        "edge-agent demo --dir ./demo-run",
    )
    sp.add_argument("--dir", type=Path, default=Path("demo-run"), help="scratch folder (recreated)")
    sp.add_argument(
        "--serve", action="store_true", help="keep the agent, hub and web UI running at the end"
    )
    sp.set_defaults(func=_cmd_demo)

    sp = add(
        "make-samples",
        "write synthetic sample studies (no patient data) to a folder",
        "edge-agent make-samples ./samples --modality CT --slices 40",
    )
    sp.add_argument("dir", type=Path)
    sp.add_argument("--modality", choices=["CT", "MR"], default="CT")
    sp.add_argument("--slices", type=int, default=20)
    sp.add_argument("--size", type=int, default=512, help="rows and columns")
    sp.add_argument("--seed", default="sample")
    sp.set_defaults(func=_cmd_samples)

    sp = add(
        "models",
        "installed model packages: list, install, activate, build the reference models",
        "edge-agent models install ./ct-lesion-seg-1.0.0 --config /srv/edge/edge-agent.toml",
    )
    msub = sp.add_subparsers(title="models commands", metavar="ACTION")
    mp = msub.add_parser("list", help="installed versions, the active one marked")
    _config_arg(mp)
    mp.add_argument("--json", action="store_true")
    mp.set_defaults(func=_cmd_models_list)
    mp = msub.add_parser("install", help="verify and install a package folder or .tar")
    _config_arg(mp)
    mp.add_argument("package", type=Path)
    mp.add_argument("--activate", action="store_true", help="make it the active version")
    mp.set_defaults(func=_cmd_models_install)
    mp = msub.add_parser("activate", help="make an installed version the active one")
    _config_arg(mp)
    mp.add_argument("name")
    mp.add_argument("version")
    mp.set_defaults(func=_cmd_models_activate)
    mp = msub.add_parser(
        "history", help="release decisions (accepted/refused, why) and installed versions"
    )
    _config_arg(mp)
    mp.add_argument("name", nargs="?")
    mp.set_defaults(func=_cmd_models_history)
    mp = msub.add_parser("rollback", help="re-activate the previous installed version")
    _config_arg(mp)
    mp.add_argument("name")
    mp.set_defaults(func=_cmd_models_rollback)
    mp = msub.add_parser("build-reference", help="write the reference model packages to DIR")
    mp.add_argument("dir", type=Path)
    mp.add_argument("--large", action="store_true", help="also the ResNet-50-sized one (~95 MB)")
    mp.set_defaults(func=_cmd_models_build)

    sp = add(
        "results",
        "inference results (current ones; --all includes superseded)",
        "edge-agent results 1.2.840.113619.2.55.3 --config /srv/edge/edge-agent.toml",
    )
    _config_arg(sp)
    sp.add_argument("study_uid", nargs="?", help="only this study")
    sp.add_argument("--all", action="store_true", help="include superseded results")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_results)

    sp = add(
        "backup",
        "online backup: the store, every file it names, the key ring and credentials",
        "edge-agent backup /backups/edge-2026-11-26 --config /srv/edge/edge-agent.toml",
    )
    _config_arg(sp)
    sp.add_argument("dest", type=Path, help="a new (or empty) folder")
    sp.set_defaults(func=_cmd_backup)

    sp = add(
        "restore",
        "restore a backup into an empty agent (every file checked against the manifest)",
        "edge-agent restore /backups/edge-2026-11-26 --config /srv/edge/edge-agent.toml",
    )
    _config_arg(sp)
    sp.add_argument("source", type=Path, help="a folder written by edge-agent backup")
    sp.set_defaults(func=_cmd_restore_backup)

    sp = add(
        "users",
        "local web accounts: add, list; API tokens for machines; audit log export",
        "edge-agent users add alice --role radiologist --config /srv/edge/edge-agent.toml",
    )
    usub = sp.add_subparsers(title="users commands", metavar="ACTION")
    ua = usub.add_parser("add", help="add an account (password: $EDGE_USER_PASSWORD or asked)")
    _config_arg(ua)
    ua.add_argument("username")
    ua.add_argument("--role", choices=["radiologist", "operator", "admin"], required=True)
    ua.set_defaults(func=_cmd_users_add)
    ul = usub.add_parser("list", help="accounts, roles, lockouts")
    _config_arg(ul)
    ul.set_defaults(func=_cmd_users_list)
    ut = usub.add_parser("token", help="an API token acting as a user (shown once)")
    _config_arg(ut)
    ut.add_argument("name", help="what the token is for, e.g. prometheus")
    ut.add_argument("--user", required=True)
    ut.set_defaults(func=_cmd_users_token)
    uu = usub.add_parser("audit", help="export the audit log (who saw or did what)")
    _config_arg(uu)
    uu.add_argument("--since", type=float, default=0.0, help="Unix time")
    uu.add_argument("--csv", action="store_true")
    uu.set_defaults(func=_cmd_users_audit)

    sp = add(
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
    _config_arg(en)
    en.add_argument("--hub", required=True, help="hub base URL")
    en.add_argument("--token", required=True, help="one-time enrollment token")
    en.set_defaults(func=_cmd_sync_enroll)
    stp = ssub.add_parser(
        "status",
        help="outbox depth per lane, oldest unsynced, dead letters, last known connectivity",
    )
    _config_arg(stp)
    stp.add_argument("--json", action="store_true")
    stp.set_defaults(func=_cmd_sync_status)

    sp = add(
        "forwards",
        "result objects (SEG, SR) queued for or sent to PACS, with attempts and errors",
        "edge-agent forwards --state DEAD --config /srv/edge/edge-agent.toml",
    )
    _config_arg(sp)
    sp.add_argument("--state", choices=["PENDING", "SENT", "DEAD"])
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_forwards)

    sp = add(
        "associations",
        "audit trail: who connected, from where, what they sent",
        "edge-agent associations --config /srv/edge/edge-agent.toml --limit 20",
    )
    _config_arg(sp)
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")
    sp.set_defaults(func=_cmd_associations)
    return p


def _config_arg(sp: argparse.ArgumentParser) -> None:
    sp.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help=f"config file (default: $EDGE_CONFIG, else ./{CONFIG_NAME})",
    )


def _load(args: argparse.Namespace) -> Config:
    path = args.config or os.environ.get("EDGE_CONFIG") or Path(CONFIG_NAME)
    return load_config(path)


def _cmd_init(args: argparse.Namespace) -> int:
    root: Path = args.dir
    cfg_path = root / CONFIG_NAME
    if cfg_path.exists() and not args.force:
        print(f"edge-agent: {cfg_path} exists (use --force to overwrite)", file=sys.stderr)
        return EXIT_ERROR
    callers = args.allow or ["STORESCU", "ECHOSCU"]
    lines = []
    for c in callers:
        ae, _, host = c.partition("@")
        entry = f'ae_title = "{ae}"' + (f', host = "{host}"' if host else "")
        lines.append(f"  {{ {entry} }},")
    template = Template(
        resources.files("edge_agent").joinpath("default_config.toml").read_text("utf-8")
    )
    text = template.substitute(
        ae_title=args.ae_title,
        bind_address=args.bind_address,
        port=args.port,
        allowed_callers="\n".join(lines),
        data_dir="data",
        min_free_mb=args.min_free_mb,
        quiet_period_s=float(args.quiet_period),
    )
    root.mkdir(parents=True, exist_ok=True)
    cfg_path.write_text(text, encoding="utf-8")
    cfg = load_config(cfg_path)  # validate what we wrote
    from edge_agent.app import prepare_dirs

    prepare_dirs(cfg)
    print(f"wrote {cfg_path}")
    print(f"data folders under {cfg.storage.data_dir}")
    print(f"start with: edge-agent run --config {cfg_path}")
    return EXIT_OK


def _registry(cfg: Config) -> tuple[Store, Registry]:
    from edge_agent.clock import SystemClock
    from edge_agent.inference.registry import Registry
    from edge_agent.store import Store

    db = Path(cfg.storage.data_dir) / cfg.storage.database
    store = Store(db)
    return store, Registry(store=store, models_dir=cfg.models_dir(), clock=SystemClock())


def _cmd_models_list(args: argparse.Namespace) -> int:
    store, reg = _registry(_load(args))
    try:
        return _print_models(args, store, reg.installed())
    finally:
        store.close()


def _print_models(args: argparse.Namespace, store: Store, models: list[InstalledModel]) -> int:
    if args.json:
        print(json.dumps([m.__dict__ for m in models], indent=2))
    elif not models:
        print("no models installed (edge-agent models install PACKAGE)")
    for m in [] if args.json else models:
        mark = "*" if m.active else ("s" if m.shadow else " ")
        print(
            f"{mark} {m.name:<24} {m.version:<12} {m.task:<15} model sha256 "
            f"{m.model_sha256[:16]}  installed {_fmt_time(m.installed_at)}"
        )
        if m.shadow:
            from edge_agent.inference.shadow import agreement

            with store.read() as conn:
                print(f"    {agreement(conn, m.name, m.version).summary()}")
    if models and not args.json:
        print("(* active, s shadow: runs beside the active version, publishes nothing)")
    return EXIT_OK


def _cmd_models_install(args: argparse.Namespace) -> int:
    store, reg = _registry(_load(args))
    try:
        m = reg.install(args.package, activate=True if args.activate else None)
    finally:
        store.close()
    print(f"installed {m.name} {m.version} ({m.task})" + (", active" if m.active else ""))
    return EXIT_OK


def _cmd_models_activate(args: argparse.Namespace) -> int:
    store, reg = _registry(_load(args))
    try:
        reg.activate(args.name, args.version)
    finally:
        store.close()
    print(f"{args.name} {args.version} is now active")
    return EXIT_OK


def _cmd_models_history(args: argparse.Namespace) -> int:
    store, reg = _registry(_load(args))
    try:
        sql = "SELECT * FROM model_updates" + (" WHERE name = ?" if args.name else "")  # noqa: S608
        rows = store.query(sql + " ORDER BY decided_at", (args.name,) if args.name else ())
        installed = [m for m in reg.installed() if not args.name or m.name == args.name]
    finally:
        store.close()
    print("installed:")
    for m in installed:
        print(
            f"  {'*' if m.active else ' '} {m.name} {m.version}  installed "
            f"{_fmt_time(m.installed_at)}"
        )
    print("releases from the hub:")
    if not rows:
        print("  none yet")
    for r in rows:
        why = f": {r['reason']}" if r["reason"] else ""
        print(f"  {_fmt_time(r['decided_at'])}  {r['name']} {r['version']}  {r['status']}{why}")
    return EXIT_OK


def _cmd_models_rollback(args: argparse.Namespace) -> int:
    from hub_protocol.semver import parse

    store, reg = _registry(_load(args))
    try:
        versions = sorted(
            (m for m in reg.installed() if m.name == args.name), key=lambda m: parse(m.version)
        )
        active = [m for m in versions if m.active]
        if not active:
            raise EdgeError(f"{args.name} has no active version")
        older = [m for m in versions if parse(m.version) < parse(active[0].version)]
        if not older:
            raise EdgeError(f"{args.name} {active[0].version} has no older installed version")
        reg.activate(args.name, older[-1].version)
    finally:
        store.close()
    print(
        f"{args.name}: {active[0].version} -> {older[-1].version} (active); new studies use "
        "it, jobs already scheduled finish on the version they were scheduled with"
    )
    return EXIT_OK


def _cmd_models_build(args: argparse.Namespace) -> int:
    from edge_agent.inference.reference_models import build_reference_packages

    for root in build_reference_packages(args.dir, large=args.large):
        print(f"wrote {root}")
    return EXIT_OK


def _cmd_results(args: argparse.Namespace) -> int:
    from edge_agent.results.store import list_results

    store = _open_store(_load(args))
    try:
        with store.read() as conn:
            results = list_results(
                conn, study_uid=args.study_uid, include_superseded=args.all, limit=args.limit
            )
    finally:
        store.close()
    if args.json:
        print(json.dumps([r.__dict__ for r in results], indent=2, default=str))
        return EXIT_OK
    if not results:
        print("no results yet")
    for r in results:
        f = r.findings
        if r.task == "segmentation":
            summary = (
                f"{f['label']}: {f['slices_with_finding']}/{f['slices']} slices, "
                f"max area {f['max_slice_area_mm2']} mm2, volume {f['volume_mm3']} mm3, "
                f"mean {f['mean_intensity']}"
            )
        else:
            probs = ", ".join(f"{k} {v:.3f}" for k, v in f["probabilities"].items())
            summary = f"top {f['top_label']} ({probs})"
        flags = (" CRITICAL" if r.critical else "") + (" (superseded)" if r.superseded_by else "")
        print(
            f"{_fmt_time(r.created_at)}  {r.model_name} {r.model_version} on {r.provider}"
            f"{flags}\n    study {r.study_uid}\n    series {r.series_uid}\n    {summary}"
            f"\n    result {r.result_id}, {r.instances} instance(s), "
            f"inference {r.inference_ms:.0f} ms"
        )
    return EXIT_OK


def _cmd_sync_enroll(args: argparse.Namespace) -> int:
    import asyncio

    from edge_agent.sync.client import enroll

    cfg = _load(args)
    path = cfg.sync.credential_path(cfg.storage.data_dir)
    if path.exists():
        print(f"edge-agent: already enrolled ({path}); remove it to enroll again", file=sys.stderr)
        return EXIT_ERROR
    cred = asyncio.run(enroll(args.hub, args.token, ca_file=cfg.sync.hub_ca_file))
    path.parent.mkdir(parents=True, exist_ok=True)
    cred.save(path)
    print(f"enrolled as {cred.site_id} with {cred.hub_url}; credential in {path}")
    print("restart the agent (edge-agent run) to start syncing")
    return EXIT_OK


def _cmd_sync_status(args: argparse.Namespace) -> int:
    from edge_agent import status
    from edge_agent.sync.client import Credential

    cfg = _load(args)
    path = cfg.sync.credential_path(cfg.storage.data_dir)
    store = _open_store(cfg)
    try:
        cred = Credential.load(path) if path.exists() else None
        with store.read() as conn:
            out = status.sync_status(conn, credential=cred, now=time.time())
    finally:
        store.close()
    if args.json:
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
        f"({out['pending_bytes']} bytes); oldest unsynced {out['oldest_unsynced_age_s']} s; "
        f"dead letters {out['dead_letters']}"
    )
    return EXIT_OK


def _cmd_forwards(args: argparse.Namespace) -> int:
    store = _open_store(_load(args))
    try:
        sql = "SELECT * FROM forwards" + (" WHERE state = ?" if args.state else "")  # noqa: S608
        sql += " ORDER BY created_at DESC, id DESC LIMIT ?"
        params = (args.state, args.limit) if args.state else (args.limit,)
        rows = [dict(r) for r in store.query(sql, params)]
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("nothing queued or sent")
    for r in rows:
        when = (
            _fmt_time(r["sent_at"])
            if r["state"] == "SENT"
            else (f"next try {_fmt_time(r['next_attempt_at'])}" if r["state"] == "PENDING" else "-")
        )
        err = f"  last error: {r['last_error']}" if r["last_error"] else ""
        print(
            f"{r['state']:<8} {r['kind']:<4} -> {r['destination']:<28} attempts "
            f"{r['attempts']:<3} {when}  result {r['result_id']}{err}"
        )
    return EXIT_OK


def _cmd_demo(args: argparse.Namespace) -> int:
    from edge_agent.demo import run_demo

    return run_demo(args.dir.resolve(), serve=args.serve)


def _cmd_samples(args: argparse.Namespace) -> int:
    from edge_agent.samples import make_study

    study = make_study(
        args.dir, modality=args.modality, slices=args.slices, size=args.size, seed=args.seed
    )
    print(f"wrote {len(study.files)} {study.modality} instances to {args.dir}")
    print(f"study {study.study_uid}")
    return EXIT_OK


def _cmd_run(args: argparse.Namespace) -> int:
    cfg = _load(args)
    from edge_agent.app import run
    from edge_agent.logs import setup_logging

    setup_logging(cfg.logging.level, json_format=cfg.logging.json)
    return run(cfg)


def _cmd_check(args: argparse.Namespace) -> int:
    cfg = _load(args)
    d, s = cfg.dicom, cfg.storage
    callers = (
        "any"
        if d.allow_any_caller
        else ", ".join(c.ae_title + (f"@{c.host}" if c.host else "") for c in d.allowed_callers)
    )
    print("configuration OK")
    print(
        f"  AE title {d.ae_title} on {d.bind_address}:{d.port}, TLS "
        f"{'on' if d.tls.enabled else 'off'}, up to {d.max_associations} associations"
    )
    print(f"  allowed callers: {callers}")
    print(f"  data: {s.data_dir} (hot {s.path('hot_dir')}, floor {s.min_free_mb} MiB)")
    print(f"  studies complete after {cfg.studies.quiet_period_s:g} s quiet")
    return EXIT_OK


def _open_store(cfg: Config) -> Store:
    from edge_agent.store import Store

    db = Path(cfg.storage.data_dir) / cfg.storage.database
    if not db.exists():
        raise EdgeError(f"no database at {db}: has the agent run yet? (edge-agent run)")
    return Store(db)


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _lifecycle(cfg: Config, store: Store, *, with_hub: bool) -> Any:
    from edge_agent.clock import SystemClock
    from edge_agent.lifecycle.manager import Lifecycle
    from edge_agent.lifecycle.tiers import Tiers
    from edge_agent.metrics import create_metrics
    from edge_agent.sync.client import Credential, HttpHubClient
    from edge_agent.sync.state import load_hlc
    from hub_protocol import HybridClock

    clock = SystemClock()
    hub = None
    cred = cfg.sync.credential_path(cfg.storage.data_dir)
    if with_hub and cred.exists():
        hub = HttpHubClient(Credential.load(cred), ca_file=cfg.sync.hub_ca_file)
    with store.read() as conn:
        last = load_hlc(conn)
    return Lifecycle(
        cfg,
        store=store,
        tiers=Tiers(cfg, store),
        clock=clock,
        metrics=create_metrics(),
        archive=hub,
        hlc=HybridClock(cfg.sync.node_id, wall=clock.now, last=last),
    )


def _cmd_storage_status(args: argparse.Namespace) -> int:
    cfg = _load(args)
    store = _open_store(cfg)
    try:
        st = _lifecycle(cfg, store, with_hub=True).status()
    finally:
        store.close()
    if args.json:
        print(json.dumps(st, indent=2, default=str))
        return EXIT_OK
    print(f"{'TIER':<6} {'INSTANCES':>9} {'BYTES':>12} {'FS USED':>7} {'FS FREE':>10}  OLDEST")
    for t in st["tiers"]:
        oldest = _fmt_time(t["oldest_received_at"]) if t["oldest_received_at"] else "-"
        print(
            f"{t['tier']:<6} {t['instances']:>9} {t['bytes']:>12} {t['fs_used']:>7.0%} "
            f"{t['fs_free'] // 2**20:>7} MiB  {oldest}  ({t['root']})"
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
        nxt = _fmt_time(j["next_run_at"]) if j["next_run_at"] else "-"
        print(
            f"job {name:<12} last {j['last_status'] or '-':<5} next {nxt}  {j['last_detail'] or ''}"
        )
    return EXIT_OK


def _cmd_storage_run(args: argparse.Namespace) -> int:
    import asyncio

    cfg = _load(args)
    store = _open_store(cfg)
    lc = _lifecycle(cfg, store, with_hub=True)
    known = ["tiers", "archive", "integrity", "maintenance"]
    jobs = args.jobs or known
    if set(jobs) - set(known):
        raise EdgeError(f"unknown job(s) {sorted(set(jobs) - set(known))}; jobs: {known}")

    async def go() -> dict[str, str]:
        try:
            ran: dict[str, str] = await lc.run_due(only=jobs)
            return ran
        finally:
            if lc._archive is not None:
                await lc._archive.close()

    try:
        ran = asyncio.run(go())
    finally:
        store.close()
    for name, outcome in ran.items():
        print(f"{name}: {outcome}")
    return EXIT_OK if all(v.startswith("ok") for v in ran.values()) else EXIT_ERROR


def _cmd_storage_new_key(args: argparse.Namespace) -> int:
    from edge_agent.lifecycle.coldcrypt import add_key

    cfg = _load(args)
    path = Path(cfg.lifecycle.cold_key_file)
    if not path.is_absolute():
        path = Path(cfg.storage.data_dir) / path
    kid = add_key(path)
    print(f"added cold-tier key {kid} to {path}; new cold files use it, older ones keep theirs")
    print("back this file up apart from the data: without it cold data cannot be read")
    return EXIT_OK


def _cmd_restore(args: argparse.Namespace, cfg: Config) -> int:
    from edge_agent.lifecycle.manager import _request_restore

    if not args.uid:
        raise EdgeError("studies restore needs a study instance UID")
    store = _open_store(cfg)
    try:
        if not store.query("SELECT 1 FROM studies WHERE study_uid = ?", (args.uid,)):
            raise EdgeError(f"no study {args.uid}")
        store.writer.call(
            lambda c: _request_restore(
                c, study_uid=args.uid, by=f"cli:{os.environ.get('USER', '?')}", now=time.time()
            )
        )
        print(f"restore of {args.uid} requested; the running agent brings it back to hot")
        deadline = time.monotonic() + args.wait
        while time.monotonic() < deadline:
            row = store.query(
                "SELECT finished_at, error FROM restore_requests WHERE study_uid = ?", (args.uid,)
            )[0]
            if row[0] is not None:
                if row[1]:
                    print(f"restore failed: {row[1]}", file=sys.stderr)
                    return EXIT_ERROR
                print("restored: every instance is on the hot tier")
                return EXIT_OK
            time.sleep(0.5)
    finally:
        store.close()
    if args.wait:
        print("not finished yet (is the agent running?); edge-agent storage status shows it")
        return EXIT_ERROR
    return EXIT_OK


def _cmd_backup(args: argparse.Namespace) -> int:
    from edge_agent.store.backup import backup

    rep = backup(_load(args), args.dest)
    print(
        f"backed up {rep.instances} instance rows, {rep.files} files ({rep.bytes} bytes) "
        f"to {args.dest} in {rep.seconds:.1f} s; it holds credentials and the cold-tier "
        "key ring: keep it encrypted and access-controlled"
    )
    return EXIT_OK


def _cmd_restore_backup(args: argparse.Namespace) -> int:
    from edge_agent.store.backup import restore
    from edge_agent.store.lock import DataDirLock

    cfg = _load(args)
    lock = DataDirLock.acquire(Path(cfg.storage.data_dir), what="edge-agent restore")
    try:
        rep = restore(args.source, cfg)
    finally:
        lock.release()
    print(
        f"restored {rep.instances} instance rows and {rep.files} files ({rep.bytes} bytes), "
        f"every one checked against the backup's manifest, in {rep.seconds:.1f} s"
    )
    return EXIT_OK


def _accounts(cfg: Config, store: Store) -> Any:
    from edge_agent.web.accounts import Accounts

    w = cfg.web
    return Accounts(
        store,
        session_ttl_s=w.session_ttl_s,
        lockout_attempts=w.lockout_attempts,
        lockout_s=w.lockout_s,
    )


def _cmd_users_add(args: argparse.Namespace) -> int:
    import getpass

    cfg = _load(args)
    password = os.environ.get("EDGE_USER_PASSWORD", "")
    if not password:
        if not sys.stdin.isatty():
            raise EdgeError("set EDGE_USER_PASSWORD or run in a terminal to type the password")
        password = getpass.getpass(f"password for {args.username}: ")
        if getpass.getpass("again: ") != password:
            raise EdgeError("the passwords differ")
    store = _open_store(cfg)
    try:
        user = _accounts(cfg, store).add_user(args.username, args.role, password, now=time.time())
    finally:
        store.close()
    print(f"added {user.username} ({user.role})")
    return EXIT_OK


def _cmd_users_list(args: argparse.Namespace) -> int:
    cfg = _load(args)
    store = _open_store(cfg)
    try:
        users = _accounts(cfg, store).users()
    finally:
        store.close()
    if not users:
        print("no accounts (edge-agent users add NAME --role ROLE)")
    for u in users:
        locked = " LOCKED" if float(str(u["locked_until"])) > time.time() else ""
        print(f"{u['username']:<24} {u['role']:<12}{locked}")
    return EXIT_OK


def _cmd_users_token(args: argparse.Namespace) -> int:
    cfg = _load(args)
    store = _open_store(cfg)
    try:
        token = _accounts(cfg, store).create_token(args.name, args.user, now=time.time())
    finally:
        store.close()
    print(token)
    print(f"(API token {args.name!r} acting as {args.user}; shown once)", file=sys.stderr)
    return EXIT_OK


def _cmd_users_audit(args: argparse.Namespace) -> int:
    import csv

    cfg = _load(args)
    store = _open_store(cfg)
    try:
        rows = [
            dict(r)
            for r in store.query(
                "SELECT id, at, username, action, target, remote, request_id, detail "
                "FROM audit_log WHERE at >= ? ORDER BY id",
                (args.since,),
            )
        ]
    finally:
        store.close()
    if args.csv:
        w = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]) if rows else ["id"])
        w.writeheader()
        w.writerows(rows)
        return EXIT_OK
    for r in rows:
        print(
            f"{_fmt_time(float(str(r['at'])))}  {r['username']:<12} {r['action']:<16} "
            f"{r['target']}  from {r['remote']}  {r['detail']}"
        )
    return EXIT_OK


def _cmd_studies(args: argparse.Namespace) -> int:
    from edge_agent.studies.models import StudyState
    from edge_agent.studies.store import list_studies

    if args.action == "restore":
        return _cmd_restore(args, _load(args))
    store = _open_store(_load(args))
    try:
        state = StudyState(args.state) if args.state else None
        with store.read() as conn:
            studies = list_studies(conn, state=state, limit=args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps([s.__dict__ for s in studies], indent=2, default=str))
        return EXIT_OK
    if not studies:
        print("no studies yet")
        return EXIT_OK
    header = (
        f"{'STUDY INSTANCE UID':<46} {'STATE':<10} {'MOD':<4} {'SER':>3} {'INST':>5} "
        f"{'LATE':>4} {'PATIENT ID':<12} {'LAST RECEIVED':<19}"
    )
    print(header)
    for s in studies:
        print(
            f"{s.study_uid[:46]:<46} {s.state.value:<10} {s.modality[:4]:<4} "
            f"{s.series_count:>3} {s.instance_count:>5} {s.late_arrivals:>4} "
            f"{s.patient_id[:12]:<12} {_fmt_time(s.last_received_at):<19}"
        )
    return EXIT_OK


def _listing(
    cfg: Config, table: str, order_by: str, args: argparse.Namespace, empty: str
) -> list[dict[str, Any]]:
    """Rows for a listing command; prints JSON or the empty message itself and then returns
    no rows, so the caller only formats a non-empty text listing."""
    store = _open_store(cfg)
    try:
        rows = store.rows(table, order_by=order_by, limit=args.limit)
    finally:
        store.close()
    if args.json:
        print(json.dumps(rows, indent=2))
        return []
    if not rows:
        print(empty)
    return rows


def _cmd_quarantine(args: argparse.Namespace) -> int:
    cfg = _load(args)
    rows = _listing(cfg, "quarantine", "received_at DESC", args, "quarantine is empty")
    qdir = cfg.storage.path("quarantine_dir")
    for r in rows:
        status = "none" if r["status"] < 0 else f"0x{r['status']:04X}"
        print(
            f"{_fmt_time(r['received_at'])}  {status}  from {r['calling_ae'] or '-'}"
            f"@{r['peer_host'] or '-'}  {r['reason']}"
        )
        print(f"    file: {qdir / r['path']}")
    return EXIT_OK


def _cmd_associations(args: argparse.Namespace) -> int:
    rows = _listing(_load(args), "associations", "started_at DESC", args, "no associations yet")
    for r in rows:
        why = f" ({r['reject_reason']})" if r["reject_reason"] else ""
        print(
            f"{_fmt_time(r['started_at'])}  {r['calling_ae']:<16} {r['peer_host']}:"
            f"{r['peer_port']:<6} {r['outcome']}{why}  stored={r['received']} "
            f"dup={r['duplicates']} failed={r['failed']} refused={r['refused']}"
        )
    return EXIT_OK
