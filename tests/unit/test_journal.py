"""The write-ahead ingest journal: records round-trip, a torn or stale record ends replay
in its segment, an fdatasync error refuses the batch and retires the segment, and an agent
restarted over a journal (torn last record included) indexes every intact record once."""

from __future__ import annotations

import errno
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pydicom
import pytest

from edge_agent.errors import OutOfResources
from edge_agent.store.journal import IngestJournal, Record
from tests.conftest import TEST_FILES, make_config, split_part10


def _record(i: int, size: int = 1000) -> Record:
    data = bytes([i % 256]) * size
    sha = hashlib.sha256(data).hexdigest()
    return Record(meta=json.dumps({"sha256": sha, "i": i}).encode(), header=b"H" * 20,
                  dataset=data, sha256=sha)  # fmt: skip


def _journal(tmp_path: Path, **kw: Any) -> IngestJournal:
    j = IngestJournal(tmp_path / "journal", segment_bytes=kw.pop("segment_bytes", 2**20), **kw)
    j.start(after=max((s for s, _ in j.segments()), default=0))
    return j


def test_round_trip_in_order_across_segments(tmp_path: Path) -> None:
    j = _journal(tmp_path, segment_bytes=64 * 1024)
    positions = [j.append(_record(i, 5000)) for i in range(40)]  # ~13 per segment
    j.close()
    assert len({p.segment for p in positions}) >= 3
    got = list(IngestJournal(tmp_path / "journal").replay(0, 0))
    assert [json.loads(r.meta)["i"] for r in got] == list(range(40))
    assert all(r.dataset == _record(i, 5000).dataset for i, r in enumerate(got))
    # from a checkpoint: only what follows it
    later = list(IngestJournal(tmp_path / "journal").replay(positions[20].segment,
                                                            positions[20].end))  # fmt: skip
    assert [json.loads(r.meta)["i"] for r in later] == list(range(21, 40))


@pytest.mark.parametrize("damage", ["truncate", "flip_payload", "flip_header"])
def test_torn_last_record_ends_replay(tmp_path: Path, damage: str) -> None:
    j = _journal(tmp_path)
    positions = [j.append(_record(i)) for i in range(5)]
    j.close()
    last = positions[-1]
    path = tmp_path / "journal" / f"seg-{last.segment:012d}.log"
    with path.open("r+b") as fh:
        if damage == "truncate":  # the tail of the record never reached the disk
            fh.seek(last.offset + 60)
            fh.write(b"\x00" * (last.end - last.offset - 60))
        elif damage == "flip_payload":
            fh.seek(last.end - 20)
            fh.write(b"\xff")
        else:
            fh.seek(last.offset + 40)
            fh.write(b"\xff")
    got = list(IngestJournal(tmp_path / "journal").replay(0, 0))
    assert [json.loads(r.meta)["i"] for r in got] == [0, 1, 2, 3]


def test_recycled_segment_old_records_are_not_replayed(tmp_path: Path) -> None:
    j = _journal(tmp_path, segment_bytes=64 * 1024)
    first = [j.append(_record(i, 5000)) for i in range(30)]
    j.recycle(below=first[-1].segment)  # the old segments are checkpointed: one kept as spare
    more = [j.append(_record(100 + i, 3000)) for i in range(30)]
    j.close()
    assert more[-1].segment > first[-1].segment
    got = list(IngestJournal(tmp_path / "journal").replay(first[-1].segment, first[-1].end))
    assert [json.loads(r.meta)["i"] for r in got] == [100 + i for i in range(30)]


def test_fdatasync_error_refuses_the_batch_and_retires_the_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    j = _journal(tmp_path)
    ok = j.append(_record(1))
    real = os.fdatasync
    calls = {"n": 0}

    def failing(fd: int) -> None:
        calls["n"] += 1
        if calls["n"] == 1:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fdatasync", failing)
    with pytest.raises(OutOfResources, match="Input/output error"):
        j.append(_record(2))
    after = j.append(_record(3))
    j.close()
    assert after.segment > ok.segment  # never written to (or fsynced) again
    got = [json.loads(r.meta)["i"] for r in IngestJournal(tmp_path / "journal").replay(0, 0)]
    assert got[0] == 1 and got[-1] == 3  # the refused record may or may not be replayed


def _ct(n: int) -> list[tuple[str, bytes, str]]:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    out = []
    for i in range(n):
        ds.SOPInstanceUID = f"1.2.826.0.1.3680043.8.498.{i + 1}"
        from io import BytesIO

        buf = BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        out.append((*split_part10(buf.getvalue()), str(ds.SOPInstanceUID)))
    return out


