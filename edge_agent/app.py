"""Composition root: builds every part from config, recovers after a crash, starts and stops.

Startup order: folders -> store (migrations) -> crash recovery -> listener -> workers.
Shutdown (SIGTERM/SIGINT): stop accepting associations, let in-flight ones finish (up to
``dicom.shutdown_grace_s``), stop workers, drain the store writer, write the clean-stop marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import ssl
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from aiohttp import web
from prometheus_client import generate_latest

from edge_agent import compose, status
from edge_agent.clock import Clock, SystemClock
from edge_agent.config import Config
from edge_agent.dicom_listener import DicomListener
from edge_agent.errors import EdgeError
from edge_agent.inference.worker import InferenceWorker
from edge_agent.lifecycle.tiers import Tiers
from edge_agent.metrics import Metrics, create_metrics
from edge_agent.perms import harden, private_umask
from edge_agent.results.forward import Forwarder
from edge_agent.store import Spool
from edge_agent.store.journal import IngestJournal
from edge_agent.store.lock import DataDirLock
from edge_agent.studies.ingest import Ingestor
from edge_agent.studies.worker import AssemblyWorker
from edge_agent.sync.model_updates import ModelUpdater, WatchSettings
from edge_agent.sync.uplink import Uplink, UplinkSettings
from edge_agent.times import SiteTime
from edge_agent.web.app import WebDeps
from edge_agent.web.app import create_app as create_web_app
from hub_protocol.releases import key_id, load_public_key

log = logging.getLogger(__name__)

CLEAN_STOP_MARKER = "clean-stop"
STATUS_NONE = -1  # quarantine rows for data that was never answered at all


@dataclass(frozen=True)
class RecoveryReport:
    clean_stop: bool
    partials_removed: int
    orphans_quarantined: int
    missing_files: int
    journal_replayed: int = 0


def prepare_dirs(cfg: Config) -> Spool:
    """Create the data folders (idempotent, 0700), make what they hold private to this user
    (:mod:`edge_agent.perms`) and return the hot spool."""
    s = cfg.storage
    folders = ("hot_dir", "warm_dir", "cold_dir", "quarantine_dir")
    with private_umask():
        for name in folders:
            s.path(name).mkdir(parents=True, exist_ok=True)
    harden([Path(s.data_dir), *(s.path(n) for n in (*folders, "journal_dir"))])
    spool = Spool(s.path("hot_dir"), fsync=s.fsync)
    spool.prepare()
    return spool


def _insert_orphan(conn: sqlite3.Connection, *, row: tuple[object, ...]) -> None:
    conn.execute(
        "INSERT INTO quarantine (received_at, status, reason, sha256, size_bytes, path) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        row,
    )


class EdgeApp:
    """The running agent. Use :meth:`open`, then :meth:`serve` (async) or the parts directly."""

    def __init__(
        self, cfg: Config, *, clock: Clock | None = None, metrics: Metrics | None = None
    ) -> None:
        self.cfg = cfg
        self.clock: Clock = clock or SystemClock()
        self.metrics = metrics or create_metrics()
        s = cfg.storage
        self.data_dir = Path(s.data_dir)
        # before any recovery, migration or port binding: a second agent on this folder
        # must touch nothing
        self.lock = DataDirLock.acquire(self.data_dir, what="edge-agent run")
        try:
            self.spool = prepare_dirs(cfg)
            self.store = compose.open_store(cfg, must_exist=False, fsync_dirs=s.fsync)
        except BaseException:
            self.lock.release()
            raise
        journal = (
            IngestJournal(
                s.path("journal_dir"),
                segment_bytes=s.journal_segment_mb * 2**20,
                fsync=s.fsync,
                max_pending_bytes=s.journal_max_pending_mb * 2**20,
            )
            if s.journal
            else None
        )
        self.ingestor = Ingestor(
            store=self.store,
            spool=self.spool,
            quarantine_dir=s.path("quarantine_dir"),
            clock=self.clock,
            metrics=self.metrics,
            min_free_bytes=s.min_free_mb * 2**20,
            max_depth=cfg.dicom.max_sequence_depth,
            max_inflated_bytes=cfg.dicom.max_inflated_mb * 2**20,
            journal=journal,
            max_record_bytes=s.journal_max_record_mb * 2**20,
            fsync=s.fsync,
        )
        self.recovery = self._recover()
        self.ingestor.start()
        self.listener = DicomListener(
            cfg.dicom,
            ingestor=self.ingestor,
            store=self.store,
            clock=self.clock,
            metrics=self.metrics,
            spill_dir=self.spool.tmp,
        )
        self.assembly = AssemblyWorker(
            cfg.studies, store=self.store, clock=self.clock, metrics=self.metrics
        )
        self.registry = compose.registry(cfg, self.store, self.clock)
        self.hlc = compose.hybrid_clock(cfg, self.store, self.clock)
        self.inference = InferenceWorker(
            cfg,
            store=self.store,
            registry=self.registry,
            clock=self.clock,
            metrics=self.metrics,
            hlc=self.hlc,
        )
        self.inference.recover()
        self.uplink: Uplink | None = None
        self.updater: ModelUpdater | None = None
        self.hub_client = client = compose.hub_client(cfg)
        if client is not None:
            sy = cfg.sync
            self.uplink = Uplink(
                client,
                store=self.store,
                clock=self.clock,
                settings=UplinkSettings(
                    max_records=sy.batch_max_records,
                    max_bytes=sy.batch_max_kb * 1024,
                    retry_initial_s=sy.retry_initial_s,
                    retry_max_s=sy.retry_max_s,
                    heartbeat_interval_s=sy.heartbeat_interval_s,
                ),
                metrics=self.metrics,
            )
            if sy.trusted_keys:  # model releases from ops, verified against pinned keys
                keys = [load_public_key(Path(k)) for k in sy.trusted_keys]
                inf = cfg.inference
                self.updater = ModelUpdater(
                    store=self.store,
                    registry=self.registry,
                    source=client,
                    trusted={key_id(k): k for k in keys},
                    threshold=sy.release_threshold,
                    staging=cfg.models_dir() / ".downloads",
                    clock=self.clock,
                    watch=WatchSettings(
                        max_error_rate=inf.rollback_error_rate,
                        window_jobs=inf.rollback_window_jobs,
                        min_jobs=inf.rollback_min_jobs,
                    ),
                    metrics=self.metrics,
                )
                self.uplink.after_pull.append(self.updater.check)
        self.tiers = Tiers(cfg, self.store)  # its crash recovery runs under the jobs' lock
        self.inference.tiers = self.tiers
        self.lifecycle = compose.lifecycle(
            cfg,
            self.store,
            clock=self.clock,
            metrics=self.metrics,
            archive=self.hub_client,
            hlc=self.hlc,
            tiers=self.tiers,
            is_idle=self._idle,
        )
        self.accounts = compose.accounts(cfg, self.store, self.metrics)
        self.web_port: int | None = None
        self.forwarder = Forwarder(
            cfg.results,
            calling_ae=cfg.results.calling_ae_title or cfg.dicom.ae_title,
            store=self.store,
            data_dir=self.data_dir,
            clock=self.clock,
        )

    def _recover(self) -> RecoveryReport:
        """Undo what a crash left half-done. Nothing acknowledged is ever touched: a file that
        has no committed row was never acknowledged, so it is moved to quarantine, not used."""
        marker = self.data_dir / CLEAN_STOP_MARKER
        clean = marker.exists()
        with contextlib.suppress(FileNotFoundError):
            marker.unlink()
        partials = self.spool.remove_partials()
        # journaled (acknowledged) instances first: their files may be among the "orphans"
        replayed = self.ingestor.recover()
        orphans = missing = 0
        if not clean:
            known = {
                str(r[0]) for r in self.store.query("SELECT path FROM instances WHERE tier = 'hot'")
            }
            qdir = self.cfg.storage.path("quarantine_dir") / "orphans"
            for path in self.spool.iter_objects():
                rel = path.relative_to(self.spool.root).as_posix()
                if rel in known:
                    continue
                qdir.mkdir(parents=True, exist_ok=True)
                dest = qdir / path.name
                path.replace(dest)
                row = (
                    self.clock.now(),
                    STATUS_NONE,
                    "orphan: written before a crash but never committed or acknowledged",
                    dest.stem,
                    dest.stat().st_size,
                    f"orphans/{dest.name}",
                )
                self.store.writer.call(partial(_insert_orphan, row=row))
                orphans += 1
            for r in self.store.query("SELECT path FROM instances WHERE tier = 'hot'"):
                if not (self.spool.root / str(r[0])).exists():
                    missing += 1
        report = RecoveryReport(clean, partials, orphans, missing, replayed)
        level = logging.INFO if clean and not missing else logging.WARNING
        log.log(
            level,
            "startup recovery",
            extra={
                "clean_stop": clean,
                "partials_removed": partials,
                "orphans_quarantined": orphans,
                "missing_files": missing,
                "journal_replayed": replayed,
            },
        )
        if missing:
            log.error(
                "instances in the store have no file on the hot tier", extra={"count": missing}
            )
        return report

    def web_deps(self) -> WebDeps:
        """What the web app needs, bound to this agent."""
        up = self.uplink
        return WebDeps(
            web=self.cfg.web,
            data_dir=Path(self.cfg.storage.data_dir),
            site=self.cfg.dicom.ae_title,
            times=SiteTime.named(self.cfg.site.time_zone),
            store=self.store,
            accounts=self.accounts,
            clock=self.clock,
            metrics_text=lambda: generate_latest(self.metrics.registry),
            health=self.health,
            ready=self.ready,
            read_instance=self.tiers.read,
            storage_status=self.lifecycle.status,
            request_restore=lambda uid, by: self.lifecycle.request_restore(uid, by=by),
            review_hook=up.wake if up is not None else None,
            hlc=self.hlc,
            hub=self.hub_client,
        )

    def ready(self) -> dict[str, str]:
        """Readiness checks: name -> "" when fine, else why not."""
        checks = {"store": "", "listener": "", "models": ""}
        try:
            self.store.writer.call(lambda c: c.execute("SELECT 1"), timeout=5)
        except Exception as exc:  # any failure means not ready; the reason is shown
            checks["store"] = f"store not writable: {exc}"
        indexer = self.ingestor.indexer
        if indexer is not None and indexer.error and not checks["store"]:
            checks["store"] = f"journaled instances cannot be indexed: {indexer.error}"
        if not self.listener.accepting:
            checks["listener"] = "DICOM listener not accepting"
        if self.cfg.inference.enabled and not self.registry.active():
            checks["models"] = "no active model installed"
        return checks

    def _idle(self) -> bool:
        """No association open and no inference job running (for database upkeep)."""
        running = self.store.query("SELECT count(*) FROM inference_jobs WHERE state = 'RUNNING'")
        return self.listener.active_associations == 0 and running[0][0] == 0

    def health(self) -> dict[str, object]:
        """The summary sent in heartbeats (and the base of the web's node status)."""
        with self.store.read() as conn:
            return status.health_summary(
                conn,
                now=self.clock.now(),
                devices=self.inference.devices,
                storage=self.lifecycle.summary(),
            )

    def close(self) -> None:
        """Drain the writer, close the store, mark a clean stop and release the folder."""
        try:
            self.ingestor.close()
            self.store.close()
            (self.data_dir / CLEAN_STOP_MARKER).write_text(
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) + "\n"
            )
        finally:
            self.lock.release()

    async def _start_web(self) -> web.AppRunner:
        w = self.cfg.web
        runner = web.AppRunner(create_web_app(self.web_deps()), access_log=None)
        await runner.setup()
        ssl_ctx = None
        if w.tls_cert:
            ssl_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            ssl_ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            ssl_ctx.load_cert_chain(w.tls_cert, w.tls_key)
        site = web.TCPSite(runner, w.bind_address, w.port, ssl_context=ssl_ctx)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise EdgeError(
                f"cannot serve the web UI on {w.bind_address}:{w.port}: {exc.strerror or exc}"
            ) from exc
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        self.web_port = int(sockets[0].getsockname()[1]) if sockets else w.port
        return runner

    async def serve(self, stop: asyncio.Event) -> None:
        """Run until ``stop`` is set, then shut down cleanly.

        Raises :class:`EdgeError` if the DICOM port cannot be bound (the store is closed).
        """
        try:
            self.listener.start()
        except OSError as exc:
            await asyncio.to_thread(self.close)
            d = self.cfg.dicom
            raise EdgeError(
                f"cannot listen on {d.bind_address}:{d.port}: {exc.strerror or exc}"
            ) from exc
        worker = asyncio.create_task(self.assembly.run(stop), name="assembly")
        inference = (
            asyncio.create_task(self.inference.run(stop), name="inference")
            if self.cfg.inference.enabled
            else None
        )
        forwarder = asyncio.create_task(self.forwarder.run(stop), name="forwarder")
        lifecycle = (
            asyncio.create_task(self.lifecycle.run(stop), name="lifecycle")
            if self.cfg.lifecycle.enabled
            else None
        )
        uplink = None
        if self.uplink is not None:
            loop, up = asyncio.get_running_loop(), self.uplink

            def wake_uplink() -> None:  # called from an inference thread
                loop.call_soon_threadsafe(up.wake)

            self.inference.on_result = wake_uplink
            uplink = asyncio.create_task(up.run(stop, health=self.health), name="uplink")
        watch = (
            asyncio.create_task(
                self.updater.run_watch(stop, self.cfg.inference.check_interval_s), name="watch"
            )
            if self.updater is not None
            else None
        )
        runner = await self._start_web() if self.cfg.web.enabled else None
        log.info("edge agent ready", extra={"port": self.listener.port, "web_port": self.web_port})
        try:
            await stop.wait()
        finally:
            log.info("shutting down: refusing new associations, finishing in-flight ones")
            aborted = await asyncio.to_thread(self.listener.stop)
            stop.set()
            if runner is not None:
                await runner.cleanup()
            await worker
            if inference is not None:
                await inference
            await forwarder
            if lifecycle is not None:
                await lifecycle
            if uplink is not None:
                await uplink
            if watch is not None:
                await watch
            await asyncio.to_thread(self.inference.close)
            await asyncio.to_thread(self.close)
            log.info("edge agent stopped", extra={"aborted_associations": aborted})


def run(cfg: Config) -> int:
    """Run the agent in the foreground until SIGTERM/SIGINT. Returns the exit code."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        app = await asyncio.to_thread(EdgeApp, cfg)
        await app.serve(stop)

    with private_umask():  # every file the agent writes holds PHI or secrets
        asyncio.run(main())
    return 0
