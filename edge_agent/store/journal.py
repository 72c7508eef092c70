"""The write-ahead ingest journal: one flush before a C-STORE is acknowledged.

An acknowledged instance must survive ``kill -9`` and power loss. Writing its file, fsyncing
the file and its folder and committing its SQLite row before answering costs three flushes
per instance, one after the other. Instead the ack path appends one record (the instance's
Part-10 bytes and what we index) to a journal segment and waits for one ``fdatasync``
shared by every association waiting at that moment (group commit); only then is the answer
sent. The indexer (:mod:`edge_agent.studies.ingest`) later writes the content-addressed
file and the rows in batches, flushes them once per batch, and moves the checkpoint (kept in
SQLite, in the same transaction as the rows) past the batch.

Why it is safe:

* a record is acknowledged only after the ``fdatasync`` that covers it returned; segments
  are written with zeros before use, so that ``fdatasync`` only writes data blocks (no
  extent or size change to commit);
* a record carries its segment id, its lengths, a CRC-32 of its header and the SHA-256 of
  its dataset: a torn, stale (a recycled segment's old bytes) or zero record is recognised,
  and replay stops at the first one. Nothing after it can have been acknowledged: a batch is
  written in order and acknowledged only as a whole, after the previous batch was durable;
* the checkpoint moves in the same SQLite transaction (``synchronous=FULL``) as the rows of
  the records it passes, after their files were flushed, so a crash anywhere leaves either
  the rows and the checkpoint, or neither (and the records are replayed);
* replay is idempotent: files are content-addressed (an existing one is checked against its
  hash and rewritten if it is not whole) and rows are deduplicated by (SOP Instance UID,
  hash, transfer syntax);
* an ``fdatasync`` error fails every record of that batch (0xA700: never acknowledged) and
  the segment is never written again (a failed fsync may have dropped the dirty pages, so
  retrying on the same descriptor could report success for lost data).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import hashlib
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import OutOfResources

log = logging.getLogger(__name__)

MAGIC = b"EJR1"
# magic, segment id, meta length, header length, dataset length, header CRC-32
_HEAD = struct.Struct("<4sQIIQI")
_ALIGN = 8
_SEGMENT_RE = re.compile(r"^seg-(\d{12})\.log$")
_ZEROS = bytes(1 << 20)
BACKPRESSURE_WAIT_S = 30.0


@dataclass(frozen=True)
class Position:
    """Where a record lies: its segment and byte offset, and the offset just after it."""

    segment: int
    offset: int
    end: int


@dataclass
class Record:
    """One journaled instance. ``meta`` is what the indexer needs beyond the bytes (UTF-8
    JSON); ``header`` the Part-10 file header; ``dataset`` the dataset as received."""

    meta: bytes
    header: bytes
    dataset: bytes | memoryview
    sha256: str
    seq: int = 0
    position: Position | None = None


def _padded(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _syncfs_fn() -> ctypes._NamedFuncPointer | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.syncfs
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_SYNCFS = _syncfs_fn()


def syncfs(path: Path) -> None:
    """Flush every dirty page of the filesystem holding ``path`` (``syncfs(2)``; ``sync``
    where it is missing). Raises ``OSError``."""
    if _SYNCFS is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _SYNCFS(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)


class IngestJournal:
    """Segments under ``root`` and the thread that appends to them with group commit."""

    def __init__(
        self,
        root: Path,
        *,
        segment_bytes: int = 64 * 2**20,
        fsync: bool = True,
        max_pending_bytes: int = 256 * 2**20,
    ) -> None:
        self.root = root
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.max_pending_bytes = max_pending_bytes
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()  # writes, rotation, retirement, spares
        self._flush_lock = threading.Lock()  # one fdatasync at a time (the group's leader)
        self._written = 0  # generation: records written so far
        self._synced = 0  # every record up to this generation is durable
        self._failed: list[tuple[int, int]] = []  # (lo, hi]: generations lost to a failed flush
        self._fd = -1
        self._segment = 0
        self._offset = 0
        self._spare: tuple[int, Path] | None = None
        self._seq = 0
        self._pending_bytes = 0  # appended, not yet checkpointed (back-pressure)
        self._cond = threading.Condition()
        self._closed = False

    # -- segments -------------------------------------------------------------------------

    def segments(self) -> list[tuple[int, Path]]:
        """Existing segments, oldest first."""
        out = []
        for p in self.root.iterdir():
            m = _SEGMENT_RE.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def _path(self, segment: int) -> Path:
        return self.root / f"seg-{segment:012d}.log"

    def _prepare_segment(self, segment: int) -> Path:
        """A zero-filled segment file (its blocks written, so a later fdatasync only writes
        data), reusing a recycled one when there is one."""
        path = self._path(segment)
        spare, self._spare = self._spare, None
        if spare is not None and spare[1].exists():
            spare[1].replace(path)
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                left = self.segment_bytes
                while left > 0:
                    left -= os.write(fd, _ZEROS[: min(left, len(_ZEROS))])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            if self.fsync:
                dfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        return path

    def start(self, *, after: int) -> None:
        """Start appending in a new segment numbered above ``after`` (the newest existing)."""
        with self._lock:
            self._segment = after
            self._open_next()

    def _open_next(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._segment += 1  # a number is never reused, even if preparing it fails
        path = self._prepare_segment(self._segment)
        self._fd = os.open(path, os.O_WRONLY)
        self._offset = 0

    def recycle(self, below: int) -> None:
        """Segments older than ``below`` hold only checkpointed records: keep one as the
        next spare, delete the rest."""
        with self._lock:
            self._recycle(below)

    def _recycle(self, below: int) -> None:
        for seg, path in self.segments():
            if seg >= below or seg >= self._segment:
                continue
            if self._spare is None:
                spare = self.root / f"spare-{seg}.log"
                path.replace(spare)
                self._spare = (seg, spare)
            else:
                path.unlink(missing_ok=True)

    # -- appending ------------------------------------------------------------------------

    def append(self, record: Record) -> Position:
        """Append ``record`` and wait until it is durable. Blocks while more than
        ``max_pending_bytes`` wait for the indexer (back-pressure), for at most
        ``BACKPRESSURE_WAIT_S``. Raises
        :class:`OutOfResources` if it cannot be made durable (never acknowledge then)."""
        size = len(record.header) + len(record.dataset)
        deadline = time.monotonic() + BACKPRESSURE_WAIT_S
        with self._cond:
            while (
                self._pending_bytes > 0
                and self._pending_bytes + size > self.max_pending_bytes
                and not self._closed
            ):
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OutOfResources(
                        f"the indexer is {self._pending_bytes // 2**20} MiB behind "
                        "(storage.journal_max_pending_mb): try again later"
                    )
                self._cond.wait(min(left, 1.0))
            if self._closed:
                raise OutOfResources("the ingest journal is closed (shutting down)")
            self._pending_bytes += size
        try:
            return self._append(record)
        except BaseException:
            self.done(size)  # not appended: the caller calls done() only for appended ones
            raise

    def done(self, size: int) -> None:
        """``size`` bytes of records were checkpointed (or failed): let appenders go on."""
        with self._cond:
            self._pending_bytes = max(0, self._pending_bytes - size)
            self._cond.notify_all()

    def _append(self, record: Record) -> Position:
        """Group commit without a thread of its own: write under the lock, then the first
        appender to reach the flush does one fdatasync for every record written by then
        (the others find their generation already durable)."""
        with self._lock:
            if self._closed:
                raise OutOfResources("the ingest journal is closed (shutting down)")
            try:
                if self._fd < 0:  # the last segment was retired and no new one could be made
                    self._open_next()
                pos = self._write(record)
            except OSError as exc:
                self._retire(exc)
                raise self._refusal(exc) from exc
            self._written += 1
            gen = self._written
        if not self.fsync:
            return pos
        with self._flush_lock:
            if self._lost(gen):
                raise OutOfResources("cannot make the instance durable: the journal flush failed")
            if self._synced >= gen:
                return pos
            with self._lock:
                fd, target = self._fd, self._written
            try:
                os.fdatasync(fd)
            except OSError as exc:
                with self._lock:
                    self._retire(exc)
                raise self._refusal(exc) from exc
            self._synced = max(self._synced, target)
        return pos

    def _lost(self, gen: int) -> bool:
        return any(lo < gen <= hi for lo, hi in self._failed)

    def _retire(self, exc: OSError) -> None:
        """(Under the lock.) A write or flush failed: every record written since the last
        durable one is lost, and the segment is never written or flushed again."""
        self._failed.append((self._synced, self._written))
        log.error(
            "ingest journal write failed: unflushed records refused, segment retired",
            extra={"segment": self._segment, "error": str(exc)},
        )
        with contextlib.suppress(OSError):
            self._open_next()

    @staticmethod
    def _refusal(exc: OSError) -> OutOfResources:
        return OutOfResources(f"cannot make the instance durable: {exc.strerror or exc}")

    def _write(self, r: Record) -> Position:
        meta_len, head_len, data_len = len(r.meta), len(r.header), len(r.dataset)
        total = _padded(_HEAD.size + meta_len + head_len + data_len)
        if total > self.segment_bytes - _HEAD.size:
            raise OSError(0, f"record of {total} bytes does not fit a journal segment")
        if self._offset + total > self.segment_bytes - _HEAD.size:
            if self.fsync:
                os.fdatasync(self._fd)  # the previous segment is complete and durable
            self._synced = max(self._synced, self._written)
            self._open_next()
        crc = zlib.crc32(struct.pack("<QIIQ", self._segment, meta_len, head_len, data_len))
        crc = zlib.crc32(r.meta, crc)
        crc = zlib.crc32(r.header, crc)
        head = _HEAD.pack(MAGIC, self._segment, meta_len, head_len, data_len, crc)
        pad = b"\x00" * (total - _HEAD.size - meta_len - head_len - data_len)
        parts = [head, r.meta, r.header, r.dataset, pad]
        expected = sum(len(p) for p in parts)
        n = os.pwritev(self._fd, parts, self._offset)
        if n != expected:  # a short write: finish it byte by byte
            blob = b"".join(bytes(p) for p in parts)
            while n < expected:
                n += os.pwrite(self._fd, blob[n:], self._offset + n)
        pos = Position(self._segment, self._offset, self._offset + total)
        self._offset += total
        return pos

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        with self._lock:
            self._closed = True
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # -- replay ---------------------------------------------------------------------------

    def replay(self, segment: int, offset: int) -> Iterator[Record]:
        """Every intact record from ``(segment, offset)`` on, in order. In each segment the
        records end at the first one that is torn, stale (a recycled segment's old bytes)
        or zero; the next segment was started only after this one was flushed whole, or
        by a restart after a crash, so reading goes on there."""
        for seg, path in self.segments():
            if seg < segment:
                continue
            data = path.read_bytes()
            pos = offset if seg == segment else 0
            while pos + _HEAD.size <= len(data):
                magic, rseg, meta_len, head_len, data_len, crc = _HEAD.unpack_from(data, pos)
                if magic != MAGIC or rseg != seg:
                    break
                body = pos + _HEAD.size
                end = body + meta_len + head_len + data_len
                if end > len(data):
                    log.warning("journal: torn record", extra={"segment": seg, "offset": pos})
                    break
                meta = data[body : body + meta_len]
                header = data[body + meta_len : body + meta_len + head_len]
                check = zlib.crc32(struct.pack("<QIIQ", rseg, meta_len, head_len, data_len))
                check = zlib.crc32(header, zlib.crc32(meta, check))
                dataset = data[body + meta_len + head_len : end]
                sha = hashlib.sha256(dataset).hexdigest()
                try:
                    claimed = json.loads(meta)["sha256"]
                except (ValueError, KeyError, TypeError):
                    claimed = None
                if check != crc or claimed != sha:
                    log.warning("journal: torn record", extra={"segment": seg, "offset": pos})
                    break
                nxt = pos + _padded(end - pos)
                yield Record(meta, header, dataset, sha, position=Position(seg, pos, nxt))
                pos = nxt
