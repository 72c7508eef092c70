"""Local accounts: users with roles, scrypt password hashes, sessions, API tokens, lockout,
and the audit log.

- Passwords: scrypt (``cryptography``; n=2**15, r=8, p=1, 16-byte salt, 32-byte key),
  stored as ``scrypt$n$r$p$salt$key`` (base64); compared in constant time.
- Sessions: a random 32-byte token in a cookie (HttpOnly, SameSite=Strict, Secure when the UI
  is served over TLS); only its SHA-256 is stored, with a CSRF token and an expiry. A login
  always creates a new session (no fixation); logout deletes it.
- API tokens for machines: random, shown once, stored as SHA-256, act as their user.
- Lockout: ``web.lockout_attempts`` failed logins in a row lock the account for
  ``web.lockout_s``; a locked account answers like a bad password (no user enumeration).
  Each attempt is counted (reserved) in the writer before its password is checked, so
  concurrent guesses cannot all slip in before the count: at most ``lockout_attempts`` of
  them are ever checked. A lock that a stranger set on purpose is lifted from the console
  (``edge-agent users unlock NAME``), so nobody can keep an admin out of the node.
- Throttle per address: more than ``web.login_throttle_attempts`` failed logins from one
  client address within ``web.login_throttle_window_s`` refuse that address's logins
  (:class:`LoginThrottled`, HTTP 429) until the window has passed, without locking anybody's
  account.
- Roles: ``radiologist`` (read studies, review findings), ``operator`` (node status, storage,
  models; no patient data beyond the worklist), ``admin`` (everything, users, audit export).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from edge_agent import audit as audit_log
from edge_agent.errors import EdgeError
from edge_agent.store import Store

if TYPE_CHECKING:
    from edge_agent.metrics import Metrics

ROLES = ("radiologist", "operator", "admin")
_USERNAME = re.compile(r"[a-z][a-z0-9._-]{1,63}")
N, R, P = 2**15, 8, 1


class AuthFailed(EdgeError):
    """Wrong credentials, locked or disabled account (one message for all: no enumeration)."""


class LoginThrottled(AuthFailed):
    """Too many failed logins from one client address; ``retry_after_s`` until the next."""

    def __init__(self, retry_after_s: float) -> None:
        super().__init__(
            "too many failed logins from this address; try again in "
            f"{max(1, round(retry_after_s))} s"
        )
        self.retry_after_s = retry_after_s


#: Addresses whose failures are remembered at most (the oldest are forgotten first), so a
#: flood of spoofed or rotating addresses cannot grow memory without bound.
THROTTLE_MAX_ADDRESSES = 10_000


class AccountError(EdgeError):
    """A user-management request that cannot be done as asked."""


@dataclass(frozen=True)
class User:
    username: str
    role: str


@dataclass(frozen=True)
class Session:
    user: User
    csrf_token: str
    token_sha256: str
    #: the password was set by someone else: only changing it (or logging out) is allowed
    must_change_password: bool = False


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


def hash_password(password: str, *, n: int = N) -> str:
    salt = secrets.token_bytes(16)
    key = Scrypt(salt=salt, length=32, n=n, r=R, p=P).derive(password.encode())
    return f"scrypt${n}${R}${P}${_b64(salt)}${_b64(key)}"


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, key = stored.split("$")
        if scheme != "scrypt":
            return False
        got = Scrypt(salt=base64.b64decode(salt), length=32, n=int(n), r=int(r), p=int(p)).derive(
            password.encode()
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(key))


#: Words that make a password guessable however long it is, once digits and symbols are
#: taken off its ends (``Password2026!``, ``hospital1234``, ``qwertyuiop12``).
COMMON_WORDS = frozenset(
    [
        "password",
        "passw0rd",
        "passwort",
        "motdepasse",
        "contrasena",
        "qwerty",
        "qwertyuiop",
        "qwertz",
        "azerty",
        "asdfghjkl",
        "zxcvbnm",
        "letmein",
        "welcome",
        "iloveyou",
        "admin",
        "administrator",
        "root",
        "changeme",
        "default",
        "secret",
        "master",
        "monkey",
        "dragon",
        "football",
        "baseball",
        "soccer",
        "hockey",
        "sunshine",
        "princess",
        "shadow",
        "superman",
        "batman",
        "trustno1",
        "starwars",
        "whatever",
        "freedom",
        "hello",
        "charlie",
        "michael",
        "jennifer",
        "hospital",
        "radiology",
        "radiologist",
        "doctor",
        "nurse",
        "pacs",
        "dicom",
        "orthanc",
        "clinic",
        "health",
        "medical",
        "summer",
        "winter",
        "spring",
        "autumn",
        "january",
        "february",
        "march",
        "april",
        "june",
        "july",
        "august",
        "september",
        "october",
        "november",
        "december",
        "monday",
        "friday",
        "abc",
        "abcdef",
        "abcdefgh",
    ]
)
_SEQUENCES = ("0123456789", "abcdefghijklmnopqrstuvwxyz", "qwertyuiopasdfghjklzxcvbnm")


def check_password_policy(
    password: str, *, username: str = "", blocklist: frozenset[str] = frozenset()
) -> None:
    """Refuse a password that is short, common or guessable: fewer than 12 characters, one
    of ``blocklist`` (e.g. a breached-password list, lower-cased), the username in it, a
    :data:`COMMON_WORDS` word with only digits or symbols around it, one repeated
    character or a run of the keyboard or the alphabet."""
    if len(password) < 12:
        raise AccountError("passwords need at least 12 characters")
    if len(password) > 1024:
        raise AccountError("passwords are at most 1024 characters")
    low = password.lower()
    if low in blocklist:
        raise AccountError("this password is on the list of breached or common passwords")
    if username and username.lower() in low:
        raise AccountError("a password must not contain the username")
    core = re.sub(r"^[\W\d_]+|[\W\d_]+$", "", low)
    if not core or core in COMMON_WORDS or re.fullmatch(r"(.+?)\1+", core):
        raise AccountError("this password is too easy to guess (a common word or a repeat)")
    if len(set(low)) <= 2 or any(low in seq or low in seq[::-1] for seq in _SEQUENCES):
        raise AccountError("this password is too easy to guess (a run of keys or letters)")


def load_blocklist(path: str) -> frozenset[str]:
    """A breached/common password list, one per line (``#`` comments), lower-cased; empty
    path = none."""
    if not path:
        return frozenset()
    with Path(path).open(encoding="utf-8", errors="replace") as fh:
        return frozenset(
            line.strip().lower() for line in fh if line.strip() and not line.startswith("#")
        )


def _sha(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@functools.cache
def _dummy_hash() -> str:
    """A fixed hash to spend the same time on unknown users as on known ones (made on first
    use: scrypt costs ~0.2 s, which every CLI command paid at import)."""
    return hash_password(secrets.token_urlsafe(16))


class Accounts:
    def __init__(
        self,
        store: Store,
        *,
        session_ttl_s: float,
        lockout_attempts: int,
        lockout_s: float,
        throttle_attempts: int = 20,
        throttle_window_s: float = 300.0,
        metrics: Metrics | None = None,
        token_ttl_s: float = 365 * 86400.0,
        blocklist: frozenset[str] = frozenset(),
    ) -> None:
        self._store = store
        self.token_ttl_s = token_ttl_s
        self._blocklist = blocklist
        self._metrics = metrics
        self.session_ttl_s = session_ttl_s
        self.lockout_attempts = lockout_attempts
        self.lockout_s = lockout_s
        self.throttle_attempts = throttle_attempts
        self.throttle_window_s = throttle_window_s
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()  # address -> times
        self._failures_lock = threading.Lock()

    # -- users ---------------------------------------------------------------------------

    def check_password(self, password: str, *, username: str = "") -> None:
        """:func:`check_password_policy` with this node's blocklist."""
        check_password_policy(password, username=username, blocklist=self._blocklist)

    def add_user(
        self,
        username: str,
        role: str,
        password: str,
        *,
        now: float,
        must_change_password: bool = False,
    ) -> User:
        """A new account; ``must_change_password`` when someone else chose the password."""
        if not _USERNAME.fullmatch(username):
            raise AccountError(
                "usernames are 2-64 characters: lower-case letters, digits, '.', '_', '-'"
            )
        if role not in ROLES:
            raise AccountError(f"role must be one of {', '.join(ROLES)}")
        self.check_password(password, username=username)
        pw = hash_password(password)

        def insert(conn: sqlite3.Connection) -> None:
            if conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
                raise AccountError(f"user {username} exists")
            conn.execute(
                "INSERT INTO users (username, role, password_hash, created_at, "
                "must_change_password, password_changed_at) VALUES (?, ?, ?, ?, ?, ?)",
                (username, role, pw, now, int(must_change_password), now),
            )

        self._store.writer.call(insert)
        return User(username, role)

    def users(self) -> list[dict[str, object]]:
        return [
            dict(r)
            for r in self._store.query(
                "SELECT username, role, failed_logins, locked_until, created_at, disabled, "
                "must_change_password, password_changed_at FROM users ORDER BY username"
            )
        ]

    def set_disabled(self, username: str, disabled: bool) -> int:
        """Disable (or enable) ``username``; disabling ends its sessions at once (its API
        tokens stop working while it is disabled). Returns the sessions ended."""

        def tx(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE users SET disabled = ? WHERE username = ?", (int(disabled), username)
            )
            if cur.rowcount == 0:
                raise AccountError(f"no user {username}")
            if not disabled:
                return 0
            return conn.execute("DELETE FROM sessions WHERE username = ?", (username,)).rowcount

        return int(self._store.writer.call(tx))

    def end_sessions(self, username: str, *, keep: str = "") -> int:
        """End every session of ``username`` (but ``keep``, a session's token hash);
        returns how many."""

        def tx(conn: sqlite3.Connection) -> int:
            if not conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
                raise AccountError(f"no user {username}")
            return conn.execute(
                "DELETE FROM sessions WHERE username = ? AND token_sha256 != ?", (username, keep)
            ).rowcount

        return int(self._store.writer.call(tx))

    def set_password(
        self, username: str, password: str, *, now: float, must_change: bool = True
    ) -> int:
        """An admin's reset: the new password must be changed at the next login (unless
        ``must_change`` is False); every session of the user ends. Returns sessions ended."""
        self.check_password(password, username=username)
        pw = hash_password(password)

        def tx(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "UPDATE users SET password_hash = ?, must_change_password = ?, "
                "password_changed_at = ?, failed_logins = 0, locked_until = 0 WHERE username = ?",
                (pw, int(must_change), now, username),
            )
            if cur.rowcount == 0:
                raise AccountError(f"no user {username}")
            return conn.execute("DELETE FROM sessions WHERE username = ?", (username,)).rowcount

        return int(self._store.writer.call(tx))

    def change_password(self, session: Session, old: str, new: str, *, now: float) -> None:
        """The user's own change: ``old`` must be right; the other sessions end, this one
        stays and is no longer held to a change."""
        username = session.user.username
        rows = self._store.query("SELECT password_hash FROM users WHERE username = ?", (username,))
        if not rows or not verify_password(old, rows[0][0]):
            raise AccountError("the current password is wrong")
        if old == new:
            raise AccountError("the new password must differ from the current one")
        self.check_password(new, username=username)
        pw = hash_password(new)

        def tx(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE users SET password_hash = ?, must_change_password = 0, "
                "password_changed_at = ? WHERE username = ?",
                (pw, now, username),
            )
            conn.execute(
                "DELETE FROM sessions WHERE username = ? AND token_sha256 != ?",
                (username, session.token_sha256),
            )

        self._store.writer.call(tx)

    # -- login / sessions ----------------------------------------------------------------

    def login(
        self, username: str, password: str, *, remote: str, now: float
    ) -> tuple[str, Session]:
        """A new session (cookie token, session) or :class:`AuthFailed` (its subclass
        :class:`LoginThrottled` when ``remote`` made too many failed attempts)."""
        try:
            out = self._login(username, password, remote=remote, now=now)
        except LoginThrottled:
            self._count("throttled")
            raise
        except AuthFailed:
            self._count("failed")
            raise
        self._count("ok")
        return out

    def _count(self, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.web_logins.labels(outcome).inc()

    def _login(
        self, username: str, password: str, *, remote: str, now: float
    ) -> tuple[str, Session]:
        self._check_throttle(remote, now)
        u = self._store.writer.call(partial(_reserve_attempt, username=username, now=now, acc=self))
        if u is None or u["disabled"] or u["locked_until"] > now:
            # the same time as a real check, but against a hash that is not this user's: a
            # locked account's password is not even tried
            verify_password(password, _dummy_hash())
            self._note_failure(remote, now)
            raise AuthFailed("wrong username or password, or the account is locked")
        if not verify_password(password, u["password_hash"]):
            self._store.writer.call(partial(_failed, username=username, now=now, acc=self))
            self._note_failure(remote, now)
            raise AuthFailed("wrong username or password, or the account is locked")
        token, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)

        def open_session(conn: sqlite3.Connection) -> None:
            (locked_until,) = conn.execute(
                "SELECT locked_until FROM users WHERE username = ?", (username,)
            ).fetchone()
            if locked_until > now:  # concurrent guesses locked it while this one was checked
                raise AuthFailed("wrong username or password, or the account is locked")
            conn.execute(
                "UPDATE users SET failed_logins = 0, locked_until = 0 WHERE username = ?",
                (username,),
            )
            conn.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
            conn.execute(
                "INSERT INTO sessions (token_sha256, username, csrf_token, created_at, "
                "expires_at, remote) VALUES (?, ?, ?, ?, ?, ?)",
                (_sha(token), username, csrf, now, now + self.session_ttl_s, remote),
            )

        try:
            self._store.writer.call(open_session)
        except AuthFailed:
            self._note_failure(remote, now)
            raise
        return token, Session(
            User(username, u["role"]),
            csrf,
            _sha(token),
            must_change_password=bool(u["must_change_password"]),
        )

    def unlock(self, username: str) -> None:
        """Lift ``username``'s lockout and forget its failed attempts (the console's way
        back in when strangers keep an account locked)."""

        def tx(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE users SET failed_logins = 0, locked_until = 0 WHERE username = ?",
                (username,),
            )
            if cur.rowcount == 0:
                raise AccountError(f"no user {username}")

        self._store.writer.call(tx)

    def _check_throttle(self, remote: str, now: float) -> None:
        with self._failures_lock:
            times = self._failures.get(remote)
            if times is None:
                return
            while times and times[0] <= now - self.throttle_window_s:
                times.popleft()
            if len(times) >= self.throttle_attempts:
                raise LoginThrottled(times[0] + self.throttle_window_s - now)

    def _note_failure(self, remote: str, now: float) -> None:
        with self._failures_lock:
            times = self._failures.pop(remote, None) or deque()
            times.append(now)
            while len(times) > self.throttle_attempts:
                times.popleft()
            self._failures[remote] = times  # most recent last
            while len(self._failures) > THROTTLE_MAX_ADDRESSES:
                self._failures.popitem(last=False)

    def session(self, token: str, *, now: float) -> Session | None:
        rows = self._store.query(
            "SELECT s.token_sha256, s.csrf_token, s.expires_at, u.username, u.role, u.disabled, "
            "u.must_change_password FROM sessions s JOIN users u USING (username) "
            "WHERE s.token_sha256 = ?",
            (_sha(token),),
        )
        if not rows or rows[0]["expires_at"] < now or rows[0]["disabled"]:
            return None
        r = rows[0]
        return Session(
            User(r["username"], r["role"]),
            r["csrf_token"],
            r["token_sha256"],
            must_change_password=bool(r["must_change_password"]),
        )

    def logout(self, session: Session) -> None:
        self._store.writer.call(
            lambda c: c.execute(
                "DELETE FROM sessions WHERE token_sha256 = ?", (session.token_sha256,)
            )
        )

    # -- API tokens ----------------------------------------------------------------------

    def create_token(
        self, name: str, username: str, *, now: float, ttl_s: float | None = None
    ) -> str:
        """A new API token acting as ``username`` (returned once, stored hashed), valid for
        ``ttl_s`` (default ``web.api_token_ttl_days``)."""
        token = "edge_" + secrets.token_urlsafe(32)
        ttl = self.token_ttl_s if ttl_s is None else ttl_s
        if not 0 < ttl <= 10 * 365 * 86400:
            raise AccountError("a token lives between 1 second and 10 years")

        def insert(conn: sqlite3.Connection) -> None:
            if not conn.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone():
                raise AccountError(f"no user {username}")
            if conn.execute("SELECT 1 FROM api_tokens WHERE name = ?", (name,)).fetchone():
                raise AccountError(f"a token named {name} exists")
            conn.execute(
                "INSERT INTO api_tokens (token_sha256, name, username, created_at, expires_at) "
                "VALUES (?, ?, ?, ?, ?)",
                (_sha(token), name, username, now, now + ttl),
            )

        self._store.writer.call(insert)
        return token

    def revoke_token(self, name: str, *, now: float) -> None:
        """Revoke the API token ``name`` (it stops working at once)."""

        def tx(conn: sqlite3.Connection) -> None:
            cur = conn.execute(
                "UPDATE api_tokens SET revoked_at = ? WHERE name = ? AND revoked_at IS NULL",
                (now, name),
            )
            if cur.rowcount == 0:
                raise AccountError(f"no active token {name}")

        self._store.writer.call(tx)

    def tokens(self) -> list[dict[str, object]]:
        """Every API token: name, user, created, expires, revoked (never the secret)."""
        return [
            dict(r)
            for r in self._store.query(
                "SELECT name, username, created_at, expires_at, revoked_at FROM api_tokens "
                "ORDER BY name"
            )
        ]

    def token_user(self, token: str, *, now: float) -> User | None:
        """The user a token acts as; None if unknown, revoked, expired or its user is
        disabled."""
        rows = self._store.query(
            "SELECT u.username, u.role FROM api_tokens t JOIN users u USING (username) "
            "WHERE t.token_sha256 = ? AND t.revoked_at IS NULL AND u.disabled = 0 "
            "AND t.expires_at > ?",
            (_sha(token), now),
        )
        return User(rows[0][0], rows[0][1]) if rows else None

    # -- audit ---------------------------------------------------------------------------

    def audit(
        self,
        *,
        username: str,
        action: str,
        target: str,
        remote: str,
        request_id: str,
        now: float,
        detail: str = "",
    ) -> Future[Any]:
        """Queue the audit row; the returned future is done once it is committed."""
        return self._store.writer.submit(
            partial(
                audit_log.append,
                at=now,
                username=username,
                action=action,
                target=target,
                remote=remote,
                request_id=request_id,
                detail=detail,
            )
        )


def _reserve_attempt(
    conn: sqlite3.Connection, *, username: str, now: float, acc: Accounts
) -> sqlite3.Row | None:
    """Count one login attempt for ``username`` before its password is checked (as a
    failure until it succeeds), in the writer: of any number of concurrent attempts at most
    ``lockout_attempts`` get past this before the account locks. The user's row (None for no
    such user); ``locked_until`` is in the future when this attempt must fail."""
    row: sqlite3.Row | None = conn.execute(
        "SELECT username, role, password_hash, failed_logins, locked_until, disabled, "
        "must_change_password FROM users WHERE username = ?",
        (username,),
    ).fetchone()
    if row is None or row["disabled"] or row["locked_until"] > now:
        return row
    if row["failed_logins"] >= acc.lockout_attempts:  # that many attempts are in flight
        conn.execute(
            "UPDATE users SET locked_until = ?, failed_logins = 0 WHERE username = ?",
            (now + acc.lockout_s, username),
        )
        locked: sqlite3.Row | None = conn.execute(
            "SELECT username, role, password_hash, failed_logins, locked_until, disabled "
            "FROM users WHERE username = ?",
            (username,),
        ).fetchone()
        return locked
    conn.execute(
        "UPDATE users SET failed_logins = failed_logins + 1 WHERE username = ?", (username,)
    )
    return row


def _failed(conn: sqlite3.Connection, *, username: str, now: float, acc: Accounts) -> None:
    """The reserved attempt failed (it is already counted): lock at the limit."""
    (n,) = conn.execute(
        "SELECT failed_logins FROM users WHERE username = ?", (username,)
    ).fetchone()
    if n >= acc.lockout_attempts:
        conn.execute(
            "UPDATE users SET locked_until = ?, failed_logins = 0 WHERE username = ?",
            (now + acc.lockout_s, username),
        )
