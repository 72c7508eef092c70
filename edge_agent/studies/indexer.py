"""The indexer: journaled instances into the content-addressed spool and SQLite, in batches.

See :mod:`edge_agent.store.journal` for why acknowledging from the journal is safe. One
batch is: write each record's file (no flush), flush the tier's filesystem once, then one
store transaction holding every record's rows and the new checkpoint. Rows are
deduplicated by (SOP Instance UID, hash, transfer syntax), so replaying a record is
harmless. A record the store refuses (it cannot happen for data the ack path checked, but an
acknowledged instance is never dropped) is kept as a quarantine entry with its file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from edge_agent.clock import Clock
from edge_agent.errors import InvalidInstance
from edge_agent.metrics import Metrics
from edge_agent.store import Spool, Store
from edge_agent.store.journal import IngestJournal, Position, Record, syncfs
from edge_agent.studies.parse import InstanceInfo
from edge_agent.studies.store import (
    RecordOutcome,
    StoredObject,
    known_associations,
    load_checkpoint,
    path_in_use,
    record_instance,
    save_checkpoint,
)

log = logging.getLogger(__name__)

RETRY_S = 1.0


@dataclass
class Item:
    """A journaled record on its way to the store."""

    record: Record
    info: InstanceInfo
    key: str  # the spool object name
    calling_ae: str
    association_id: str | None
    received_at: float
    seq: int = 0
    replayed: bool = False
    appended: bool = False  # in the journal's back-pressure count (done() when finished)
    relpath: str = ""
    size: int = field(default=0)
    unwritten: bool = False  # in ``unwritten_bytes``: acknowledged, its file not yet written


def record_meta(
    info: InstanceInfo,
    *,
    sha256: str,
    key: str,
    calling_ae: str,
    association_id: str | None,
    peer_host: str,
    received_at: float,
) -> bytes:
    """The journal record's metadata (what replay needs besides the bytes)."""
    return json.dumps(
        {
            "sha256": sha256,
            "key": key,
            "ts": info.transfer_syntax,
            "sop_class": info.sop_class_uid,
            "sop_instance": info.sop_instance_uid,
            "calling_ae": calling_ae,
            "association_id": association_id,
            "peer_host": peer_host,
            "received_at": received_at,
        },
        separators=(",", ":"),
    ).encode()


