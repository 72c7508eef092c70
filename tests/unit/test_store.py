"""The SQLite store (migrations, the group-commit writer, pooled readers) and the file spool."""

from __future__ import annotations

import errno
import hashlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import edge_agent.store.spool as spool_module
from edge_agent.errors import OutOfResources, StoreError
from edge_agent.store import Spool, Store, connect
from edge_agent.store import migrations as migrations_module
from edge_agent.store.migrations import MIGRATIONS, Migration

WAIT_S = 10.0


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "db" / "edge.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[Store]:
    s = Store(db_path)
    yield s
    s.close()


def insert_event(study_uid: str) -> Callable[[sqlite3.Connection], int]:
    def fn(conn: sqlite3.Connection) -> int:
        cur = conn.execute(
            "INSERT INTO study_events (study_uid, at, to_state, reason) VALUES (?, 0, 'X', 't')",
            (study_uid,),
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    return fn


def event_uids(store: Store) -> list[str]:
    return [r[0] for r in store.query("SELECT study_uid FROM study_events ORDER BY id")]


class Blocker:
    """Holds the writer thread inside a request until released, so that everything submitted
    meanwhile lands in the queue and is drained as one batch."""

    def __init__(self, store: Store, fn: Callable[[sqlite3.Connection], Any] | None = None):
        self.started = threading.Event()
        self.release = threading.Event()
        self._fn = fn

        def blocker(conn: sqlite3.Connection) -> str:
            if self._fn is not None:
                self._fn(conn)
            self.started.set()
            if not self.release.wait(WAIT_S):
                raise TimeoutError("blocker never released")
            return "blocker"

        self.future: Future[Any] = store.writer.submit(blocker)
        assert self.started.wait(WAIT_S), "writer never ran the blocker"

    def __enter__(self) -> Blocker:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release.set()


# ---------------------------------------------------------------------------------------------
# Opening and migrations


def test_wal_mode_and_full_sync(store: Store, db_path: Path) -> None:
    raw = sqlite3.connect(db_path)
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent
    finally:
        raw.close()
    assert store.writer.call(lambda c: c.execute("PRAGMA synchronous").fetchone()[0]) == 2
    assert store.writer.call(lambda c: c.execute("PRAGMA foreign_keys").fetchone()[0]) == 1


def test_migrations_recorded_and_not_reapplied(db_path: Path) -> None:
    names = [m.name for m in MIGRATIONS]
    first = Store(db_path)
    try:
        assert first.applied_migrations == names
        rows = first.query("SELECT name, applied_at FROM _migrations ORDER BY name")
        assert [r["name"] for r in rows] == names
        tables = {r[0] for r in first.query("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {"associations", "studies", "series", "instances", "quarantine"} <= tables
        first.writer.call(insert_event("1.2.3"))
    finally:
        first.close()

    again = Store(db_path)
    try:
        assert again.applied_migrations == []
        assert [tuple(r) for r in again.query("SELECT name, applied_at FROM _migrations")] == [
            tuple(r) for r in rows
        ]
        assert event_uids(again) == ["1.2.3"]  # data survived; nothing was re-created
    finally:
        again.close()


def test_unknown_migration_refuses_to_open(db_path: Path) -> None:
    Store(db_path).close()
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("INSERT INTO _migrations (name, applied_at) VALUES ('0999_future', 0)")
    raw.close()
    with pytest.raises(StoreError, match="0999_future"):
        Store(db_path)


def test_failing_migration_is_rolled_back(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Store(db_path).close()
    bad = Migration("0002_broken", "CREATE TABLE half_done (a INTEGER);\nCREATE TABLE broken (((;")
    monkeypatch.setattr(migrations_module, "MIGRATIONS", (*MIGRATIONS, bad))
    with pytest.raises(StoreError, match="0002_broken"):
        Store(db_path)
    raw = sqlite3.connect(db_path)
    try:
        tables = {r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        done = {r[0] for r in raw.execute("SELECT name FROM _migrations")}
    finally:
        raw.close()
    assert "half_done" not in tables  # the first statement went with the failed migration
    assert done == {m.name for m in MIGRATIONS}


def test_store_creates_its_folder(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b" / "edge.db"
    s = Store(path)
    try:
        assert path.is_file()
    finally:
        s.close()


# ---------------------------------------------------------------------------------------------
# Writer


def test_call_returns_the_result(store: Store) -> None:
    row_id = store.writer.call(insert_event("1.2.3"))
    assert isinstance(row_id, int)
    assert store.writer.call(lambda c: c.execute("SELECT 6 * 7").fetchone()[0]) == 42
    assert store.query("SELECT id FROM study_events")[0][0] == row_id


def test_call_reraises_the_exception_and_rolls_back_that_request(store: Store) -> None:
    def fails(conn: sqlite3.Connection) -> None:
        insert_event("doomed")(conn)
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        store.writer.call(fails)
    assert event_uids(store) == []
    assert store.writer.stats.failures == 0  # fn's failure is not a transaction failure
    store.writer.call(insert_event("after"))
    assert event_uids(store) == ["after"]


def test_a_failing_request_does_not_roll_back_the_rest_of_its_batch(store: Store) -> None:
    def fails(conn: sqlite3.Connection) -> None:
        insert_event("failing")(conn)
        raise RuntimeError("this request fails")

    def violates(conn: sqlite3.Connection) -> None:
        insert_event("violating")(conn)
        conn.execute(
            "INSERT INTO series (series_uid, study_uid, first_received_at, "
            "last_received_at) VALUES ('s', 'no-such-study', 0, 0)"
        )  # FK error

    before = store.writer.stats.transactions
    with Blocker(store):
        futures = [store.writer.submit(insert_event(f"ok-{i}")) for i in range(3)]
        bad = store.writer.submit(fails)
        futures += [store.writer.submit(insert_event(f"ok-{i}")) for i in range(3, 6)]
        fk = store.writer.submit(violates)
        futures.append(store.writer.submit(insert_event("ok-6")))

    ids = [f.result(WAIT_S) for f in futures]
    assert len(set(ids)) == 7
    with pytest.raises(RuntimeError, match="this request fails"):
        bad.result(WAIT_S)
    with pytest.raises(sqlite3.IntegrityError):
        fk.result(WAIT_S)

    stats = store.writer.stats
    assert stats.transactions - before == 2  # the blocker's, then everything else at once
    assert stats.max_batch == 9
    assert stats.failures == 0
    assert event_uids(store) == [f"ok-{i}" for i in range(7)]
    assert store.query("SELECT count(*) FROM series")[0][0] == 0


def test_sync_dirs_are_fsynced_once_per_batch(store: Store, tmp_path: Path) -> None:
    a, b, c = (tmp_path / n for n in "abc")
    for d in (a, b, c):
        d.mkdir()
    store.writer.call(insert_event("x"), sync_dirs=[a, b])
    assert store.writer.stats.dir_fsyncs == 2

    with Blocker(store):
        futures = [
            store.writer.submit(insert_event("1"), sync_dirs=[a]),
            store.writer.submit(insert_event("2"), sync_dirs=[a, b]),
            store.writer.submit(insert_event("3"), sync_dirs=[c]),
            store.writer.submit(insert_event("4")),
        ]
    for f in futures:
        f.result(WAIT_S)
    assert store.writer.stats.dir_fsyncs == 2 + 3  # a, b, c: each once for the batch


def test_sync_dirs_skipped_when_fsync_is_off(tmp_path: Path) -> None:
    s = Store(tmp_path / "edge.db", fsync_dirs=False)
    try:
        s.writer.call(insert_event("x"), sync_dirs=[tmp_path, tmp_path / "does-not-exist"])
        assert s.writer.stats.dir_fsyncs == 0
        assert event_uids(s) == ["x"]
    finally:
        s.close()


def test_failed_directory_fsync_fails_the_whole_batch(store: Store, tmp_path: Path) -> None:
    missing = tmp_path / "gone"
    with Blocker(store):
        good = store.writer.submit(insert_event("would-be-committed"))
        doomed = store.writer.submit(insert_event("needs-dir"), sync_dirs=[missing])
    for f in (good, doomed):
        with pytest.raises(StoreError, match="transaction failed") as info:
            f.result(WAIT_S)
        assert isinstance(info.value.__cause__, FileNotFoundError)
    assert store.writer.stats.failures == 1
    assert event_uids(store) == []  # nothing of that batch became durable
    store.writer.call(insert_event("later"))  # the writer keeps working
    assert event_uids(store) == ["later"]


def test_submit_after_close_raises(store: Store) -> None:
    store.writer.call(insert_event("x"))
    store.writer.close()
    with pytest.raises(StoreError, match="closed"):
        store.writer.submit(insert_event("y"))
    with pytest.raises(StoreError):
        store.writer.call(insert_event("y"))
    store.writer.close()  # idempotent


def test_close_finishes_what_is_queued(store: Store) -> None:
    with Blocker(store):
        futures = [store.writer.submit(insert_event(str(i))) for i in range(5)]
        closer = threading.Thread(target=store.writer.close)
        closer.start()
    closer.join(WAIT_S)
    assert not closer.is_alive()
    assert all(isinstance(f.result(0), int) for f in futures)
    assert event_uids(store) == [str(i) for i in range(5)]


# ---------------------------------------------------------------------------------------------
# Readers


def test_readers_see_committed_data_only(store: Store) -> None:
    with Blocker(store, insert_event("uncommitted")) as blocker:
        # The writer holds an open transaction with an insert in it; WAL readers are not
        # blocked and do not see it.
        assert event_uids(store) == []
    blocker.future.result(WAIT_S)
    assert event_uids(store) == ["uncommitted"]


def test_readers_on_other_threads_see_committed_data(store: Store) -> None:
    store.writer.call(insert_event("shared"))
    seen: list[list[str]] = []

    def read() -> None:
        seen.append(event_uids(store))

    threads = [threading.Thread(target=read) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
    assert seen == [["shared"]] * 4


def test_reader_connections_are_read_only(store: Store) -> None:
    with store.read() as conn, pytest.raises(sqlite3.OperationalError):
        conn.execute(
            "INSERT INTO study_events (study_uid, at, to_state, reason) VALUES ('x', 0, 'X', 'r')"
        )
    assert event_uids(store) == []


def test_snapshot_is_consistent(store: Store) -> None:
    store.writer.call(insert_event("before"))
    with store.snapshot() as conn:
        first = conn.execute("SELECT count(*) FROM study_events").fetchone()[0]
        store.writer.call(insert_event("during"))
        second = conn.execute("SELECT count(*) FROM study_events").fetchone()[0]
    assert first == second == 1
    assert event_uids(store) == ["before", "during"]


def test_connect_failure_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError):
        connect(tmp_path / "no-such-folder" / "x.db")


# ---------------------------------------------------------------------------------------------
# Spool


class OsProxy:
    """The ``os`` module as the spool sees it, with some functions replaced."""

    def __init__(self, **overrides: Callable[..., Any]) -> None:
        self._overrides = overrides

    def __getattr__(self, name: str) -> Any:
        if name in self._overrides:
            return self._overrides[name]
        return getattr(os, name)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "hot")
    s.prepare()
    return s


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def test_prepare_creates_the_layout(spool: Spool) -> None:
    assert spool.tmp.is_dir()
    assert len([p for p in spool.objects.iterdir() if p.is_dir()]) == 256
    spool.prepare()  # idempotent
    assert files_under(spool.root) == []


def test_put_writes_a_content_addressed_file(spool: Spool) -> None:
    chunks = (b"header-", b"", b"dataset bytes" * 1000)
    digest = sha(b"".join(chunks))
    written = spool.put(digest, chunks)
    assert written.created is True
    assert written.relpath == f"objects/{digest[:2]}/{digest}.dcm"
    assert written.abspath == spool.root / written.relpath
    assert spool.locate(written.relpath) == written.abspath
    assert written.abspath.read_bytes() == b"".join(chunks)
    assert list(spool.tmp.iterdir()) == []
    assert spool.iter_objects() == [written.abspath]


def test_put_is_atomic_via_tmp(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    data = b"x" * 10_000
    digest = sha(data)
    dest = spool.root / spool.relpath(digest)
    observed: list[tuple[bool, list[str]]] = []

    def watching_write(fd: int, buf: Any) -> int:
        observed.append((dest.exists(), [p.name for p in spool.tmp.iterdir()]))
        return os.write(fd, buf)

    monkeypatch.setattr(spool_module, "os", OsProxy(write=watching_write))
    spool.put(digest, (data,))
    assert observed
    for dest_visible, tmp_names in observed:
        assert not dest_visible  # never visible under objects/ while being written
        assert len(tmp_names) == 1
        assert tmp_names[0].endswith(".partial")
    assert dest.read_bytes() == data
    assert list(spool.tmp.iterdir()) == []


def test_put_handles_short_writes(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = 0

    def short_write(fd: int, buf: Any) -> int:
        nonlocal calls
        calls += 1
        return os.write(fd, bytes(buf[:3]))

    monkeypatch.setattr(spool_module, "os", OsProxy(write=short_write))
    data = bytes(range(256)) * 4
    written = spool.put(sha(data), (data[:500], data[500:]))
    assert written.abspath.read_bytes() == data
    assert calls >= len(data) // 3


def test_identical_put_is_not_rewritten(spool: Spool) -> None:
    data = b"same bytes"
    first = spool.put(sha(data), (data,))
    inode = first.abspath.stat().st_ino
    second = spool.put(sha(data), (data,))
    assert second.created is False
    assert second.relpath == first.relpath
    assert second.abspath.stat().st_ino == inode
    assert second.abspath.read_bytes() == data
    assert list(spool.tmp.iterdir()) == []
    assert len(spool.iter_objects()) == 1


@pytest.mark.parametrize("fsync", [True, False])
def test_put_fsyncs_the_file_unless_disabled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    s = Spool(tmp_path / "hot", fsync=fsync)
    s.prepare()
    synced: list[int] = []

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        os.fsync(fd)

    monkeypatch.setattr(spool_module, "os", OsProxy(fsync=counting_fsync))
    s.put(sha(b"abc"), (b"abc",))
    assert len(synced) == (1 if fsync else 0)


def test_remove_partials(spool: Spool) -> None:
    kept = spool.put(sha(b"kept"), (b"kept",))
    for i in range(3):
        (spool.tmp / f"crash-{i}.partial").write_bytes(b"half")
    assert spool.remove_partials() == 3
    assert list(spool.tmp.iterdir()) == []
    assert spool.iter_objects() == [kept.abspath]
    assert spool.remove_partials() == 0


def test_remove_partials_without_tmp_folder(tmp_path: Path) -> None:
    assert Spool(tmp_path / "never-prepared").remove_partials() == 0


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_while_writing(spool: Spool, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    calls = 0

    def filling_write(fd: int, buf: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 1:  # the first write lands partly, then the disk is full
            return os.write(fd, bytes(buf[:100]))
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(spool_module, "os", OsProxy(write=filling_write))
    data = b"y" * 4096
    with pytest.raises(OutOfResources) as info:
        spool.put(sha(data), (data,))
    assert isinstance(info.value.__cause__, OSError)
    assert info.value.__cause__.errno == code
    assert calls == 2
    assert list(spool.tmp.iterdir()) == []
    assert files_under(spool.objects) == []

    monkeypatch.undo()  # space is back: the same put now succeeds
    assert spool.put(sha(data), (data,)).abspath.read_bytes() == data


def test_disk_full_at_fsync(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_module, "os", OsProxy(fsync=failing_fsync))
    with pytest.raises(OutOfResources):
        spool.put(sha(b"z"), (b"z",))
    assert list(spool.tmp.iterdir()) == []
    assert files_under(spool.objects) == []


def test_other_io_errors_propagate_and_clean_up(
    spool: Spool, monkeypatch: pytest.MonkeyPatch
) -> None:
    def eio(fd: int, buf: Any) -> int:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(spool_module, "os", OsProxy(write=eio))
    with pytest.raises(OSError) as info:
        spool.put(sha(b"w"), (b"w",))
    assert not isinstance(info.value, OutOfResources)
    assert info.value.errno == errno.EIO
    assert list(spool.tmp.iterdir()) == []
    assert files_under(spool.objects) == []


def test_free_bytes_reports_the_filesystem(spool: Spool) -> None:
    st = os.statvfs(spool.root)
    assert 0 < spool.free_bytes() <= st.f_blocks * st.f_frsize


def _hammer(store: Store, futures: list[Any], lock: threading.Lock) -> None:
    for _ in range(200):
        try:
            fut = store.writer.submit(lambda c: c.execute("SELECT 1").fetchone()[0])
        except StoreError:
            return
        with lock:
            futures.append(fut)


def test_submit_racing_close_never_hangs(tmp_path: Path) -> None:
    """Every submit either raises StoreError or gets its result; none is left unresolved."""
    for round_ in range(20):
        store = Store(tmp_path / f"race{round_}.db")
        futures: list[Any] = []
        lock = threading.Lock()
        threads = [threading.Thread(target=_hammer, args=(store, futures, lock)) for _ in range(4)]
        for t in threads:
            t.start()
        store.close()
        for t in threads:
            t.join()
        for fut in futures:
            assert fut.result(timeout=5) == 1
