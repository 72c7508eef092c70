"""Configuration: frozen dataclasses loaded once from a TOML file plus ``EDGE_*`` overrides.

Every setting has a documented default, unit and limit. :func:`load_config` reads the file,
applies environment overrides (``EDGE_<SECTION>_<FIELD>``, e.g. ``EDGE_DICOM_PORT=11112``,
``EDGE_DICOM_TLS_ENABLED=true``) and validates; any problem raises :class:`ConfigError`
naming the dotted field (``dicom.port``). Unknown keys, and unknown ``EDGE_<SECTION>_*``
variables of a known section, are errors too, so a typo never silently falls back to a
default. Other ``EDGE_*`` variables (e.g. ``EDGE_SERVICE_HOST`` injected by Kubernetes) are
ignored.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

from edge_agent.errors import ConfigError

ENV_PREFIX = "EDGE_"
MAX_PDU_BYTES = 16 * 2**20  # the largest PDU the listener will ever announce or buffer
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


@dataclass(frozen=True, kw_only=True)
class AllowedCaller:
    """One peer allowed to open associations.

    ``ae_title``: the calling AE title (exact match, trailing spaces ignored).
    ``host``: optional IP address or CIDR network the peer must connect from; empty = any.
    """

    ae_title: str
    host: str = ""

    def matches(self, ae_title: str, peer_ip: str) -> bool:
        """True if a peer calling as ``ae_title`` from ``peer_ip`` is this caller."""
        if ae_title.strip() != self.ae_title.strip():
            return False
        if not self.host:
            return True
        try:
            ip = ipaddress.ip_address(peer_ip)
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d
            return ip in ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return False


@dataclass(frozen=True, kw_only=True)
class TlsConfig:
    """DICOM TLS (PS3.15 B.1). Off by default; when on, cert and key are required.

    ``ca_file``: if set, peers must present a client certificate signed by this CA.
    """

    enabled: bool = False
    cert_file: str = ""
    key_file: str = ""
    ca_file: str = ""


@dataclass(frozen=True, kw_only=True)
class DicomConfig:
    """The DICOM listener.

    ``ae_title``: our AE title (1-16 chars). ``bind_address``/``port``: where to listen.
    ``max_associations``: concurrent associations (1-256); more are rejected
    "local limit exceeded" (transient). ``require_called_ae_title``: reject associations
    addressed to another AE title. ``allowed_callers``: the allow-list; an empty list rejects
    everyone unless ``allow_any_caller`` is true.

    ``max_associations_per_ip``: of those, how many one peer address may hold (so one
    slow or hostile sender cannot take every slot; 0 = all but a quarter of
    ``max_associations`` (at least one slot kept for others) from 4 slots up, every slot
    below); more are rejected "local limit exceeded" (transient).

    Limits (each refusal is counted in ``edge_dicom_limit_refusals_total`` and audited):
    ``max_connections`` TCP connections at once (associations or not, 1-65536) and
    ``max_connections_per_ip`` from one peer address: more are closed at once.
    ``acse_timeout_s``: the ARTIM timer: an A-ASSOCIATE-RQ must arrive this long after the
    connection (after the TLS handshake), and the peer must close this long after our
    rejection, release or abort. ``tls_handshake_timeout_s``: the TLS handshake's deadline.
    ``network_timeout_s``: the longest an association may sit idle between messages.
    ``dimse_timeout_s``: the longest gap between two PDUs of one message.
    ``pdu_read_timeout_s``: once a PDU's header arrived, its body must arrive within this.
    ``max_pdu_bytes``: the largest P-DATA PDU we accept (announced in the A-ASSOCIATE-AC,
    4096..16777216; 0, once "unlimited", now means the most, 16 MiB); a longer one aborts
    the association before its body is read.
    ``max_dataset_mb``: the largest dataset accepted (a longer one aborts).
    ``memory_dataset_kb``: datasets up to this size are received in memory, larger ones
    straight into a spill file on the hot tier; ``max_buffered_mb`` caps the memory all
    associations together hold (past it, datasets spill). ``max_sequence_depth``: the
    deepest sequence nesting accepted. ``max_inflated_mb``: the most a deflated dataset may
    inflate to. Timeouts are in seconds.
    ``poll_interval_ms``: deprecated and ignored (pynetdicom's server is no longer used);
    kept so older configuration files still load.
    """

    ae_title: str = "EDGE_AGENT"
    bind_address: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 16
    require_called_ae_title: bool = True
    allow_any_caller: bool = False
    allowed_callers: tuple[AllowedCaller, ...] = ()
    max_associations_per_ip: int = 0
    max_connections: int = 512
    max_connections_per_ip: int = 32
    acse_timeout_s: float = 10.0
    tls_handshake_timeout_s: float = 10.0
    dimse_timeout_s: float = 60.0
    network_timeout_s: float = 60.0
    pdu_read_timeout_s: float = 30.0
    max_pdu_bytes: int = 262_144
    max_dataset_mb: int = 4096
    memory_dataset_kb: int = 8192
    max_buffered_mb: int = 256
    max_sequence_depth: int = 32
    max_inflated_mb: int = 64
    shutdown_grace_s: float = 30.0
    poll_interval_ms: float = 0.2
    tls: TlsConfig = field(default_factory=TlsConfig)

    @property
    def associations_per_ip(self) -> int:
        """``max_associations_per_ip`` with 0 resolved."""
        if self.max_associations_per_ip:
            return self.max_associations_per_ip
        n = self.max_associations
        return n - max(1, n // 4) if n >= 4 else n


@dataclass(frozen=True, kw_only=True)
class StorageConfig:
    """Where data lives. Relative directories are resolved against ``data_dir``.

    ``hot_dir``/``warm_dir``/``cold_dir``: the storage tiers (separate mounts in production).
    ``quarantine_dir``: rejected inputs, kept with their reason. ``database``: the SQLite file.
    ``min_free_mb``: free-space floor on the hot tier in MiB; below it C-STORE answers 0xA700.
    ``fsync``: must stay true in production; tests of the fsync cost itself may turn it off
    (then nothing is flushed at all, SQLite included).
    ``journal``: acknowledge C-STOREs from the write-ahead ingest journal (one flush per
    group of instances; files and rows follow in batches); false = write, fsync and commit
    each instance before its answer. ``journal_dir``: where its segments live.
    ``journal_segment_mb``: segment size (written with zeros before use).
    ``journal_max_pending_mb``: journaled bytes not yet indexed before senders wait.
    ``journal_max_record_mb``: larger instances skip the journal (received straight into
    their file).
    """

    data_dir: str = "/var/lib/edge-agent"
    database: str = "edge.db"
    hot_dir: str = "hot"
    warm_dir: str = "warm"
    cold_dir: str = "cold"
    quarantine_dir: str = "quarantine"
    min_free_mb: int = 1024
    fsync: bool = True
    journal: bool = True
    journal_dir: str = "journal"
    journal_segment_mb: int = 64
    journal_max_pending_mb: int = 256
    journal_max_record_mb: int = 16

    def path(self, name: str) -> Path:
        """Resolve one of this section's path settings against ``data_dir``."""
        p = Path(getattr(self, name))
        return p if p.is_absolute() else Path(self.data_dir) / p


@dataclass(frozen=True, kw_only=True)
class StudiesConfig:
    """Study assembly.

    ``quiet_period_s``: a study is complete when nothing arrived for this long (seconds).
    ``quiet_period_by_modality``: per-modality overrides, e.g. ``{CT = 20}``.
    ``check_interval_s``: how often the assembly worker looks for complete studies.
    """

    quiet_period_s: float = 10.0
    quiet_period_by_modality: Mapping[str, float] = field(default_factory=dict)
    check_interval_s: float = 0.5

    def quiet_period_for(self, modality: str) -> float:
        """The quiet period in seconds for a study of ``modality``."""
        return float(self.quiet_period_by_modality.get(modality.upper(), self.quiet_period_s))


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """``level``: DEBUG|INFO|WARNING|ERROR. ``json``: one JSON object per line (default)."""

    level: str = "INFO"
    json: bool = True


@dataclass(frozen=True, kw_only=True)
class InferenceConfig:
    """Model execution.

    ``enabled``: run models on COMPLETE studies. ``providers``: execution providers in order
    of preference (``tensorrt``, ``cuda``, ``cpu``), filtered by what onnxruntime offers.
    ``device_ids``: one inference worker per GPU id (ignored on CPU: one worker).
    ``max_batch_size``: cap on a model's own batch size. ``intra_op_threads``: ONNX Runtime
    CPU threads per session (0 = its default). ``models_dir``: installed packages
    (relative = inside ``storage.data_dir``). ``max_attempts``: a job that crashed the runner
    this many times is FAILED.

    A version activated by a model update is watched: when more than ``rollback_error_rate``
    of its last ``rollback_window_jobs`` finished jobs (at least ``rollback_min_jobs``) FAILED,
    the previous version is re-activated, the failed series re-run on it and ops told.
    ``shadow_agreement``: the score (Dice or top-1 match) at which a shadow version's series
    counts as agreeing with the active one.
    """

    enabled: bool = True
    providers: tuple[str, ...] = ("tensorrt", "cuda", "cpu")
    device_ids: tuple[int, ...] = (0,)
    max_batch_size: int = 16
    intra_op_threads: int = 0
    models_dir: str = "models"
    max_attempts: int = 2
    check_interval_s: float = 0.5
    rollback_error_rate: float = 0.5
    rollback_window_jobs: int = 20
    rollback_min_jobs: int = 5
    shadow_agreement: float = 0.9


@dataclass(frozen=True, kw_only=True)
class LifecycleConfig:
    """Storage tiers, archive, retention and housekeeping (``edge_agent.lifecycle``).

    A study moves hot -> warm after ``hot_days`` without new instances, warm -> cold after
    ``warm_days``, and (``archive`` on, the hub enrolled) cold -> the hub archive after
    ``cold_days``; ``cold_days_by_modality`` overrides that per modality (the retention
    route). Archived instances are deleted locally ``keep_days_after_archive`` after the hub
    confirmed their hash (0 = at once). Each tier has capacity watermarks (share of its
    filesystem used): above ``<tier>_high_watermark`` the oldest studies move down (or
    archived copies are evicted) early until usage is under ``<tier>_low_watermark``.
    Cold files are compressed and AES-256-GCM encrypted with the key ring in
    ``cold_key_file`` (or ``$EDGE_COLD_KEYS``). Jobs run on schedules: ``tier_interval_s``
    (moves, retention, pressure), ``archive_interval_s``, ``integrity_interval_s`` (re-hash
    ``integrity_sample`` stored files), ``maintenance_cron`` (WAL checkpoint, vacuum when
    idle; crontab syntax, UTC). ``batch_instances``: most instances one job run handles.
    """

    enabled: bool = True
    hot_days: float = 7.0
    warm_days: float = 30.0
    cold_days: float = 90.0
    cold_days_by_modality: Mapping[str, float] = field(default_factory=dict)
    archive: bool = True
    keep_days_after_archive: float = 0.0
    hot_high_watermark: float = 0.85
    hot_low_watermark: float = 0.75
    warm_high_watermark: float = 0.90
    warm_low_watermark: float = 0.80
    cold_high_watermark: float = 0.95
    cold_low_watermark: float = 0.85
    cold_key_file: str = "cold-keys"
    tier_interval_s: float = 300.0
    archive_interval_s: float = 600.0
    integrity_interval_s: float = 3600.0
    integrity_sample: int = 100
    maintenance_cron: str = "30 3 * * *"
    batch_instances: int = 2000


@dataclass(frozen=True, kw_only=True)
class WebConfig:
    """The local web UI, REST API (``/api/v1``), ``/metrics``, ``/healthz``, ``/readyz``.

    Served on ``bind_address``:``port`` (0 = any free port, for tests), over HTTPS when
    ``tls_cert`` and ``tls_key`` are set (session cookies are then marked Secure). Sessions
    last ``session_ttl_s``; ``lockout_attempts`` failed logins in a row lock an account for
    ``lockout_s``. The worklist refreshes itself every ``refresh_s``.
    """

    enabled: bool = True
    bind_address: str = "0.0.0.0"
    port: int = 8080
    tls_cert: str = ""
    tls_key: str = ""
    session_ttl_s: float = 28800.0
    lockout_attempts: int = 5
    lockout_s: float = 900.0
    refresh_s: float = 5.0


@dataclass(frozen=True, kw_only=True)
class Destination:
    """A DICOM destination (PACS) results are sent to: ``ae_title`` at ``host``:``port``."""

    ae_title: str
    host: str
    port: int = 104

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True, kw_only=True)
class ResultsConfig:
    """DICOM outputs and forwarding.

    ``dicom_outputs``: encode SEG (masks) and Comprehensive SR (measurements,
    classifications) for every result. ``destinations``: where to C-STORE them
    (``"PACS@10.0.0.5:104"`` or tables). A send that fails is retried with exponential backoff
    (``retry_initial_s`` doubling up to ``retry_max_s``, with jitter); after ``max_attempts``
    it is dead-lettered (``edge-agent forwards`` shows why) and never blocks others.
    """

    dicom_outputs: bool = True
    destinations: tuple[Destination, ...] = ()
    calling_ae_title: str = "EDGE_AGENT"
    max_attempts: int = 8
    retry_initial_s: float = 5.0
    retry_max_s: float = 300.0
    check_interval_s: float = 1.0


