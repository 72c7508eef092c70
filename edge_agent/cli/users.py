"""``edge-agent users``: local web accounts, API tokens for machines, the audit log."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from typing import TYPE_CHECKING

from edge_agent import audit as audit_log
from edge_agent.cli.common import (
    EXIT_ERROR,
    EXIT_OK,
    add_command,
    config_arg,
    fmt_time,
    load,
    open_store,
    parse_time,
)
from edge_agent.config import Config
from edge_agent.errors import EdgeError

if TYPE_CHECKING:
    from edge_agent.web.accounts import User

ROLES = ["radiologist", "operator", "admin"]


def add_users(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    sp = add_command(
        sub,
        "users",
        "local web accounts: add, list; API tokens for machines; audit log export",
        "edge-agent users add alice --role radiologist --config /srv/edge/edge-agent.toml",
    )
    usub = sp.add_subparsers(title="users commands", metavar="ACTION")
    ua = usub.add_parser("add", help="add an account (password: $EDGE_USER_PASSWORD or asked)")
    config_arg(ua)
    ua.add_argument("username")
    ua.add_argument("--role", choices=ROLES, required=True)
    ua.set_defaults(func=_cmd_add)
    ul = usub.add_parser("list", help="accounts, roles, lockouts")
    config_arg(ul)
    ul.set_defaults(func=lambda a: show(load(a)))
    uk = usub.add_parser("unlock", help="lift an account's lockout (audited)")
    config_arg(uk)
    uk.add_argument("username")
    uk.set_defaults(func=lambda a: unlock(load(a), a.username))
    ut = usub.add_parser("token", help="an API token acting as a user (shown once)")
    config_arg(ut)
    ut.add_argument("name", help="what the token is for, e.g. prometheus")
    ut.add_argument("--user", required=True)
    ut.set_defaults(func=lambda a: token(load(a), a.name, user=a.user))
    uu = usub.add_parser("audit", help="export the audit log (who saw or did what)")
    config_arg(uu)
    uu.add_argument(
        "--since",
        type=parse_time,
        default=0.0,
        metavar="TIME",
        help="only entries from then on: 2026-12-01, 2026-12-01T08:30 (local time), "
        "2026-12-01T08:30Z, or Unix seconds",
    )
    uu.add_argument("--csv", action="store_true", help="as CSV (formula cells neutralised)")
    uu.add_argument(
        "--verify",
        action="store_true",
        help="check the log's hash chain (exit 1 where it breaks); prints its head hash",
    )
    uu.set_defaults(
        func=lambda a: (
            verify_audit(load(a)) if a.verify else audit(load(a), since=a.since, as_csv=a.csv)
        )
    )


def _cmd_add(args: argparse.Namespace) -> int:
    cfg = load(args)
    password = os.environ.get("EDGE_USER_PASSWORD", "")
    if not password:
        if not sys.stdin.isatty():
            raise EdgeError("set EDGE_USER_PASSWORD or run in a terminal to type the password")
        password = getpass.getpass(f"password for {args.username}: ")
        if getpass.getpass("again: ") != password:
            raise EdgeError("the passwords differ")
    add(cfg, args.username, role=args.role, password=password)
    return EXIT_OK


def add(cfg: Config, username: str, *, role: str, password: str) -> User:
    """Add the account ``username`` with ``role``; prints and returns it."""
    from edge_agent import compose

    store = open_store(cfg)
    try:
        user = compose.accounts(cfg, store).add_user(username, role, password, now=time.time())
    finally:
        store.close()
    print(f"added {user.username} ({user.role})")
    return user


def show(cfg: Config) -> int:
    """Print the accounts, their roles and lockouts."""
    from edge_agent import compose

    store = open_store(cfg)
    try:
        users = compose.accounts(cfg, store).users()
    finally:
        store.close()
    if not users:
        print("no accounts (edge-agent users add NAME --role ROLE)")
    for u in users:
        locked = " LOCKED" if float(str(u["locked_until"])) > time.time() else ""
        print(f"{u['username']:<24} {u['role']:<12}{locked}")
    return EXIT_OK


def unlock(cfg: Config, username: str) -> int:
    """Lift ``username``'s lockout and forget its failed logins; audited as the console
    (the operating-system user who ran it)."""
    from edge_agent import compose

    store = open_store(cfg)
    try:
        acc = compose.accounts(cfg, store)
        acc.unlock(username)
        acc.audit(
            username=f"console:{getpass.getuser()}",
            action="user.unlock",
            target=username,
            remote="console",
            request_id="-",
            now=time.time(),
        ).result()
    finally:
        store.close()
    print(f"unlocked {username}")
    return EXIT_OK


def token(cfg: Config, name: str, *, user: str) -> int:
    """Print a new API token ``name`` acting as ``user`` (shown once)."""
    from edge_agent import compose

    store = open_store(cfg)
    try:
        secret = compose.accounts(cfg, store).create_token(name, user, now=time.time())
    finally:
        store.close()
    print(secret)
    print(f"(API token {name!r} acting as {user}; shown once)", file=sys.stderr)
    return EXIT_OK


def audit(cfg: Config, *, since: float = 0.0, as_csv: bool = False) -> int:
    """Print the audit log from ``since`` (Unix time), as text or CSV."""
    store = open_store(cfg)
    try:
        rows = [
            dict(r)
            for r in store.query(
                "SELECT id, at, username, action, target, remote, request_id, detail, "
                "prev_sha256, sha256 FROM audit_log WHERE at >= ? ORDER BY id",
                (since,),
            )
        ]
    finally:
        store.close()
    if as_csv:
        audit_log.write_csv(rows, sys.stdout)
        return EXIT_OK
    if not rows:
        print("no audit entries" + (f" since {fmt_time(since)}" if since else ""))
    for r in rows:
        print(
            f"{fmt_time(float(str(r['at'])))}  {r['username']:<12} {r['action']:<16} "
            f"{r['target']}  from {r['remote']}  {r['detail']}"
        )
    return EXIT_OK


def verify_audit(cfg: Config) -> int:
    """Check the audit log's hash chain; EXIT_ERROR at the first row that breaks it."""
    store = open_store(cfg)
    try:
        store.writer.call(audit_log.seal)  # rows from before the chain, chained as they are
        with store.snapshot() as conn:
            verdict = audit_log.verify(conn)
    finally:
        store.close()
    if not verdict.intact:
        print(
            f"audit log BROKEN at row {verdict.broken_at}: {verdict.reason} "
            f"({verdict.rows - 1} row(s) before it are intact)"
        )
        return EXIT_ERROR
    print(f"audit log intact: {verdict.rows} row(s), head sha256 {verdict.head}")
    print("(keep the head hash elsewhere: rows removed from the end show only against it)")
    return EXIT_OK
