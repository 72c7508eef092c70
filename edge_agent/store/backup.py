"""Online backup and restore of an agent: the SQLite store and every file it names.

Backup (``edge-agent backup DEST``, safe while the agent runs and ingests):

1. take the lifecycle lock, so no tier move, archive drop or restore changes which file an
   instance lives in until the copy is done (ingest goes on: it only adds files and rows);
2. copy the store with SQLite's online backup API (a consistent snapshot; in WAL mode the
   agent's writer is not blocked);
3. copy every file the *copy* names: instances on each tier, SEG/SR result objects, installed
   model packages; plus the cold-tier key ring, the site secret (pseudonyms) and the sync
   credential (a backup is as sensitive as the data: keep it encrypted and access-controlled);
4. write ``manifest.json`` with the SHA-256 and size of every file, fsync everything.

An instance acknowledged after the snapshot is not in the backup (and its row is not either):
the backup is the agent as of step 2, whole.

Restore (``edge-agent restore BACKUP --config CFG``) refuses a target that already holds a
store or tier data, checks every file against the manifest while copying it into the places
the target config names (tiers may be other mounts than before), then the store.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from edge_agent import __version__
from edge_agent.config import Config
from edge_agent.errors import EdgeError

TIERS = ("hot", "warm", "cold")
MANIFEST = "manifest.json"


class BackupError(EdgeError):
    """The backup or restore cannot be done as asked (with the reason)."""


@dataclass(frozen=True)
class BackupReport:
    files: int
    bytes: int
    instances: int
    seconds: float


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    with dst.open("rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def _lifecycle_lock(data_dir: Path, timeout_s: float) -> Iterator[None]:
    fd = os.open(data_dir / "lifecycle.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise BackupError(
                        "the lifecycle jobs hold their lock (a long tier move?); try again"
                    ) from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)


def _secrets(cfg: Config) -> dict[str, Path]:
    data = Path(cfg.storage.data_dir)
    key_file = Path(cfg.lifecycle.cold_key_file)
    return {
        "cold-keys": key_file if key_file.is_absolute() else data / key_file,
        "site-secret": cfg.sync.secret_path(cfg.storage.data_dir),
        "sync-credential.json": cfg.sync.credential_path(cfg.storage.data_dir),
    }


def backup(cfg: Config, dest: Path, *, lock_timeout_s: float = 300.0) -> BackupReport:
    started = time.monotonic()
    data = Path(cfg.storage.data_dir)
    db = data / cfg.storage.database
    if not db.exists():
        raise BackupError(f"no store at {db}")
    if dest.exists() and any(dest.iterdir()):
        raise BackupError(f"{dest} is not empty: a backup goes to a new folder")
    dest.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict[str, object]] = {}
    with _lifecycle_lock(data, lock_timeout_s):
        src = sqlite3.connect(db, timeout=30)
        dst = sqlite3.connect(dest / "edge.db")
        try:
            # one step: a consistent snapshot under a read transaction (in WAL mode the
            # agent's writer goes on meanwhile; a stepped copy would restart at each write)
            src.backup(dst)
        finally:
            dst.close()
            src.close()
        snap = sqlite3.connect(f"file:{dest / 'edge.db'}?mode=ro", uri=True)
        try:
            instances = snap.execute(
                "SELECT tier, path FROM instances WHERE tier IN ('hot', 'warm', 'cold')"
            ).fetchall()
            objects = [r[0] for r in snap.execute("SELECT path FROM result_objects")]
            models = [r[0] for r in snap.execute("SELECT path FROM model_versions")]
            (n_instances,) = snap.execute("SELECT count(*) FROM instances").fetchone()
        finally:
            snap.close()
        for tier, rel in instances:
            name = f"tiers/{tier}/{rel}"
            _copy(cfg.storage.path(f"{tier}_dir") / rel, dest / name)
            files[name] = {}
        for rel in objects:
            _copy(data / rel, dest / "data" / rel)
            files[f"data/{rel}"] = {}
        models_dir = cfg.models_dir()
        for rel in models:
            for p in sorted((models_dir / rel).rglob("*")):
                if p.is_file():
                    name = f"models/{p.relative_to(models_dir).as_posix()}"
                    _copy(p, dest / name)
                    files[name] = {}
        for name, path in _secrets(cfg).items():
            if path.exists():
                _copy(path, dest / "secrets" / name)
                (dest / "secrets" / name).chmod(0o600)
                files[f"secrets/{name}"] = {}
    total = 0
    for name, meta in files.items():
        p = dest / name
        meta["sha256"], meta["size"] = _sha(p), p.stat().st_size
        total += p.stat().st_size
    files["edge.db"] = {"sha256": _sha(dest / "edge.db"), "size": (dest / "edge.db").stat().st_size}
    manifest = {
        "format": 1,
        "agent_version": __version__,
        "created_at": time.time(),
        "instances": n_instances,
        "files": files,
    }
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    for p in (dest, *{(dest / n).parent for n in files}):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return BackupReport(len(files), total, int(n_instances), time.monotonic() - started)


def restore(source: Path, cfg: Config) -> BackupReport:
    started = time.monotonic()
    try:
        manifest = json.loads((source / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise BackupError(f"{source} is not a backup (no readable {MANIFEST}): {exc}") from exc
    data = Path(cfg.storage.data_dir)
    db = data / cfg.storage.database
    if db.exists():
        raise BackupError(f"{db} exists: restore only into an empty agent")
    for tier in TIERS:
        objs = cfg.storage.path(f"{tier}_dir") / "objects"
        if objs.exists() and any(p.is_file() for p in objs.rglob("*")):
            raise BackupError(
                f"the {tier} tier ({objs}) holds data: restore only into an empty agent"
            )
    placed: list[Path] = []
    total = 0
    secrets = _secrets(cfg)
    for name, meta in sorted(manifest["files"].items()):
        src = source / name
        if not src.is_file() or src.stat().st_size != meta["size"] or _sha(src) != meta["sha256"]:
            raise BackupError(f"{name} is missing or damaged in the backup (hash or size differs)")
        top, _, rest = name.partition("/")
        if name == "edge.db":
            continue  # last: the store appears only once every file it names is in place
        if top == "tiers":
            tier, _, rel = rest.partition("/")
            dst = cfg.storage.path(f"{tier}_dir") / rel
        elif top == "data":
            dst = data / rest
        elif top == "models":
            dst = cfg.models_dir() / rest
        elif top == "secrets" and rest in secrets:
            dst = secrets[rest]
        else:
            raise BackupError(f"unexpected file {name} in the backup")
        _copy(src, dst)
        if top == "secrets":
            dst.chmod(0o600)
        placed.append(dst)
        total += int(meta["size"])
    data.mkdir(parents=True, exist_ok=True)
    tmp = db.with_suffix(".restoring")
    _copy(source / "edge.db", tmp)
    tmp.replace(db)
    fd = os.open(data, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return BackupReport(
        len(placed) + 1, total, int(manifest["instances"]), time.monotonic() - started
    )
