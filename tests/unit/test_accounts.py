"""Web accounts under attack: concurrent guesses cannot outrun the lockout, one address
cannot keep guessing (throttle), and the console can lift a lock a stranger set."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from edge_agent.cli import main as cli
from edge_agent.config import load_config
from edge_agent.metrics import create_metrics
from edge_agent.store import Store
from edge_agent.web import accounts as accounts_mod
from edge_agent.web.accounts import AccountError, Accounts, AuthFailed, LoginThrottled, User
from tests.conftest import free_port

PASSWORD = "correct horse battery staple"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "edge.db")
    yield s
    s.close()


def _accounts(store: Store, **kw: float) -> Accounts:
    args: dict[str, float] = {
        "session_ttl_s": 3600.0,
        "lockout_attempts": 5,
        "lockout_s": 600.0,
        "throttle_attempts": 1000,
        "throttle_window_s": 300.0,
    }
    args.update(kw)
    return Accounts(
        store,
        session_ttl_s=args["session_ttl_s"],
        lockout_attempts=int(args["lockout_attempts"]),
        lockout_s=args["lockout_s"],
        throttle_attempts=int(args["throttle_attempts"]),
        throttle_window_s=args["throttle_window_s"],
        metrics=create_metrics(),
    )


def test_concurrent_guesses_cannot_outrun_the_lockout(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    acc = _accounts(store)
    acc.add_user("rad", "radiologist", PASSWORD, now=1000.0)
    (real_hash,) = store.query("SELECT password_hash FROM users WHERE username = 'rad'")[0]
    checked: list[str] = []
    lock = threading.Lock()
    verify = accounts_mod.verify_password

    def counting(password: str, stored: str) -> bool:
        if stored == real_hash:
            with lock:
                checked.append(password)
        return verify(password, stored)

    monkeypatch.setattr(accounts_mod, "verify_password", counting)
    guesses = [f"guess number {i:04d}" for i in range(40)]
    guesses[30] = PASSWORD  # the attacker's list holds the password, far down
    start = threading.Barrier(len(guesses))

    def attempt(pw: str) -> bool:
        start.wait()
        try:
            acc.login("rad", pw, remote=f"10.0.0.{len(pw)}", now=1001.0)
        except AuthFailed:
            return False
        return True

    with ThreadPoolExecutor(len(guesses)) as pool:
        won = list(pool.map(attempt, guesses))
    # all 40 raced the lock: at most lockout_attempts of them were checked against the hash
    assert len(checked) <= 5, len(checked)
    assert not any(won[i] for i in range(len(guesses)) if guesses[i] != PASSWORD)
    if not won[30]:  # the password was not among the few checked: the account is locked now
        with pytest.raises(AuthFailed):
            acc.login("rad", PASSWORD, remote="10.0.0.99", now=1002.0)
    (locked_until,) = store.query("SELECT locked_until FROM users WHERE username = 'rad'")[0]
    assert won[30] or locked_until > 1002.0


def test_lockout_in_a_row_and_a_success_resets_the_count(store: Store) -> None:
    acc = _accounts(store, lockout_attempts=3)
    acc.add_user("rad", "radiologist", PASSWORD, now=0.0)
    for _ in range(2):
        with pytest.raises(AuthFailed):
            acc.login("rad", "wrong password!!", remote="a", now=1.0)
    acc.login("rad", PASSWORD, remote="a", now=2.0)  # resets the count
    for _ in range(2):
        with pytest.raises(AuthFailed):
            acc.login("rad", "wrong password!!", remote="a", now=3.0)
    acc.login("rad", PASSWORD, remote="a", now=4.0)  # 2 in a row: not locked
    for _ in range(3):
        with pytest.raises(AuthFailed):
            acc.login("rad", "wrong password!!", remote="a", now=5.0)
    with pytest.raises(AuthFailed):
        acc.login("rad", PASSWORD, remote="a", now=6.0)  # locked: even the right password
    acc.login("rad", PASSWORD, remote="a", now=606.0)  # the lock expired


def test_one_address_is_throttled_without_locking_anybody(store: Store) -> None:
    acc = _accounts(store, throttle_attempts=4, throttle_window_s=60.0)
    acc.add_user("rad", "radiologist", PASSWORD, now=0.0)
    for i in range(4):  # spraying unknown names locks no account, but counts per address
        with pytest.raises(AuthFailed) as exc:
            acc.login(f"user{i}", PASSWORD, remote="203.0.113.9", now=10.0 + i)
        assert not isinstance(exc.value, LoginThrottled)
    with pytest.raises(LoginThrottled) as thr:
        acc.login("rad", PASSWORD, remote="203.0.113.9", now=20.0)  # even the right password
    assert thr.value.retry_after_s == pytest.approx(50.0)  # the oldest failure leaves at 70
    acc.login("rad", PASSWORD, remote="198.51.100.1", now=20.0)  # another address: fine
    acc.login("rad", PASSWORD, remote="203.0.113.9", now=70.5)  # the window moved on
    text = acc._metrics.registry  # type: ignore[union-attr]
    assert text.get_sample_value("edge_web_logins_total", {"outcome": "throttled"}) == 1
    assert text.get_sample_value("edge_web_logins_total", {"outcome": "failed"}) == 4
    assert text.get_sample_value("edge_web_logins_total", {"outcome": "ok"}) == 2


def test_the_throttle_forgets_the_oldest_addresses_first(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(accounts_mod, "THROTTLE_MAX_ADDRESSES", 3)
    monkeypatch.setattr(accounts_mod, "verify_password", lambda p, h: False)
    acc = _accounts(store, throttle_attempts=1)
    for addr in ("a", "b", "c", "d"):
        with pytest.raises(AuthFailed):
            acc.login("x", "y", remote=addr, now=1.0)
    assert list(acc._failures) == ["b", "c", "d"]  # bounded memory
    with pytest.raises(LoginThrottled):
        acc.login("x", "y", remote="d", now=2.0)


def test_console_unlock_lifts_a_lock_and_is_audited(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "node"
    assert cli(["init", str(root), "--port", str(free_port()), "--ae-title", "EDGE_U"]) == 0
    cfg_path = root / "edge-agent.toml"
    cfg = load_config(cfg_path)
    db = Path(cfg.storage.data_dir) / cfg.storage.database
    Store(db).close()  # the database, as the agent's first run leaves it
    monkeypatch.setenv("EDGE_USER_PASSWORD", PASSWORD)
    assert cli(["users", "add", "boss", "--role", "admin", "--config", str(cfg_path)]) == 0
    st = Store(db)
    try:
        acc = _accounts(st, lockout_attempts=cfg.web.lockout_attempts)
        for _ in range(cfg.web.lockout_attempts):
            with pytest.raises(AuthFailed):
                acc.login("boss", "not the password", remote="x", now=1e9)
        with pytest.raises(AuthFailed):
            acc.login("boss", PASSWORD, remote="y", now=1e9)
    finally:
        st.close()
    capsys.readouterr()
    assert cli(["users", "unlock", "boss", "--config", str(cfg_path)]) == 0
    assert "unlocked boss" in capsys.readouterr().out
    assert cli(["users", "unlock", "nobody", "--config", str(cfg_path)]) != 0
    assert "no user nobody" in capsys.readouterr().err
    st = Store(db)
    try:
        _accounts(st).login("boss", PASSWORD, remote="y", now=1e9)
        rows = st.query("SELECT username, action, target FROM audit_log WHERE action LIKE 'user.%'")
        assert [(r["action"], r["target"]) for r in rows] == [("user.unlock", "boss")]
        assert str(rows[0]["username"]).startswith("console:")
    finally:
        st.close()


@pytest.mark.parametrize(
    ("password", "why"),
    [
        ("short pass", "12 characters"),
        ("Password2026!", "too easy"),
        ("hospital1234", "too easy"),
        ("QWERTYUIOP12", "too easy"),
        ("abcabcabcabc", "too easy"),
        ("aaaaaaaaaaaaaaab", "run of keys"),
        ("1234567890123", "too easy"),
        ("zyxwvutsrqponm", "run of keys"),
        ("my name is radjones!", "username"),
        ("breached password one", "breached"),
    ],
)
def test_password_policy_refuses_guessable_passwords(store: Store, password: str, why: str) -> None:
    acc = Accounts(
        store,
        session_ttl_s=60,
        lockout_attempts=5,
        lockout_s=60,
        blocklist=frozenset({"breached password one"}),
    )
    with pytest.raises(AccountError, match=why):
        acc.add_user("radjones", "radiologist", password, now=0.0)
    acc.add_user("radjones", "radiologist", "violet staple 42 orbit", now=0.0)  # a passphrase


def test_disable_ends_sessions_and_stops_tokens_until_enabled(store: Store) -> None:
    acc = _accounts(store)
    acc.add_user("rad", "radiologist", PASSWORD, now=0.0)
    cookie, _ = acc.login("rad", PASSWORD, remote="a", now=1.0)
    token = acc.create_token("scanner", "rad", now=1.0)
    assert acc.session(cookie, now=2.0) is not None and acc.token_user(token, now=2.0)
    assert acc.set_disabled("rad", True) == 1
    assert acc.session(cookie, now=3.0) is None and acc.token_user(token, now=3.0) is None
    with pytest.raises(AuthFailed):
        acc.login("rad", PASSWORD, remote="a", now=3.0)
    acc.set_disabled("rad", False)
    assert acc.session(cookie, now=4.0) is None  # an ended session stays ended
    assert acc.token_user(token, now=4.0) == User("rad", "radiologist")
    acc.login("rad", PASSWORD, remote="a", now=4.0)
    with pytest.raises(AccountError, match="no user"):
        acc.set_disabled("nobody", True)


def test_tokens_expire_and_are_revoked(store: Store) -> None:
    acc = Accounts(store, session_ttl_s=60, lockout_attempts=5, lockout_s=60, token_ttl_s=100)
    acc.add_user("ops", "operator", PASSWORD, now=0.0)
    default = acc.create_token("prometheus", "ops", now=0.0)
    short = acc.create_token("once", "ops", now=0.0, ttl_s=10)
    assert acc.token_user(short, now=9.0) and acc.token_user(short, now=10.0) is None
    assert acc.token_user(default, now=99.0) and acc.token_user(default, now=100.0) is None
    third = acc.create_token("grafana", "ops", now=0.0)
    acc.revoke_token("grafana", now=5.0)
    assert acc.token_user(third, now=6.0) is None
    with pytest.raises(AccountError, match="no active token"):
        acc.revoke_token("grafana", now=7.0)
    listed = {t["name"]: t for t in acc.tokens()}
    assert listed["grafana"]["revoked_at"] == 5.0 and listed["once"]["expires_at"] == 10.0
    assert all("token" not in k for t in listed.values() for k in t)  # never the secret
    with pytest.raises(AccountError, match="between"):
        acc.create_token("forever", "ops", now=0.0, ttl_s=0)


def test_a_password_set_by_someone_else_must_be_changed(store: Store) -> None:
    acc = _accounts(store)
    acc.add_user("rad", "radiologist", PASSWORD, now=0.0, must_change_password=True)
    cookie, session = acc.login("rad", PASSWORD, remote="a", now=1.0)
    assert session.must_change_password
    other, _ = acc.login("rad", PASSWORD, remote="b", now=1.0)
    with pytest.raises(AccountError, match="current password is wrong"):
        acc.change_password(session, "not it at all", "violet staple 42 orbit", now=2.0)
    with pytest.raises(AccountError, match="differ"):
        acc.change_password(session, PASSWORD, PASSWORD, now=2.0)
    with pytest.raises(AccountError, match="too easy"):
        acc.change_password(session, PASSWORD, "Password2026!", now=2.0)
    acc.change_password(session, PASSWORD, "violet staple 42 orbit", now=2.0)
    now_session = acc.session(cookie, now=3.0)
    assert now_session is not None and not now_session.must_change_password
    assert acc.session(other, now=3.0) is None  # the other session ended
    with pytest.raises(AuthFailed):
        acc.login("rad", PASSWORD, remote="a", now=3.0)
    # an admin's reset: the sessions end and the next login must change it again
    assert acc.set_password("rad", "admin chosen 7 words", now=4.0) == 1
    assert acc.session(cookie, now=4.0) is None
    _, again = acc.login("rad", "admin chosen 7 words", remote="a", now=5.0)
    assert again.must_change_password
    assert acc.end_sessions("rad") == 1


def test_console_manages_accounts_and_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "node"
    assert cli(["init", str(root), "--port", str(free_port()), "--ae-title", "EDGE_C"]) == 0
    cfg = str(root / "edge-agent.toml")
    monkeypatch.setenv("EDGE_USER_PASSWORD", PASSWORD)
    assert cli(["users", "add", "rad", "--role", "radiologist", "--temporary", "-c", cfg]) == 0
    assert cli(["users", "list", "-c", cfg]) == 0
    assert "must-change-password" in capsys.readouterr().out
    assert cli(["users", "disable", "rad", "-c", cfg]) == 0
    assert cli(["users", "list", "-c", cfg]) == 0
    assert "DISABLED" in capsys.readouterr().out
    assert cli(["users", "enable", "rad", "-c", cfg]) == 0
    monkeypatch.setenv("EDGE_USER_PASSWORD", "Password2026!")
    assert cli(["users", "passwd", "rad", "-c", cfg]) == 1
    assert "too easy to guess" in capsys.readouterr().err
    monkeypatch.setenv("EDGE_USER_PASSWORD", "violet staple 42 orbit")
    assert cli(["users", "passwd", "rad", "--keep", "-c", cfg]) == 0
    assert cli(["users", "token", "ris", "--user", "rad", "--days", "2", "-c", cfg]) == 0
    out = capsys.readouterr()
    assert out.out.strip().splitlines()[-1].startswith("edge_") and "until" in out.err
    assert cli(["users", "revoke", "ris", "-c", cfg]) == 0
    assert cli(["users", "tokens", "-c", cfg]) == 0
    assert "revoked" in capsys.readouterr().out
    assert cli(["users", "revoke", "ris", "-c", cfg]) == 1
    assert cli(["users", "logout", "nobody", "-c", cfg]) == 1
    cfg_obj = load_config(Path(cfg))
    st = Store(Path(cfg_obj.storage.data_dir) / cfg_obj.storage.database)
    try:
        rows = st.query("SELECT action, target, username FROM audit_log ORDER BY id")
        assert [(r["action"], r["target"]) for r in rows] == [
            ("user.disable", "rad"),
            ("user.enable", "rad"),
            ("user.passwd", "rad"),
            ("token.create", "ris"),
            ("token.revoke", "ris"),
        ]
        assert all(str(r["username"]).startswith("console:") for r in rows)
        _accounts(st).login("rad", "violet staple 42 orbit", remote="x", now=1e9)
    finally:
        st.close()
