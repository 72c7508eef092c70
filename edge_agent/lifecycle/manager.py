"""The storage lifecycle jobs: tier moves by age, disk pressure, archive to the hub,
retention (local deletion after archive), restores, integrity sampling, database upkeep.

What may move or go, and when (ages count from a study's last instance, or its restore):

- hot -> warm after ``hot_days``, warm -> cold after ``warm_days``, for studies at rest
  (DONE or FAILED: nothing is reading or writing them);
- cold -> the hub archive after ``cold_days`` (per modality: ``cold_days_by_modality``),
  only once every result of the study is at the hub (its outbox records ACKED); the upload is
  the encrypted cold file itself, so the hub never holds patient data in clear;
- a local copy is deleted only when the hub confirmed that instance's hash, and
  ``keep_days_after_archive`` have passed (or, under disk pressure, at once: archived copies
  are the first to go). When a study has no local copy left a tombstone record syncs;
- under pressure (a tier above its high watermark) the oldest studies at rest also move down
  early, to a tier on another filesystem or to cold (compressed); never anything not yet at
  the hub, nor a study with pending inference. If nothing safe can go, nothing goes: the
  listener's free-space floor answers 0xA700 and ``edge_storage_pressure`` stays 1.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from edge_agent.clock import Clock
from edge_agent.config import Config
from edge_agent.errors import EdgeError
from edge_agent.lifecycle.tiers import ARCHIVED, LOCAL_TIERS, Placement, Tiers
from edge_agent.metrics import Metrics
from edge_agent.store import Store
from edge_agent.sync.outbox import enqueue
from edge_agent.units import fmt_bytes
from hub_protocol import HybridClock, Lane, RecordType

log = logging.getLogger(__name__)

DAY = 86400.0
AT_REST = ("DONE", "FAILED")
NEXT_TIER = {"hot": "warm", "warm": "cold"}


class LifecycleBusy(EdgeError):
    """Another process holds the lifecycle lock."""


class ArchiveClient(Protocol):
    async def archive_put(self, sha256: str, data: bytes) -> int: ...

    async def archive_get(self, sha256: str) -> bytes: ...


def _age_sql() -> str:
    return "max(s.last_received_at, coalesce(s.restored_at, 0))"


def _results_at_hub_sql() -> str:
    """A study's results are all at the hub (no outbox record of them not yet ACKED)."""
    return (
        "NOT EXISTS (SELECT 1 FROM results r JOIN outbox o ON o.key = 'result/' || r.result_id"
        " WHERE r.study_uid = s.study_uid AND o.state != 'ACKED')"
    )


def _placements(conn: sqlite3.Connection, where: str, params: Sequence[Any]) -> list[Placement]:
    return [
        Placement(r["id"], r["sha256"], r["tier"], r["path"], r["archive_sha256"])
        for r in conn.execute(
            "SELECT i.id, i.sha256, i.tier, i.path, i.archive_sha256 FROM instances i "
            f"JOIN studies s USING (study_uid) WHERE {where}",
            tuple(params),
        )
    ]


@dataclass(frozen=True)
class TierUsage:
    tier: str
    root: Path
    instances: int
    bytes: int
    fs_used: float  # share of the filesystem used
    fs_free: int
    oldest_received_at: float | None


