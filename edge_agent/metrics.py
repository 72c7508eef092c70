"""Prometheus metrics of the agent, on a registry owned by the app (no module globals)."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


@dataclass(frozen=True)
class Metrics:
    registry: CollectorRegistry
    instances: Counter
    associations: Counter
    active_associations: Gauge
    connections: Counter
    limit_refusals: Counter
    out_of_resources: Counter
    store_seconds: Histogram
    studies_completed: Counter
    studies_reopened: Counter
    inference_jobs: Counter
    inference_seconds: Histogram
    shadow_runs: Counter
    model_rollbacks: Counter
    lifecycle_runs: Counter
    lifecycle_moves: Counter
    storage_pressure: Gauge
    storage_corrupt: Counter
    storage_bytes: Gauge
    storage_used_ratio: Gauge
    storage_oldest_seconds: Gauge
    storage_pending_archive: Gauge
    sync_connectivity: Gauge
    outbox_depth: Gauge
    outbox_oldest_seconds: Gauge
    outbox_dead: Gauge
    web_logins: Counter


def create_metrics(registry: CollectorRegistry | None = None) -> Metrics:
    """Create every metric of the agent on ``registry`` (a new one by default)."""
    reg = registry or CollectorRegistry()
    return Metrics(
        registry=reg,
        sync_connectivity=Gauge(
            "edge_sync_connectivity",
            "1 for the current hub connectivity state",
            ["state"],
            registry=reg,
        ),
        outbox_depth=Gauge(
            "edge_outbox_depth", "Records waiting for the hub, by lane", ["lane"], registry=reg
        ),
        outbox_oldest_seconds=Gauge(
            "edge_outbox_oldest_unsynced_seconds",
            "Age of the oldest record not yet at the hub",
            registry=reg,
        ),
        outbox_dead=Gauge("edge_outbox_dead_letters", "Records the hub refused", registry=reg),
        web_logins=Counter(
            "edge_web_logins",
            "Web login attempts by outcome (ok, failed: wrong password, unknown, locked or "
            "disabled; throttled: refused by the per-address limit before any check)",
            ["outcome"],
            registry=reg,
        ),
        instances=Counter(
            "edge_dicom_instances_total",
            "C-STORE requests by outcome (stored, duplicate, new_version, quarantined, refused)",
            ["outcome"],
            registry=reg,
        ),
        associations=Counter(
            "edge_dicom_associations_total",
            "Association requests by outcome (accepted, rejected)",
            ["outcome"],
            registry=reg,
        ),
        active_associations=Gauge(
            "edge_dicom_active_associations", "Associations open now", registry=reg
        ),
        connections=Counter(
            "edge_dicom_connections_total",
            "TCP connections to the DICOM port by how they ended (released, aborted, "
            "rejected, dropped: closed before becoming an association)",
            ["outcome"],
            registry=reg,
        ),
        limit_refusals=Counter(
            "edge_dicom_limit_refusals_total",
            "Connections, associations or messages refused by a limit, by limit",
            ["limit"],
            registry=reg,
        ),
        out_of_resources=Counter(
            "edge_dicom_out_of_resources_total",
            "C-STORE answered 0xA700 because the hot tier was below its free-space floor or full",
            registry=reg,
        ),
        store_seconds=Histogram(
            "edge_dicom_store_seconds",
            "Time from dataset received to status ready (write, fsync, commit)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=reg,
        ),
        studies_completed=Counter(
            "edge_studies_completed_total",
            "Studies moved to COMPLETE, by reason",
            ["reason"],
            registry=reg,
        ),
        studies_reopened=Counter(
            "edge_studies_reopened_total", "Late arrivals that re-opened a study", registry=reg
        ),
        inference_jobs=Counter(
            "edge_inference_jobs_total",
            "Inference jobs by model and outcome (done, retry, failed)",
            ["model", "outcome"],
            registry=reg,
        ),
        inference_seconds=Histogram(
            "edge_inference_seconds",
            "Job time (load, preprocess, run, postprocess)",
            ["model", "provider"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
            registry=reg,
        ),
        shadow_runs=Counter(
            "edge_shadow_runs_total",
            "Series a shadow model version also ran on, by outcome (agree, disagree)",
            ["model", "outcome"],
            registry=reg,
        ),
        lifecycle_runs=Counter(
            "edge_lifecycle_job_runs_total",
            "Storage lifecycle job runs by job (tiers, archive, integrity, maintenance) and status",
            ["job", "status"],
            registry=reg,
        ),
        lifecycle_moves=Counter(
            "edge_lifecycle_moves_total",
            "Instances moved between tiers (to 'archived' = local copy deleted after archive)",
            ["src", "dst"],
            registry=reg,
        ),
        storage_pressure=Gauge(
            "edge_storage_pressure",
            "1 while a tier stays above its high watermark with nothing safe left to move",
            ["tier"],
            registry=reg,
        ),
        storage_corrupt=Counter(
            "edge_storage_corrupt_files_total",
            "Stored files whose content no longer matches the received hash",
            ["tier"],
            registry=reg,
        ),
        storage_bytes=Gauge(
            "edge_storage_tier_bytes", "Bytes of instances per tier", ["tier"], registry=reg
        ),
        storage_used_ratio=Gauge(
            "edge_storage_tier_used_ratio",
            "Share of each tier's filesystem in use",
            ["tier"],
            registry=reg,
        ),
        storage_oldest_seconds=Gauge(
            "edge_storage_oldest_seconds",
            "Age of the oldest instance on each tier",
            ["tier"],
            registry=reg,
        ),
        storage_pending_archive=Gauge(
            "edge_storage_pending_archive",
            "Instances ready for the hub archive (past their archive age, results at the hub)",
            registry=reg,
        ),
        model_rollbacks=Counter(
            "edge_model_rollbacks_total",
            "Model versions rolled back, by trigger (error_rate, ops)",
            ["model", "trigger"],
            registry=reg,
        ),
    )