def test_restart_replays_journal_once_with_a_torn_last_record(tmp_path: Path) -> None:
    """Instances journaled (acknowledged) but never indexed, as after kill -9: the next
    start indexes every intact record exactly once; the torn last one was never
    acknowledged and is gone; a second restart changes nothing."""
    from edge_agent.app import EdgeApp
    from edge_agent.studies.ingest import Origin

    cfg = make_config(tmp_path)
    app = EdgeApp(cfg)
    app.ingestor.indexer.close()  # the "crash": nothing gets indexed from here on
    app.ingestor.indexer.start = lambda: None  # type: ignore[method-assign]
    items = _ct(6)
    seqs = []
    for ts, data, uid in items:
        r = app.ingestor.receive(
            data,
            transfer_syntax=ts,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            sop_instance_uid=uid,
            origin=Origin(association_id=None, calling_ae="UNIT"),
            indexed=False,
        )
        assert r.status == 0, r
        seqs.append(r.seq)
    journal = app.ingestor.indexer.journal
    journal.close()
    app.store.close()
    app.lock.release()
    assert app.store.path.exists()
    # tear the last record
    seg = max(journal.segments())[1]
    data = bytearray(seg.read_bytes())
    end = len(data.rstrip(b"\x00"))
    seg.write_bytes(bytes(data[: end - 100]) + b"\x00" * (len(data) - end + 100))

    again = EdgeApp(cfg)
    try:
        assert again.recovery.journal_replayed == 5
        rows = again.store.query("SELECT sop_instance_uid, path, sha256 FROM instances")
        assert sorted(r[0] for r in rows) == sorted(uid for _, _, uid in items[:5])
        for r in rows:
            stored = (again.spool.root / r["path"]).read_bytes()
            assert hashlib.sha256(split_part10(stored)[1]).hexdigest() == r["sha256"]
    finally:
        again.close()
    third = EdgeApp(cfg)
    try:
        assert third.recovery.journal_replayed == 0
        assert third.store.query("SELECT count(*) FROM instances")[0][0] == 5
    finally:
        third.close()


def test_back_pressure_and_free_space_accounting_return_to_zero(tmp_path: Path) -> None:
    """Every journaled byte is released once indexed, and a refused append releases its own
    (no drift that would one day stall senders or refuse them for lack of space)."""
    from edge_agent.app import EdgeApp
    from edge_agent.studies.ingest import Origin

    app = EdgeApp(make_config(tmp_path))
    try:
        indexer = app.ingestor.indexer
        assert indexer is not None
        kw = {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "origin": Origin(
            association_id=None, calling_ae="UNIT")}  # fmt: skip
        for ts, data, uid in _ct(4):
            r = app.ingestor.receive(data, transfer_syntax=ts, sop_instance_uid=uid, **kw)
            assert r.status == 0 and r.seq
        assert indexer.unwritten_bytes == 0 and indexer.journal._pending_bytes == 0
        indexer.journal.close()  # appends now fail: refused, nothing left counted
        ts, data, uid = _ct(5)[4]
        r = app.ingestor.receive(data, transfer_syntax=ts, sop_instance_uid=uid, **kw)
        assert r.status == 0xA700
        assert indexer.unwritten_bytes == 0 and indexer.journal._pending_bytes == 0
        assert app.store.query("SELECT count(*) FROM instances")[0][0] == 4
    finally:
        app.close()


def test_a_written_file_leaves_the_unwritten_count_at_once(tmp_path: Path) -> None:
    """The free-space check subtracts what is acknowledged but not yet on the tier: a file
    the indexer has written counts in the filesystem's usage, so it must leave that count
    then, not when its whole batch commits (which counted a batch twice and refused, on a
    nearly full tier, instances that fit)."""
    from edge_agent.app import EdgeApp
    from edge_agent.studies.ingest import Origin

    app = EdgeApp(make_config(tmp_path))
    try:
        indexer = app.ingestor.indexer
        assert indexer is not None
        indexer.close()  # batches by hand below
        kw = {"sop_class_uid": "1.2.840.10008.5.1.4.1.1.2", "origin": Origin(
            association_id=None, calling_ae="UNIT")}  # fmt: skip
        for ts, data, uid in _ct(4):
            r = app.ingestor.receive(data, transfer_syntax=ts, sop_instance_uid=uid,
                                     indexed=False, **kw)  # fmt: skip
            assert r.status == 0
        batch = []
        while not indexer._queue.empty():
            item = indexer._queue.get()
            assert item is not None
            batch.append(item)
        assert len(batch) == 4
        sizes = [i.size for i in batch]
        assert indexer.unwritten_bytes == sum(sizes)
        seen: list[int] = []
        put = indexer._spool.put

        def watching_put(*a: Any, **k: Any) -> Any:
            seen.append(indexer.unwritten_bytes)
            return put(*a, **k)

        indexer._spool.put = watching_put  # type: ignore[method-assign]
        indexer.index(batch)
        assert seen == [sum(sizes[k:]) for k in range(4)]
        assert indexer.unwritten_bytes == 0
        assert app.store.query("SELECT count(*) FROM instances")[0][0] == 4
    finally:
        app.close()