class Lifecycle:
    def __init__(
        self,
        cfg: Config,
        *,
        store: Store,
        tiers: Tiers,
        clock: Clock,
        metrics: Metrics,
        archive: ArchiveClient | None = None,
        hlc: HybridClock | None = None,
        is_idle: Callable[[], bool] = lambda: True,
    ) -> None:
        self._cfg = cfg
        self._lc = cfg.lifecycle
        self._store = store
        self.tiers = tiers
        self._clock = clock
        self._metrics = metrics
        self._archive = archive
        self._hlc = hlc
        self._is_idle = is_idle
        tiers.on_corrupt = self._report_corrupt
        self.jobs: list[tuple[str, Callable[[], Any], Callable[[], Awaitable[str]]]] = [
            ("tiers", self._interval(self._lc.tier_interval_s), self._tier_job),
            ("archive", self._interval(self._lc.archive_interval_s), self._archive_job),
            ("integrity", self._interval(self._lc.integrity_interval_s), self._integrity_job),
            ("maintenance", self._cron(self._lc.maintenance_cron), self._maintenance_job),
        ]

    # -- schedule (APScheduler triggers on the injected clock) ----------------------------

    @staticmethod
    def _interval(seconds: float) -> Callable[[], Any]:
        return lambda: IntervalTrigger(seconds=seconds, timezone=UTC)

    @staticmethod
    def _cron(expr: str) -> Callable[[], Any]:
        return lambda: CronTrigger.from_crontab(expr, timezone=UTC)

    def _next_run(self, make_trigger: Callable[[], Any], now: float) -> float:
        now_dt = datetime.fromtimestamp(now, UTC)
        trigger = make_trigger()
        if isinstance(trigger, IntervalTrigger):
            nxt = trigger.get_next_fire_time(now_dt, now_dt)
        else:
            nxt = trigger.get_next_fire_time(None, now_dt)
            if nxt is not None and nxt.timestamp() <= now:
                nxt = trigger.get_next_fire_time(nxt, now_dt.replace(microsecond=0))
        return float(nxt.timestamp()) if nxt is not None else now + DAY

    async def run_due(self, *, only: Sequence[str] = ()) -> dict[str, str]:
        """Run every job whose time has come (or the ``only`` ones now), one after the
        other, so jobs never overlap. Each job's next run is persisted: a restart keeps the
        schedule. A job that fails is logged and retried at its next time."""
        ran: dict[str, str] = {}
        lock = Path(self._cfg.storage.data_dir) / "lifecycle.lock"
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise LifecycleBusy(
                    "another process (the running agent?) is running the lifecycle jobs"
                ) from None
            await asyncio.to_thread(self.tiers.recover)  # moves a crash left half-done
            await self._run_due(ran, only)
        finally:
            os.close(fd)
        self.update_metrics()
        return ran

    async def _run_due(self, ran: dict[str, str], only: Sequence[str]) -> None:
        for name, trigger, fn in self.jobs:
            now = self._clock.now()
            rows = self._store.query(
                "SELECT next_run_at FROM lifecycle_jobs WHERE name = ?", (name,)
            )
            due = rows[0][0] if rows and rows[0][0] is not None else None
            if only:
                if name not in only:
                    continue
            elif due is None and name == "maintenance":  # cron: wait for its first time
                self._store.writer.call(
                    partial(_schedule, name=name, next_at=self._next_run(trigger, now))
                )
                continue
            elif due is not None and due > now:
                continue
            self._store.writer.call(partial(_started, name=name, now=now))
            try:
                detail, status = await fn(), "ok"
            except Exception as exc:
                detail, status = f"{type(exc).__name__}: {exc}", "error"
                log.exception("lifecycle job failed", extra={"job": name})
            end = self._clock.now()
            self._store.writer.call(
                partial(
                    _finished,
                    name=name,
                    now=end,
                    status=status,
                    detail=detail,
                    next_at=self._next_run(trigger, end),
                )
            )
            self._metrics.lifecycle_runs.labels(name, status).inc()
            ran[name] = f"{status}: {detail}"

    async def run(self, stop: asyncio.Event, tick_s: float | None = None) -> None:
        """Run due jobs until ``stop`` is set (looking every ``tick_s``: by default 5 s, or
        the shortest job interval if shorter)."""
        lc = self._lc
        tick_s = tick_s or min(
            5.0, lc.tier_interval_s, lc.archive_interval_s, lc.integrity_interval_s
        )
        while not stop.is_set():
            try:
                await self.run_due()
            except LifecycleBusy as exc:
                log.warning("lifecycle jobs skipped: %s", exc)
            except Exception:
                log.exception("lifecycle scheduler error; retrying next tick")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=tick_s)

    # -- jobs ----------------------------------------------------------------------------

    async def _tier_job(self) -> str:
        moved = await asyncio.to_thread(self.age_out)
        dropped = await asyncio.to_thread(self.drop_expired_copies)
        relieved = await asyncio.to_thread(self.relieve_pressure)
        restored = await self.process_restores()
        return (
            f"moved {moved}, local copies dropped after archive {dropped}, "
            f"pressure {relieved}, restored {restored}"
        )

    async def _archive_job(self) -> str:
        n, nbytes = await self.archive_due()
        return f"archived {n} instance(s), {fmt_bytes(nbytes)}"

    async def _integrity_job(self) -> str:
        checked, bad = await asyncio.to_thread(self.integrity_sample)
        return f"checked {checked}, corrupt {bad}"

    async def _maintenance_job(self) -> str:
        return await asyncio.to_thread(self.maintenance)

    # -- tier moves ----------------------------------------------------------------------

    def _at_rest_studies(self, tier: str, older_than: float, limit: int) -> list[str]:
        return [
            r[0]
            for r in self._store.query(
                f"SELECT s.study_uid FROM studies s WHERE s.state IN {AT_REST} "
                f"AND {_age_sql()} < ? AND EXISTS (SELECT 1 FROM instances i WHERE "
                "i.study_uid = s.study_uid AND i.tier = ?) AND NOT EXISTS (SELECT 1 FROM "
                "restore_requests q WHERE q.study_uid = s.study_uid AND q.finished_at IS NULL)"
                f" ORDER BY {_age_sql()} LIMIT ?",
                (older_than, tier, limit),
            )
        ]

    def _study_rows(self, studies: Sequence[str], tier: str) -> list[Placement]:
        out: list[Placement] = []
        with self._store.read() as conn:
            for uid in studies:
                out += _placements(conn, "i.study_uid = ? AND i.tier = ?", (uid, tier))
        return out

    def _move(self, rows: list[Placement], dst: str, **kw: Any) -> int:
        if not rows:
            return 0
        src = rows[0].tier
        rep = self.tiers.move(rows, dst, now=self._clock.now(), **kw)
        self._metrics.lifecycle_moves.labels(src, dst).inc(rep.moved)
        if rep.moved:
            log.info(
                "instances moved between tiers",
                extra={"from": src, "to": dst, "instances": rep.moved, "bytes": rep.bytes_written},
            )
        return rep.moved

    def age_out(self) -> int:
        """hot -> warm and warm -> cold by age; returns instances moved."""
        now, moved = self._clock.now(), 0
        for src, days in (("hot", self._lc.hot_days), ("warm", self._lc.warm_days)):
            budget = self._lc.batch_instances - moved
            studies = self._at_rest_studies(src, now - days * DAY, budget)
            rows = self._study_rows(studies, src)[:budget]
            moved += self._move(rows, NEXT_TIER[src])
        return moved

    def relieve_pressure(self) -> str:
        """For each tier above its high watermark: drop archived copies (oldest first), then
        move the oldest studies at rest down early, until under the low watermark."""
        notes = []
        for tier in LOCAL_TIERS:
            hi = getattr(self._lc, f"{tier}_high_watermark")
            lo = getattr(self._lc, f"{tier}_low_watermark")
            used = self._fs_used(tier)
            if used <= hi:
                self._metrics.storage_pressure.labels(tier).set(0)
                continue
            freed = 0
            for step in (self._drop_archived_copies, self._move_down_early):
                while self._fs_used(tier) > lo:
                    n = step(tier)
                    freed += n
                    if n == 0:
                        break
            still = self._fs_used(tier) > hi
            self._metrics.storage_pressure.labels(tier).set(1 if still else 0)
            if still:
                log.error(
                    "storage pressure: nothing more can safely go from this tier",
                    extra={"tier": tier, "used": round(self._fs_used(tier), 3)},
                )
            notes.append(f"{tier} {used:.0%} -> {self._fs_used(tier):.0%} ({freed} instances)")
        return "; ".join(notes) or "none"

    def _fs_used(self, tier: str) -> float:
        du = shutil.disk_usage(self.tiers.root(tier))
        return (du.total - du.free) / du.total if du.total else 0.0

    def _drop_archived_copies(self, tier: str) -> int:
        with self._store.read() as conn:
            rows = _placements(
                conn,
                f"i.tier = ? AND i.archive_sha256 IS NOT NULL AND s.state IN {AT_REST} "
                f"ORDER BY i.archived_at LIMIT {int(self._lc.batch_instances)}",
                (tier,),
            )
        return self._drop(rows)

    def _move_down_early(self, tier: str) -> int:
        dst = NEXT_TIER.get(tier)
        if dst is None:
            return 0
        same_fs = self.tiers.root(tier).stat().st_dev == self.tiers.root(dst).stat().st_dev
        if same_fs and dst != "cold":  # it would free nothing here
            return 0
        studies = self._at_rest_studies(tier, self._clock.now(), 50)
        rows = self._study_rows(studies, tier)[: self._lc.batch_instances]
        return self._move(rows, dst)

    # -- archive and retention -----------------------------------------------------------

    def _archive_candidates(self) -> list[Placement]:
        now, lc = self._clock.now(), self._lc
        by_mod = [(m.upper(), float(d) * DAY) for m, d in lc.cold_days_by_modality.items()]
        days = (
            ("CASE upper(s.modality) " + "WHEN ? THEN ? " * len(by_mod) + "ELSE ? END")
            if by_mod
            else "?"
        )
        params: list[Any] = [now, *(x for pair in by_mod for x in pair), lc.cold_days * DAY]
        with self._store.read() as conn:
            return _placements(
                conn,
                f"i.tier = 'cold' AND i.archive_sha256 IS NULL AND s.state IN {AT_REST} "
                f"AND {_age_sql()} < ? - ({days}) AND {_results_at_hub_sql()} AND NOT EXISTS "
                "(SELECT 1 FROM instances h WHERE h.study_uid = s.study_uid AND h.tier IN "
                f"('hot', 'warm')) ORDER BY {_age_sql()} LIMIT {int(lc.batch_instances)}",
                params,
            )

    async def archive_due(self) -> tuple[int, int]:
        """Upload the cold instances of studies past their archive age to the hub archive
        (resumable); record each confirmed hash. Returns (instances, bytes)."""
        if self._archive is None or not self._lc.archive:
            return 0, 0
        n = nbytes = 0
        for p in await asyncio.to_thread(self._archive_candidates):
            try:
                blob = await asyncio.to_thread(self.tiers.locate("cold", p.path).read_bytes)
            except FileNotFoundError:
                continue  # moved meanwhile
            sha = hashlib.sha256(blob).hexdigest()
            await self._archive.archive_put(sha, blob)  # returns once the hub checked it
            ok = self._store.writer.call(
                partial(_mark_archived, p=p, sha=sha, now=self._clock.now())
            )
            if ok:
                n += 1
                nbytes += len(blob)
        if n:
            log.info("instances archived at the hub", extra={"instances": n, "bytes": nbytes})
            await asyncio.to_thread(self.drop_expired_copies)
        return n, nbytes

    def drop_expired_copies(self) -> int:
        """Delete local copies the hub confirmed ``keep_days_after_archive`` ago (a restored
        study's copies stay ``hot_days`` after its restore)."""
        cutoff = self._clock.now() - self._lc.keep_days_after_archive * DAY
        with self._store.read() as conn:
            rows = _placements(
                conn,
                f"i.tier IN ('hot', 'warm', 'cold') AND i.archive_sha256 IS NOT NULL AND "
                f"i.archived_at <= ? AND s.state IN {AT_REST} AND coalesce(s.restored_at, 0) "
                f"< ? LIMIT {int(self._lc.batch_instances)}",
                (cutoff, self._clock.now() - self._lc.hot_days * DAY),
            )
        return self._drop(rows)

    def _drop(self, rows: list[Placement]) -> int:
        if not rows:
            return 0
        ids = {p.id for p in rows}
        studies = {
            r[1] for r in self._store.query("SELECT id, study_uid FROM instances") if r[0] in ids
        }
        n = 0
        for tier in LOCAL_TIERS:
            n += self._move([p for p in rows if p.tier == tier], ARCHIVED)
        for uid in studies:
            self._store.writer.call(partial(self._tombstone, study_uid=uid))
        return n

    def _tombstone(self, conn: sqlite3.Connection, *, study_uid: str) -> None:
        """When a study has no local copy left: a tombstone record for the hub."""
        left = conn.execute(
            "SELECT count(*) FROM instances WHERE study_uid = ? AND tier != ?",
            (study_uid, ARCHIVED),
        ).fetchone()[0]
        if left or self._hlc is None:
            return
        n, size = conn.execute(
            "SELECT count(*), coalesce(sum(size_bytes), 0) FROM instances WHERE study_uid = ?",
            (study_uid,),
        ).fetchone()
        hlc = self._hlc.now()
        enqueue(
            conn,
            key=f"archive/{study_uid}",
            type=RecordType.TOMBSTONE,
            lane=Lane.BATCH,
            payload={
                "study_uid": study_uid,
                "instances": n,
                "bytes": size,
                "local_copy": "deleted after the hub archive confirmed every instance",
                "at": self._clock.now(),
            },
            hlc=hlc,
            now=self._clock.now(),
        )

    # -- restore -------------------------------------------------------------------------

    def request_restore(self, study_uid: str, *, by: str) -> None:
        request_restore(self._store, study_uid, by=by, now=self._clock.now())

    async def process_restores(self) -> int:
        """Bring every requested study back to hot (from warm/cold, or from the hub)."""
        done = 0
        for (uid,) in self._store.query(
            "SELECT study_uid FROM restore_requests WHERE finished_at IS NULL"
        ):
            try:
                await self.restore(uid)
                error = None
                done += 1
            except EdgeError as exc:
                error = str(exc)
                log.error("study restore failed", extra={"study_uid": uid, "error": error})
            self._store.writer.call(
                partial(_restore_done, study_uid=uid, now=self._clock.now(), error=error)
            )
        return done

    async def restore(self, study_uid: str) -> int:
        """Every instance of the study on hot again; returns instances moved."""
        moved = 0
        for tier in ("warm", "cold", ARCHIVED):
            while True:
                with self._store.read() as conn:
                    rows = _placements(
                        conn, "i.study_uid = ? AND i.tier = ? LIMIT 50", (study_uid, tier)
                    )
                if not rows:
                    break
                blobs: dict[str, bytes] = {}
                if tier == ARCHIVED:
                    if self._archive is None:
                        raise EdgeError("the study is archived and this site has no hub")
                    for p in rows:
                        blobs[p.path] = await self._archive.archive_get(p.path)
                n = await asyncio.to_thread(
                    self._move, rows, "hot", fetch_archived=partial(_blob_of, blobs)
                )
                if n == 0:
                    raise EdgeError(f"could not restore {tier} instances of {study_uid}")
                moved += n
        self._store.writer.call(
            lambda c: c.execute(
                "UPDATE studies SET restored_at = ? WHERE study_uid = ?",
                (self._clock.now(), study_uid),
            )
        )
        log.info("study restored to hot", extra={"study_uid": study_uid, "instances": moved})
        return moved

    # -- integrity and upkeep ------------------------------------------------------------

    def _report_corrupt(self, instance_id: int, tier: str, path: str, problem: str) -> None:
        self._store.writer.call(
            lambda c: c.execute(
                "INSERT INTO integrity_reports (at, instance_id, tier, path, problem) "
                "VALUES (?, ?, ?, ?, ?)",
                (self._clock.now(), instance_id, tier, path, problem[:1000]),
            )
        )
        self._metrics.storage_corrupt.labels(tier).inc()
        log.error(
            "stored instance is corrupt",
            extra={"instance_id": instance_id, "tier": tier, "path": path, "problem": problem},
        )

    def integrity_sample(self) -> tuple[int, int]:
        """Re-hash a random sample of stored files; returns (checked, corrupt)."""
        with self._store.read() as conn:
            rows = _placements(
                conn,
                "i.tier IN ('hot', 'warm', 'cold') ORDER BY random() LIMIT ?",
                (self._lc.integrity_sample,),
            )
        bad = 0
        for p in rows:
            try:
                self.tiers.read_verified(p)
            except FileNotFoundError:
                continue  # moved since the sample was drawn
            except EdgeError as exc:
                bad += 1
                self._report_corrupt(p.id, p.tier, p.path, str(exc))
        return len(rows), bad

    def maintenance(self) -> str:
        """WAL checkpoint; VACUUM when the agent is idle and a fifth of the file is free."""
        db = Path(self._cfg.storage.data_dir) / self._cfg.storage.database
        conn = sqlite3.connect(db, isolation_level=None, timeout=30)
        try:
            busy, log_frames, done = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            vacuumed = False
            if pages and free / pages > 0.2 and self._is_idle():
                conn.execute("VACUUM")
                vacuumed = True
        finally:
            conn.close()
        if log_frames <= 0:
            wal = "write-ahead log empty"
        else:
            wal = f"{done} of {log_frames} write-ahead log page(s) written back"
            if busy:
                wal += " (a reader held the rest: next time)"
        return wal + ("; database compacted (VACUUM)" if vacuumed else "")

    # -- status --------------------------------------------------------------------------

    def usage(self) -> list[TierUsage]:
        out = []
        rows = {
            r[0]: (r[1], r[2], r[3])
            for r in self._store.query(
                "SELECT tier, count(*), coalesce(sum(size_bytes), 0), min(received_at) "
                "FROM instances GROUP BY tier"
            )
        }
        for tier in LOCAL_TIERS:
            root = self.tiers.root(tier)
            root.mkdir(parents=True, exist_ok=True)
            du = shutil.disk_usage(root)
            n, size, oldest = rows.get(tier, (0, 0, None))
            out.append(
                TierUsage(
                    tier,
                    root,
                    int(n),
                    int(size),
                    (du.total - du.free) / du.total if du.total else 0.0,
                    du.free,
                    oldest,
                )
            )
        return out

    def status(self) -> dict[str, Any]:
        tiers = self.usage()
        (archived,) = self._store.query(
            "SELECT count(*) FROM instances WHERE tier = ?", (ARCHIVED,)
        )[0]
        pending = len(self._archive_candidates()) if self._lc.archive else 0
        jobs = {r["name"]: dict(r) for r in self._store.query("SELECT * FROM lifecycle_jobs")}
        restores = [dict(r) for r in self._store.query("SELECT * FROM restore_requests")]
        corrupt = self._store.query("SELECT count(*) FROM integrity_reports")[0][0]
        return {
            "tiers": [t.__dict__ | {"root": str(t.root)} for t in tiers],
            "archived_instances": archived,
            "pending_archive": pending,
            "archive_enabled": bool(self._lc.archive and self._archive is not None),
            "jobs": jobs,
            "restores": restores,
            "integrity_reports": corrupt,
        }

    def update_metrics(self) -> None:
        now = self._clock.now()
        for t in self.usage():
            self._metrics.storage_bytes.labels(t.tier).set(t.bytes)
            self._metrics.storage_used_ratio.labels(t.tier).set(t.fs_used)
            age = max(0.0, now - t.oldest_received_at) if t.oldest_received_at else 0.0
            self._metrics.storage_oldest_seconds.labels(t.tier).set(age)
        pending = len(self._archive_candidates()) if self._lc.archive else 0
        self._metrics.storage_pending_archive.set(pending)

    def summary(self) -> dict[str, Any]:
        """For heartbeats: per tier instances, bytes and filesystem use."""
        return {
            t.tier: {"instances": t.instances, "bytes": t.bytes, "fs_used": round(t.fs_used, 3)}
            for t in self.usage()
        }