class Indexer:
    """The background thread that drains the journal into the store."""

    def __init__(
        self,
        *,
        journal: IngestJournal,
        store: Store,
        spool: Spool,
        clock: Clock,
        metrics: Metrics,
        fsync: bool,
        tier: str = "hot",
        max_batch: int = 512,
        linger_s: float = 0.05,
        quarantine: Callable[[Item, str], None] | None = None,
    ) -> None:
        self.journal = journal
        self._store = store
        self._spool = spool
        self._clock = clock
        self._metrics = metrics
        self._fsync = fsync
        self._tier = tier
        self._max_batch = max_batch
        self._linger_s = linger_s
        self._kick = threading.Event()
        self._quarantine = quarantine
        self._queue: queue.SimpleQueue[Item | None] = queue.SimpleQueue()
        self._cond = threading.Condition()
        self._seq = 0  # last sequence number handed out
        self._done = 0  # every item up to this one is in the store
        self._done_set: set[int] = set()
        self._pending: dict[str, list[tuple[str, str]]] = {}  # SOP UID -> [(sha, ts)]
        self._thread: threading.Thread | None = None
        self._closing = False
        self.error = ""  # why the last batch failed ("" while batches succeed)
        self.unwritten_bytes = 0  # acknowledged, not yet in a spool file (free-space check)

    # -- the ack path ---------------------------------------------------------------------

    def pending_versions(self, sop_instance_uid: str) -> list[tuple[str, str]]:
        """(sha256, transfer syntax) of journaled, not yet indexed, copies of a SOP UID."""
        with self._cond:
            return list(self._pending.get(sop_instance_uid, ()))

    def reserve(self, item: Item) -> int:
        """Number ``item`` and count it as pending (before its journal append)."""
        with self._cond:
            self._seq += 1
            item.seq = self._seq
            item.size = len(item.record.header) + len(item.record.dataset)
            self._pending.setdefault(item.info.sop_instance_uid, []).append(
                (item.record.sha256, item.info.transfer_syntax)
            )
            self.unwritten_bytes += item.size
            item.unwritten = True
            return item.seq

    def submit(self, item: Item) -> None:
        """``item`` is durable in the journal: index it."""
        self._queue.put(item)

    def forget(self, item: Item) -> None:
        """``item``'s journal append failed: it was never acknowledged."""
        self._finish([item])

    def wait(self, seq: int, timeout: float) -> bool:
        """Wait until every item up to ``seq`` is in the store. False on timeout."""
        deadline = time.monotonic() + timeout
        self._kick.set()  # someone is waiting: no lingering
        with self._cond:
            while self._done < seq:
                left = deadline - time.monotonic()
                if left <= 0 or self.error:
                    return False
                self._cond.wait(min(left, RETRY_S))
        return True

    @property
    def last_seq(self) -> int:
        with self._cond:
            return self._seq

    # -- the thread -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ingest-indexer", daemon=True)
        self._thread.start()

    def close(self, timeout: float = 60.0) -> None:
        """Index what is queued, then stop (a batch that keeps failing is left in the
        journal, for the next start to replay)."""
        self._closing = True
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    def _batches(self) -> Iterator[list[Item]]:
        """Like :func:`~edge_agent.store.db.batches`, but a batch lingers up to ``linger_s``
        for more records (one filesystem flush and one commit for many instances instead of
        one each), unless someone waits for the index (:meth:`wait`) or it is full."""
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            deadline = time.monotonic() + self._linger_s
            while len(batch) < self._max_batch and not self._kick.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                try:
                    nxt = self._queue.get(timeout=min(left, 0.005))
                except queue.Empty:
                    continue
                if nxt is None:
                    yield batch
                    return
                batch.append(nxt)
            self._kick.clear()
            yield batch

    def _run(self) -> None:
        for batch in self._batches():
            while True:
                try:
                    self.index(batch)
                    self.error = ""
                    break
                except Exception as exc:  # acknowledged data: keep it and try again
                    self.error = f"{type(exc).__name__}: {exc}"
                    with self._cond:
                        self._cond.notify_all()
                    if self._closing:
                        log.error(
                            "journaled instances left for replay at the next start",
                            extra={"records": len(batch), "error": self.error},
                        )
                        return
                    log.exception("indexing journaled instances failed; retrying")
                    time.sleep(RETRY_S)

    # -- a batch --------------------------------------------------------------------------

    def index(self, batch: list[Item]) -> None:
        """Write the files, flush them, commit the rows and the checkpoint."""
        for item in batch:
            r = item.record
            written = self._spool.put(
                item.key, (r.header, r.dataset), sync=False, verify=item.replayed
            )
            item.relpath = written.relpath
            self._written(item)
        if self._fsync:
            syncfs(self._spool.root)
        last = max(
            (i.record.position for i in batch if i.record.position is not None),
            key=lambda p: (p.segment, p.offset),
            default=None,
        )
        now = self._clock.now()
        results = self._store.writer.call(lambda conn: self._rows(conn, batch, last, now))
        for item, outcome in zip(batch, results, strict=True):
            self._report(item, outcome)
        self._finish(batch)
        if last is not None:
            self.journal.recycle(below=last.segment)

    def _rows(
        self,
        conn: sqlite3.Connection,
        batch: list[Item],
        last: Position | None,
        now: float,
    ) -> list[tuple[RecordOutcome | None, bool, int, str]]:
        out: list[tuple[RecordOutcome | None, bool, int, str]] = []
        known = self._known_associations(conn, {i.association_id for i in batch})
        for i, item in enumerate(batch):
            obj = StoredObject(
                sha256=item.record.sha256, size_bytes=item.size, tier=self._tier,
                path=item.relpath,
            )  # fmt: skip
            conn.execute(f"SAVEPOINT i{i}")
            try:
                rec = record_instance(
                    conn,
                    item.info,
                    obj,
                    now=item.received_at,
                    association_id=item.association_id if item.association_id in known else None,
                    calling_ae=item.calling_ae,
                )
            except Exception as exc:  # see the module docstring
                conn.execute(f"ROLLBACK TO i{i}")
                conn.execute(f"RELEASE i{i}")
                out.append((None, False, 0, f"{type(exc).__name__}: {exc}"))
                continue
            conn.execute(f"RELEASE i{i}")
            out.append((rec.outcome, rec.late, rec.version, ""))
        if last is not None:
            save_checkpoint(conn, segment=last.segment, offset=last.end, now=now)
        return out

    @staticmethod
    def _known_associations(conn: sqlite3.Connection, ids: set[str | None]) -> set[str]:
        """Of ``ids``, those with an audit row (a replayed record may name one that is
        gone with a crash: its instance is kept without the link)."""
        return known_associations(conn, [i for i in ids if i is not None])

    def _report(self, item: Item, result: tuple[RecordOutcome | None, bool, int, str]) -> None:
        outcome, late, version, error = result
        info = item.info
        if outcome is None:
            log.error(
                "acknowledged instance could not be indexed: kept in quarantine",
                extra={"sop_instance_uid": info.sop_instance_uid, "error": error},
            )
            if self._quarantine is not None:
                self._quarantine(item, f"acknowledged but could not be indexed: {error}")
            return
        if outcome is RecordOutcome.DUPLICATE:
            if not item.replayed:
                self._metrics.instances.labels("duplicate").inc()
            # a duplicate that raced with its twin: its file goes if no row names it
            drop_unreferenced(self._store, self._spool, self._tier, item.relpath)
            return
        if late:
            self._metrics.studies_reopened.inc()
            log.info(
                "late arrival re-opened study",
                extra={"study_uid": info.study_uid, "sop_instance_uid": info.sop_instance_uid},
            )
        if outcome is RecordOutcome.NEW_VERSION:
            log.warning(
                "same SOP Instance UID with different bytes: kept as a new version",
                extra={
                    "sop_instance_uid": info.sop_instance_uid,
                    "version": version,
                    "calling_ae": item.calling_ae,
                    "sha256": item.record.sha256,
                },
            )
        if not item.replayed:
            self._metrics.instances.labels(outcome.value).inc()

    def _written(self, item: Item) -> None:
        """``item``'s file is on the tier: its bytes now count in the filesystem's usage,
        so they leave ``unwritten_bytes`` at once (not when the batch commits, which would
        count a whole batch twice and refuse instances that fit)."""
        with self._cond:
            if item.unwritten:
                item.unwritten = False
                self.unwritten_bytes -= item.size

    def _finish(self, batch: Iterable[Item]) -> None:
        size = 0
        with self._cond:
            for item in batch:
                if item.appended:
                    size += item.size
                if item.unwritten:  # reserved on the ack path, its file never written
                    item.unwritten = False
                    self.unwritten_bytes -= item.size
                versions = self._pending.get(item.info.sop_instance_uid)
                if versions is not None:
                    with contextlib.suppress(ValueError):
                        versions.remove((item.record.sha256, item.info.transfer_syntax))
                    if not versions:
                        del self._pending[item.info.sop_instance_uid]
                if item.seq:
                    self._done_set.add(item.seq)
            while self._done + 1 in self._done_set:
                self._done += 1
                self._done_set.discard(self._done)
            self._cond.notify_all()
        self.journal.done(size)


