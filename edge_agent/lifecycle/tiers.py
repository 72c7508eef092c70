"""Where an instance lives, reading it from any tier, and moving it between tiers safely.

Tiers are folders (separate mounts in production): ``hot`` (the spool the listener writes),
``warm`` (same layout), ``cold`` (compressed + encrypted, :mod:`.coldcrypt`), and
``archived`` (no local file: the hub archive holds the cold bytes; ``path`` is their SHA-256).
The store's ``instances.tier/path`` is the one place that says where an instance is.

A move (:meth:`Tiers.move`) is, for a batch:

1. a journal row per instance (``tier_moves``: from, to), committed first;
2. the source read and checked (its dataset SHA-256 must be the one recorded at reception:
   a corrupt file is reported and left where it is, never propagated);
3. the destination written (temp name -> rename), every file and folder fsynced, then read
   back and checked again;
4. one transaction points the rows at their new place (only rows still where we found them);
5. the sources deleted, then the journal rows.

A crash anywhere leaves a journal row; :meth:`Tiers.recover` finishes or undoes it: if the
row already points at the destination the source is deleted, otherwise the destination is.
So the store always names exactly one complete, verified copy, and no stray copy survives.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from edge_agent.config import Config
from edge_agent.errors import EdgeError, OutOfResources, UntrustedError
from edge_agent.lifecycle.coldcrypt import ColdDataError, KeyRing, decrypt, encrypt
from edge_agent.store import Store

log = logging.getLogger(__name__)

LOCAL_TIERS = ("hot", "warm", "cold")
ARCHIVED = "archived"


class CorruptInstance(UntrustedError):
    """A stored file's content is not what was received (bit rot, tampering)."""


def dataset_sha256(part10: bytes) -> str:
    """SHA-256 of the dataset bytes of one of our Part-10 files (after the File Meta group,
    whose length is its first element): the hash recorded when the instance arrived."""
    if len(part10) < 144 or part10[128:132] != b"DICM" or part10[132:136] != b"\x02\x00\x00\x00":
        raise CorruptInstance("not a DICOM Part 10 file written by this agent")
    meta_len = int.from_bytes(part10[140:144], "little")
    return hashlib.sha256(memoryview(part10)[144 + meta_len :]).hexdigest()


@dataclass(frozen=True)
class Placement:
    id: int
    sha256: str
    tier: str
    path: str
    archive_sha256: str | None = None


