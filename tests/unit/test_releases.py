"""Signed model releases: every attack is refused with its reason (TUF-style checks)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub.ops import (
    add_signature,
    deterministic_tar,
    keygen,
    load_private,
    load_public,
    make_release,
)
from hub_protocol.releases import (
    Release,
    ReleaseError,
    capped_read,
    envelope,
    key_id,
    sign,
    verify_archive,
    verify_release,
)

NOW = 1_800_000_000.0


@pytest.fixture(scope="module")
def package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from edge_agent.inference.reference_models import SEG_NAME, build_reference_packages

    roots = build_reference_packages(tmp_path_factory.mktemp("pkg"))
    return next(r for r in roots if r.name.startswith(SEG_NAME))


def keys(n: int) -> list[Ed25519PrivateKey]:
    return [Ed25519PrivateKey.generate() for _ in range(n)]


def release(version: str = "1.0.0", expires: float = NOW + 3600) -> Release:
    return Release(
        name="ct-lesion-seg",
        version=version,
        archive_sha256="a" * 64,
        archive_size=10,
        expires_at=expires,
        created_at=NOW - 10,
    )


def verify(
    doc: bytes,
    trusted: list[Ed25519PrivateKey],
    threshold: int = 1,
    accepted: dict[str, str] | None = None,
) -> object:
    return verify_release(
        doc,
        trusted={key_id(k.public_key()): k.public_key() for k in trusted},
        threshold=threshold,
        accepted_versions=accepted or {},
        now=NOW,
    )


def test_good_release_with_threshold() -> None:
    a, b, c = keys(3)
    rel = release()
    v = verify(envelope(rel, [sign(rel, a), sign(rel, b)]), [a, b, c], threshold=2)
    assert v.release == rel and set(v.signed_by) == {
        key_id(a.public_key()),  # type: ignore[attr-defined]
        key_id(b.public_key()),
    }


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("tampered_metadata", "bad_signature"),
        ("unknown_key", "unknown_key"),
        ("below_threshold", "below_threshold"),
        ("same_key_twice", "below_threshold"),
        ("expired", "expired"),
        ("older_version", "rollback"),
        ("equal_version", "rollback"),
        ("garbage", "malformed"),
    ],
)
def test_attacks_are_refused_with_the_reason(case: str, reason: str) -> None:
    a, b, stranger = keys(3)
    rel = release()
    trusted, threshold, accepted = [a, b], 1, {"ct-lesion-seg": "0.9.0"}
    if case == "tampered_metadata":
        doc = json.loads(envelope(rel, [sign(rel, a)]))
        doc["signed"]["archive"]["sha256"] = "b" * 64  # the hub swaps the archive
        document = json.dumps(doc).encode()
    elif case == "unknown_key":
        document = envelope(rel, [sign(rel, stranger)])
    elif case == "below_threshold":
        document, threshold = envelope(rel, [sign(rel, a)]), 2
    elif case == "same_key_twice":
        document, threshold = envelope(rel, [sign(rel, a), sign(rel, a)]), 2
    elif case == "expired":
        old = release(expires=NOW - 1)
        document = envelope(old, [sign(old, a)])
    elif case == "older_version":
        document, accepted = envelope(rel, [sign(rel, a)]), {"ct-lesion-seg": "1.2.0"}
    elif case == "equal_version":
        document, accepted = envelope(rel, [sign(rel, a)]), {"ct-lesion-seg": "1.0.0"}
    else:
        document = b"{not json"
    with pytest.raises(ReleaseError) as err:
        verify(document, trusted, threshold, accepted)
    assert err.value.reason == reason, err.value


def test_archive_hash_size_and_download_cap() -> None:
    data = b"x" * 1000
    import hashlib

    rel = Release(
        name="m",
        version="1.0.0",
        archive_sha256=hashlib.sha256(data).hexdigest(),
        archive_size=1000,
        expires_at=NOW + 1,
        created_at=NOW,
    )
    verify_archive(data, rel)
    with pytest.raises(ReleaseError, match="hash_mismatch"):
        verify_archive(b"y" * 1000, rel)
    with pytest.raises(ReleaseError, match="size_mismatch"):
        verify_archive(data + b"!", rel)
    got = []
    with pytest.raises(ReleaseError, match="too_large"):
        for chunk in capped_read(io.BytesIO(b"z" * 5000), 1000, chunk=256):
            got.append(chunk)
    assert sum(len(c) for c in got) <= 1000  # stopped at the cap, not read whole


def test_ops_keygen_release_sign_and_edge_verify(package: Path, tmp_path: Path) -> None:
    from hub_protocol.package import PackageError, open_package

    kid = keygen(tmp_path / "ops1.key", b"correct horse battery")
    assert oct((tmp_path / "ops1.key").stat().st_mode & 0o777) == "0o600"
    assert b"ENCRYPTED" in (tmp_path / "ops1.key").read_bytes()
    with pytest.raises(ValueError):
        load_private(tmp_path / "ops1.key", b"wrong passphrase!!")
    rel, archive, doc = make_release(package, tmp_path / "out", now=NOW)
    assert deterministic_tar(package) == archive.read_bytes()  # reproducible
    assert add_signature(doc, load_private(tmp_path / "ops1.key", b"correct horse battery")) == kid
    pub = load_public(tmp_path / "ops1.key.pub")
    v = verify_release(
        doc.read_bytes(), trusted={kid: pub}, threshold=1, accepted_versions={}, now=NOW + 60
    )
    verify_archive(archive.read_bytes(), v.release)
    pkg = open_package(archive, staging=tmp_path / "staging")
    assert pkg.manifest.name == rel.name and pkg.manifest.version == rel.version
    # a release whose tar points outside the package is refused before anything is written
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("../../outside.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(PackageError, match="escapes"):
        open_package(evil, staging=tmp_path / "staging2")
    assert not (tmp_path / "outside.txt").exists()
