"""Installed model versions: install (verify, copy, verify again), activate, list, load.

One active version per model (a partial unique index enforces it). Installed packages live
in ``models_dir/<name>/<version>/``; a package is re-verified against its manifest every time
it is loaded, so a file changed on disk after installation is refused, not run.
"""

from __future__ import annotations

import shutil
import sqlite3
import uuid
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from edge_agent.clock import Clock
from edge_agent.errors import PermanentError
from edge_agent.store import Store
from hub_protocol.manifest import Manifest, parse_manifest
from hub_protocol.package import ModelPackage, open_package, verify_folder


class RegistryError(PermanentError):
    """An install/activate request that cannot be done as asked."""


@dataclass(frozen=True, kw_only=True)
class InstalledModel:
    name: str
    version: str
    task: str
    manifest_sha256: str
    model_sha256: str
    path: str
    installed_at: float
    active: bool
    manifest_json: str = ""
    shadow: bool = False
    activated_at: float | None = None

    def manifest(self) -> Manifest:
        """The manifest recorded at install time (for routing; execution re-verifies files)."""
        return parse_manifest(self.manifest_json)


def _row(r: sqlite3.Row) -> InstalledModel:
    return InstalledModel(
        name=r["name"],
        version=r["version"],
        task=r["task"],
        manifest_sha256=r["manifest_sha256"],
        model_sha256=r["model_sha256"],
        path=r["path"],
        installed_at=r["installed_at"],
        active=bool(r["active"]),
        manifest_json=r["manifest"],
        shadow=bool(r["shadow"]),
        activated_at=r["activated_at"],
    )


def _insert(conn: sqlite3.Connection, *, m: InstalledModel, activate: bool | None) -> bool:
    has_active = conn.execute(
        "SELECT 1 FROM model_versions WHERE name = ? AND active = 1", (m.name,)
    ).fetchone()
    make_active = activate is True or (activate is None and has_active is None)
    if make_active:
        conn.execute("UPDATE model_versions SET active = 0 WHERE name = ?", (m.name,))
    conn.execute(
        "INSERT INTO model_versions (name, version, task, manifest_sha256, model_sha256, path,"
        " manifest, installed_at, active, activated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (
            m.name,
            m.version,
            m.task,
            m.manifest_sha256,
            m.model_sha256,
            m.path,
            m.manifest_json,
            m.installed_at,
            int(make_active),
            m.installed_at if make_active else None,
        ),
    )
    return make_active


def set_active(conn: sqlite3.Connection, *, name: str, version: str, now: float) -> None:
    if (
        conn.execute(
            "SELECT 1 FROM model_versions WHERE name = ? AND version = ?", (name, version)
        ).fetchone()
        is None
    ):
        raise RegistryError(f"{name} {version} is not installed")
    conn.execute("UPDATE model_versions SET active = 0 WHERE name = ?", (name,))
    conn.execute(
        "UPDATE model_versions SET active = 1, shadow = 0, activated_at = ? "
        "WHERE name = ? AND version = ?",
        (now, name, version),
    )


def _set_shadow(conn: sqlite3.Connection, *, name: str, version: str | None) -> None:
    conn.execute("UPDATE model_versions SET shadow = 0 WHERE name = ?", (name,))
    if version is None:
        return
    row = conn.execute(
        "SELECT active FROM model_versions WHERE name = ? AND version = ?", (name, version)
    ).fetchone()
    if row is None:
        raise RegistryError(f"{name} {version} is not installed")
    if row[0]:
        raise RegistryError(f"{name} {version} is the active version; it cannot be its shadow")
    conn.execute(
        "UPDATE model_versions SET shadow = 1 WHERE name = ? AND version = ?", (name, version)
    )


class Registry:
    def __init__(self, *, store: Store, models_dir: Path, clock: Clock) -> None:
        self._store = store
        self.models_dir = models_dir
        self._clock = clock

    def install(self, source: Path, *, activate: bool | None = None) -> InstalledModel:
        """Verify the package at ``source`` (folder or .tar) and install it. ``activate``:
        True = make it active, False = never here (the caller activates after its own checks),
        None = only if the model has no active version yet. Installing the same version again
        with identical content is a no-op; with different content an error."""
        staging = self.models_dir / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        pkg = open_package(source, staging=staging)
        m = pkg.manifest
        existing = self.get(m.name, m.version)
        if existing is not None:
            if existing.manifest_sha256 != pkg.manifest_sha256:
                raise RegistryError(
                    f"{m.name} {m.version} is already installed with different content; "
                    "publish a new version instead"
                )
            return existing
        dest = self.models_dir / m.name / m.version
        tmp = staging / f"copy-{uuid.uuid4().hex}"
        if pkg.root.parent == staging:
            pkg.root.rename(tmp)
        else:
            shutil.copytree(pkg.root, tmp)
        verify_folder(tmp)  # what we copied is what was verified
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():  # left by an install that crashed before its row was written
            shutil.rmtree(dest)
        tmp.rename(dest)
        model = InstalledModel(
            name=m.name,
            version=m.version,
            task=m.task,
            manifest_sha256=pkg.manifest_sha256,
            model_sha256=m.files[m.model_file].sha256,
            path=dest.relative_to(self.models_dir).as_posix(),
            installed_at=self._clock.now(),
            active=False,
            manifest_json=pkg.manifest_bytes.decode("utf-8"),
        )
        active = self._store.writer.call(partial(_insert, m=model, activate=activate))
        return InstalledModel(**{**model.__dict__, "active": active})

    def activate(self, name: str, version: str) -> None:
        """Make ``version`` the active one of ``name`` (atomically; it stops being a shadow)."""
        self._store.writer.call(
            partial(set_active, name=name, version=version, now=self._clock.now())
        )

    def set_shadow(self, name: str, version: str | None) -> None:
        """Make ``version`` the shadow of ``name`` (replacing any other); None = no shadow."""
        self._store.writer.call(partial(_set_shadow, name=name, version=version))

    def shadows(self) -> dict[str, InstalledModel]:
        """The shadow version of each model that has one."""
        return {m.name: m for m in self.installed() if m.shadow}

    def get(self, name: str, version: str) -> InstalledModel | None:
        rows = self._store.query(
            "SELECT * FROM model_versions WHERE name = ? AND version = ?", (name, version)
        )
        return _row(rows[0]) if rows else None

    def installed(self) -> list[InstalledModel]:
        return [
            _row(r)
            for r in self._store.query("SELECT * FROM model_versions ORDER BY name, installed_at")
        ]

    def active(self) -> list[InstalledModel]:
        return [m for m in self.installed() if m.active]

    def load(self, model: InstalledModel) -> ModelPackage:
        """The installed package, verified again against its manifest."""
        pkg = verify_folder(self.models_dir / model.path)
        if pkg.manifest_sha256 != model.manifest_sha256:
            raise RegistryError(f"{model.name} {model.version}: manifest changed on disk")
        return pkg


def release_decisions(conn: sqlite3.Connection, name: str | None = None) -> list[sqlite3.Row]:
    """The hub releases this site accepted or refused (and why), oldest first; only those of
    model ``name`` if given."""
    sql = "SELECT * FROM model_updates" + (" WHERE name = ?" if name else "")  # noqa: S608
    return list(conn.execute(sql + " ORDER BY decided_at", (name,) if name else ()))
