"""Ops tooling for model releases: keys, deterministic archives, signatures.

* ``keygen``: an Ed25519 key pair; the private key is PEM encrypted with a passphrase
  (BestAvailableEncryption), file mode 0600; the public key goes to every edge (pinned).
* ``release``: verifies a model package folder, writes a deterministic ``.tar`` (sorted,
  zeroed times and owners, so the same package always gives the same bytes) and the unsigned
  release metadata (name, version, archive SHA-256 and size, expiry).
* ``sign``: adds one ops signature; k-of-n thresholds are k people running ``sign``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hub_protocol.package import verify_folder
from hub_protocol.releases import Release, canonical, key_id, load_public_key, sign


def keygen(path: Path, passphrase: bytes) -> str:
    """Write ``path`` (encrypted private key, 0600) and ``path.pub``; returns the key id."""
    if len(passphrase) < 12:
        raise ValueError("use a passphrase of at least 12 characters")
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(passphrase),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub = key.public_key()
    path.with_suffix(path.suffix + ".pub").write_bytes(
        pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return key_id(pub)


def load_private(path: Path, passphrase: bytes) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=passphrase)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    return key


def load_public(path: Path) -> Ed25519PublicKey:
    return load_public_key(path)


def deterministic_tar(folder: Path) -> bytes:
    """The package as a tar whose bytes depend only on the files' names and contents."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for p in sorted(folder.rglob("*")):
            if not p.is_file():
                continue
            info = tarfile.TarInfo(p.relative_to(folder).as_posix())
            data = p.read_bytes()
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def make_release(
    package: Path, out_dir: Path, *, expires_days: float = 365.0, now: float | None = None
) -> tuple[Release, Path, Path]:
    """Verify ``package`` and write ``<name>-<version>.tar`` and its unsigned release
    document (``.release.json``) to ``out_dir``. Returns (release, archive, document)."""
    pkg = verify_folder(package)  # never publish what an edge would refuse
    m = pkg.manifest
    data = deterministic_tar(package)
    now = time.time() if now is None else now
    release = Release(
        name=m.name,
        version=m.version,
        archive_sha256=hashlib.sha256(data).hexdigest(),
        archive_size=len(data),
        expires_at=now + expires_days * 86400,
        created_at=now,
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / f"{m.name}-{m.version}.tar"
    archive.write_bytes(data)
    doc = out_dir / f"{m.name}-{m.version}.release.json"
    doc.write_bytes(canonical({"signed": release.to_json(), "signatures": []}))
    return release, archive, doc


def add_signature(document: Path, key: Ed25519PrivateKey) -> str:
    """Sign the release document in place (idempotent per key). Returns the key id."""
    doc = json.loads(document.read_bytes())
    release = Release.from_json(doc["signed"])
    entry = sign(release, key)
    doc["signatures"] = [s for s in doc["signatures"] if s.get("keyid") != entry["keyid"]]
    doc["signatures"].append(entry)
    document.write_bytes(canonical(doc))
    return entry["keyid"]
