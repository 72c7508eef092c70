"""The ``cloud-hub`` command.

Examples::

    cloud-hub run --database-url sqlite:///hub.db --port 8443
    cloud-hub sites enroll "St. Mary radiology" --database-url sqlite:///hub.db
    cloud-hub sites list --database-url postgresql+psycopg://hub@db/hub

``--database-url`` defaults to ``$HUB_DATABASE_URL``, then ``sqlite:///hub.db``; the ops
token for the fleet view comes from ``$HUB_OPS_TOKEN``, a token that reads only ``/metrics``
from ``$HUB_METRICS_TOKEN``. ``run``'s pool options default to ``$HUB_DB_POOL_SIZE``,
``$HUB_DB_MAX_OVERFLOW``, ``$HUB_DB_POOL_TIMEOUT_S`` and ``$HUB_WORKER_THREADS``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cloud_hub import __version__

if TYPE_CHECKING:
    from cloud_hub.store import HubStore

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


def _db_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--database-url",
        default=os.environ.get("HUB_DATABASE_URL", "sqlite:///hub.db"),
        help="SQLAlchemy URL (default $HUB_DATABASE_URL or sqlite:///hub.db)",
    )


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, str(default)))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cloud-hub",
        description="Central hub for edge agents.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("Examples::", 1)[1] if __doc__ else None,
    )
    p.add_argument("--version", action="version", version=f"cloud-hub {__version__}")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")
    run = sub.add_parser(
        "run",
        help="serve the hub API until SIGTERM",
        description="serve the hub API\n\nexample:\n  cloud-hub run --port 8443",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _db_arg(run)
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=8443)
    run.add_argument(
        "--artifact-dir",
        default=os.environ.get("HUB_ARTIFACT_DIR", "artifacts"),
        help="release archives: a folder, or s3://bucket/prefix (endpoint: HUB_S3_ENDPOINT_URL)",
    )
    run.add_argument(
        "--archive-dir",
        default=os.environ.get("HUB_ARCHIVE_DIR", "archive"),
        help="sites' archived instances: a folder, or s3://bucket/prefix",
    )
    pool = run.add_argument_group(
        "database pool and threads (per replica; budget: replicas x (pool size + overflow) "
        "<= PostgreSQL max_connections - reserve)"
    )
    pool.add_argument(
        "--db-pool-size",
        type=int,
        default=_env_int("HUB_DB_POOL_SIZE", 5),
        help="connections kept open (default $HUB_DB_POOL_SIZE or 5)",
    )
    pool.add_argument(
        "--db-max-overflow",
        type=int,
        default=_env_int("HUB_DB_MAX_OVERFLOW", 5),
        help="more connections opened under load (default $HUB_DB_MAX_OVERFLOW or 5)",
    )
    pool.add_argument(
        "--db-pool-timeout",
        type=float,
        default=float(os.environ.get("HUB_DB_POOL_TIMEOUT_S", "5")),
        help="seconds a request waits for a connection, then 503 (default "
        "$HUB_DB_POOL_TIMEOUT_S or 5)",
    )
    pool.add_argument(
        "--worker-threads",
        type=int,
        default=_env_int("HUB_WORKER_THREADS", 0),
        help="threads for blocking calls (default $HUB_WORKER_THREADS or 0 = pool size + overflow)",
    )
    run.add_argument("--tls-cert", help="PEM certificate chain: serve HTTPS")
    run.add_argument("--tls-key", help="PEM private key for --tls-cert")
    run.set_defaults(func=_cmd_run)
    sites = sub.add_parser("sites", help="enroll and list sites")
    ssub = sites.add_subparsers(title="sites commands", metavar="ACTION")
    en = ssub.add_parser("enroll", help="create a one-time enrollment token for a new site")
    _db_arg(en)
    en.add_argument("name", help="a human name for the site")
    en.add_argument("--ttl-hours", type=float, default=168.0)
    en.set_defaults(func=_cmd_enroll)
    ls = ssub.add_parser("list", help="enrolled sites and their last heartbeat")
    _db_arg(ls)
    ls.add_argument("--json", action="store_true")
    ls.set_defaults(func=_cmd_list)
    mod = sub.add_parser("models", help="ops: signing keys, signed model releases")
    msub = mod.add_subparsers(title="models commands", metavar="ACTION")
    kg = msub.add_parser("keygen", help="an Ed25519 key pair; private key encrypted (0600)")
    kg.add_argument("keyfile", type=Path)
    kg.set_defaults(func=_cmd_keygen)
    rl = msub.add_parser(
        "release",
        help="verify a package folder, write its deterministic .tar and unsigned release document",
    )
    rl.add_argument("package", type=Path)
    rl.add_argument("--out", type=Path, default=Path("releases"))
    rl.add_argument("--expires-days", type=float, default=365.0)
    rl.set_defaults(func=_cmd_release)
    sg = msub.add_parser("sign", help="add this key's signature to a release document")
    sg.add_argument("document", type=Path)
    sg.add_argument("--key", type=Path, required=True)
    sg.set_defaults(func=_cmd_sign)
    pb = msub.add_parser("publish", help="store a signed release and its archive at the hub")
    _db_arg(pb)
    pb.add_argument("document", type=Path)
    pb.add_argument("archive", type=Path)
    pb.add_argument(
        "--artifact-dir",
        default=os.environ.get("HUB_ARTIFACT_DIR", "artifacts"),
        help="release archives: a folder, or s3://bucket/prefix (endpoint: HUB_S3_ENDPOINT_URL)",
    )
    pb.set_defaults(func=_cmd_publish)
    asg = msub.add_parser("assign", help="send a published release to sites")
    _db_arg(asg)
    asg.add_argument("name")
    asg.add_argument("version")
    asg.add_argument("--site", action="append", default=[])
    asg.add_argument("--all", action="store_true", help="every enrolled site")
    asg.add_argument(
        "--shadow",
        action="store_true",
        help="run it beside the active version without publishing; sites report agreement",
    )
    asg.set_defaults(func=_cmd_assign)
    ro = msub.add_parser("rollout", help="staged rollout: start, advance, pause, rollback")
    rosub = ro.add_subparsers(title="rollout commands", metavar="ACTION")
    rs_ = rosub.add_parser("start", help="assign to the canary sites first")
    _db_arg(rs_)
    rs_.add_argument("name")
    rs_.add_argument("version")
    rs_.add_argument("--canary", action="append", required=True, help="canary site id")
    rs_.add_argument("--percent", type=int, default=25, help="second stage: share of the rest")
    rs_.add_argument("--previous", help="version to roll back to (default: newest older)")
    rs_.set_defaults(func=_cmd_rollout_start)
    for action, helptext in (
        ("advance", "next stage once the current one reports active (pauses at the first refusal)"),
        ("pause", "stop assigning"),
        ("rollback", "tell every site that got it to re-activate the previous version"),
    ):
        ra = rosub.add_parser(action, help=helptext)
        _db_arg(ra)
        ra.add_argument("name")
        ra.add_argument("version")
        ra.set_defaults(func=_cmd_rollout_action, action=action)
    stt = msub.add_parser("status", help="per-site install status of model versions")
    _db_arg(stt)
    stt.add_argument("name", nargs="?")
    stt.set_defaults(func=_cmd_model_status)

    rec = sub.add_parser("records", help="cloud-side edits sent to a site")
    rsub = rec.add_subparsers(title="records commands", metavar="ACTION")
    rs = rsub.add_parser("set", help="set a record of a site (goes down its change feed)")
    _db_arg(rs)
    rs.add_argument("site_id")
    rs.add_argument("key", help="e.g. system_config/thresholds")
    rs.add_argument("type", help="record type, e.g. system_config")
    rs.add_argument("json", help="the new value, a JSON object")
    rs.set_defaults(func=_cmd_records_set)

    conf = sub.add_parser("conflicts", help="the manual-review queue")
    csub = conf.add_subparsers(title="conflicts commands", metavar="ACTION")
    cl = csub.add_parser("list", help="open conflicts, both versions")
    _db_arg(cl)
    cl.add_argument("--site")
    cl.add_argument("--json", action="store_true")
    cl.set_defaults(func=_cmd_conflicts_list)
    cr = csub.add_parser("resolve", help="keep the edge or the cloud version")
    _db_arg(cr)
    cr.add_argument("conflict_id", type=int)
    cr.add_argument("--take", choices=["edge", "cloud"], required=True)
    cr.add_argument("--by", default=os.environ.get("USER", "ops"), help="who decides (logged)")
    cr.set_defaults(func=_cmd_conflicts_resolve)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    try:
        code: int = args.func(args)
    except Exception as exc:  # one line for the operator, not a traceback
        print(f"cloud-hub: {type(exc).__name__}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return EXIT_ERROR
    return code


def _store(url: str) -> HubStore:
    from cloud_hub.store import HubStore, connect

    return HubStore(connect(url))


def _cmd_run(args: argparse.Namespace) -> int:
    import logging

    from aiohttp import web

    from cloud_hub.app import HubConfig, create_app

    logging.basicConfig(level=logging.INFO)
    cfg = HubConfig(
        database_url=args.database_url,
        host=args.host,
        port=args.port,
        artifact_dir=args.artifact_dir,
        archive_dir=args.archive_dir,
        ops_token=os.environ.get("HUB_OPS_TOKEN", ""),
        metrics_token=os.environ.get("HUB_METRICS_TOKEN", ""),
        db_pool_size=args.db_pool_size,
        db_max_overflow=args.db_max_overflow,
        db_pool_timeout_s=args.db_pool_timeout,
        worker_threads=args.worker_threads,
    )
    ssl_context = None
    if args.tls_cert or args.tls_key:
        import ssl

        if not (args.tls_cert and args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        ssl_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ssl_context.minimum_version = ssl.TLSVersion.TLSv1_2
        ssl_context.load_cert_chain(args.tls_cert, args.tls_key)
    web.run_app(create_app(cfg), host=cfg.host, port=cfg.port, print=None, ssl_context=ssl_context)
    return EXIT_OK


def _cmd_enroll(args: argparse.Namespace) -> int:
    token = _store(args.database_url).create_enrollment_token(
        args.name, ttl_s=args.ttl_hours * 3600
    )
    print(token)
    print(
        f"one-time token for {args.name!r}, valid {args.ttl_hours:g} h: give it to the site's "
        "operator (edge-agent sync enroll)",
        file=sys.stderr,
    )
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    rows = _store(args.database_url).list_sites()
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no sites enrolled")
    for r in rows:
        seen = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["last_seen_at"]))
            if r["last_seen_at"]
            else "never"
        )
        print(f"{r['site_id']:<22} {r['name']:<30} last seen {seen}")
    return EXIT_OK


def _cmd_conflicts_list(args: argparse.Namespace) -> int:
    rows = _store(args.database_url).conflicts(args.site)
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no open conflicts")
    for r in rows:
        print(f"#{r['id']} {r['site_id']} {r['key']} ({r['type']})")
        print(f"    edge  {r['edge_hlc']}: {r['edge_payload']}")
        print(f"    cloud {r['cloud_hlc']}: {r['cloud_payload']}")
    return EXIT_OK


def _cmd_conflicts_resolve(args: argparse.Namespace) -> int:
    version = _store(args.database_url).resolve_conflict(
        None, args.conflict_id, take=args.take, by=args.by
    )
    print(
        f"conflict #{args.conflict_id} resolved ({args.take} version kept by {args.by}); "
        f"record now at version {version}; the site gets it through its change feed"
    )
    return EXIT_OK


def _cmd_records_set(args: argparse.Namespace) -> int:
    from hub_protocol import RecordType

    value = json.loads(args.json)
    if not isinstance(value, dict):
        raise ValueError("the value must be a JSON object")
    version = _store(args.database_url).cloud_edit(
        args.site_id, key=args.key, type=RecordType(args.type), payload=value
    )
    print(f"{args.key} of {args.site_id} is now version {version}; the site pulls it next")
    return EXIT_OK


def _passphrase(confirm: bool = False) -> bytes:
    """From $HUB_KEY_PASSPHRASE, else asked on the terminal."""
    env = os.environ.get("HUB_KEY_PASSPHRASE")
    if env:
        return env.encode()
    import getpass

    first = getpass.getpass("key passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise ValueError("passphrases differ")
    return first.encode()


def _cmd_keygen(args: argparse.Namespace) -> int:
    from cloud_hub.ops import keygen

    kid = keygen(args.keyfile, _passphrase(confirm=True))
    print(
        f"key {kid}: private {args.keyfile} (encrypted, 0600), public {args.keyfile}.pub "
        "(pin it on every edge)"
    )
    return EXIT_OK


def _cmd_release(args: argparse.Namespace) -> int:
    from cloud_hub.ops import make_release

    rel, archive, doc = make_release(args.package, args.out, expires_days=args.expires_days)
    print(
        f"{rel.name} {rel.version}: {archive} ({rel.archive_size} bytes, sha256 "
        f"{rel.archive_sha256[:16]}...), unsigned document {doc}"
    )
    return EXIT_OK


def _cmd_sign(args: argparse.Namespace) -> int:
    from cloud_hub.ops import add_signature, load_private

    kid = add_signature(args.document, load_private(args.key, _passphrase()))
    print(f"{args.document} signed by key {kid}")
    return EXIT_OK


def _cmd_publish(args: argparse.Namespace) -> int:
    rel = _store(args.database_url).publish(
        args.document.read_bytes(), args.archive.read_bytes(), args.artifact_dir
    )
    print(f"published {rel.name} {rel.version} (archive {rel.archive_sha256[:16]}...)")
    return EXIT_OK


def _cmd_assign(args: argparse.Namespace) -> int:
    store = _store(args.database_url)
    sites = [s["site_id"] for s in store.list_sites()] if args.all else args.site
    if not sites:
        raise ValueError("name sites with --site, or --all")
    n = store.assign(args.name, args.version, sites, shadow=args.shadow)
    mode = " as a shadow" if args.shadow else ""
    print(f"{args.name} {args.version} assigned{mode} to {n} site(s)")
    return EXIT_OK


def _cmd_model_status(args: argparse.Namespace) -> int:
    rows = _store(args.database_url).rollout_status(args.name)
    if not rows:
        print("no install reports yet")
    for r in rows:
        print(
            f"{r['site_id']:<22} {r['name']} {r['version']:<10} {r['status']:<16} "
            f"{r['detail'][:120]}"
        )
    return EXIT_OK


def _cmd_rollout_start(args: argparse.Namespace) -> int:
    _store(args.database_url).start_rollout(
        args.name, args.version, canary=args.canary, percent=args.percent, previous=args.previous
    )
    print(f"{args.name} {args.version}: canary stage on {', '.join(args.canary)}")
    return EXIT_OK


def _cmd_rollout_action(args: argparse.Namespace) -> int:
    store = _store(args.database_url)
    if args.action == "advance":
        print(f"{args.name} {args.version}: {store.advance_rollout(args.name, args.version)}")
    elif args.action == "pause":
        store.pause_rollout(args.name, args.version)
        print(f"{args.name} {args.version}: paused")
    else:
        n = store.rollback_rollout(args.name, args.version)
        print(f"{args.name} {args.version}: rollback sent to {n} site(s)")
    return EXIT_OK
