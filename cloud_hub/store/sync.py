"""Push and records: a batch is applied in one transaction; each ``(site, key)`` at most
once, each ``(site, lane, seq)`` at most once; the lane's high-water mark is the highest seq
with every lower seq of the lane held (applied or rejected). A change to an existing record
based on an older version goes through the conflict rule of its data type. Every query is
scoped by ``site_id``: a site can read and write only its own rows. Every write here takes the
site's lock first (:mod:`cloud_hub.store.base`), so a push, a cloud edit and a conflict's
resolution for one site never interleave, on any replica.
"""

from __future__ import annotations

import json
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from cloud_hub.store.base import StoreBase, cas_record, lock_site
from cloud_hub.store.feed import write_change
from cloud_hub.store.schema import conflict_queue, lane_seqs, lanes, records, sites
from hub_protocol import (
    HLC,
    ChangeType,
    Lane,
    PushBatch,
    PushReceipt,
    Receipt,
    ReceiptStatus,
    Record,
    RecordType,
)
from hub_protocol.conflicts import DEFAULT_RULES, Outcome, Rule, Version, resolve

#: Record types -> the data type whose conflict rule applies.
DATA_TYPE = {
    RecordType.RESULT: "ai_results",
    RecordType.REVIEW: "review",
    RecordType.PATIENT_DATA: "patient_data",
    RecordType.STUDY_METADATA: "study_metadata",
    RecordType.USER_PREFERENCES: "user_preferences",
    RecordType.SYSTEM_CONFIG: "system_config",
    RecordType.HEARTBEAT: "operational",
    RecordType.TOMBSTONE: "operational",
    RecordType.CONFLICT_RESOLUTION: "operational",
}
HUB_RULES = {**DEFAULT_RULES, "operational": Rule.EDGE_WINS}


