"""One agent per data folder: an exclusive ``flock`` on ``DATA_DIR/edge-agent.lock``.

``edge-agent run`` takes it before any crash recovery or port binding and holds it for the
life of the process (the kernel releases it when the process dies, even by SIGKILL, so a
stale lock file never blocks a restart). Commands that must not run beside a live agent
(``restore``) take it too; a second holder is refused with the pid of the first.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

from edge_agent.errors import EdgeError

LOCK_FILE = "edge-agent.lock"


class DataDirBusy(EdgeError):
    """Another process holds the data folder's lock."""


class DataDirLock:
    """Holds the lock until :meth:`release` (or process exit)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd = fd
        self.path = path

    @classmethod
    def acquire(cls, data_dir: Path, *, what: str = "edge-agent") -> DataDirLock:
        """Take the lock or raise :class:`DataDirBusy` naming the holder's pid."""
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o640)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = ""
            with contextlib.suppress(OSError, ValueError):
                holder = os.pread(fd, 64, 0).decode().split()[0]
            os.close(fd)
            pid = f" (pid {holder})" if holder else ""
            raise DataDirBusy(
                f"another edge-agent{pid} is using {data_dir}: {what} refused "
                "(stop it first, or point this one at another data folder)"
            ) from None
        except OSError:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {what}\n".encode(), 0)
        return cls(fd, path)

    def release(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = -1