@dataclass(frozen=True, kw_only=True)
class SyncConfig:
    """Sync with the hub (the client loops come with the hub).

    ``node_id``: this agent's id in hybrid-logical-clock timestamps (letters, digits, ``._-``).
    ``outbox_max_mb``: pending outbox bytes at most; when full, new results wait (their jobs
    are retried later) instead of anything being dropped. ``credential_file``: written by
    ``edge-agent sync enroll`` (relative = inside ``storage.data_dir``); without it the agent
    does not sync. Batches hold at most ``batch_max_records`` records / ``batch_max_kb`` KiB.
    Failed pushes back off from ``retry_initial_s`` doubling to ``retry_max_s`` (with jitter).
    ``hub_ca_file``: PEM bundle trusted for the hub's TLS certificate (empty = system trust).
    ``trusted_keys``: the ops Ed25519 public keys (PEM files) pinned for model releases; none =
    model updates from the hub are off. ``release_threshold``: how many of them must sign.
    ``pseudonymise``: replace ``pseudonymise_fields`` by a keyed pseudonym (HMAC-SHA-256 with
    the site secret in ``secret_file``, created on first use) before anything leaves the site.
    """

    node_id: str = "edge"
    outbox_max_mb: int = 2048
    credential_file: str = "sync-credential.json"
    batch_max_records: int = 500
    batch_max_kb: int = 4096
    retry_initial_s: float = 1.0
    retry_max_s: float = 300.0
    heartbeat_interval_s: float = 60.0
    pseudonymise: bool = True
    pseudonymise_fields: tuple[str, ...] = (
        "patient_id",
        "patient_name",
        "patient_birth_date",
        "accession_number",
    )
    secret_file: str = "site-secret.key"  # noqa: S105 - a file name, not a secret
    hub_ca_file: str = ""
    trusted_keys: tuple[str, ...] = ()
    release_threshold: int = 1

    def secret_path(self, data_dir: str) -> Path:
        p = Path(self.secret_file)
        return p if p.is_absolute() else Path(data_dir) / p

    def credential_path(self, data_dir: str) -> Path:
        p = Path(self.credential_file)
        return p if p.is_absolute() else Path(data_dir) / p


