"""PHI at rest is readable by the agent's own user only.

The store (names, IDs, accessions, the audit log, password hashes), its WAL, the received
instances, results, quarantine, journal and backups all hold patient data. The agent runs
with a ``0077`` umask (files 0600, folders 0700, whatever the service manager's umask), and
on start it takes group and other permissions off what an older install, a restore or a
hand copy left readable: the whole of each data folder once (a marker file records it), its
top level (the database and its WAL) at every start. Symbolic links are not followed.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077
#: Written in a data folder once every file under it was made private.
MARKER = ".private-0077"
_OPEN = stat.S_IRWXG | stat.S_IRWXO


@contextmanager
def private_umask() -> Iterator[None]:
    """Create files 0600 and folders 0700 in the block (the previous umask after it)."""
    old = os.umask(PRIVATE_UMASK)
    try:
        yield
    finally:
        os.umask(old)


def _private(path: Path) -> bool:
    """Take group/other bits off ``path`` (not following a link); True if it changed."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(st.st_mode) or not st.st_mode & _OPEN:
        return False
    path.chmod(stat.S_IMODE(st.st_mode) & ~_OPEN)
    return True


def harden(roots: Iterable[Path]) -> int:
    """Make every folder and file under each existing root private; returns how many were
    changed. A root with :data:`MARKER` only has itself and its top level checked."""
    changed = 0
    for root in dict.fromkeys(Path(r) for r in roots):
        if not root.is_dir():
            continue
        changed += _private(root)
        if (root / MARKER).exists():
            for child in root.iterdir():
                changed += _private(child)
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            base = Path(dirpath)
            for name in (*dirnames, *filenames):
                changed += _private(base / name)
        fd = os.open(root / MARKER, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.close(fd)
    if changed:
        log.warning(
            "files and folders readable by other users were made private (0600/0700)",
            extra={"changed": changed},
        )
    return changed