class SyncStore(StoreBase):
    """Push, high-water marks, edits made at the hub, and the results sites pushed."""

    rules: dict[str, Rule]

    def _high_water(self, conn: Connection, site_id: str) -> dict[Lane, int]:
        return {
            Lane(r[0]): int(r[1])
            for r in conn.execute(
                sa.select(lanes.c.lane, lanes.c.high_water).where(lanes.c.site_id == site_id)
            )
        }

    def high_water(self, site_id: str) -> dict[Lane, int]:
        with self.engine.connect() as conn:
            return self._high_water(conn, site_id)

    def push(self, site_id: str, batch: PushBatch, *, now: float | None = None) -> PushReceipt:
        """Apply a batch for ``site_id`` (at most once per key and per lane seq).

        Set-based: one query for the lane seqs already held, one for the keys that exist,
        then bulk inserts, so the cost per record stays flat as batches grow.
        """
        now = time.time() if now is None else now
        out: list[Receipt] = []
        with self.writing() as conn:
            if not lock_site(conn, site_id):
                raise KeyError(f"no site {site_id}")
            hw = self._high_water(conn, site_id)
            held: set[tuple[str, int]] = set()
            for lane in sorted({r.lane for r in batch.records}, key=lambda x: x.value):
                lane_recs = [r.seq for r in batch.records if r.lane is lane]
                held.update(
                    (lane.value, int(s))
                    for s in conn.execute(
                        sa.select(lane_seqs.c.seq).where(
                            lane_seqs.c.site_id == site_id,
                            lane_seqs.c.lane == lane.value,
                            lane_seqs.c.seq >= min(lane_recs),
                            lane_seqs.c.seq <= max(lane_recs),
                        )
                    ).scalars()
                )
            keys = list({r.key for r in batch.records})
            existing: dict[str, int] = {}
            for i in range(0, len(keys), 500):
                existing.update(
                    (str(k), int(v))
                    for k, v in conn.execute(
                        sa.select(records.c.key, records.c.version).where(
                            records.c.site_id == site_id, records.c.key.in_(keys[i : i + 500])
                        )
                    )
                )
            inserts: list[dict[str, Any]] = []
            seq_rows: list[dict[str, Any]] = []
            touched: set[Lane] = set()
            for rec in batch.records:
                if (rec.lane.value, rec.seq) in held or rec.seq <= hw.get(rec.lane, 0):
                    out.append(Receipt(key=rec.key, seq=rec.seq, status=ReceiptStatus.DUPLICATE))
                    continue
                body = json.dumps(dict(rec.payload), sort_keys=True)
                current = existing.get(rec.key)
                error = ""
                if current is not None and rec.type is RecordType.RESULT:
                    status, version = ReceiptStatus.REJECTED, current
                    error = "results are immutable: a new result supersedes, it never replaces"
                elif current is not None:
                    status, version, error = self._update(conn, site_id, rec, current, now)
                else:
                    version, status = 1, ReceiptStatus.APPLIED
                    inserts.append(
                        {
                            "site_id": site_id,
                            "key": rec.key,
                            "type": rec.type.value,
                            "lane": rec.lane.value,
                            "seq": rec.seq,
                            "hlc": rec.hlc.encode(),
                            "version": 1,
                            "payload": body,
                            "received_at": now,
                        }
                    )
                existing[rec.key] = version
                held.add((rec.lane.value, rec.seq))
                seq_rows.append(
                    {
                        "site_id": site_id,
                        "lane": rec.lane.value,
                        "seq": rec.seq,
                        "status": status.value,
                    }
                )
                touched.add(rec.lane)
                out.append(
                    Receipt(key=rec.key, seq=rec.seq, status=status, version=version, error=error)
                )
            if inserts:
                conn.execute(records.insert(), inserts)
            if seq_rows:
                conn.execute(lane_seqs.insert(), seq_rows)
            for lane in sorted(touched, key=lambda x: x.value):  # one order in every writer
                hw[lane] = self._advance(conn, site_id, lane, hw.get(lane, 0))
            conn.execute(sites.update().where(sites.c.site_id == site_id).values(last_seen_at=now))
        return PushReceipt(receipts=tuple(out), high_water=hw)

    def _update(
        self, conn: Connection, site_id: str, rec: Record, current: int, now: float
    ) -> tuple[ReceiptStatus, int, str]:
        """A change to an existing record: applied when based on the current version, else
        resolved by the conflict rule of its data type (manual review keeps both)."""
        row = conn.execute(
            sa.select(records.c.payload, records.c.hlc).where(
                records.c.site_id == site_id, records.c.key == rec.key
            )
        ).one()

        def write(payload: dict[str, Any], hlc: str) -> int:
            return cas_record(
                conn,
                site_id,
                rec.key,
                current,
                type=rec.type.value,
                lane=rec.lane.value,
                seq=rec.seq,
                hlc=hlc,
                payload=json.dumps(payload, sort_keys=True),
                received_at=now,
            )

        if rec.base_version == current:
            return ReceiptStatus.APPLIED, write(dict(rec.payload), rec.hlc.encode()), ""
        cloud_hlc = HLC.decode(row.hlc)
        edge = Version(origin="edge", hlc=rec.hlc, fields=dict(rec.payload))
        cloud = Version(origin="cloud", hlc=cloud_hlc, fields=json.loads(row.payload))
        res = resolve(DATA_TYPE[rec.type], edge, cloud, self.rules)
        if res.outcome is Outcome.MANUAL:
            cid = conn.execute(
                conflict_queue.insert().values(
                    site_id=site_id,
                    key=rec.key,
                    type=rec.type.value,
                    edge_payload=json.dumps(dict(rec.payload), sort_keys=True),
                    edge_hlc=rec.hlc.encode(),
                    cloud_payload=row.payload,
                    cloud_hlc=row.hlc,
                    cloud_version=current,
                    created_at=now,
                )
            ).inserted_primary_key
            assert cid is not None
            return ReceiptStatus.CONFLICT, current, f"kept for manual review (conflict {cid[0]})"
        version = current
        if res.outcome is not Outcome.CLOUD and res.value is not None:
            version = write(dict(res.value), max(rec.hlc, cloud_hlc).encode())
        if res.value != dict(rec.payload):  # tell the edge what won
            write_change(
                conn,
                site_id,
                type=ChangeType.RECORD,
                key=rec.key,
                version=version,
                payload={"value": res.value, "reason": res.reason},
                now=now,
            )
        return ReceiptStatus.CONFLICT, version, res.reason

    def _advance(self, conn: Connection, site_id: str, lane: Lane, hw: int) -> int:
        seqs = [
            int(r[0])
            for r in conn.execute(
                sa.select(lane_seqs.c.seq)
                .where(
                    lane_seqs.c.site_id == site_id,
                    lane_seqs.c.lane == lane.value,
                    lane_seqs.c.seq > hw,
                )
                .order_by(lane_seqs.c.seq)
            )
        ]
        for s in seqs:
            if s != hw + 1:
                break
            hw = s
        # a high-water mark only grows (the guard holds even for a writer without the lock)
        updated = conn.execute(
            lanes.update()
            .where(lanes.c.site_id == site_id, lanes.c.lane == lane.value, lanes.c.high_water <= hw)
            .values(high_water=hw)
        )
        if updated.rowcount == 0:
            stored = conn.execute(
                sa.select(lanes.c.high_water).where(
                    lanes.c.site_id == site_id, lanes.c.lane == lane.value
                )
            ).scalar()
            if stored is not None:
                return int(stored)
            conn.execute(lanes.insert().values(site_id=site_id, lane=lane.value, high_water=hw))
        return hw

    def cloud_edit(
        self,
        site_id: str,
        *,
        key: str,
        type: RecordType,
        payload: dict[str, Any],
        now: float | None = None,
    ) -> int:
        """A change made at the hub (ops, a cloud service) to one site's record: stored as the
        next version and sent to the site through its change feed. Returns the version."""
        now = time.time() if now is None else now
        body = json.dumps(payload, sort_keys=True)
        hlc = HLC(int(now * 1000), 0, "hub").encode()
        with self.writing() as conn:
            if not lock_site(conn, site_id):
                raise KeyError(f"no site {site_id}")
            row = conn.execute(
                sa.select(records.c.version).where(
                    records.c.site_id == site_id, records.c.key == key
                )
            ).first()
            if row is None:
                version = 1
                conn.execute(
                    records.insert().values(
                        site_id=site_id,
                        key=key,
                        type=type.value,
                        lane=Lane.BATCH.value,
                        seq=0,
                        hlc=hlc,
                        version=1,
                        payload=body,
                        received_at=now,
                    )
                )
            else:
                version = cas_record(
                    conn, site_id, key, int(row[0]), hlc=hlc, payload=body, received_at=now
                )
            write_change(
                conn,
                site_id,
                type=ChangeType.RECORD,
                key=key,
                version=version,
                payload={"value": payload, "reason": "cloud edit"},
                now=now,
            )
        return version

    def results(
        self, site_id: str, *, study_uid: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        q = sa.select(
            records.c.key, records.c.payload, records.c.lane, records.c.seq, records.c.received_at
        ).where(records.c.site_id == site_id, records.c.type == RecordType.RESULT.value)
        with self.engine.connect() as conn:
            rows = [
                dict(r)
                for r in conn.execute(
                    q.order_by(records.c.received_at.desc()).limit(limit)
                ).mappings()
            ]
        out = []
        for r in rows:
            payload = json.loads(r.pop("payload"))
            if study_uid is None or payload.get("study_uid") == study_uid:
                out.append({**r, "result": payload})
        return out
