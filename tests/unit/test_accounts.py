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
from edge_agent.web.accounts import Accounts, AuthFailed, LoginThrottled
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
