"""The audit log's hash chain (edits, deletions, insertions found; rows from before the
chain chained on upgrade), CSV formula neutralisation, ``users audit --verify``; and PHI at
rest: private umask, existing files made private once, links not followed."""

from __future__ import annotations

import csv
import io
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent import audit
from edge_agent.cli import main as cli
from edge_agent.config import load_config
from edge_agent.perms import MARKER, harden, private_umask
from edge_agent.store import Store
from tests.conftest import free_port


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "edge.db")
    yield s
    s.close()


def _write(store: Store, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        store.writer.call(
            lambda c, i=i: audit.append(
                c,
                at=1000.0 + i / 3,  # not exactly representable: the hash must still match
                username=f"user{i}",
                action="study.view",
                target=f"1.2.3.{i}",
                remote="10.0.0.1",
                request_id=f"r{i}",
                detail="Żółć" if i % 2 else "",
            )
        )


def _verify(store: Store) -> audit.Verdict:
    with store.read() as conn:
        return audit.verify(conn)


def test_the_chain_finds_an_edited_a_removed_and_an_inserted_row(store: Store) -> None:
    _write(store, 6)
    ok = _verify(store)
    assert ok.intact and ok.rows == 6 and len(ok.head) == 64
    store.writer.call(lambda c: c.execute("UPDATE audit_log SET username = 'x' WHERE id = 3"))
    bad = _verify(store)
    assert (bad.broken_at, bad.rows) == (3, 3) and "edited" in bad.reason
    store.writer.call(lambda c: c.execute("UPDATE audit_log SET username = 'user2' WHERE id = 3"))
    assert _verify(store).intact  # put back as it was
    store.writer.call(lambda c: c.execute("DELETE FROM audit_log WHERE id = 4"))
    gone = _verify(store)
    assert gone.broken_at == 5 and "removed or inserted" in gone.reason


def test_renumbered_rows_break_the_chain(store: Store) -> None:
    _write(store, 3)
    # room made for a forged row between the first two: the ids are in the hashes
    store.writer.call(lambda c: c.execute("UPDATE audit_log SET id = id * 10"))
    v = _verify(store)
    assert v.broken_at == 10 and "edited" in v.reason


def test_rows_from_before_the_chain_are_chained_by_the_next_write(store: Store) -> None:
    store.writer.call(
        lambda c: c.executemany(
            "INSERT INTO audit_log (at, username, action, target, remote, request_id, detail) "
            "VALUES (?, 'old', 'login', 'old', '-', '-', '')",
            [(1.0,), (2.0,)],
        )
    )
    assert not _verify(store).intact  # unchained rows are not taken as intact
    _write(store, 2)
    v = _verify(store)
    assert v.intact and v.rows == 4


def test_csv_neutralises_formulas_and_keeps_the_rest() -> None:
    rows = [
        {"id": 1, "at": 1.5, "username": '=HYPERLINK("http://x")', "action": "+1", "target": "-2"},
        {"id": 2, "at": 2.0, "username": "@SUM(A1)", "action": "\tx", "target": "1.2.3"},
    ]
    buf = io.StringIO()
    assert audit.write_csv(rows, buf) == 2
    got = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert [g["username"] for g in got] == ['\'=HYPERLINK("http://x")', "'@SUM(A1)"]
    assert [g["action"] for g in got] == ["'+1", "'\tx"]
    assert [g["target"] for g in got] == ["'-2", "1.2.3"]
    assert got[0]["at"] == "1.5" and got[0]["id"] == "1"


def test_users_audit_verify_exits_1_where_the_chain_breaks(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "node"
    assert cli(["init", str(root), "--port", str(free_port()), "--ae-title", "EDGE_A"]) == 0
    cfg_path = root / "edge-agent.toml"
    cfg = load_config(cfg_path)
    st = Store(Path(cfg.storage.data_dir) / cfg.storage.database)
    try:
        _write(st, 5)
    finally:
        st.close()
    capsys.readouterr()
    assert cli(["users", "audit", "--verify", "--config", str(cfg_path)]) == 0
    assert "audit log intact: 5 row(s), head sha256 " in capsys.readouterr().out
    st = Store(Path(cfg.storage.data_dir) / cfg.storage.database)
    try:
        st.writer.call(lambda c: c.execute("UPDATE audit_log SET target = 'x' WHERE id = 2"))
    finally:
        st.close()
    assert cli(["users", "audit", "--verify", "--config", str(cfg_path)]) == 1
    assert "audit log BROKEN at row 2" in capsys.readouterr().out


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.lstat().st_mode)


def test_harden_makes_an_old_install_private_once_without_following_links(
    tmp_path: Path,
) -> None:
    data = tmp_path / "data"
    (data / "hot" / "objects" / "ab").mkdir(parents=True)
    inst = data / "hot" / "objects" / "ab" / "x.dcm"
    inst.write_bytes(b"PHI")
    db = data / "edge.db"
    db.write_bytes(b"db")
    outside = tmp_path / "outside.txt"
    outside.write_text("not ours")
    outside.chmod(0o644)
    (data / "link").symlink_to(outside)
    for p in (data, data / "hot", data / "hot" / "objects", data / "hot" / "objects" / "ab"):
        p.chmod(0o755)
    inst.chmod(0o644)
    db.chmod(0o664)
    assert harden([data]) == 6
    assert {_mode(p) for p in (data, data / "hot", data / "hot" / "objects" / "ab")} == {0o700}
    assert _mode(inst) == _mode(db) == 0o600
    assert _mode(outside) == 0o644  # the link's target is left alone
    assert (data / MARKER).exists()
    # later starts only look at the top level: a deep file is not walked again
    inst.chmod(0o644)
    db.chmod(0o644)
    assert harden([data]) == 1
    assert _mode(db) == 0o600 and _mode(inst) == 0o644
    assert harden([data / "missing"]) == 0


def test_private_umask_creates_private_files_and_restores_the_old_one(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        with private_umask():
            (tmp_path / "f").write_text("x")
            (tmp_path / "d").mkdir()
        (tmp_path / "g").write_text("x")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "f") == 0o600 and _mode(tmp_path / "d") == 0o700
    assert _mode(tmp_path / "g") == 0o644