def drop_unreferenced(store: Store, spool: Spool, tier: str, relpath: str) -> None:
    """Remove a spool file no instance row names (one written for an instance that was then
    not recorded). Never raises: crash recovery quarantines what is left."""
    try:
        with store.read() as conn:
            used = path_in_use(conn, tier, relpath)
        if not used:
            spool.locate(relpath).unlink(missing_ok=True)
    except Exception:
        log.exception("could not remove an unrecorded spool file", extra={"path": relpath})


def checkpoint(store: Store) -> tuple[int, int]:
    """The journal position every record before which is in the store."""
    with store.read() as conn:
        return load_checkpoint(conn)


def replay(
    indexer: Indexer,
    store: Store,
    inspect: Callable[[Record, dict[str, object]], InstanceInfo],
    *,
    batch: int = 256,
) -> int:
    """Index every journaled record after the checkpoint (at startup, before the listener
    runs). Returns how many records were replayed. ``inspect`` re-derives what we index
    from a record (raises :class:`InvalidInstance` if today's checks refuse it: it is then
    quarantined, never dropped: it was acknowledged)."""
    seg, off = checkpoint(store)
    items: list[Item] = []
    n = 0
    for record in indexer.journal.replay(seg, off):
        meta = json.loads(record.meta)
        try:
            info = inspect(record, meta)
        except InvalidInstance as exc:
            info = _placeholder(meta)
            item = _item(record, info, meta)
            if indexer._quarantine is not None:
                indexer._quarantine(item, f"journaled but refused by today's checks: {exc}")
            continue
        items.append(_item(record, info, meta))
        n += 1
        if len(items) >= batch:
            indexer.index(items)
            items = []
    if items:
        indexer.index(items)
    if n:
        log.warning("ingest journal replayed after an unclean stop", extra={"records": n})
    return n


def _item(record: Record, info: InstanceInfo, meta: dict[str, object]) -> Item:
    return Item(
        record=record,
        info=info,
        key=str(meta.get("key") or record.sha256),
        calling_ae=str(meta.get("calling_ae") or ""),
        association_id=(str(meta["association_id"]) if meta.get("association_id") else None),
        received_at=float(meta.get("received_at") or 0.0),  # type: ignore[arg-type]
        replayed=True,
        size=len(record.header) + len(record.dataset),
    )


def _placeholder(meta: dict[str, object]) -> InstanceInfo:
    return InstanceInfo(
        sop_class_uid=str(meta.get("sop_class", "")),
        sop_instance_uid=str(meta.get("sop_instance", "")),
        study_uid="",
        series_uid="",
        transfer_syntax=str(meta.get("ts", "")),
    )
