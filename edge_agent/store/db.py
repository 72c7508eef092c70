"""The single SQLite system of record: one file, WAL mode, one writer thread.

Writes go through :class:`Writer`, a single thread that owns the only write connection. It
takes every request waiting in its queue, runs each in its own SAVEPOINT inside one
transaction, fsyncs the directories the batch depends on, and commits once (group commit).
A request's future resolves only after that commit is durable (``synchronous=FULL``), so a
caller that waited on it may acknowledge the data to the outside world.

Reads use one connection per thread (:meth:`Store.reader`); WAL lets them run beside the
writer without blocking it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import sqlite_utils

from edge_agent.errors import StoreError
from edge_agent.store.migrations import apply_migrations

log = logging.getLogger(__name__)

T = TypeVar("T")
Q = TypeVar("Q")
Q_co = TypeVar("Q_co", covariant=True)


class QueueLike(Protocol[Q_co]):
    def get(self) -> Q_co: ...

    def get_nowait(self) -> Q_co: ...


WriteFn = Callable[[sqlite3.Connection], Any]

BUSY_TIMEOUT_MS = 30_000
MAX_DIR_FDS = 512


def connect(path: Path, *, readonly: bool = False, durable: bool = True) -> sqlite3.Connection:
    """Open ``path`` with the pragmas every connection of the agent uses.

    Autocommit mode (``isolation_level=None``): transactions are explicit ``BEGIN``/``COMMIT``.
    ``durable=False`` (only with ``storage.fsync = false``, for measuring what durability
    costs) commits with ``synchronous=OFF``: no flush at all.
    """
    try:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        if readonly:
            conn.execute("PRAGMA query_only = ON")
        else:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise StoreError(f"cannot put {path} in WAL mode (got {mode})")
            # FULL: a commit is on disk when COMMIT returns; we acknowledge C-STOREs on it.
            conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'OFF'}")
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open database {path}: {exc}") from exc
    conn.row_factory = sqlite3.Row
    return conn


@dataclass
class _Request:
    fn: WriteFn
    future: Future[Any]
    sync_dirs: tuple[Path, ...] = ()


@dataclass
class WriterStats:
    """Counters of the writer's work, for benchmarks and metrics."""

    transactions: int = 0
    requests: int = 0
    max_batch: int = 0
    dir_fsyncs: int = 0
    failures: int = 0


class Writer:
    """The one writer thread. See the module docstring for the batching contract."""

    def __init__(self, path: Path, *, max_batch: int = 512, fsync_dirs: bool = True) -> None:
        self._path = path
        self._max_batch = max_batch
        self._fsync_dirs = fsync_dirs
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._conn = connect(path, durable=fsync_dirs)
        self._closed = threading.Event()
        self._submit_lock = threading.Lock()
        self.stats = WriterStats()
        self._dir_fds: dict[Path, int] = {}  # used by the writer thread only
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called (nothing more can be written)."""
        return self._closed.is_set()

    def submit(self, fn: WriteFn, *, sync_dirs: Iterable[Path] = ()) -> Future[Any]:
        """Queue ``fn(conn)`` to run inside the next transaction.

        ``sync_dirs``: directories to fsync before that transaction commits (e.g. the folder a
        file was just renamed into), so the row never becomes durable before the file does.
        The returned future holds ``fn``'s result once the transaction has committed, or the
        exception ``fn`` (or the commit) raised. Raises :class:`StoreError` if closed.
        """
        fut: Future[Any] = Future()
        with self._submit_lock:  # no request may slip in behind the stop marker
            if self._closed.is_set():
                raise StoreError("store writer is closed")
            self._queue.put(_Request(fn, fut, tuple(sync_dirs)))
        return fut

    def call(
        self,
        fn: Callable[[sqlite3.Connection], T],
        *,
        sync_dirs: Iterable[Path] = (),
        timeout: float | None = None,
    ) -> T:
        """Submit ``fn`` and wait for its committed result (re-raising its exception)."""
        result: T = self.submit(fn, sync_dirs=sync_dirs).result(timeout=timeout)
        return result

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the thread and close the connection."""
        with self._submit_lock:
            if self._closed.is_set():
                return
            self._closed.set()
            self._queue.put(None)
        self._thread.join(timeout)
        with contextlib.suppress(sqlite3.Error):
            self._conn.close()
        for fd in self._dir_fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._dir_fds.clear()

    def _dir_fd(self, path: Path) -> int:
        """A kept-open descriptor of ``path`` for fsync (the spool has 256 fixed folders;
        re-opening one per batch cost more than the fsync itself)."""
        fd = self._dir_fds.get(path)
        if fd is None:
            if len(self._dir_fds) >= MAX_DIR_FDS:
                for old in self._dir_fds.values():
                    os.close(old)
                self._dir_fds.clear()
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            self._dir_fds[path] = fd
        return fd

    def _run(self) -> None:
        for batch in batches(self._queue, self._max_batch):
            self._commit_batch(batch)

    def _commit_batch(self, batch: list[_Request]) -> None:
        results: list[tuple[bool, Any]] = []
        try:
            if self._fsync_dirs:
                dirs = {d for r in batch for d in r.sync_dirs}
                for d in dirs:
                    os.fsync(self._dir_fd(d))
                self.stats.dir_fsyncs += len(dirs)
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            for i, req in enumerate(batch):
                sp = f"r{i}"
                conn.execute(f"SAVEPOINT {sp}")
                try:
                    value = req.fn(conn)
                except BaseException as exc:
                    conn.execute(f"ROLLBACK TO {sp}")
                    conn.execute(f"RELEASE {sp}")
                    results.append((False, exc))
                else:
                    conn.execute(f"RELEASE {sp}")
                    results.append((True, value))
            conn.execute("COMMIT")
        except (sqlite3.Error, OSError) as exc:
            with contextlib.suppress(sqlite3.Error):
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
            self.stats.failures += 1
            log.error("store transaction failed", extra={"error": str(exc), "batch": len(batch)})
            err = StoreError(f"store transaction failed: {exc}")
            err.__cause__ = exc
            for req in batch:
                req.future.set_exception(err)
            return
        self.stats.transactions += 1
        self.stats.requests += len(batch)
        self.stats.max_batch = max(self.stats.max_batch, len(batch))
        for req, (ok, value) in zip(batch, results, strict=True):
            if ok:
                req.future.set_result(value)
            else:
                req.future.set_exception(value)