def _blob_of(blobs: dict[str, bytes], p: Placement) -> bytes:
    return blobs[p.path]


def _schedule(conn: sqlite3.Connection, *, name: str, next_at: float) -> None:
    conn.execute(
        "INSERT INTO lifecycle_jobs (name, next_run_at) VALUES (?, ?) "
        "ON CONFLICT(name) DO UPDATE SET next_run_at = excluded.next_run_at",
        (name, next_at),
    )


def _started(conn: sqlite3.Connection, *, name: str, now: float) -> None:
    conn.execute(
        "INSERT INTO lifecycle_jobs (name, last_started_at) VALUES (?, ?) "
        "ON CONFLICT(name) DO UPDATE SET last_started_at = excluded.last_started_at",
        (name, now),
    )


def _finished(
    conn: sqlite3.Connection, *, name: str, now: float, status: str, detail: str, next_at: float
) -> None:
    conn.execute(
        "UPDATE lifecycle_jobs SET last_finished_at = ?, last_status = ?, last_detail = ?, "
        "next_run_at = ? WHERE name = ?",
        (now, status, detail[:1000], next_at, name),
    )


def _mark_archived(conn: sqlite3.Connection, *, p: Placement, sha: str, now: float) -> bool:
    cur = conn.execute(
        "UPDATE instances SET archive_sha256 = ?, archived_at = ? WHERE id = ? AND tier = ? "
        "AND path = ?",
        (sha, now, p.id, p.tier, p.path),
    )
    return cur.rowcount == 1


