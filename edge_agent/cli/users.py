"""``edge-agent users``: local web accounts, API tokens for machines, the audit log."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
import time
from functools import partial
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
    from edge_agent.web.accounts import Accounts, User

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
    ua.add_argument(
        "--temporary",
        action="store_true",
        help="a password you chose for someone else: they must change it at the first login",
    )
    ua.set_defaults(func=_cmd_add)
    ul = usub.add_parser("list", help="accounts, roles, lockouts")
    config_arg(ul)
    ul.set_defaults(func=lambda a: show(load(a)))
    uk = usub.add_parser("unlock", help="lift an account's lockout (audited)")
    config_arg(uk)
    uk.add_argument("username")
    uk.set_defaults(func=lambda a: unlock(load(a), a.username))
    for action, text in (
        ("disable", "disable an account: its sessions end, its API tokens stop (audited)"),
        ("enable", "enable a disabled account (audited)"),
        ("logout", "end every session of an account (audited)"),
        (
            "passwd",
            "set an account's password ($EDGE_USER_PASSWORD or asked); it must be "
            "changed at the next login unless --keep; its sessions end (audited)",
        ),
    ):
        ux = usub.add_parser(action, help=text)
        config_arg(ux)
        ux.add_argument("username")
        if action == "passwd":
            ux.add_argument("--keep", action="store_true", help="no change forced at login")
        ux.set_defaults(func=partial(_cmd_manage, action))
    ut = usub.add_parser("token", help="an API token acting as a user (shown once)")
    config_arg(ut)
    ut.add_argument("name", help="what the token is for, e.g. prometheus")
    ut.add_argument("--user", required=True)
    ut.add_argument("--days", type=float, help="lifetime (default web.api_token_ttl_days)")
    ut.set_defaults(func=lambda a: token(load(a), a.name, user=a.user, days=a.days))
    uts = usub.add_parser("tokens", help="API tokens: user, created, expiry, revoked")
    config_arg(uts)
    uts.set_defaults(func=lambda a: tokens(load(a)))
    ur = usub.add_parser("revoke", help="revoke an API token by name (audited)")
    config_arg(ur)
    ur.add_argument("name")
    ur.set_defaults(func=lambda a: revoke(load(a), a.name))
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


def _password(username: str) -> str:
    password = os.environ.get("EDGE_USER_PASSWORD", "")
    if not password:
        if not sys.stdin.isatty():
            raise EdgeError("set EDGE_USER_PASSWORD or run in a terminal to type the password")
        password = getpass.getpass(f"password for {username}: ")
        if getpass.getpass("again: ") != password:
            raise EdgeError("the passwords differ")
    return password


def _cmd_add(args: argparse.Namespace) -> int:
    cfg = load(args)
    add(
        cfg,
        args.username,
        role=args.role,
        password=_password(args.username),
        temporary=args.temporary,
    )
    return EXIT_OK


def _cmd_manage(action: str, args: argparse.Namespace) -> int:
    cfg = load(args)
    password = _password(args.username) if action == "passwd" else ""
    return manage(cfg, action, args.username, password=password, keep=getattr(args, "keep", False))


def _console_audit(acc: Accounts, action: str, target: str, detail: str = "") -> None:
    acc.audit(
        username=f"console:{getpass.getuser()}",
        action=action,
        target=target,
        remote="console",
        request_id="-",
        now=time.time(),
        detail=detail,
    ).result()


def manage(
    cfg: Config, action: str, username: str, *, password: str = "", keep: bool = False
) -> int:
    """``disable``, ``enable``, ``logout`` or ``passwd`` the account ``username`` from the
    console; audited as the operating-system user who ran it."""
    from edge_agent import compose

    store = open_store(cfg)
    try:
        acc = compose.accounts(cfg, store)
        if action in ("disable", "enable"):
            ended = acc.set_disabled(username, action == "disable")
        elif action == "logout":
            ended = acc.end_sessions(username)
        else:
            ended = acc.set_password(username, password, now=time.time(), must_change=not keep)
        note = "" if keep or action != "passwd" else "; it must be changed at the next login"
        _console_audit(acc, f"user.{action}", username, f"{ended} sessions ended{note}")
    finally:
        store.close()
    done = {
        "disable": "disabled",
        "enable": "enabled",
        "logout": "logged out",
        "passwd": "new password for",
    }
    print(f"{done[action]} {username} ({ended} session(s) ended{note})")
    return EXIT_OK


def add(cfg: Config, username: str, *, role: str, password: str, temporary: bool = False) -> User:
    """Add the account ``username`` with ``role`` (``temporary``: its password must be
    changed at the first login); prints and returns it."""
    from edge_agent import compose

    store = open_store(cfg)
    try:
        user = compose.accounts(cfg, store).add_user(
            username, role, password, now=time.time(), must_change_password=temporary
        )
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
        flags = " LOCKED" if float(str(u["locked_until"])) > time.time() else ""
        flags += " DISABLED" if u["disabled"] else ""
        flags += " must-change-password" if u["must_change_password"] else ""
        print(f"{u['username']:<24} {u['role']:<12}{flags}")
    return EXIT_OK


def unlock(cfg: Config, username: str) -> int:
    """Lift ``username``'s lockout and forget its failed logins; audited as the console
    (the operating-system user who ran it)."""
    from edge_agent import compose

    store = open_store(cfg)
    try:
        acc = compose.accounts(cfg, store)
        acc.unlock(username)
        _console_audit(acc, "user.unlock", username)
    finally:
        store.close()
    print(f"unlocked {username}")
    return EXIT_OK


def token(cfg: Config, name: str, *, user: str, days: float | None = None) -> int:
    """Print a new API token ``name`` acting as ``user`` (shown once), valid ``days``."""
    from edge_agent import compose

    store = open_store(cfg)
    try:
        acc = compose.accounts(cfg, store)
        now = time.time()
        ttl = None if days is None else days * 86400
        secret = acc.create_token(name, user, now=now, ttl_s=ttl)
        _console_audit(acc, "token.create", name, user)
    finally:
        store.close()
    print(secret)
    expires = fmt_time(now + (acc.token_ttl_s if ttl is None else ttl))
    print(f"(API token {name!r} acting as {user}, until {expires}; shown once)", file=sys.stderr)
    return EXIT_OK


def tokens(cfg: Config) -> int:
    """Print the API tokens (never their secrets)."""
    from edge_agent import compose

    store = open_store(cfg)
    try:
        rows = compose.accounts(cfg, store).tokens()
    finally:
        store.close()
    if not rows:
        print("no API tokens (edge-agent users token NAME --user USER)")
    now = time.time()
    for t in rows:
        if t["revoked_at"]:
            state = f"revoked {fmt_time(float(str(t['revoked_at'])))}"
        elif float(str(t["expires_at"])) <= now:
            state = f"EXPIRED {fmt_time(float(str(t['expires_at'])))}"
        else:
            state = f"valid until {fmt_time(float(str(t['expires_at'])))}"
        print(f"{t['name']:<24} {t['username']:<16} {state}")
    return EXIT_OK


def revoke(cfg: Config, name: str) -> int:
    """Revoke the API token ``name``; audited as the console."""
    from edge_agent import compose

    store = open_store(cfg)
    try:
        acc = compose.accounts(cfg, store)
        acc.revoke_token(name, now=time.time())
        _console_audit(acc, "token.revoke", name)
    finally:
        store.close()
    print(f"revoked {name}")
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
