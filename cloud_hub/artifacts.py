"""Where the hub keeps release archives: a folder (default) or an S3-compatible bucket.

Archives are content-addressed (the name is the SHA-256 of the bytes), written once, never
changed. The hub serves them itself in both cases (``GET /v1/artifacts/SHA256`` with HTTP
Range, behind the site's credential), so sites never need to reach the bucket.

``open_artifacts("artifacts")`` is a folder; ``open_artifacts("s3://bucket/prefix")`` a
bucket, with the endpoint from ``HUB_S3_ENDPOINT_URL`` (MinIO, Ceph RGW, ... ; unset = AWS)
and credentials from the usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_DEFAULT_REGION`` (never from the command line).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

CHUNK = 1 << 20


class ArtifactError(Exception):
    """The artifact store cannot be used (bad location, bucket unreachable, ...)."""


class ArtifactStore(Protocol):
    def put(self, sha256: str, data: bytes) -> None:
        """Store ``data`` under its SHA-256 (a no-op if it is already there)."""
        ...

    def size(self, sha256: str) -> int | None:
        """The stored size, or None if there is no such artifact."""
        ...

    def read(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``start`` .. ``end`` - 1, in chunks."""
        ...


def _check(sha256: str, data: bytes | None = None) -> None:
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"not a SHA-256: {sha256!r}")
    if data is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ValueError("artifact bytes do not match their SHA-256")


class FolderArtifacts:
    """``<root>/<sha256>``, written to a temporary name, fsynced and renamed."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, sha256: str) -> Path:
        _check(sha256)
        return self.root / sha256

    def put(self, sha256: str, data: bytes) -> None:
        _check(sha256, data)
        path = self.path(sha256)
        if path.is_file() and path.stat().st_size == len(data):
            return
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        with tmp.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    def size(self, sha256: str) -> int | None:
        path = self.path(sha256)
        return path.stat().st_size if path.is_file() else None

    def read(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        with self.path(sha256).open("rb") as f:
            f.seek(start)
            left = end - start
            while left > 0:
                block = f.read(min(CHUNK, left))
                if not block:
                    return
                left -= len(block)
                yield block


class S3Artifacts:
    """Objects ``<prefix>/<sha256>`` in an S3-compatible bucket (boto3, the ``s3`` extra)."""

    def __init__(self, bucket: str, prefix: str = "", *, client: Any = None) -> None:
        if client is None:
            try:
                import boto3
            except ImportError as exc:  # pragma: no cover - depends on the install
                raise ArtifactError(
                    "an s3:// artifact store needs boto3: pip install 'edge-agent[s3]'"
                ) from exc
            client = boto3.client("s3", endpoint_url=os.environ.get("HUB_S3_ENDPOINT_URL"))
        self._s3 = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    def _key(self, sha256: str) -> str:
        _check(sha256)
        return f"{self.prefix}/{sha256}" if self.prefix else sha256

    def put(self, sha256: str, data: bytes) -> None:
        _check(sha256, data)
        if self.size(sha256) == len(data):
            return
        self._s3.put_object(
            Bucket=self.bucket,
            Key=self._key(sha256),
            Body=data,
            ContentType="application/x-tar",
            ChecksumSHA256=_b64(hashlib.sha256(data).digest()),  # the bucket verifies it
        )

    def size(self, sha256: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            head = self._s3.head_object(Bucket=self.bucket, Key=self._key(sha256))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise ArtifactError(f"artifact store: {exc}") from exc
        return int(head["ContentLength"])

    def read(self, sha256: str, start: int, end: int) -> Iterator[bytes]:
        if end <= start:
            return
        obj = self._s3.get_object(
            Bucket=self.bucket, Key=self._key(sha256), Range=f"bytes={start}-{end - 1}"
        )
        body = obj["Body"]
        try:
            while block := body.read(CHUNK):
                yield block
        finally:
            body.close()


def _b64(raw: bytes) -> str:
    import base64

    return base64.b64encode(raw).decode()


def open_artifacts(location: str | Path) -> FolderArtifacts | S3Artifacts:
    """A folder path, or ``s3://bucket[/prefix]``."""
    text = str(location)
    if text.startswith("s3://"):
        bucket, _, prefix = text[5:].partition("/")
        if not bucket:
            raise ArtifactError(f"{text!r}: an s3:// location needs a bucket name")
        return S3Artifacts(bucket, prefix)
    return FolderArtifacts(Path(text))


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """(start, end exclusive) for a single-range ``Range: bytes=...`` header; None = the
    whole artifact; ValueError = not satisfiable (416)."""
    if not header:
        return None
    m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", header)
    if m is None or (not m[1] and not m[2]):
        raise ValueError(f"unsupported Range {header!r} (one range of bytes only)")
    if not m[1]:  # suffix: the last N bytes
        n = int(m[2])
        if n == 0:
            raise ValueError("empty suffix range")
        return max(0, size - n), size
    start = int(m[1])
    end = min(int(m[2]) + 1, size) if m[2] else size
    if start >= size or end <= start:
        raise ValueError(f"range starts at {start}, the artifact has {size} bytes")
    return start, end
