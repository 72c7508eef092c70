"""Signed model releases: the metadata ops sign and every edge verifies before installing.

Security model after The Update Framework: the hub distributes releases but cannot forge
them. A release's metadata names the model, its semantic version, an expiry, and the SHA-256
and size of the package archive; ops sign the canonical JSON of that metadata with Ed25519
keys; an edge pins the ops public keys and a threshold (k of n distinct trusted keys must have
signed). :func:`verify_release` is pure code over bytes, checks in this order and raises a
:class:`ReleaseError` naming what failed:

1. well-formed metadata; 2. signatures: only trusted keys count, each at most once, at least
``threshold`` valid; 3. not expired; 4. version strictly greater than any version of that
model this edge already accepted (rollback protection).

:func:`verify_archive` then checks the downloaded bytes against the signed size and hash, and
:func:`capped_read` enforces the size cap while downloading (a stream longer than declared is
cut off, never stored whole).
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from hub_protocol.messages import ProtocolError
from hub_protocol.semver import SemverKey
from hub_protocol.semver import parse as semver_parse

SPEC_VERSION = 1


class ReleaseError(Exception):
    """A release that must not be installed; ``reason`` is a short machine word."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason


def canonical(obj: Any) -> bytes:
    """The exact bytes that are signed: sorted keys, no whitespace, UTF-8."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def key_id(public_key: Ed25519PublicKey) -> str:
    """A stable id for a public key: first 16 hex chars of SHA-256 of its raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    """An ops public key from a PEM file (what an edge pins)."""
    key = serialization.load_pem_public_key(path.read_bytes())
    if not isinstance(key, Ed25519PublicKey):
        raise ValueError(f"{path} is not an Ed25519 public key")
    return key


def _semver(v: str) -> SemverKey:
    return semver_parse(v)


@dataclass(frozen=True, kw_only=True)
class Release:
    name: str
    version: str
    archive_sha256: str
    archive_size: int
    expires_at: float  # epoch seconds
    created_at: float

    def to_json(self) -> dict[str, Any]:
        return {
            "spec": SPEC_VERSION,
            "name": self.name,
            "version": self.version,
            "archive": {"sha256": self.archive_sha256, "size": self.archive_size},
            "expires_at": self.expires_at,
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Release:
        try:
            if obj["spec"] != SPEC_VERSION:
                raise ReleaseError("malformed", f"unknown release spec {obj['spec']!r}")
            arch = obj["archive"]
            rel = cls(
                name=str(obj["name"]),
                version=str(obj["version"]),
                archive_sha256=str(arch["sha256"]),
                archive_size=int(arch["size"]),
                expires_at=float(obj["expires_at"]),
                created_at=float(obj["created_at"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ReleaseError("malformed", f"release metadata: {exc}") from exc
        if len(rel.archive_sha256) != 64 or rel.archive_size < 0:
            raise ReleaseError("malformed", "archive sha256/size")
        try:
            _semver(rel.version)
        except (ValueError, ProtocolError) as exc:
            raise ReleaseError("malformed", str(exc)) from exc
        return rel


def sign(release: Release, private_key: Ed25519PrivateKey) -> dict[str, str]:
    """One signature entry ``{"keyid", "sig"}`` over the canonical release metadata."""
    sig = private_key.sign(canonical(release.to_json()))
    return {"keyid": key_id(private_key.public_key()), "sig": base64.b64encode(sig).decode()}


def envelope(release: Release, signatures: Iterable[Mapping[str, str]]) -> bytes:
    """The signed document as distributed: ``{"signed": ..., "signatures": [...]}``."""
    return canonical({"signed": release.to_json(), "signatures": list(signatures)})


@dataclass(frozen=True)
class Verified:
    release: Release
    signed_by: tuple[str, ...]


def verify_release(
    document: bytes,
    *,
    trusted: Mapping[str, Ed25519PublicKey],
    threshold: int,
    accepted_versions: Mapping[str, str],
    now: float | None = None,
) -> Verified:
    """Verify a signed release document (see the module docstring for the checks).

    ``trusted``: key id -> pinned ops public key. ``accepted_versions``: model name -> the
    highest version this edge has already accepted. Raises :class:`ReleaseError`.
    """
    if threshold < 1:
        raise ValueError("threshold must be >= 1")
    try:
        doc = json.loads(document)
        signed, sigs = doc["signed"], doc["signatures"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ReleaseError("malformed", f"not a signed release document: {exc}") from exc
    release = Release.from_json(signed)
    message = canonical(signed)
    if not isinstance(sigs, list):
        raise ReleaseError("malformed", "signatures must be a list")
    good: list[str] = []
    unknown: list[str] = []
    bad: list[str] = []
    for s in sigs:
        kid = str(s.get("keyid", "")) if isinstance(s, dict) else ""
        if kid in good:
            continue  # the same key counts once, however often it signed
        key = trusted.get(kid)
        if key is None:
            unknown.append(kid)
            continue
        try:
            key.verify(base64.b64decode(str(s.get("sig", "")), validate=True), message)
        except (InvalidSignature, ValueError):
            bad.append(kid)
            continue
        good.append(kid)
    if len(good) < threshold:
        if bad:
            reason = "bad_signature"
        elif unknown and not good:
            reason = "unknown_key"
        else:
            reason = "below_threshold"
        raise ReleaseError(
            reason,
            f"{len(good)} valid signature(s) from trusted keys, {threshold} required "
            f"(invalid: {bad or 'none'}, unknown keys: {unknown or 'none'})",
        )
    now = time.time() if now is None else now
    if release.expires_at <= now:
        raise ReleaseError(
            "expired",
            f"release {release.name} {release.version} expired "
            f"{now - release.expires_at:.0f} s ago",
        )
    prev = accepted_versions.get(release.name)
    if prev is not None and _semver(release.version) <= _semver(prev):
        raise ReleaseError(
            "rollback", f"{release.name} {release.version} is not newer than the accepted {prev}"
        )
    return Verified(release, tuple(good))


def capped_read(stream: BinaryIO, limit: int, chunk: int = 1 << 20) -> Iterator[bytes]:
    """Yield ``stream`` in chunks, raising ReleaseError as soon as it exceeds ``limit`` bytes
    (the signed size): an oversized download is stopped, not stored whole."""
    total = 0
    while data := stream.read(chunk):
        total += len(data)
        if total > limit:
            raise ReleaseError("too_large", f"download exceeds the signed size of {limit} bytes")
        yield data


def verify_archive(data: bytes, release: Release) -> None:
    """The archive bytes must have exactly the signed size and SHA-256."""
    if len(data) != release.archive_size:
        raise ReleaseError(
            "size_mismatch", f"archive is {len(data)} bytes, signed size {release.archive_size}"
        )
    digest = hashlib.sha256(data).hexdigest()
    if digest != release.archive_sha256:
        raise ReleaseError(
            "hash_mismatch", f"archive SHA-256 {digest[:16]}... differs from the signed one"
        )