@dataclass
class MoveReport:
    moved: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Tiers:
    def __init__(self, cfg: Config, store: Store) -> None:
        s = cfg.storage
        self._roots = {t: s.path(f"{t}_dir") for t in LOCAL_TIERS}
        self._fsync = s.fsync
        self._key_file = Path(cfg.lifecycle.cold_key_file)
        if not self._key_file.is_absolute():
            self._key_file = Path(s.data_dir) / self._key_file
        self._ring: KeyRing | None = None
        self._dirs: set[Path] = set()  # object folders known to exist
        self._store = store
        #: called with (instance id, tier, path, problem) for every corrupt file met
        self.on_corrupt: Callable[[int, str, str, str], None] | None = None

    # -- places -------------------------------------------------------------------------

    def root(self, tier: str) -> Path:
        return self._roots[tier]

    def ring(self) -> KeyRing:
        if self._ring is None:
            self._ring = KeyRing.load(self._key_file, create=True)
        return self._ring

    def reload_keys(self) -> None:
        self._ring = None

    @staticmethod
    def relpath(tier: str, sha256: str) -> str:
        return f"objects/{sha256[:2]}/{sha256}" + (".cold" if tier == "cold" else ".dcm")

    def locate(self, tier: str, relpath: str) -> Path:
        return self._roots[tier] / relpath

    # -- reading ------------------------------------------------------------------------

    def read(self, tier: str, relpath: str) -> bytes:
        """The Part-10 bytes of an instance stored at (tier, relpath)."""
        if tier == ARCHIVED:
            raise ArchivedError("the instance is in the hub archive; restore its study first")
        raw = self.locate(tier, relpath).read_bytes()
        if tier == "cold":
            return decrypt(raw, self.ring(), what=f"cold file {relpath}")
        return raw

    def read_verified(self, p: Placement) -> bytes:
        data = self.read(p.tier, p.path)
        got = dataset_sha256(data)
        if got != p.sha256:
            raise CorruptInstance(
                f"{p.tier}/{p.path}: content hash {got[:16]}... is not the received "
                f"{p.sha256[:16]}..."
            )
        return data

    # -- moving -------------------------------------------------------------------------

    def move(
        self,
        rows: Sequence[Placement],
        dst: str,
        *,
        now: float,
        fetch_archived: Callable[[Placement], bytes] | None = None,
    ) -> MoveReport:
        """Move ``rows`` to tier ``dst`` (a local tier, or ``archived`` = drop the local
        copy of an instance the hub archive confirmed). See the module docstring."""
        report = MoveReport()
        rows = [r for r in rows if r.tier != dst]
        if dst == ARCHIVED and any(r.archive_sha256 is None for r in rows):
            raise ValueError("only instances the hub archive confirmed can drop their copy")
        if not rows:
            return report
        plan = [
            (r, r.archive_sha256 if dst == ARCHIVED else self.relpath(dst, _object_key(r)))
            for r in rows
        ]
        self._store.writer.call(
            lambda c: c.executemany(
                "INSERT OR REPLACE INTO tier_moves (instance_id, src_tier, src_path, dst_tier,"
                " dst_path, started_at) VALUES (?, ?, ?, ?, ?, ?)",
                [(r.id, r.tier, r.path, dst, d, now) for r, d in plan],
            )
        )
        done: list[tuple[Placement, str, Path | None]] = []
        try:
            for r, d in plan:
                try:
                    path = None
                    if dst != ARCHIVED and r.tier in ("hot", "warm") and dst in ("hot", "warm"):
                        path = self._copy(r, dst, str(d))  # same bytes: copied in the kernel
                        n = path.stat().st_size
                        report.bytes_read += n
                        report.bytes_written += n
                    elif dst != ARCHIVED:
                        data = self._source(r, fetch_archived)
                        report.bytes_read += len(data)
                        out = encrypt(data, self.ring()) if dst == "cold" else data
                        path = self._write(dst, str(d), out)
                        report.bytes_written += len(out)
                    done.append((r, str(d), path))
                except (CorruptInstance, ColdDataError) as exc:
                    report.failed.append((r.id, str(exc)))
                    if self.on_corrupt is not None:
                        self.on_corrupt(r.id, r.tier, r.path, str(exc))
                except FileNotFoundError as exc:
                    report.failed.append((r.id, f"source missing: {exc.filename}"))
            paths = [p for _, _, p in done if p is not None]
            if self._fsync and paths:
                for path in paths:
                    _fsync_path(path)
                for folder in {p.parent for p in paths}:
                    _fsync_path(folder)
            for r, d, path in list(done):  # read back what we wrote, check the hash
                if path is None:
                    continue
                try:
                    self.read_verified(Placement(r.id, r.sha256, dst, d))
                except (CorruptInstance, ColdDataError) as exc:
                    try:
                        if r.tier != ARCHIVED:
                            self.read_verified(r)
                    except (CorruptInstance, ColdDataError) as src_exc:  # bad at the source
                        done.remove((r, d, path))
                        path.unlink(missing_ok=True)
                        report.failed.append((r.id, str(src_exc)))
                        if self.on_corrupt is not None:
                            self.on_corrupt(r.id, r.tier, r.path, str(src_exc))
                        continue
                    raise EdgeError(f"{dst}/{d} does not read back as written: {exc}") from exc
        except BaseException as exc:
            self._abandon([(r, str(d)) for r, d in plan], dst)
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfResources(f"no space left on the {dst} tier") from exc
            raise
        moved: list[tuple[Placement, str]] = self._store.writer.call(
            partial(_commit_moves, moves=[(r, d) for r, d, _ in done], dst=dst)
        )
        for r, _ in moved:
            if r.tier in LOCAL_TIERS:
                with contextlib.suppress(FileNotFoundError):
                    self.locate(r.tier, r.path).unlink()
        moved_ids = {r.id for r, _ in moved}
        self._abandon([(r, str(d)) for r, d in plan if r.id not in moved_ids], dst)
        self._store.writer.call(
            lambda c: c.executemany(
                "DELETE FROM tier_moves WHERE instance_id = ?", [(r.id,) for r, _ in plan]
            )
        )
        report.moved = len(moved)
        return report

    def _abandon(self, items: Sequence[tuple[Placement, str]], dst: str) -> None:
        """Copies at ``dst`` that the store does not point at are deleted; journal rows go."""
        if not items:
            return
        if dst in LOCAL_TIERS:
            for r, d in items:
                now = self._store.query("SELECT tier, path FROM instances WHERE id = ?", (r.id,))
                if now and (now[0][0], now[0][1]) == (dst, d):
                    continue  # the store points there: it is the live copy
                with contextlib.suppress(FileNotFoundError):
                    self.locate(dst, d).unlink()
        self._store.writer.call(
            lambda c: c.executemany(
                "DELETE FROM tier_moves WHERE instance_id = ?", [(r.id,) for r, _ in items]
            )
        )

    def _source(self, r: Placement, fetch: Callable[[Placement], bytes] | None) -> bytes:
        if r.tier == ARCHIVED:
            if fetch is None:
                raise ArchivedError("restoring an archived instance needs the hub")
            blob = fetch(r)
            if hashlib.sha256(blob).hexdigest() != r.path:
                raise CorruptInstance(f"archive blob {r.path[:16]}... does not match its hash")
            data = decrypt(blob, self.ring(), what=f"archive blob {r.path[:16]}...")
            if dataset_sha256(data) != r.sha256:
                raise CorruptInstance(f"archive blob {r.path[:16]}... holds other content")
            return data
        # not hashed here: the copy is checked against the received hash after it is
        # written, and a mismatch is then traced to the source or the destination
        return self.read(r.tier, r.path)

    def _copy(self, r: Placement, tier: str, relpath: str) -> Path:
        """A plain copy between uncompressed tiers with ``copy_file_range`` (no trip through
        user space; the filesystem may even share extents)."""
        dest = self.locate(tier, relpath)
        if dest.parent not in self._dirs:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(dest.parent)
        with self.locate(r.tier, r.path).open("rb") as fin, dest.open("wb") as fout:
            left = os.fstat(fin.fileno()).st_size
            while left > 0:
                try:
                    n = os.copy_file_range(fin.fileno(), fout.fileno(), left)
                except OSError as exc:  # e.g. EXDEV on older kernels: copy in user space
                    if exc.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP):
                        raise
                    fin.seek(0)
                    fout.seek(0)
                    fout.truncate()
                    shutil.copyfileobj(fin, fout, 1 << 20)
                    break
                if n == 0:
                    break
                left -= n
        return dest

    def _write(self, tier: str, relpath: str, data: bytes) -> Path:
        """Write at the final name: until the row points here, the journal makes any
        partial file here garbage that recovery deletes, so no temp name is needed."""
        dest = self.locate(tier, relpath)
        if dest.parent not in self._dirs:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._dirs.add(dest.parent)
        with dest.open("wb") as f:
            f.write(data)
        return dest

    # -- crash recovery -----------------------------------------------------------------

    def recover(self) -> tuple[int, int]:
        """Finish or undo every move a crash interrupted. Returns (finished, undone)."""
        finished = undone = 0
        for row in self._store.query(
            "SELECT m.*, i.tier AS now_tier, i.path AS now_path FROM tier_moves m "
            "LEFT JOIN instances i ON i.id = m.instance_id"
        ):
            if row["now_tier"] == row["dst_tier"] and row["now_path"] == row["dst_path"]:
                if row["src_tier"] in LOCAL_TIERS:
                    with contextlib.suppress(FileNotFoundError):
                        self.locate(row["src_tier"], row["src_path"]).unlink()
                finished += 1
            else:
                if row["dst_tier"] in LOCAL_TIERS:
                    with contextlib.suppress(FileNotFoundError):
                        self.locate(row["dst_tier"], row["dst_path"]).unlink()
                undone += 1
            self._store.writer.call(partial(_forget_move, instance_id=int(row["instance_id"])))
        for tier in LOCAL_TIERS:
            tmp = self._roots[tier] / "tmp"
            if tier != "hot" and tmp.is_dir():  # hot/tmp belongs to the spool's own recovery
                for p in tmp.glob("*.partial"):
                    with contextlib.suppress(FileNotFoundError):
                        p.unlink()
        if finished or undone:
            log.warning(
                "tier moves interrupted by a crash were completed or undone",
                extra={"finished": finished, "undone": undone},
            )
        return finished, undone


class ArchivedError(EdgeError):
    """The instance has no local copy (it is in the hub archive)."""


def _forget_move(conn: sqlite3.Connection, *, instance_id: int) -> None:
    conn.execute("DELETE FROM tier_moves WHERE instance_id = ?", (instance_id,))


def _commit_moves(
    conn: sqlite3.Connection, *, moves: list[tuple[Placement, str]], dst: str
) -> list[tuple[Placement, str]]:
    """Point each row at its new place, only if it is still where the move found it."""
    out = []
    for r, d in moves:
        cur = conn.execute(
            "UPDATE instances SET tier = ?, path = ? WHERE id = ? AND tier = ? AND path = ?",
            (dst, d, r.id, r.tier, r.path),
        )
        if cur.rowcount == 1:
            out.append((r, d))
    return out


def _object_key(r: Placement) -> str:
    """The object name an instance keeps across tiers: its file's stem (the dataset hash, or
    the hash and a transfer-syntax tag when the same bytes are held under two syntaxes)."""
    if r.tier == ARCHIVED or not r.path.startswith("objects/"):
        return r.sha256
    return r.path.rsplit("/", 1)[-1].split(".", 1)[0]
