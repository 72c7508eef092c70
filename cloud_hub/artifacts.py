"""Where the hub keeps release archives: a folder (default) or an S3-compatible bucket.

Archives are content-addressed (the name is the SHA-256 of the bytes), written once, never
changed. The hub serves them itself in both cases (``GET /v1/artifacts/SHA256`` with HTTP
Range, behind the site's credential), so sites never need to reach the bucket.

The same stores hold the sites' archived instances, uploaded in chunks that may reach any
replica: each chunk is a *part* object of its own (named by site, object, offset and length,
so a resent chunk rewrites the same bytes under the same name), and the object is assembled
from its parts by :meth:`put_verified`, which streams them, checks the SHA-256 on the way and
makes the object visible only if it matches (memory stays bounded whatever the size). Which
parts make an upload is recorded in the hub's database (:mod:`cloud_hub.store.archive`), so
every replica sees the same upload. A folder store is for a single replica (or a volume all
replicas mount read-write); several replicas need the bucket.

``open_artifacts("artifacts")`` is a folder; ``open_artifacts("s3://bucket/prefix")`` a
bucket, with the endpoint from ``HUB_S3_ENDPOINT_URL`` (MinIO, Ceph RGW, ... ; unset = AWS)
and credentials from the usual ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` /
``AWS_DEFAULT_REGION`` (never from the command line).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

CHUNK = 1 << 20
#: the size of the parts an assembled object is written to a bucket in (S3's minimum is 5 MiB)
S3_PART = 8 << 20
_PART_NAME = re.compile(r"uploads/[A-Za-z0-9_-]{1,64}/[0-9a-f]{64}/[0-9]{16}-[0-9]{1,12}")


class ArtifactError(Exception):
    """The artifact store cannot be used (bad location, bucket unreachable, ...)."""


class PartMissing(ArtifactError):
    """An upload part is not (or no longer) in the store: another replica finished the
    upload and removed it, or it was never written."""


def part_name(site_id: str, sha256: str, offset: int, length: int) -> str:
    """The name of the part holding bytes ``offset`` .. ``offset + length`` of ``sha256``
    uploaded by ``site_id``."""
    name = f"uploads/{site_id}/{sha256}/{offset:016d}-{length}"
    if not _PART_NAME.fullmatch(name):
        raise ValueError(f"not a valid upload part: {name!r}")
    return name


def _check_part(name: str) -> None:
    if not _PART_NAME.fullmatch(name):
        raise ValueError(f"not a valid upload part: {name!r}")


class _Hashing:
    """Chunks passed through, hashed and counted."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._it = iter(chunks)
        self.sha = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for block in self._it:
            self.sha.update(block)
            self.size += len(block)
            yield block

    def matches(self, sha256: str) -> bool:
        return self.sha.hexdigest() == sha256


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

    def put_part(self, name: str, data: bytes) -> None:
        """Store an upload part (:func:`part_name`), replacing one of the same name."""
        ...

    def read_part(self, name: str) -> Iterator[bytes]:
        """An upload part's bytes, in chunks; :class:`PartMissing` if it is not there."""
        ...

    def delete_parts(self, names: Iterable[str]) -> None:
        """Remove upload parts; those already gone are ignored."""
        ...

    def put_verified(self, sha256: str, chunks: Iterable[bytes]) -> int:
        """Store the object made of ``chunks`` under ``sha256`` if their SHA-256 is that;
        otherwise store nothing and raise ValueError. Returns the size."""
        ...

    def check(self) -> None:
        """Raise :class:`ArtifactError` unless the store can be written now (readiness)."""
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

    def _part(self, name: str) -> Path:
        _check_part(name)
        return self.root / ".uploads" / name.removeprefix("uploads/")

    def _write(self, path: Path, chunks: Iterable[bytes]) -> Path:
        """``chunks`` into a temporary file beside ``path`` (unique: two replicas may write
        the same name at once), fsynced; the caller renames or removes it."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        try:
            with tmp.open("wb") as f:
                for block in chunks:
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def put_part(self, name: str, data: bytes) -> None:
        path = self._part(name)
        self._write(path, [data]).replace(path)

    def read_part(self, name: str) -> Iterator[bytes]:
        try:
            f = self._part(name).open("rb")
        except FileNotFoundError as exc:
            raise PartMissing(f"upload part {name} is gone") from exc
        with f:
            while block := f.read(CHUNK):
                yield block

    def delete_parts(self, names: Iterable[str]) -> None:
        folders = set()
        for name in names:
            path = self._part(name)
            path.unlink(missing_ok=True)
            folders.add(path.parent)
        for folder in folders:
            with contextlib.suppress(OSError):  # only once empty: others' parts stay
                folder.rmdir()

    def check(self) -> None:
        """The folder exists (made if need be) and a file can be written in it and removed."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            probe = self.root / f".ready.{uuid.uuid4().hex}.tmp"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ArtifactError(f"folder store not writable: {exc}") from exc

    def put_verified(self, sha256: str, chunks: Iterable[bytes]) -> int:
        path = self.path(sha256)
        hashing = _Hashing(chunks)
        tmp = self._write(path, hashing)
        if not hashing.matches(sha256):
            tmp.unlink(missing_ok=True)
            raise ValueError("artifact bytes do not match their SHA-256")
        tmp.replace(path)
        return hashing.size


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
        self._put(self._key(sha256), data, ContentType="application/x-tar")

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
        yield from _drain(obj["Body"])

    def check(self) -> None:
        """The bucket answers a HEAD request with these credentials."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._s3.head_bucket(Bucket=self.bucket)
        except (ClientError, BotoCoreError) as exc:
            raise ArtifactError(f"artifact store: {exc}") from exc

    def _part_key(self, name: str) -> str:
        _check_part(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _put(self, key: str, data: bytes, **extra: str) -> None:
        self._s3.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=data,
            ChecksumSHA256=_b64(hashlib.sha256(data).digest()),  # the bucket verifies it
            **extra,
        )

    def put_part(self, name: str, data: bytes) -> None:
        self._put(self._part_key(name), data)

    def read_part(self, name: str) -> Iterator[bytes]:
        from botocore.exceptions import ClientError

        try:
            obj = self._s3.get_object(Bucket=self.bucket, Key=self._part_key(name))
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                raise PartMissing(f"upload part {name} is gone") from exc
            raise ArtifactError(f"artifact store: {exc}") from exc
        yield from _drain(obj["Body"])

    def delete_parts(self, names: Iterable[str]) -> None:
        keys = [{"Key": self._part_key(n)} for n in names]
        for i in range(0, len(keys), 1000):  # deleting a missing key is not an error
            self._s3.delete_objects(Bucket=self.bucket, Delete={"Objects": keys[i : i + 1000]})

    def put_verified(self, sha256: str, chunks: Iterable[bytes]) -> int:
        """A multipart upload in :data:`S3_PART` parts, completed only if the hash
        matches (aborted otherwise: nothing becomes visible); one PUT when it is small."""
        key = self._key(sha256)
        hashing = _Hashing(chunks)
        buf = bytearray()
        upload_id: str | None = None
        parts: list[dict[str, Any]] = []
        try:
            for block in hashing:
                buf += block
                while len(buf) >= S3_PART:
                    if upload_id is None:
                        upload_id = self._s3.create_multipart_upload(Bucket=self.bucket, Key=key)[
                            "UploadId"
                        ]
                    n = len(parts) + 1
                    etag = self._s3.upload_part(
                        Bucket=self.bucket,
                        Key=key,
                        UploadId=upload_id,
                        PartNumber=n,
                        Body=bytes(buf[:S3_PART]),
                    )["ETag"]
                    parts.append({"ETag": etag, "PartNumber": n})
                    del buf[:S3_PART]
            if not hashing.matches(sha256):
                raise ValueError("artifact bytes do not match their SHA-256")
            if upload_id is None:
                self._put(key, bytes(buf))
                return hashing.size
            if buf:
                n = len(parts) + 1
                etag = self._s3.upload_part(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, PartNumber=n, Body=bytes(buf)
                )["ETag"]
                parts.append({"ETag": etag, "PartNumber": n})
            self._s3.complete_multipart_upload(
                Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
            )
            upload_id = None
            return hashing.size
        finally:
            if upload_id is not None:
                self._s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)


def _drain(body: Any) -> Iterator[bytes]:
    """A boto3 streaming body, in chunks, closed at the end."""
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
