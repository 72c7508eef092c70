"""The SQLite system of record and the file spool beside it."""

from edge_agent.store.db import Store, Writer, connect, fsync_dir
from edge_agent.store.spool import Spool, SpoolWrite

__all__ = ["Spool", "SpoolWrite", "Store", "Writer", "connect", "fsync_dir"]
