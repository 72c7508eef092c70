"""The inference worker: COMPLETE studies -> jobs (routing) -> results.

Scheduling and job execution are separate loops. Each inference device (a GPU id, or the CPU)
has one executor thread, so one model call runs per device at a time; ONNX Runtime sessions
are cached per (model, version, device). Jobs are claimed in a transaction (attempts + 1)
before they run, so a crash mid-job is seen at restart (:meth:`recover`) and the job retried,
until it has crashed the runner ``max_attempts`` times. Long work (DICOM decoding,
preprocessing, inference) never holds a write transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
from pydicom.dataset import Dataset

from edge_agent.clock import Clock
from edge_agent.config import Config
from edge_agent.errors import OutOfResources, PermanentError, UntrustedError
from edge_agent.inference.models import Job, Stage
from edge_agent.inference.postprocess import classification_findings, segmentation_findings
from edge_agent.inference.preprocess import frames, preprocess_frame
from edge_agent.inference.registry import InstalledModel, Registry, RegistryError
from edge_agent.inference.routing import SeriesFacts, matches
from edge_agent.inference.runner import PROVIDERS, ModelRunner
from edge_agent.inference.shadow import score as shadow_score
from edge_agent.inference.store import (
    claim_job,
    complete_studies,
    fail_job,
    finish_job,
    record_run,
    recover_jobs,
    schedule_study,
    series_instances,
)
from edge_agent.lifecycle.tiers import Tiers
from edge_agent.metrics import Metrics
from edge_agent.results.commit import commit_result
from edge_agent.results.dicom import key_images, make_kos, make_seg, make_sr
from edge_agent.results.forward import ResultObject, write_object
from edge_agent.results.models import Result, uuid7
from edge_agent.results.store import current_object_path
from edge_agent.store import Store
from edge_agent.studies.store import series_for_routing, series_sop_classes
from edge_agent.sync.phi import Pseudonymiser, load_or_create_key
from hub_protocol import HybridClock

log = logging.getLogger(__name__)

CPU_DEVICE = -1


@dataclass
class Progress:
    """Where a running job is (read by the caller when it fails)."""

    stage: Stage = Stage.MODEL


class InferenceWorker:
    def __init__(
        self,
        cfg: Config,
        *,
        store: Store,
        registry: Registry,
        clock: Clock,
        metrics: Metrics,
        hlc: HybridClock | None = None,
    ) -> None:
        self._hlc = hlc
        self.tiers: Tiers | None = None  # set by the app: reads from every tier
        self.on_result: Callable[[], None] | None = None  # e.g. wake the uplink
        self.phi = (
            Pseudonymiser(
                load_or_create_key(cfg.sync.secret_path(cfg.storage.data_dir)),
                cfg.sync.pseudonymise_fields,
            )
            if cfg.sync.pseudonymise
            else None
        )
        self._cfg = cfg
        self._inf = cfg.inference
        self._store = store
        self._registry = registry
        self._clock = clock
        self._metrics = metrics
        available = set(ort.get_available_providers())
        gpu = any(PROVIDERS[p] in available for p in self._inf.providers if p != "cpu")
        self.devices: tuple[int, ...] = self._inf.device_ids if gpu else (CPU_DEVICE,)
        self._executors = {
            d: ThreadPoolExecutor(1, thread_name_prefix=f"inference-{d}") for d in self.devices
        }
        self._runners: dict[tuple[str, str, int], ModelRunner] = {}

    # -- scheduling -------------------------------------------------------------------------

    def recover(self) -> tuple[int, int]:
        """Requeue or fail jobs left RUNNING by a crash."""
        requeued, failed = self._store.writer.call(
            partial(recover_jobs, max_attempts=self._inf.max_attempts, now=self._clock.now())
        )
        if requeued or failed:
            log.warning(
                "inference jobs recovered after a crash",
                extra={"requeued": requeued, "failed": failed},
            )
        return requeued, failed

    def _facts(self, study_uid: str) -> list[SeriesFacts]:
        with self._store.read() as conn:
            out = []
            for s in series_for_routing(conn, study_uid):
                classes = series_sop_classes(conn, s["series_uid"])
                first = series_instances(conn, s["series_uid"])[:1]
                rows = cols = 0
                if first:
                    hdr = pydicom.dcmread(
                        self._source(first[0][1], first[0][2]),
                        stop_before_pixels=True,
                        specific_tags=["Rows", "Columns"],
                    )
                    rows, cols = int(hdr.get("Rows", 0) or 0), int(hdr.get("Columns", 0) or 0)
                out.append(
                    SeriesFacts(
                        series_uid=s["series_uid"],
                        modality=s["modality"],
                        body_part=s["body_part"],
                        sop_classes=classes,
                        series_description=s["description"],
                        rows=rows,
                        columns=cols,
                        slices=int(s["instance_count"]),
                    )
                )
        return out

    def _source(self, tier: str, relpath: str) -> Path | io.BytesIO:
        """Where to read an instance from, whatever tier it is on."""
        if tier in ("hot", "warm"):
            return self._cfg.storage.path(f"{tier}_dir") / relpath
        if self.tiers is None:
            raise RegistryError(f"instance on the {tier} tier and no tier reader configured")
        return io.BytesIO(self.tiers.read(tier, relpath))  # cold: decrypted; archived: error

    def schedule(self) -> int:
        """Create jobs for every COMPLETE study; returns how many studies were scheduled."""
        with self._store.read() as conn:
            waiting = complete_studies(conn)
        if not waiting:
            return 0
        # Route on the manifests recorded at install; the files are verified when a job runs,
        # so a package damaged on disk gives FAILED jobs with the reason, not silence.
        active = [(m, m.manifest()) for m in self._registry.active()]
        done = 0
        for study_uid, round_, only in waiting:
            jobs = [
                (facts.series_uid, m.name, m.version)
                for facts in self._facts(study_uid)
                for m, manifest in active
                if matches(manifest.routing, facts) and only in (None, m.name)
            ]
            if self._store.writer.call(
                partial(
                    schedule_study,
                    study_uid=study_uid,
                    round_=round_,
                    jobs=jobs,
                    now=self._clock.now(),
                )
            ):
                done += 1
                log.info(
                    "study scheduled for inference",
                    extra={"study_uid": study_uid, "jobs": len(jobs)},
                )
        return done

    # -- execution ---------------------------------------------------------------------------

    def _runner(self, model: InstalledModel, device: int) -> ModelRunner:
        key = (model.name, model.version, device)
        runner = self._runners.get(key)
        if runner is None:
            providers = ["cpu"] if device == CPU_DEVICE else list(self._inf.providers)
            runner = ModelRunner(
                self._registry.load(model),
                providers=providers,
                device_id=max(device, 0),
                max_batch_size=self._inf.max_batch_size,
                intra_op_threads=self._inf.intra_op_threads,
            )
            self._runners[key] = runner
        return runner

    def _load_series(self, series_uid: str) -> list[Dataset]:
        with self._store.read() as conn:
            rows = series_instances(conn, series_uid)
        dss = [pydicom.dcmread(self._source(tier, path)) for _, tier, path in rows]

        def order(ds: Dataset) -> tuple[float, float]:
            pos = ds.get("ImagePositionPatient")
            z = float(pos[2]) if pos is not None and len(pos) == 3 else 0.0
            try:
                n = float(ds.get("InstanceNumber", 0) or 0)
            except (TypeError, ValueError):
                n = 0.0
            return (z, n)

        return sorted(dss, key=order)

    def execute(
        self, job: Job, device: int, progress: Progress | None = None
    ) -> tuple[Result, list[ResultObject], tuple[list[np.ndarray], np.ndarray]]:
        """Run one claimed job; raises on failure (classified by the caller), with
        ``progress.stage`` saying where. Also returns the model's (inputs, output), for a
        shadow version to be compared against."""
        p = progress or Progress()
        p.stage = Stage.MODEL
        model = self._registry.get(job.model_name, job.model_version)
        if model is None:
            raise RegistryError(f"{job.model_name} {job.model_version} is no longer installed")
        runner = self._runner(model, device)
        manifest = runner.manifest
        t0 = time.perf_counter()
        dss: list[Dataset] = []
        items: list[np.ndarray] = []
        p.stage = Stage.READ
        series = self._load_series(job.series_uid)
        p.stage = Stage.PREPROCESS
        for ds in series:
            for frame in frames(ds):
                dss.append(ds)
                items.append(preprocess_frame(ds, frame, manifest.preprocessing))
        t1 = time.perf_counter()
        p.stage = Stage.INFERENCE
        out, _ = runner.infer(items)
        t2 = time.perf_counter()
        p.stage = Stage.POSTPROCESS
        if manifest.task == "segmentation":
            f = segmentation_findings(manifest, dss, items, out)
        else:
            f = classification_findings(manifest, dss, out)
        now = self._clock.now()
        result = Result(
            result_id=uuid7(now),
            job_id=job.id,
            study_uid=job.study_uid,
            series_uid=job.series_uid,
            model_name=model.name,
            model_version=model.version,
            model_sha256=model.model_sha256,
            provider=runner.provider,
            task=manifest.task,
            findings=f.findings,
            critical=f.critical,
            instances=len(dss),
            preprocess_ms=(t1 - t0) * 1000,
            inference_ms=(t2 - t1) * 1000,
            created_at=now,
        )
        objects: list[ResultObject] = []
        p.stage = Stage.ENCODE
        if self._cfg.results.dicom_outputs:
            data_dir = Path(self._cfg.storage.data_dir)
            single = len({id(d) for d in dss}) == len(dss)  # no multi-frame sources
            seg: Dataset | None = None
            if manifest.task == "segmentation" and single:
                masks = out.reshape(out.shape[0], out.shape[-2], out.shape[-1])
                binary = masks >= manifest.output.threshold
                if binary.any() and masks.shape[1:] == (int(dss[0].Rows), int(dss[0].Columns)):
                    seg = make_seg(result, dss, binary, manifest.output.codes)
                    objects.append(write_object(data_dir, result.result_id, "SEG", seg))
                    kos = make_kos(result, key_images(dss, binary))
                    objects.append(write_object(data_dir, result.result_id, "KO", kos))
            unique = list({id(d): d for d in dss}.values())
            previous = self._previous_sr(job, data_dir)
            sr = make_sr(result, unique, manifest.output.codes, seg=seg, previous=previous)
            objects.append(write_object(data_dir, result.result_id, "SR", sr))
        return result, objects, (items, out)

    def _previous_sr(self, job: Job, data_dir: Path) -> list[Dataset]:
        """The SR of the result this job's will supersede (its Predecessor Document), if it
        has one on disk."""
        with self._store.read() as conn:
            path = current_object_path(
                conn,
                study_uid=job.study_uid,
                series_uid=job.series_uid,
                model_name=job.model_name,
                kind="SR",
            )
        if path is None:
            return []
        try:
            return [pydicom.dcmread(data_dir / path, stop_before_pixels=True)]
        except (OSError, pydicom.errors.InvalidDicomError) as exc:
            log.warning(
                "the replaced result's SR cannot be read: the new SR names no predecessor",
                extra={"path": path, "error": str(exc)},
            )
            return []

    def _shadow(
        self, job: Job, device: int, active_items: list[np.ndarray], active_out: np.ndarray
    ) -> None:
        """Run the model's shadow version (if any) on the series the active one just ran on,
        and record how far they agree. Nothing the shadow computes is published; its failure
        is recorded as a disagreement and never affects the job."""
        shadow = self._registry.shadows().get(job.model_name)
        if shadow is None or shadow.version == job.model_version:
            return
        active = self._registry.get(job.model_name, job.model_version)
        if active is None:
            return
        error: str | None = None
        value = 0.0
        try:
            runner = self._runner(shadow, device)
            a_manifest = active.manifest()
            if runner.manifest.preprocessing == a_manifest.preprocessing:
                items = active_items
            else:
                items = [
                    preprocess_frame(ds, frame, runner.manifest.preprocessing)
                    for ds in self._load_series(job.series_uid)
                    for frame in frames(ds)
                ]
            out, _ = runner.infer(items)
            value = shadow_score(a_manifest, active_out, runner.manifest, out)
        except Exception as exc:  # a broken candidate is data for ops, not an agent failure
            error = f"{type(exc).__name__}: {exc}"[:500]
        agree = error is None and value >= self._inf.shadow_agreement
        self._store.writer.call(
            partial(
                record_run,
                job_id=job.id,
                name=job.model_name,
                active_version=job.model_version,
                shadow_version=shadow.version,
                score_=value,
                agree=agree,
                error=error,
                now=self._clock.now(),
            )
        )
        self._metrics.shadow_runs.labels(job.model_name, "agree" if agree else "disagree").inc()

    def run_one(self, device: int = CPU_DEVICE) -> bool:
        """Claim and run one job on ``device``; False if there was none."""
        job = self._store.writer.call(partial(claim_job, now=self._clock.now()))
        if job is None:
            return False
        started = time.perf_counter()
        progress = Progress()
        try:
            result, objects, (items, out) = self.execute(job, device, progress)
        except (PermanentError, UntrustedError) as exc:
            self._fail(job, f"{type(exc).__name__}: {exc}", retry=False, stage=progress.stage)
        except Exception as exc:  # anything else may be transient: retry up to the limit
            retry = job.attempts < self._inf.max_attempts
            log.exception(
                "inference job failed",
                extra={"job_id": job.id, "retry": retry, "stage": progress.stage.value},
            )
            self._fail(job, f"{type(exc).__name__}: {exc}", retry=retry, stage=progress.stage)
        else:
            try:
                self._finish(job, result, objects)
            except OutOfResources as exc:
                # The outbox is full (hub unreachable for long): keep the job for later,
                # without counting it against the job; pause this worker.
                log.warning(
                    "result not stored yet: %s; job requeued", exc, extra={"job_id": job.id}
                )
                self._store.writer.call(
                    partial(
                        fail_job,
                        job=job,
                        error=str(exc),
                        retry=True,
                        now=self._clock.now(),
                        refund_attempt=True,
                        stage=Stage.STORE,
                    )
                )
                return False
            if self.on_result is not None:
                self.on_result()
            self._metrics.inference_jobs.labels(job.model_name, "done").inc()
            self._metrics.inference_seconds.labels(job.model_name, result.provider).observe(
                time.perf_counter() - started
            )
            log.info(
                "inference result",
                extra={
                    "job_id": job.id,
                    "study_uid": job.study_uid,
                    "model": job.model_name,
                    "version": job.model_version,
                    "provider": result.provider,
                    "critical": result.critical,
                    "result_id": result.result_id,
                    "instances": result.instances,
                    "inference_ms": round(result.inference_ms, 1),
                },
            )
            self._shadow(job, device, items, out)
        return True

    def _finish(self, job: Job, result: Result, objects: list[ResultObject]) -> None:
        now = self._clock.now()
        hlc = self._hlc.now() if self._hlc is not None else None

        def tx(conn: sqlite3.Connection) -> None:
            commit_result(
                conn,
                result=result,
                now=now,
                objects=objects,
                destinations=self._cfg.results.destinations,
                hlc=hlc,
                max_outbox_bytes=self._cfg.sync.outbox_max_mb * 2**20,
                phi=self.phi,
            )
            finish_job(conn, job=job, result_id=result.result_id, now=now)

        self._store.writer.call(tx)

    def _fail(self, job: Job, error: str, *, retry: bool, stage: Stage) -> None:
        self._store.writer.call(
            partial(fail_job, job=job, error=error, retry=retry, now=self._clock.now(), stage=stage)
        )
        self._metrics.inference_jobs.labels(job.model_name, "retry" if retry else "failed").inc()
        if not retry:
            log.error(
                "inference job FAILED",
                extra={
                    "job_id": job.id,
                    "error": error,
                    "stage": stage.value,
                    "study_uid": job.study_uid,
                },
            )

    def drain(self) -> int:
        """Schedule and run everything pending now, synchronously (tests, CLI). Returns jobs run."""
        self.schedule()
        n = 0
        while self.run_one(self.devices[0]):
            n += 1
        return n

    async def run(self, stop: asyncio.Event) -> None:
        """Schedule and execute until ``stop`` is set (one task per device)."""
        loop = asyncio.get_running_loop()

        async def pause() -> None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=self._inf.check_interval_s)

        async def scheduler() -> None:
            while not stop.is_set():
                try:
                    await asyncio.to_thread(self.schedule)
                except Exception:
                    log.exception("inference scheduling failed; retrying next interval")
                await pause()

        async def device_loop(device: int) -> None:
            while not stop.is_set():
                try:
                    busy = await loop.run_in_executor(self._executors[device], self.run_one, device)
                except Exception:
                    log.exception("inference worker error; retrying next interval")
                    busy = False
                if not busy:
                    await pause()

        await asyncio.gather(scheduler(), *(device_loop(d) for d in self.devices))

    def close(self) -> None:
        for ex in self._executors.values():
            ex.shutdown(wait=True)
