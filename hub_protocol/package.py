"""Opening a model package (folder or ``.tar``) and verifying every byte of it.

Pure code over files with explicit limits, in the spirit of python-tuf: nothing from a
package is used until the manifest validates and every listed file has its declared size
and SHA-256. A tar is unpacked only after every member passed the checks (regular files,
relative paths inside the package, total size under the cap), so a crafted archive cannot
write outside its staging folder.
"""

from __future__ import annotations

import hashlib
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from hub_protocol.errors import UntrustedError
from hub_protocol.manifest import Manifest, parse_manifest

MANIFEST_NAME = "manifest.json"
#: Files a package may hold besides those its manifest lists (signatures come with issue 5).
ALLOWED_EXTRA = frozenset({MANIFEST_NAME})
DEFAULT_MAX_PACKAGE_BYTES = 4 * 1024**3
_CHUNK = 1024 * 1024


class PackageError(UntrustedError):
    """A package failed a trust check (hash, size, unexpected or unsafe file)."""


@dataclass(frozen=True)
class ModelPackage:
    """A verified package: ``root`` holds exactly the files the manifest lists."""

    root: Path
    manifest: Manifest
    manifest_bytes: bytes

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest.model_file

    @property
    def manifest_sha256(self) -> str:
        return hashlib.sha256(self.manifest_bytes).hexdigest()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def open_package(
    path: Path, *, staging: Path | None = None, max_bytes: int = DEFAULT_MAX_PACKAGE_BYTES
) -> ModelPackage:
    """Open and verify the package at ``path`` (a folder, or a ``.tar`` unpacked into a new
    folder under ``staging``). Raises :class:`ManifestError` for an invalid manifest and
    :class:`PackageError` for anything that fails a trust check."""
    if path.is_dir():
        return verify_folder(path)
    if tarfile.is_tarfile(path):
        base = staging or Path(tempfile.gettempdir())
        base.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(prefix="pkg-", dir=base))
        try:
            _safe_extract(path, root, max_bytes)
            return verify_folder(root)
        except BaseException:
            shutil.rmtree(root, ignore_errors=True)
            raise
    raise PackageError(f"{path} is neither a package folder nor a tar archive")


def verify_folder(root: Path) -> ModelPackage:
    """Validate ``root/manifest.json`` and check every file against it."""
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise PackageError(f"no {MANIFEST_NAME} in {root}")
    raw = manifest_path.read_bytes()
    manifest = parse_manifest(raw)
    present = {
        p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() or p.is_symlink()
    }
    extra = sorted(present - set(manifest.files) - ALLOWED_EXTRA)
    if extra:
        raise PackageError(f"files not listed in the manifest: {', '.join(extra[:5])}")
    resolved_root = root.resolve()
    for name, entry in manifest.files.items():
        p = root / name
        if p.is_symlink() or not p.is_file():
            raise PackageError(f"{name}: missing or not a regular file")
        if resolved_root not in p.resolve().parents:
            raise PackageError(f"{name}: points outside the package")
        size = p.stat().st_size
        if size != entry.size:
            raise PackageError(f"{name}: size {size} differs from the manifest ({entry.size})")
        digest = sha256_file(p)
        if digest != entry.sha256:
            raise PackageError(f"{name}: SHA-256 {digest[:16]}... differs from the manifest")
    return ModelPackage(root=root, manifest=manifest, manifest_bytes=raw)


def _safe_extract(archive: Path, dest: Path, max_bytes: int) -> None:
    with tarfile.open(archive) as tar:
        members = tar.getmembers()
        total = 0
        for m in members:
            name = PurePosixPath(m.name)
            if m.isdir():
                continue
            if not m.isfile():
                raise PackageError(f"{m.name}: links, devices and fifos are not allowed")
            if name.is_absolute() or ".." in name.parts or not name.parts:
                raise PackageError(f"{m.name}: path escapes the package")
            total += m.size
            if total > max_bytes:
                raise PackageError(f"package larger than the {max_bytes} byte limit")
        for m in members:
            if m.isdir():
                continue
            target = dest / PurePosixPath(m.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            if src is None:  # pragma: no cover - isfile() members always have data
                raise PackageError(f"{m.name}: unreadable member")
            with src, target.open("wb") as out:
                shutil.copyfileobj(src, out, _CHUNK)


def write_manifest_files(root: Path, manifest: dict[str, object]) -> None:
    """Fill ``manifest['files']`` with the size and SHA-256 of every file under ``root``
    (except the manifest) and write ``root/manifest.json``. For package builders."""
    import json

    files = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel != MANIFEST_NAME:
            files[rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}
    manifest["files"] = files
    parse_manifest(manifest)  # never write a package we would refuse to load
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
