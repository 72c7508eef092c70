"""Content-addressed file storage for received instances (the hot tier spool).

An object is stored at ``objects/<sha[:2]>/<sha>.dcm`` under its tier folder, where ``sha``
is the SHA-256 of the dataset bytes as received. Writing is: temp file in ``tmp/`` -> write
-> fsync -> ``os.replace`` into place. The caller fsyncs the destination folder (in the
store writer's batch) before committing the row, so a committed row always points at a
durable, complete file, and a partial file is never visible under ``objects/``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

from edge_agent.errors import OutOfResources

log = logging.getLogger(__name__)

_HEX = "0123456789abcdef"


@dataclass(frozen=True)
class SpoolWrite:
    """Where an object went: ``relpath`` relative to the tier root; ``created`` False when an
    identical object was already present (nothing written)."""

    relpath: str
    abspath: Path
    created: bool


class Spool:
    """A tier folder holding content-addressed objects."""

    def __init__(self, root: Path, *, fsync: bool = True) -> None:
        self.root = root
        self.objects = root / "objects"
        self.tmp = root / "tmp"
        self.fsync = fsync

    def prepare(self) -> None:
        """Create the folder layout (idempotent)."""
        self.tmp.mkdir(parents=True, exist_ok=True)
        for a in _HEX:
            for b in _HEX:
                (self.objects / (a + b)).mkdir(parents=True, exist_ok=True)

    def relpath(self, sha256: str) -> str:
        return f"objects/{sha256[:2]}/{sha256}.dcm"

    def locate(self, relpath: str) -> Path:
        return self.root / relpath

    def free_bytes(self) -> int:
        """Bytes available to this process on the tier's filesystem."""
        return shutil.disk_usage(self.root).free

    def put(
        self,
        sha256: str,
        chunks: tuple[bytes | memoryview, ...],
        *,
        sync: bool | None = None,
        verify: bool = False,
    ) -> SpoolWrite:
        """Store the concatenation of ``chunks`` under ``sha256`` durably (file fsynced and
        renamed; the caller fsyncs the parent folder before acknowledging).

        ``sync=False``: no fsync (the caller flushes the filesystem before it relies on the
        file). ``verify``: an object already there is only trusted if it holds exactly
        these bytes (after a crash it may be a file written but never flushed); otherwise
        it is rewritten.

        Raises :class:`OutOfResources` on ENOSPC/EDQUOT (the temp file is removed); other
        ``OSError`` propagate.
        """
        rel = self.relpath(sha256)
        dest = self.root / rel
        if dest.exists() and (not verify or _holds(dest, chunks)):
            return SpoolWrite(rel, dest, created=False)
        fsync = self.fsync if sync is None else sync
        tmp = self.tmp / f"{uuid.uuid4().hex}.partial"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                for chunk in chunks:
                    write_all(fd, chunk)
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            tmp.replace(dest)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfResources(f"no space left on {self.root}") from exc
            raise
        return SpoolWrite(rel, dest, created=True)

    def adopt(self, sha256: str, spill: Path) -> SpoolWrite:
        """Move ``spill`` (a complete file already written in this tier's ``tmp/``) into
        place under ``sha256``: fsync, then rename (no copy). If an identical object is
        already there, ``spill`` is left for the caller to delete.

        Raises :class:`OutOfResources` on ENOSPC/EDQUOT; other ``OSError`` propagate.
        """
        rel = self.relpath(sha256)
        dest = self.root / rel
        if dest.exists():
            return SpoolWrite(rel, dest, created=False)
        try:
            if self.fsync:
                fd = os.open(spill, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            spill.replace(dest)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OutOfResources(f"no space left on {self.root}") from exc
            raise
        return SpoolWrite(rel, dest, created=True)

    def remove_partials(self) -> int:
        """Delete temp files left by a crash (never acknowledged). Returns how many."""
        n = 0
        if self.tmp.is_dir():
            for p in self.tmp.iterdir():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    n += 1
        return n

    def iter_objects(self) -> list[Path]:
        """Every object file currently present."""
        if not self.objects.is_dir():
            return []
        return sorted(self.objects.glob("??/*.dcm"))


def write_all(fd: int, data: bytes | memoryview) -> None:
    """Write all of ``data`` to ``fd`` (``os.write`` may write less than asked)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _holds(path: Path, chunks: tuple[bytes | memoryview, ...]) -> bool:
    """True if ``path`` holds exactly the concatenation of ``chunks``."""
    try:
        if path.stat().st_size != sum(len(c) for c in chunks):
            return False
        with path.open("rb") as fh:
            return all(fh.read(len(c)) == bytes(c) for c in chunks)
    except OSError:
        return False