def batches(q: QueueLike[Q | None], limit: int) -> Iterator[list[Q]]:
    """Group commit: wait for the first item, take whatever else is already queued (up to
    ``limit``), yield the batch; a ``None`` in the queue ends it (after the items before).
    """
    while True:
        first = q.get()
        if first is None:
            return
        batch = [first]
        stop = False
        while len(batch) < limit:
            try:
                nxt = q.get_nowait()
            except queue.Empty:
                break
            if nxt is None:
                stop = True
                break
            batch.append(nxt)
        yield batch
        if stop:
            return


def fsync_dir(path: Path) -> None:
    """fsync a directory so that entries renamed into it survive power loss."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Store:
    """Opens (creating and migrating) the database and hands out the writer and readers.

    Readers come from a small pool (:meth:`read`), not one per thread: pynetdicom runs every
    association on a new thread, and a connection per thread would leak a file descriptor
    for each association the agent ever served.
    """

    def __init__(self, path: Path, *, fsync_dirs: bool = True, max_idle_readers: int = 8) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        conn = connect(path)
        try:
            self.applied_migrations = apply_migrations(conn)
        finally:
            conn.close()
        self.writer = Writer(path, fsync_dirs=fsync_dirs)
        self._idle: queue.LifoQueue[sqlite3.Connection] = queue.LifoQueue(max_idle_readers)
        self._closed = False

    @contextlib.contextmanager
    def read(self) -> Iterator[sqlite3.Connection]:
        """Borrow a read-only connection for the duration of the ``with`` block."""
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = connect(self.path, readonly=True)
        try:
            yield conn
        finally:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            if self._closed:
                conn.close()
            else:
                try:
                    self._idle.put_nowait(conn)
                except queue.Full:
                    conn.close()

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A consistent read: every query inside sees the same committed state."""
        with self.read() as conn:
            conn.execute("BEGIN")
            yield conn

    def query(self, sql: str, params: Iterable[Any] | dict[str, Any] = ()) -> list[sqlite3.Row]:
        """Run one read query and return all rows."""
        with self.read() as conn:
            return list(conn.execute(sql, params if isinstance(params, dict) else tuple(params)))

    def rows(self, table: str, *, order_by: str, limit: int) -> list[dict[str, Any]]:
        """Rows of ``table`` as dicts, via sqlite-utils (used by the CLI listings)."""
        with self.read() as conn:
            return list(
                sqlite_utils.Database(conn)[table].rows_where(order_by=order_by, limit=limit)
            )

    def close(self) -> None:
        """Drain and stop the writer, close idle readers (borrowed ones close on return)."""
        self._closed = True
        self.writer.close()
        while True:
            try:
                conn = self._idle.get_nowait()
            except queue.Empty:
                break
            with contextlib.suppress(sqlite3.Error):
                conn.close()
