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
from typing import Any, TypeVar, get_type_hints

from edge_agent.errors import ConfigError
from edge_agent.times import check_zone_name

ENV_PREFIX = "EDGE_"
MAX_PDU_BYTES = 16 * 2**20  # the largest PDU the listener will ever announce or buffer
_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # printable ASCII without backslash
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_T = TypeVar("_T")


@dataclass(frozen=True)
class Bound:
    """The limits of one numeric setting, declared beside it (see :func:`setting`).

    ``lo``/``hi``: inclusive unless ``lo_open``/``hi_open``; ``zero``: 0 is also allowed
    (it means "auto" or "the most" for that setting); ``unit``: shown in messages and docs.
    For a list or table setting the bound applies to each value.
    """

    lo: float | None = None
    hi: float | None = None
    unit: str = ""
    lo_open: bool = False
    hi_open: bool = False
    zero: bool = False

    def check(self, where: str, v: float) -> None:
        if self.zero and v == 0:
            return
        low_ok = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        high_ok = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        if not (low_ok and high_ok):
            raise ConfigError(where, f"must be {self.describe()}, got {v}")

    def describe(self) -> str:
        def num(x: float) -> str:
            return str(int(x)) if float(x).is_integer() else str(x)

        unit = f" {self.unit}" if self.unit else ""
        zero = " (or 0)" if self.zero else ""
        if self.lo is not None and self.hi is not None:
            if self.lo_open or self.hi_open:
                left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
                return f"in {left}{num(self.lo)}, {num(self.hi)}{right}{unit}{zero}"
            return f"{num(self.lo)}..{num(self.hi)}{unit}{zero}"
        if self.lo is not None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}{unit}{zero}"
        assert self.hi is not None
        return f"{'<' if self.hi_open else '<='} {num(self.hi)}{unit}{zero}"


def setting(
    default: _T,
    *,
    lo: float | None = None,
    hi: float | None = None,
    unit: str = "",
    lo_open: bool = False,
    hi_open: bool = False,
    zero: bool = False,
    required: bool = False,
    choices: tuple[str, ...] = (),
) -> _T:
    """A setting with its default and, in one place, its limits: a numeric :class:`Bound`,
    ``required`` (a string or list that must not be empty), ``choices`` (the values a string,
    or each item of a list, may take). :func:`validate` checks them all, naming the field."""
    meta: dict[str, object] = {"required": required, "choices": choices}
    if lo is not None or hi is not None:
        meta["bound"] = Bound(lo, hi, unit, lo_open, hi_open, zero)
    if isinstance(default, dict):
        value = dict(default)
        return field(default_factory=lambda: dict(value), metadata=meta)  # type: ignore[return-value]
    return field(default=default, metadata=meta)


