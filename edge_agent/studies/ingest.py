"""Receiving one instance: check it, keep it durably, index it, and say which status to answer.

This is everything the C-STORE handler does, with no networking in it, so tests can drive it
directly. The order is what makes an acknowledgement safe:

1. free-space floor check (0xA700 if below; nothing written);
2. strict structural check and UID validation (0xC0xx + quarantine if bad);
3. duplicate check against the store (identical bytes: 0x0000, nothing written);
4. spool write: temp file, write, fsync, rename (ENOSPC: 0xA700, temp removed);
5. row committed by the store writer, after it fsynced the spool folder;
6. only then 0x0000.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from edge_agent.clock import Clock
from edge_agent.dicom.negotiation import IMPLEMENTATION_CLASS_UID as IMPLEMENTATION_CLASS_UID
from edge_agent.dicom.negotiation import (
    IMPLEMENTATION_VERSION_NAME as IMPLEMENTATION_VERSION_NAME,
)
from edge_agent.errors import InvalidInstance, OutOfResources, StoreError
from edge_agent.metrics import Metrics
from edge_agent.store import Spool, Store
from edge_agent.store.journal import IngestJournal, Record
from edge_agent.store.spool import write_all
from edge_agent.studies.indexer import Indexer, Item, drop_unreferenced, record_meta, replay
from edge_agent.studies.parse import MAX_DEPTH, MAX_INFLATED_BYTES, InstanceInfo, inspect_dataset
from edge_agent.studies.store import (
    Quarantined,
    RecordOutcome,
    StoredObject,
    insert_quarantine,
    record_instance,
    sop_versions,
)

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_NONE = -1  # quarantine rows for data kept without a status of its own


class DatasetSource(Protocol):
    """A received dataset: ``data[offset:offset + size]`` (``bytes`` or a buffer such as an
    ``mmap``), its SHA-256 computed as it arrived, and, for a large one, the spill file
    that already holds :func:`file_header` + the dataset (not yet fsynced)."""

    data: Any
    offset: int
    size: int
    sha256: str
    spill: Path | None


@dataclass
class InMemory:
    """A :class:`DatasetSource` over bytes in memory."""

    data: bytes
    offset: int
    size: int
    sha256: str
    spill: Path | None = None

    @classmethod
    def of(cls, dataset: bytes) -> InMemory:
        return cls(dataset, 0, len(dataset), hashlib.sha256(dataset).hexdigest())


class Outcome(StrEnum):
    STORED = "stored"
    DUPLICATE = "duplicate"
    NEW_VERSION = "new_version"
    QUARANTINED = "quarantined"
    REFUSED = "refused"


@dataclass(frozen=True, kw_only=True)
class Origin:
    """Who sent an instance: for the audit trail and the quarantine record."""

    association_id: str | None
    calling_ae: str
    peer_host: str = ""


@dataclass(frozen=True)
class IngestResult:
    """The status to answer, an Error Comment (empty on success) and what happened."""

    status: int
    comment: str
    outcome: Outcome
    instance_id: int | None = None
    seq: int = 0  # the journal sequence number (0: not journaled); see Ingestor.wait_indexed


SPACE_SLACK_BYTES = 64 * 1024  # per instance: filesystem overhead beyond its bytes


class Ingestor:
    """Turns received dataset bytes into a durable, indexed instance (or a clear refusal)."""

    def __init__(
        self,
        *,
        store: Store,
        spool: Spool,
        quarantine_dir: Path,
        clock: Clock,
        metrics: Metrics,
        min_free_bytes: int,
        tier: str = "hot",
        max_depth: int = MAX_DEPTH,
        max_inflated_bytes: int = MAX_INFLATED_BYTES,
        journal: IngestJournal | None = None,
        max_record_bytes: int = 16 * 2**20,
        fsync: bool = True,
    ) -> None:
        self._store = store
        self._spool = spool
        self._quarantine = quarantine_dir
        self._clock = clock
        self._metrics = metrics
        self.min_free_bytes = min_free_bytes
        self._tier = tier
        self._max_depth = max_depth
        self._max_inflated = max_inflated_bytes
        self._max_record = max_record_bytes
        self.indexer: Indexer | None = None
        if journal is not None:
            self.indexer = Indexer(
                journal=journal,
                store=store,
                spool=spool,
                clock=clock,
                metrics=metrics,
                fsync=fsync,
                tier=tier,
                quarantine=self._quarantine_acknowledged,
            )

    # -- the journal's lifecycle ---------------------------------------------------------

    def recover(self) -> int:
        """Replay journaled records the store does not hold yet (startup, before any
        association). Returns how many were replayed."""
        if self.indexer is None:
            return 0
        return replay(self.indexer, self._store, self._inspect_record)

    def start(self) -> None:
        """Start the journal and the indexer (after :meth:`recover`)."""
        if self.indexer is None:
            return
        journal = self.indexer.journal
        newest = max((seg for seg, _ in journal.segments()), default=0)
        journal.start(after=newest)
        self.indexer.start()

    def close(self) -> None:
        """No more appends; index what is journaled; stop."""
        if self.indexer is not None:
            self.indexer.journal.close()
            self.indexer.close()

    def wait_indexed(self, seq: int, timeout: float = 60.0) -> bool:
        """Wait until every instance journaled up to ``seq`` is in the store."""
        if self.indexer is None or seq <= 0:
            return True
        return self.indexer.wait(seq, timeout)

    def _inspect_record(self, record: Record, meta: dict[str, object]) -> InstanceInfo:
        return inspect_dataset(
            record.dataset,
            str(meta.get("ts", "")),
            expected_sop_class=str(meta.get("sop_class", "")) or None,
            expected_sop_instance=str(meta.get("sop_instance", "")) or None,
            max_depth=self._max_depth,
            max_inflated_bytes=self._max_inflated,
        )

    def _quarantine_acknowledged(self, item: Item, reason: str) -> None:
        data = bytes(item.record.header) + bytes(item.record.dataset)
        exc = InvalidInstance(STATUS_NONE, reason)
        self._quarantine_instance(
            data,
            exc,
            transfer_syntax=item.info.transfer_syntax,
            sop_class_uid=item.info.sop_class_uid,
            sop_instance_uid=item.info.sop_instance_uid,
            origin=Origin(association_id=None, calling_ae=item.calling_ae),
        )

    # -- receiving ------------------------------------------------------------------------

    def receive(
        self,
        dataset: bytes | DatasetSource,
        *,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        origin: Origin,
        indexed: bool = True,
    ) -> IngestResult:
        """Handle one C-STORE dataset (encoded as received, without file meta).

        Returns once the instance is durable (the status may be acknowledged). With the
        journal on, ``indexed=False`` returns as soon as it is journaled; its file and rows
        follow a moment later (:meth:`wait_indexed` with the result's ``seq``); the default
        waits for them too.

        Never raises: every failure becomes a status and a comment.
        """
        started = time.perf_counter()
        src = InMemory.of(dataset) if isinstance(dataset, bytes) else dataset
        try:
            result = self._receive(
                src,
                transfer_syntax=transfer_syntax,
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                origin=origin,
            )
            if indexed and result.seq and not self.wait_indexed(result.seq):
                log.warning("instance journaled but not yet indexed after 60 s")
        except OutOfResources as exc:
            result = self._refuse(str(exc), origin)
        except Exception as exc:  # never acknowledged; the sender gets a clear status
            log.exception(
                "instance not stored: internal error",
                extra={"sop_instance_uid": sop_instance_uid, "calling_ae": origin.calling_ae},
            )
            self._metrics.instances.labels("refused").inc()
            result = IngestResult(
                STATUS_OUT_OF_RESOURCES,
                f"Out of resources: cannot store instance ({exc})",
                Outcome.REFUSED,
            )
        self._metrics.store_seconds.observe(time.perf_counter() - started)
        return result

    def _receive(
        self,
        src: DatasetSource,
        *,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        origin: Origin,
    ) -> IngestResult:
        free = self._spool.free_bytes()
        if self.indexer is not None:  # journaled instances still to be written to this tier
            free -= self.indexer.unwritten_bytes
        if free < self.min_free_bytes:
            raise OutOfResources(
                f"Out of resources: free space on the hot tier ({free // 2**20} MiB) is below "
                f"the floor ({self.min_free_bytes // 2**20} MiB)"
            )
        if free < src.size + SPACE_SLACK_BYTES:
            raise OutOfResources(
                f"Out of resources: the hot tier has {free // 1024} KiB free, the instance "
                f"needs {(src.size + SPACE_SLACK_BYTES) // 1024} KiB"
            )
        try:
            info = inspect_dataset(
                src.data,
                transfer_syntax,
                expected_sop_class=sop_class_uid,
                expected_sop_instance=sop_instance_uid,
                offset=src.offset,
                size=src.size,
                max_depth=self._max_depth,
                max_inflated_bytes=self._max_inflated,
            )
        except InvalidInstance as exc:
            return self._quarantine_instance(
                memoryview(src.data)[src.offset : src.offset + src.size],
                exc,
                transfer_syntax=transfer_syntax,
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                origin=origin,
            )
        sha = src.sha256
        with self._store.read() as conn:
            versions = sop_versions(conn, info.sop_instance_uid)
        if self.indexer is not None:
            versions += [(0, k, t) for k, t in self.indexer.pending_versions(info.sop_instance_uid)]
        key = sha
        for version, known, known_ts in versions:
            if known == sha and known_ts == info.transfer_syntax:
                return self._duplicate(info, version, origin)
            if known == sha:
                # the same bytes under another transfer syntax are another object: its file
                # header differs, so it must not share the first one's file
                key = object_key(sha, info.transfer_syntax)
        header = file_header(info, origin.calling_ae)
        dataset = memoryview(src.data)[src.offset : src.offset + src.size]
        if self.indexer is not None and src.spill is None and src.size <= self._max_record:
            return self._journal(info, header, dataset, sha, key, origin, new=bool(versions))
        if (
            src.spill is not None
            and key == sha
            and bytes(memoryview(src.data)[: src.offset]) == header
        ):
            written = self._spool.adopt(key, src.spill)
        else:
            written = self._spool.put(key, (header, dataset))
        obj = StoredObject(
            sha256=sha,
            size_bytes=len(header) + src.size,
            tier=self._tier,
            path=written.relpath,
        )
        now = self._clock.now()
        try:
            recorded = self._store.writer.call(
                lambda conn: record_instance(
                    conn,
                    info,
                    obj,
                    now=now,
                    association_id=origin.association_id,
                    calling_ae=origin.calling_ae,
                ),
                sync_dirs=(written.abspath.parent,) if written.created else (),
            )
        except BaseException:
            if written.created:  # never acknowledged: leave no file without a row
                drop_unreferenced(self._store, self._spool, self._tier, written.relpath)
            raise
        if recorded.outcome is RecordOutcome.DUPLICATE:  # raced with an identical copy
            return self._duplicate(info, recorded.version, origin)
        if recorded.late:
            self._metrics.studies_reopened.inc()
            log.info(
                "late arrival re-opened study",
                extra={"study_uid": info.study_uid, "sop_instance_uid": info.sop_instance_uid},
            )
        if recorded.outcome is RecordOutcome.NEW_VERSION:
            log.warning(
                "same SOP Instance UID with different bytes: kept as a new version",
                extra={
                    "sop_instance_uid": info.sop_instance_uid,
                    "version": recorded.version,
                    "calling_ae": origin.calling_ae,
                    "sha256": sha,
                },
            )
            self._metrics.instances.labels(Outcome.NEW_VERSION.value).inc()
            return IngestResult(STATUS_SUCCESS, "", Outcome.NEW_VERSION, recorded.instance_id)
        self._metrics.instances.labels(Outcome.STORED.value).inc()
        return IngestResult(STATUS_SUCCESS, "", Outcome.STORED, recorded.instance_id)

    def _journal(
        self,
        info: InstanceInfo,
        header: bytes,
        dataset: memoryview,
        sha: str,
        key: str,
        origin: Origin,
        *,
        new: bool,
    ) -> IngestResult:
        """The ack path with the journal: one durable append, then the answer."""
        assert self.indexer is not None
        if self._store.writer.closed or self.indexer.error:
            # the journal would keep it, but nothing could index it: refuse while broken
            raise StoreError(
                f"store not writable: {self.indexer.error or 'store writer is closed'}"
            )
        now = self._clock.now()
        meta = record_meta(
            info,
            sha256=sha,
            key=key,
            calling_ae=origin.calling_ae,
            association_id=origin.association_id,
            peer_host=origin.peer_host,
            received_at=now,
        )
        record = Record(meta=meta, header=header, dataset=dataset, sha256=sha)
        item = Item(
            record=record,
            info=info,
            key=key,
            calling_ae=origin.calling_ae,
            association_id=origin.association_id,
            received_at=now,
        )
        seq = self.indexer.reserve(item)
        try:
            record.position = self.indexer.journal.append(record)
            item.appended = True
        except BaseException:
            self.indexer.forget(item)
            raise
        self.indexer.submit(item)
        outcome = Outcome.NEW_VERSION if new else Outcome.STORED
        return IngestResult(STATUS_SUCCESS, "", outcome, None, seq=seq)

    def _duplicate(self, info: InstanceInfo, version: int, origin: Origin) -> IngestResult:
        log.info(
            "duplicate instance (identical bytes) acknowledged, no second copy",
            extra={
                "sop_instance_uid": info.sop_instance_uid,
                "version": version,
                "calling_ae": origin.calling_ae,
            },
        )
        self._metrics.instances.labels(Outcome.DUPLICATE.value).inc()
        return IngestResult(STATUS_SUCCESS, "", Outcome.DUPLICATE)

    def _refuse(self, reason: str, origin: Origin) -> IngestResult:
        log.warning(
            "instance refused: out of resources",
            extra={"reason": reason, "calling_ae": origin.calling_ae},
        )
        self._metrics.out_of_resources.inc()
        self._metrics.instances.labels(Outcome.REFUSED.value).inc()
        return IngestResult(STATUS_OUT_OF_RESOURCES, reason, Outcome.REFUSED)

    def _quarantine_instance(
        self,
        dataset: bytes | memoryview,
        exc: InvalidInstance,
        *,
        transfer_syntax: str,
        sop_class_uid: str,
        sop_instance_uid: str,
        origin: Origin,
    ) -> IngestResult:
        """Keep the raw bytes and the reason, record the row, answer the failure status."""
        now = self._clock.now()
        sha = hashlib.sha256(dataset).hexdigest()
        day = time.strftime("%Y%m%d", time.gmtime(now))
        rel = f"{day}/{sha}-{uuid.uuid4().hex[:8]}"
        sidecar = {
            "reason": exc.reason,
            "status": f"0x{exc.status:04X}",
            "received_at": now,
            "association_id": origin.association_id,
            "calling_ae": origin.calling_ae,
            "peer_host": origin.peer_host,
            "transfer_syntax": transfer_syntax,
            "sop_class_uid": sop_class_uid,
            "sop_instance_uid": sop_instance_uid,
            "sha256": sha,
            "size_bytes": len(dataset),
        }
        try:
            folder = self._quarantine / day
            folder.mkdir(parents=True, exist_ok=True)
            _write_durably(self._quarantine / f"{rel}.raw", dataset)
            _write_durably(
                self._quarantine / f"{rel}.json",
                json.dumps(sidecar, indent=2).encode(),
            )
            row = Quarantined(
                received_at=now,
                association_id=origin.association_id,
                calling_ae=origin.calling_ae,
                peer_host=origin.peer_host,
                status=exc.status,
                reason=exc.reason,
                sop_class_uid=sop_class_uid,
                sop_instance_uid=sop_instance_uid,
                sha256=sha,
                size_bytes=len(dataset),
                path=f"{rel}.raw",
            )
            self._store.writer.call(
                partial(insert_quarantine, q=row),
                sync_dirs=(folder,),
            )
        except (OSError, StoreError):
            log.exception("could not write quarantine record", extra=sidecar)
        log.warning("instance quarantined", extra=sidecar)
        self._metrics.instances.labels(Outcome.QUARANTINED.value).inc()
        return IngestResult(exc.status, exc.reason, Outcome.QUARANTINED)


def file_header(info: InstanceInfo, source_ae: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (PS3.10 7.1) we add in front of
    the dataset as received (the dataset bytes themselves are never re-encoded).

    Encoded by hand: pydicom's writer costs ~0.7 ms per instance on the C-STORE path; the test
    suite pins this output to pydicom's ``write_file_meta_info`` byte for byte.
    """
    return file_header_for(
        info.sop_class_uid, info.sop_instance_uid, info.transfer_syntax, source_ae
    )


def file_header_for(
    sop_class: str, sop_instance: str, transfer_syntax: str, source_ae: str
) -> bytes:
    """:func:`file_header` from the C-STORE request's UIDs (known before the dataset arrives,
    so a large dataset can be received straight behind its header; the ingest checks that
    the dataset agrees before it keeps the file as it is)."""
    body = b"".join(
        (
            b"\x02\x00\x01\x00OB\x00\x00\x02\x00\x00\x00\x00\x01",  # (0002,0001) version
            _element(0x0002, b"UI", sop_class, b"\x00"),
            _element(0x0003, b"UI", sop_instance, b"\x00"),
            _element(0x0010, b"UI", transfer_syntax, b"\x00"),
            _element(0x0012, b"UI", IMPLEMENTATION_CLASS_UID, b"\x00"),
            _element(0x0013, b"SH", IMPLEMENTATION_VERSION_NAME, b" "),
            _element(0x0016, b"AE", source_ae.strip(), b" ") if source_ae.strip() else b"",
        )
    )
    group_length = b"\x02\x00\x00\x00UL\x04\x00" + len(body).to_bytes(4, "little")
    return b"\x00" * 128 + b"DICM" + group_length + body


def _element(elem: int, vr: bytes, value: str, pad: bytes) -> bytes:
    raw = value.encode("ascii", "replace")
    if len(raw) % 2:
        raw += pad
    return b"\x02\x00" + elem.to_bytes(2, "little") + vr + len(raw).to_bytes(2, "little") + raw


def object_key(sha256: str, transfer_syntax: str) -> str:
    """The spool name of a dataset whose bytes are already held under another syntax."""
    tag = hashlib.sha256(transfer_syntax.encode()).hexdigest()[:8]
    return f"{sha256}-{tag}"


def _write_durably(path: Path, data: bytes | memoryview) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