def _request_restore(conn: sqlite3.Connection, *, study_uid: str, by: str, now: float) -> None:
    conn.execute(
        "INSERT INTO restore_requests (study_uid, requested_at, requested_by) VALUES (?, ?, ?) "
        "ON CONFLICT(study_uid) DO UPDATE SET requested_at = excluded.requested_at, "
        "requested_by = excluded.requested_by, finished_at = NULL, error = NULL",
        (study_uid, now, by),
    )


def request_restore(store: Store, study_uid: str, *, by: str, now: float) -> None:
    """Ask for ``study_uid`` to be brought back to hot (the lifecycle's restore job does it;
    asking again resets a finished or failed request). Raises EdgeError if no such study."""
    if not store.query("SELECT 1 FROM studies WHERE study_uid = ?", (study_uid,)):
        raise EdgeError(f"no study {study_uid}")
    store.writer.call(partial(_request_restore, study_uid=study_uid, by=by, now=now))


def restore_outcome(store: Store, study_uid: str) -> tuple[bool, str | None]:
    """(finished, error) of the restore request for ``study_uid``."""
    row = store.query(
        "SELECT finished_at, error FROM restore_requests WHERE study_uid = ?", (study_uid,)
    )[0]
    return row[0] is not None, row[1]


def _restore_done(
    conn: sqlite3.Connection, *, study_uid: str, now: float, error: str | None
) -> None:
    conn.execute(
        "UPDATE restore_requests SET finished_at = ?, error = ? WHERE study_uid = ?",
        (now, error, study_uid),
    )