def check_declared(section: object, where: str) -> None:
    """Check every setting of ``section`` (a config dataclass) against what :func:`setting`
    declared beside it, then the section's own cross-field rules (its ``check`` method),
    and the same for each nested section."""
    for f in dataclasses.fields(section):  # type: ignore[arg-type]
        v = getattr(section, f.name)
        here = _join(where, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            check_declared(v, here)
            continue
        if f.metadata.get("required") and not v:
            raise ConfigError(here, "must not be empty")
        choices: tuple[str, ...] = f.metadata.get("choices", ())
        bound: Bound | None = f.metadata.get("bound")
        if isinstance(v, Mapping):
            items = [(_join(here, str(k)), x) for k, x in v.items()]
        elif isinstance(v, tuple):
            items = [(f"{here}[{i}]", x) for i, x in enumerate(v)]
        else:
            items = [(here, v)]
        for at, x in items:
            if dataclasses.is_dataclass(x) and not isinstance(x, type):
                check_declared(x, at)  # a list of tables (destinations, callers)
                continue
            if choices and x not in choices:
                raise ConfigError(at, f"must be one of {', '.join(choices)}, got {x!r}")
            if bound is not None:
                bound.check(at, x)
    check = getattr(section, "check", None)
    if check is not None:
        check()


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
    port: int = setting(11112, lo=1, hi=65535)
    max_associations: int = setting(16, lo=1, hi=256)
    require_called_ae_title: bool = True
    allow_any_caller: bool = False
    allowed_callers: tuple[AllowedCaller, ...] = ()
    max_associations_per_ip: int = setting(0, lo=0, hi=256)  # and <= max_associations
    max_connections: int = setting(512, lo=1, hi=65536)
    max_connections_per_ip: int = setting(32, lo=1, hi=65536)
    acse_timeout_s: float = setting(10.0, lo=0, hi=3600, lo_open=True, unit="s")
    tls_handshake_timeout_s: float = setting(10.0, lo=0, hi=3600, lo_open=True, unit="s")
    dimse_timeout_s: float = setting(60.0, lo=0, hi=3600, lo_open=True, unit="s")
    network_timeout_s: float = setting(60.0, lo=0, hi=3600, lo_open=True, unit="s")
    pdu_read_timeout_s: float = setting(30.0, lo=0, hi=3600, lo_open=True, unit="s")
    max_pdu_bytes: int = setting(262_144, lo=4096, hi=MAX_PDU_BYTES, unit="bytes", zero=True)
    max_dataset_mb: int = setting(4096, lo=1, hi=65536, unit="MiB")
    memory_dataset_kb: int = setting(8192, lo=64, hi=1024 * 1024, unit="KiB")
    max_buffered_mb: int = setting(256, lo=1, hi=65536, unit="MiB")
    max_sequence_depth: int = setting(32, lo=1, hi=256)
    max_inflated_mb: int = setting(64, lo=1, hi=4096, unit="MiB")
    shutdown_grace_s: float = setting(30.0, lo=0, hi=3600, lo_open=True, unit="s")
    poll_interval_ms: float = setting(0.2, lo=0, unit="ms")  # deprecated, ignored
    tls: TlsConfig = field(default_factory=TlsConfig)

    @property
    def associations_per_ip(self) -> int:
        """``max_associations_per_ip`` with 0 resolved."""
        if self.max_associations_per_ip:
            return self.max_associations_per_ip
        n = self.max_associations
        return n - max(1, n // 4) if n >= 4 else n

    def check(self) -> None:
        """The rules between settings (each one's own limits are declared beside it)."""
        _check_ae("dicom.ae_title", self.ae_title)
        try:
            ipaddress.ip_address(self.bind_address)
        except ValueError:
            raise ConfigError(
                "dicom.bind_address", f"not an IP address: {self.bind_address!r}"
            ) from None
        if not 0 <= self.max_associations_per_ip <= self.max_associations:
            raise ConfigError(
                "dicom.max_associations_per_ip",
                f"must be 0 (auto) or 1..dicom.max_associations ({self.max_associations}), "
                f"got {self.max_associations_per_ip}",
            )
        if self.max_connections < self.max_associations:
            raise ConfigError(
                "dicom.max_connections",
                f"must be at least dicom.max_associations ({self.max_associations})",
            )
        if not self.allowed_callers and not self.allow_any_caller:
            raise ConfigError(
                "dicom.allowed_callers",
                "is empty and dicom.allow_any_caller is false: every association would be rejected",
            )
        for i, c in enumerate(self.allowed_callers):
            _check_ae(f"dicom.allowed_callers[{i}].ae_title", c.ae_title)
            if c.host:
                try:
                    ipaddress.ip_network(c.host, strict=False)
                except ValueError:
                    raise ConfigError(
                        f"dicom.allowed_callers[{i}].host",
                        f"not an IP address or CIDR: {c.host!r}",
                    ) from None
        t = self.tls
        if t.enabled:
            for name in ("cert_file", "key_file"):
                v = getattr(t, name)
                if not v:
                    raise ConfigError(
                        f"dicom.tls.{name}", "required when dicom.tls.enabled is true"
                    )
                if not Path(v).is_file():
                    raise ConfigError(f"dicom.tls.{name}", f"file not found: {v}")
            if t.ca_file and not Path(t.ca_file).is_file():
                raise ConfigError("dicom.tls.ca_file", f"file not found: {t.ca_file}")


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

    data_dir: str = setting("/var/lib/edge-agent", required=True)
    database: str = setting("edge.db", required=True)
    hot_dir: str = setting("hot", required=True)
    warm_dir: str = setting("warm", required=True)
    cold_dir: str = setting("cold", required=True)
    quarantine_dir: str = setting("quarantine", required=True)
    min_free_mb: int = setting(1024, lo=0, unit="MiB")
    fsync: bool = True
    journal: bool = True
    journal_dir: str = "journal"
    journal_segment_mb: int = setting(64, lo=4, hi=4096, unit="MiB")
    journal_max_pending_mb: int = setting(256, lo=1, hi=65536, unit="MiB")
    journal_max_record_mb: int = setting(16, lo=1, hi=1024, unit="MiB")

    def path(self, name: str) -> Path:
        """Resolve one of this section's path settings against ``data_dir``."""
        p = Path(getattr(self, name))
        return p if p.is_absolute() else Path(self.data_dir) / p

    def check(self) -> None:
        if self.journal_max_record_mb * 2 > self.journal_segment_mb:
            raise ConfigError(
                "storage.journal_max_record_mb",
                f"must be at most half of storage.journal_segment_mb ({self.journal_segment_mb})",
            )
        seen: dict[Path, str] = {}
        for name in ("hot_dir", "warm_dir", "cold_dir", "quarantine_dir"):
            p = self.path(name).resolve()
            if p in seen:
                raise ConfigError(f"storage.{name}", f"is the same folder as storage.{seen[p]}")
            seen[p] = name


@dataclass(frozen=True, kw_only=True)
class StudiesConfig:
    """Study assembly.

    ``quiet_period_s``: a study is complete when nothing arrived for this long (seconds).
    ``quiet_period_by_modality``: per-modality overrides, e.g. ``{CT = 20}``.
    ``check_interval_s``: how often the assembly worker looks for complete studies.
    """

    quiet_period_s: float = setting(10.0, lo=0, hi=86400, lo_open=True, unit="s")
    quiet_period_by_modality: Mapping[str, float] = setting(
        {}, lo=0, hi=86400, lo_open=True, unit="s"
    )
    check_interval_s: float = setting(0.5, lo=0, hi=60, lo_open=True, unit="s")

    def quiet_period_for(self, modality: str) -> float:
        """The quiet period in seconds for a study of ``modality``."""
        return float(self.quiet_period_by_modality.get(modality.upper(), self.quiet_period_s))


@dataclass(frozen=True, kw_only=True)
class SiteConfig:
    """This site as people see it.

    ``time_zone``: the IANA zone (``Europe/Warsaw``, ``UTC``) every time is shown in, with
    its name beside it: worklist, study page, reports, CLI. Empty = this machine's zone.
    Stored times stay UTC; only what is shown changes.
    """

    time_zone: str = ""

    def check(self) -> None:
        problem = check_zone_name(self.time_zone)
        if problem:
            raise ConfigError("site.time_zone", problem)


@dataclass(frozen=True, kw_only=True)
class LoggingConfig:
    """``level``: DEBUG|INFO|WARNING|ERROR. ``json``: one JSON object per line (default)."""

    level: str = "INFO"
    json: bool = True

    def check(self) -> None:
        if self.level.upper() not in _LOG_LEVELS:
            raise ConfigError("logging.level", f"must be one of {', '.join(_LOG_LEVELS)}")


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
    providers: tuple[str, ...] = setting(
        ("tensorrt", "cuda", "cpu"), required=True, choices=("tensorrt", "cuda", "cpu")
    )
    device_ids: tuple[int, ...] = setting((0,), required=True, lo=0)
    max_batch_size: int = setting(16, lo=1, hi=1024)
    intra_op_threads: int = setting(0, lo=0)
    models_dir: str = setting("models", required=True)
    max_attempts: int = setting(2, lo=1, hi=10)
    check_interval_s: float = setting(0.5, lo=0, hi=60, lo_open=True, unit="s")
    rollback_error_rate: float = setting(0.5, lo=0, hi=1, hi_open=True)
    rollback_window_jobs: int = setting(20, lo=1, hi=10000)
    rollback_min_jobs: int = setting(5, lo=1)
    shadow_agreement: float = setting(0.9, lo=0, hi=1, lo_open=True)

    def check(self) -> None:
        if self.rollback_min_jobs > self.rollback_window_jobs:
            raise ConfigError(
                "inference.rollback_min_jobs", "must be 1..inference.rollback_window_jobs"
            )


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
    hot_days: float = setting(7.0, lo=0, hi=36500, lo_open=True, unit="days")
    warm_days: float = setting(30.0, lo=0, hi=36500, lo_open=True, unit="days")
    cold_days: float = setting(90.0, lo=0, hi=36500, lo_open=True, unit="days")
    cold_days_by_modality: Mapping[str, float] = setting({}, lo=0, hi=36500, unit="days")
    archive: bool = True
    keep_days_after_archive: float = setting(0.0, lo=0, hi=36500, unit="days")
    hot_high_watermark: float = setting(0.85, lo=0, hi=1, lo_open=True)
    hot_low_watermark: float = setting(0.75, lo=0, hi=1, lo_open=True)
    warm_high_watermark: float = setting(0.90, lo=0, hi=1, lo_open=True)
    warm_low_watermark: float = setting(0.80, lo=0, hi=1, lo_open=True)
    cold_high_watermark: float = setting(0.95, lo=0, hi=1, lo_open=True)
    cold_low_watermark: float = setting(0.85, lo=0, hi=1, lo_open=True)
    cold_key_file: str = setting("cold-keys", required=True)
    tier_interval_s: float = setting(300.0, lo=0, hi=604800, lo_open=True, unit="s")
    archive_interval_s: float = setting(600.0, lo=0, hi=604800, lo_open=True, unit="s")
    integrity_interval_s: float = setting(3600.0, lo=0, hi=604800, lo_open=True, unit="s")
    integrity_sample: int = setting(100, lo=0, hi=100000)
    maintenance_cron: str = "30 3 * * *"
    batch_instances: int = setting(2000, lo=1, hi=1000000)

    def check(self) -> None:
        if not self.hot_days <= self.warm_days <= self.cold_days:
            raise ConfigError(
                "lifecycle.hot_days", "must be > 0 and hot_days <= warm_days <= cold_days (days)"
            )
        for mod, v in self.cold_days_by_modality.items():
            if v < self.warm_days:
                raise ConfigError(f"lifecycle.cold_days_by_modality.{mod}", "must be >= warm_days")
        for tier in ("hot", "warm", "cold"):
            hi = getattr(self, f"{tier}_high_watermark")
            lo = getattr(self, f"{tier}_low_watermark")
            if not 0 < lo < hi <= 1:
                raise ConfigError(
                    f"lifecycle.{tier}_low_watermark",
                    f"must be > 0 and < {tier}_high_watermark <= 1",
                )
        try:
            from apscheduler.triggers.cron import CronTrigger

            CronTrigger.from_crontab(self.maintenance_cron, timezone="UTC")
        except ValueError as exc:
            raise ConfigError("lifecycle.maintenance_cron", f"not a crontab line: {exc}") from None


@dataclass(frozen=True, kw_only=True)
class WebConfig:
    """The local web UI, REST API (``/api/v1``), ``/metrics``, ``/healthz``, ``/readyz``.

    Served on ``bind_address``:``port`` (0 = any free port, for tests), over HTTPS when
    ``tls_cert`` and ``tls_key`` are set (session cookies are then marked Secure). Sessions
    last ``session_ttl_s``; ``lockout_attempts`` failed logins in a row lock an account for
    ``lockout_s``; ``login_throttle_attempts`` failed logins from one client address within
    ``login_throttle_window_s`` refuse that address's logins for the rest of the window.
    API tokens expire after ``api_token_ttl_days`` unless made with another lifetime.
    ``password_blocklist_file``: a breached/common password list (one per line), refused
    on top of the built-in rules. The worklist refreshes itself every ``refresh_s``.
    """

    enabled: bool = True
    bind_address: str = "0.0.0.0"
    port: int = setting(8080, lo=0, hi=65535)
    tls_cert: str = ""
    tls_key: str = ""
    session_ttl_s: float = setting(28800.0, lo=60, hi=7 * 86400, unit="s")
    lockout_attempts: int = setting(5, lo=1, hi=100)
    lockout_s: float = setting(900.0, lo=1, hi=86400, unit="s")
    login_throttle_attempts: int = setting(20, lo=1, hi=100_000)
    login_throttle_window_s: float = setting(300.0, lo=1, hi=86400, unit="s")
    refresh_s: float = setting(5.0, lo=0.5, hi=3600, unit="s")
    api_token_ttl_days: float = setting(365.0, lo=0.001, hi=3650, unit="days")
    password_blocklist_file: str = ""

    def check(self) -> None:
        if self.password_blocklist_file and not Path(self.password_blocklist_file).is_file():
            raise ConfigError(
                "web.password_blocklist_file", f"no file {self.password_blocklist_file}"
            )
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("web.tls_cert", "web.tls_cert and web.tls_key go together")


@dataclass(frozen=True, kw_only=True)
class Destination:
    """A DICOM destination (PACS) results are sent to: ``ae_title`` at ``host``:``port``."""

    ae_title: str
    host: str = setting("", required=True)
    port: int = setting(104, lo=1, hi=65535)

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
    calling_ae_title: str = ""  # "" = dicom.ae_title: the AE title PACS know us by
    max_attempts: int = setting(8, lo=1, hi=100)
    retry_initial_s: float = setting(5.0, lo=0, lo_open=True, unit="s")
    retry_max_s: float = setting(300.0, hi=86400, unit="s")
    check_interval_s: float = setting(1.0, lo=0, hi=60, lo_open=True, unit="s")

    def check(self) -> None:
        if self.calling_ae_title:
            _check_ae("results.calling_ae_title", self.calling_ae_title)
        for i, dest in enumerate(self.destinations):
            _check_ae(f"results.destinations[{i}].ae_title", dest.ae_title)
        if self.retry_initial_s > self.retry_max_s:
            raise ConfigError(
                "results.retry_initial_s", "must be > 0 and <= results.retry_max_s (<= 86400 s)"
            )


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
    outbox_max_mb: int = setting(2048, lo=1, hi=1024 * 1024, unit="MiB")
    credential_file: str = setting("sync-credential.json", required=True)
    batch_max_records: int = setting(500, lo=1, hi=10000)
    batch_max_kb: int = setting(4096, lo=1, hi=64 * 1024, unit="KiB")
    retry_initial_s: float = setting(1.0, lo=0, lo_open=True, unit="s")
    retry_max_s: float = setting(300.0, hi=3600, unit="s")
    heartbeat_interval_s: float = setting(60.0, lo=1, hi=86400, unit="s")
    pseudonymise: bool = True
    pseudonymise_fields: tuple[str, ...] = (
        "patient_id",
        "patient_name",
        "patient_birth_date",
        "accession_number",
    )
    secret_file: str = setting("site-secret.key", required=True)  # a file name, not a secret
    hub_ca_file: str = ""
    trusted_keys: tuple[str, ...] = ()
    release_threshold: int = setting(1, lo=1)

    def check(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", self.node_id):
            raise ConfigError("sync.node_id", "1-64 letters, digits, '.', '_' or '-'")
        if self.retry_initial_s > self.retry_max_s:
            raise ConfigError("sync.retry_initial_s", "must be > 0 and <= sync.retry_max_s <= 3600")
        if self.hub_ca_file and not Path(self.hub_ca_file).is_file():
            raise ConfigError("sync.hub_ca_file", f"file not found: {self.hub_ca_file}")
        for i, k in enumerate(self.trusted_keys):
            if not Path(k).is_file():
                raise ConfigError(f"sync.trusted_keys[{i}]", f"file not found: {k}")
        if self.release_threshold > max(len(self.trusted_keys), 1):
            raise ConfigError("sync.release_threshold", "must be 1..number of sync.trusted_keys")

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
    site: SiteConfig = field(default_factory=SiteConfig)

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


def validate(cfg: Config) -> None:
    """Check every setting against the limits declared beside it, then each section's
    cross-field rules; raise :class:`ConfigError` naming the field."""
    check_declared(cfg, "")


def _check_ae(where: str, value: str) -> None:
    if not value.strip() or not _AE_RE.match(value):
        raise ConfigError(where, f"not a valid AE title (1-16 printable ASCII, no '\\'): {value!r}")