@dataclass(frozen=True, kw_only=True)
class Config:
    """The whole agent configuration."""

    dicom: DicomConfig = field(default_factory=DicomConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    studies: StudiesConfig = field(default_factory=StudiesConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    results: ResultsConfig = field(default_factory=ResultsConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
    lifecycle: LifecycleConfig = field(default_factory=LifecycleConfig)
    web: WebConfig = field(default_factory=WebConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def models_dir(self) -> Path:
        p = Path(self.inference.models_dir)
        return p if p.is_absolute() else Path(self.storage.data_dir) / p


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(
    path: str | os.PathLike[str] | None, env: Mapping[str, str] | None = None
) -> Config:
    """Load ``path`` (TOML; ``None`` = defaults only), apply ``EDGE_*`` overrides from ``env``
    (default ``os.environ``), validate, and return the frozen :class:`Config`.

    Relative ``storage.data_dir`` is resolved against the config file's folder.

    Raises :class:`ConfigError` naming the bad field.
    """
    env = os.environ if env is None else env
    raw: dict[str, Any] = {}
    base = Path.cwd()
    if path is not None:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError("config", f"cannot read {p}: {exc.strerror or exc}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError("config", f"{p} is not UTF-8 text (TOML must be): {exc}") from exc
        try:
            raw = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError("config", f"{p} is not valid TOML: {exc}") from exc
        base = p.resolve().parent
    _apply_env(raw, env)
    cfg: Config = _build(Config, raw, "")
    if not Path(cfg.storage.data_dir).is_absolute():
        storage = dataclasses.replace(cfg.storage, data_dir=str(base / cfg.storage.data_dir))
        cfg = dataclasses.replace(cfg, storage=storage)
    validate(cfg)
    return cfg


def _apply_env(raw: dict[str, Any], env: Mapping[str, str]) -> None:
    known = dict(_env_names(Config, ()))
    sections = {f.name.upper() for f in dataclasses.fields(Config)}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX) or name == "EDGE_CONFIG":
            continue
        if name not in known:
            # EDGE_DICOM_PROT is a typo to report; EDGE_SERVICE_HOST (Kubernetes injects
            # <SERVICE>_* variables for a Service named "edge") is not ours to judge.
            if name.removeprefix(ENV_PREFIX).split("_", 1)[0] in sections:
                raise ConfigError(name, "unknown EDGE_* environment variable")
            continue
        path = known[name]
        node = raw
        for key in path[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                raise ConfigError(".".join(path), "environment override conflicts with the file")
            node = child
        node[path[-1]] = _EnvValue(value)


class _EnvValue(str):
    """A string from the environment, converted to the field's type when built."""


def _env_names(cls: type[Any], prefix: tuple[str, ...]) -> list[tuple[str, tuple[str, ...]]]:
    out: list[tuple[str, tuple[str, ...]]] = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        path = (*prefix, f.name)
        if dataclasses.is_dataclass(t):
            out.extend(_env_names(t, path))  # type: ignore[arg-type]
        else:
            out.append((ENV_PREFIX + "_".join(path).upper(), path))
    return out


def _build(cls: type[Any], raw: Any, where: str) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(where or "config", "must be a table")
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in names:
            raise ConfigError(_join(where, key), "unknown setting")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.name in raw:
            kwargs[f.name] = _convert(hints[f.name], raw[f.name], _join(where, f.name))
    return cls(**kwargs)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _convert(t: Any, value: Any, where: str) -> Any:
    if dataclasses.is_dataclass(t):
        return _build(t, value, where)  # type: ignore[arg-type]
    if t is bool:
        if isinstance(value, _EnvValue):
            low = value.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ConfigError(where, f"expected true/false, got {value!r}")
        if not isinstance(value, bool):
            raise ConfigError(where, f"expected true/false, got {value!r}")
        return value
    if t is int:
        if isinstance(value, _EnvValue):
            try:
                return int(value.strip())
            except ValueError:
                raise ConfigError(where, f"expected an integer, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(where, f"expected an integer, got {value!r}")
        return value
    if t is float:
        if isinstance(value, _EnvValue):
            try:
                return float(value.strip())
            except ValueError:
                raise ConfigError(where, f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(where, f"expected a number, got {value!r}")
        return float(value)
    if t is str:
        if not isinstance(value, str):
            raise ConfigError(where, f"expected a string, got {value!r}")
        return str(value)
    if t == tuple[AllowedCaller, ...]:
        return _callers(value, where)
    if t == tuple[Destination, ...]:
        return _destinations(value, where)
    if t in (tuple[str, ...], tuple[int, ...]):
        item = str if t == tuple[str, ...] else int
        if isinstance(value, _EnvValue):
            value = [_EnvValue(v.strip()) for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(where, "expected a list")
        return tuple(_convert(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if t == Mapping[str, float]:
        if isinstance(value, _EnvValue):
            value = _parse_pairs(value, where)
        if not isinstance(value, dict):
            raise ConfigError(where, "expected a table of NAME = seconds")
        return {str(k).upper(): _convert(float, v, f"{where}.{k}") for k, v in value.items()}
    raise ConfigError(where, f"unsupported setting type {t!r}")  # pragma: no cover


def _parse_pairs(value: str, where: str) -> dict[str, _EnvValue]:
    out: dict[str, _EnvValue] = {}
    for part in filter(None, (p.strip() for p in value.split(","))):
        name, sep, num = part.partition("=")
        if not sep:
            raise ConfigError(where, f"expected NAME=seconds pairs, got {part!r}")
        out[name.strip()] = _EnvValue(num)
    return out


def _items(value: Any, where: str, what: str) -> list[Any]:
    """A TOML array as it is, or an environment string split on commas."""
    if isinstance(value, _EnvValue):
        return [p.strip() for p in value.split(",") if p.strip()]
    if isinstance(value, list):
        return value
    raise ConfigError(where, f"expected a list of {what}")


def _destinations(value: Any, where: str) -> tuple[Destination, ...]:
    """A TOML array of tables/strings, or (from env) ``"PACS@10.0.0.5:104,ARCH@h:11112"``."""
    out: list[Destination] = []
    for i, item in enumerate(_items(value, where, "destinations")):
        here = f"{where}[{i}]"
        if isinstance(item, str):
            ae, sep, rest = item.partition("@")
            host, colon, port = rest.rpartition(":")
            if not sep or not colon:
                raise ConfigError(here, f"expected AE@host:port, got {item!r}")
            try:
                out.append(Destination(ae_title=ae.strip(), host=host.strip(), port=int(port)))
            except ValueError:
                raise ConfigError(here, f"port is not a number in {item!r}") from None
        elif isinstance(item, dict):
            out.append(_build(Destination, item, here))
        else:
            raise ConfigError(here, "expected a table {ae_title, host, port} or 'AE@host:port'")
    return tuple(out)


def _callers(value: Any, where: str) -> tuple[AllowedCaller, ...]:
    """Accept a TOML array of tables/strings, or (from env) ``"AE[@host],AE2"``."""
    out: list[AllowedCaller] = []
    for i, item in enumerate(_items(value, where, "callers")):
        here = f"{where}[{i}]"
        if isinstance(item, str):
            ae, _, host = item.partition("@")
            out.append(AllowedCaller(ae_title=ae.strip(), host=host.strip()))
        elif isinstance(item, dict):
            out.append(_build(AllowedCaller, item, here))
        else:
            raise ConfigError(here, "expected a table {ae_title=..., host=...} or 'AE@host'")
    return tuple(out)


# ---------------------------------------------------------------------------------------------
# Validation


def _validate_lifecycle(lc: LifecycleConfig) -> None:
    if not 0 < lc.hot_days <= lc.warm_days <= lc.cold_days <= 36500:
        raise ConfigError(
            "lifecycle.hot_days", "must be > 0 and hot_days <= warm_days <= cold_days (days)"
        )
    for mod, v in lc.cold_days_by_modality.items():
        if not lc.warm_days <= v <= 36500:
            raise ConfigError(f"lifecycle.cold_days_by_modality.{mod}", "must be >= warm_days")
    if not 0 <= lc.keep_days_after_archive <= 36500:
        raise ConfigError("lifecycle.keep_days_after_archive", "must be 0..36500 days")
    for tier in ("hot", "warm", "cold"):
        hi, lo = getattr(lc, f"{tier}_high_watermark"), getattr(lc, f"{tier}_low_watermark")
        if not 0 < lo < hi <= 1:
            raise ConfigError(
                f"lifecycle.{tier}_low_watermark", f"must be > 0 and < {tier}_high_watermark <= 1"
            )
    if not lc.cold_key_file:
        raise ConfigError("lifecycle.cold_key_file", "must not be empty")
    for name in ("tier_interval_s", "archive_interval_s", "integrity_interval_s"):
        if not 0 < getattr(lc, name) <= 86400 * 7:
            raise ConfigError(f"lifecycle.{name}", "must be in (0, 604800] seconds")
    if not 0 <= lc.integrity_sample <= 100000:
        raise ConfigError("lifecycle.integrity_sample", "must be 0..100000")
    if not 1 <= lc.batch_instances <= 1000000:
        raise ConfigError("lifecycle.batch_instances", "must be 1..1000000")
    try:
        from apscheduler.triggers.cron import CronTrigger

        CronTrigger.from_crontab(lc.maintenance_cron, timezone="UTC")
    except ValueError as exc:
        raise ConfigError("lifecycle.maintenance_cron", f"not a crontab line: {exc}") from None


def _check_ranges(section: str, values: object, **ranges: tuple[int, int]) -> None:
    """Each ``name=(lo, hi)``: ``values.name`` must be in lo..hi, else :class:`ConfigError`."""
    for name, (lo, hi) in ranges.items():
        v = getattr(values, name)
        if not lo <= v <= hi:
            raise ConfigError(f"{section}.{name}", f"must be {lo}..{hi}, got {v}")


def validate(cfg: Config) -> None:
    """Check limits and cross-field rules; raise :class:`ConfigError` naming the field."""
    d = cfg.dicom
    _check_ae("dicom.ae_title", d.ae_title)
    if not 1 <= d.port <= 65535:
        raise ConfigError("dicom.port", f"must be 1..65535, got {d.port}")
    try:
        ipaddress.ip_address(d.bind_address)
    except ValueError:
        raise ConfigError("dicom.bind_address", f"not an IP address: {d.bind_address!r}") from None
    if not 1 <= d.max_associations <= 256:
        raise ConfigError("dicom.max_associations", f"must be 1..256, got {d.max_associations}")
    for name in (
        "acse_timeout_s",
        "tls_handshake_timeout_s",
        "dimse_timeout_s",
        "network_timeout_s",
        "pdu_read_timeout_s",
        "shutdown_grace_s",
    ):
        v = getattr(d, name)
        if not 0 < v <= 3600:
            raise ConfigError(f"dicom.{name}", f"must be in (0, 3600] seconds, got {v}")
    if d.max_pdu_bytes != 0 and not 4096 <= d.max_pdu_bytes <= MAX_PDU_BYTES:
        raise ConfigError(
            "dicom.max_pdu_bytes",
            f"must be 4096..{MAX_PDU_BYTES} bytes (or 0 for the most), got {d.max_pdu_bytes}",
        )
    _check_ranges(
        "dicom",
        d,
        max_connections=(1, 65536),
        max_connections_per_ip=(1, 65536),
        max_dataset_mb=(1, 65536),
        memory_dataset_kb=(64, 1024 * 1024),
        max_buffered_mb=(1, 65536),
        max_sequence_depth=(1, 256),
        max_inflated_mb=(1, 4096),
    )
    if not 0 <= d.max_associations_per_ip <= d.max_associations:
        raise ConfigError(
            "dicom.max_associations_per_ip",
            f"must be 0 (auto) or 1..dicom.max_associations ({d.max_associations}), "
            f"got {d.max_associations_per_ip}",
        )
    if d.max_connections < d.max_associations:
        raise ConfigError(
            "dicom.max_connections",
            f"must be at least dicom.max_associations ({d.max_associations})",
        )
    sc = cfg.storage
    _check_ranges(
        "storage",
        sc,
        journal_segment_mb=(4, 4096),
        journal_max_pending_mb=(1, 65536),
        journal_max_record_mb=(1, 1024),
    )
    if sc.journal_max_record_mb * 2 > sc.journal_segment_mb:
        raise ConfigError(
            "storage.journal_max_record_mb",
            f"must be at most half of storage.journal_segment_mb ({sc.journal_segment_mb})",
        )
    if not d.allowed_callers and not d.allow_any_caller:
        raise ConfigError(
            "dicom.allowed_callers",
            "is empty and dicom.allow_any_caller is false: every association would be rejected",
        )
    for i, c in enumerate(d.allowed_callers):
        _check_ae(f"dicom.allowed_callers[{i}].ae_title", c.ae_title)
        if c.host:
            try:
                ipaddress.ip_network(c.host, strict=False)
            except ValueError:
                raise ConfigError(
                    f"dicom.allowed_callers[{i}].host", f"not an IP address or CIDR: {c.host!r}"
                ) from None
    if d.tls.enabled:
        for name in ("cert_file", "key_file"):
            v = getattr(d.tls, name)
            if not v:
                raise ConfigError(f"dicom.tls.{name}", "required when dicom.tls.enabled is true")
            if not Path(v).is_file():
                raise ConfigError(f"dicom.tls.{name}", f"file not found: {v}")
        if d.tls.ca_file and not Path(d.tls.ca_file).is_file():
            raise ConfigError("dicom.tls.ca_file", f"file not found: {d.tls.ca_file}")

    s = cfg.storage
    if not s.data_dir:
        raise ConfigError("storage.data_dir", "must not be empty")
    for name in ("database", "hot_dir", "warm_dir", "cold_dir", "quarantine_dir"):
        if not getattr(s, name):
            raise ConfigError(f"storage.{name}", "must not be empty")
    tiers = {name: s.path(name).resolve() for name in ("hot_dir", "warm_dir", "cold_dir")}
    tiers["quarantine_dir"] = s.path("quarantine_dir").resolve()
    seen: dict[Path, str] = {}
    for name, p in tiers.items():
        if p in seen:
            raise ConfigError(f"storage.{name}", f"is the same folder as storage.{seen[p]}")
        seen[p] = name
    if s.min_free_mb < 0:
        raise ConfigError("storage.min_free_mb", f"must be >= 0 MiB, got {s.min_free_mb}")

    st = cfg.studies
    if not 0 < st.quiet_period_s <= 86400:
        raise ConfigError(
            "studies.quiet_period_s", f"must be in (0, 86400] s, got {st.quiet_period_s}"
        )
    for mod, v in st.quiet_period_by_modality.items():
        if not 0 < v <= 86400:
            raise ConfigError(f"studies.quiet_period_by_modality.{mod}", "must be in (0, 86400] s")
    if not 0 < st.check_interval_s <= 60:
        raise ConfigError("studies.check_interval_s", "must be in (0, 60] seconds")

    inf = cfg.inference
    if not inf.providers:
        raise ConfigError("inference.providers", "must list at least one provider")
    for i, name in enumerate(inf.providers):
        if name not in ("tensorrt", "cuda", "cpu"):
            raise ConfigError(
                f"inference.providers[{i}]", f"unknown provider {name!r} (tensorrt, cuda, cpu)"
            )
    if not inf.device_ids or any(d < 0 for d in inf.device_ids):
        raise ConfigError("inference.device_ids", "must list GPU ids >= 0")
    if not 1 <= inf.max_batch_size <= 1024:
        raise ConfigError("inference.max_batch_size", "must be 1..1024")
    if inf.intra_op_threads < 0:
        raise ConfigError("inference.intra_op_threads", "must be >= 0")
    if not inf.models_dir:
        raise ConfigError("inference.models_dir", "must not be empty")
    if not 1 <= inf.max_attempts <= 10:
        raise ConfigError("inference.max_attempts", "must be 1..10")
    if not 0 < inf.check_interval_s <= 60:
        raise ConfigError("inference.check_interval_s", "must be in (0, 60] seconds")
    if not 0 <= inf.rollback_error_rate < 1:
        raise ConfigError("inference.rollback_error_rate", "must be in [0, 1)")
    if not 1 <= inf.rollback_window_jobs <= 10000:
        raise ConfigError("inference.rollback_window_jobs", "must be 1..10000")
    if not 1 <= inf.rollback_min_jobs <= inf.rollback_window_jobs:
        raise ConfigError(
            "inference.rollback_min_jobs", "must be 1..inference.rollback_window_jobs"
        )
    if not 0 < inf.shadow_agreement <= 1:
        raise ConfigError("inference.shadow_agreement", "must be in (0, 1]")
    _validate_lifecycle(cfg.lifecycle)
    w = cfg.web
    if not 0 <= w.port <= 65535:
        raise ConfigError("web.port", f"must be 0..65535, got {w.port}")
    if bool(w.tls_cert) != bool(w.tls_key):
        raise ConfigError("web.tls_cert", "web.tls_cert and web.tls_key go together")
    if not 60 <= w.session_ttl_s <= 7 * 86400:
        raise ConfigError("web.session_ttl_s", "must be 60..604800 seconds")
    if not 1 <= w.lockout_attempts <= 100:
        raise ConfigError("web.lockout_attempts", "must be 1..100")
    if not 1 <= w.lockout_s <= 86400:
        raise ConfigError("web.lockout_s", "must be 1..86400 seconds")
    if not 0.5 <= w.refresh_s <= 3600:
        raise ConfigError("web.refresh_s", "must be 0.5..3600 seconds")

    res = cfg.results
    _check_ae("results.calling_ae_title", res.calling_ae_title)
    for i, dest in enumerate(res.destinations):
        _check_ae(f"results.destinations[{i}].ae_title", dest.ae_title)
        if not dest.host:
            raise ConfigError(f"results.destinations[{i}].host", "must not be empty")
        if not 1 <= dest.port <= 65535:
            raise ConfigError(
                f"results.destinations[{i}].port", f"must be 1..65535, got {dest.port}"
            )
    if not 1 <= res.max_attempts <= 100:
        raise ConfigError("results.max_attempts", "must be 1..100")
    if not 0 < res.retry_initial_s <= res.retry_max_s <= 86400:
        raise ConfigError(
            "results.retry_initial_s", "must be > 0 and <= results.retry_max_s (<= 86400 s)"
        )
    if not 0 < res.check_interval_s <= 60:
        raise ConfigError("results.check_interval_s", "must be in (0, 60] seconds")

    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", cfg.sync.node_id):
        raise ConfigError("sync.node_id", "1-64 letters, digits, '.', '_' or '-'")
    sy = cfg.sync
    if not 1 <= sy.outbox_max_mb <= 1024 * 1024:
        raise ConfigError("sync.outbox_max_mb", "must be 1..1048576 MiB")
    if not sy.credential_file:
        raise ConfigError("sync.credential_file", "must not be empty")
    if not 1 <= sy.batch_max_records <= 10000:
        raise ConfigError("sync.batch_max_records", "must be 1..10000")
    if not 1 <= sy.batch_max_kb <= 64 * 1024:
        raise ConfigError("sync.batch_max_kb", "must be 1..65536 KiB")
    if not 0 < sy.retry_initial_s <= sy.retry_max_s <= 3600:
        raise ConfigError("sync.retry_initial_s", "must be > 0 and <= sync.retry_max_s <= 3600")
    if sy.hub_ca_file and not Path(sy.hub_ca_file).is_file():
        raise ConfigError("sync.hub_ca_file", f"file not found: {sy.hub_ca_file}")
    for i, k in enumerate(sy.trusted_keys):
        if not Path(k).is_file():
            raise ConfigError(f"sync.trusted_keys[{i}]", f"file not found: {k}")
    if not 1 <= sy.release_threshold <= max(len(sy.trusted_keys), 1):
        raise ConfigError("sync.release_threshold", "must be 1..number of sync.trusted_keys")
    if not sy.secret_file:
        raise ConfigError("sync.secret_file", "must not be empty")
    if not 1 <= sy.heartbeat_interval_s <= 86400:
        raise ConfigError("sync.heartbeat_interval_s", "must be 1..86400 s")

    if cfg.logging.level.upper() not in _LOG_LEVELS:
        raise ConfigError("logging.level", f"must be one of {', '.join(_LOG_LEVELS)}")


def _check_ae(where: str, value: str) -> None:
    if not value.strip() or not _AE_RE.match(value):
        raise ConfigError(where, f"not a valid AE title (1-16 printable ASCII, no '\\'): {value!r}")
