"""Model versions from central ops: discover, verify, download (resumable), stage, self-test,
activate atomically; refuse anything that fails a check, leaving the active model untouched.

Assignments arrive through the hub's change feed (``model_assignment`` rows in the replica).
For each one not yet decided, in this order, each step a gate:

1. the signed release document (:func:`hub_protocol.releases.verify_release`): pinned ops
   keys and threshold, not expired, version strictly greater than any accepted for that model;
2. the archive download into ``staging/<sha256>.part``, resumed with an HTTP Range request
   from what is already there, cut off at the signed size, then checked against the signed
   size and SHA-256;
3. the package (tar safety, every file's hash and size, manifest name/version = release);
4. installation (copied and verified again), an ONNX Runtime session and the manifest
   self-test;
5. activation: one transaction switches the active version; the previous version stays.
   Each step is reported to the hub as it starts (``downloading``, ``verifying``,
   ``self_test``), then the decision.
   An assignment in ``shadow`` mode stops before this step: the version becomes the model's
   shadow (:mod:`edge_agent.inference.shadow`) and its agreement with the active version is
   reported to the hub; a later normal assignment of the same version promotes it (verified
   again, no second download).

After activation the version is watched (:meth:`ModelUpdater.watch`, run by the agent on its
own, online or not): if more than ``inference.rollback_error_rate`` of its recent jobs fail,
the previous version is re-activated in one transaction with the re-run of the failed series.

Every decision (accepted, refused, shadow, rolled back, with the reason) is recorded, and
re-sent to the hub after each successful pull until it got there.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.clock import Clock
from edge_agent.errors import EdgeError
from edge_agent.inference.registry import InstalledModel, Registry, set_active
from edge_agent.inference.runner import ModelRunner
from edge_agent.inference.store import agreement, job_outcomes, rerun_on
from edge_agent.metrics import Metrics
from edge_agent.store import Store
from hub_protocol import ChangeType
from hub_protocol.package import open_package
from hub_protocol.releases import Release, ReleaseError, verify_archive, verify_release
from hub_protocol.semver import parse as semver

log = logging.getLogger(__name__)

ACCEPTED, REFUSED, SHADOW = "accepted", "refused", "shadow"
ROLLED_BACK, AUTO_ROLLED_BACK = "rolled_back", "auto_rolled_back"
#: what the hub is told for each local decision (the hub's rollouts wait for "active")
HUB_STATUS = {ACCEPTED: "active"}


class ArtifactSource(Protocol):
    async def download(self, path: str, dest: Path, *, limit: int) -> None:
        """Append the artifact at ``path`` to ``dest``, resuming from its current size, and
        never writing past ``limit`` bytes in total (raise if the server sends more)."""
        ...

    async def report_model(self, name: str, version: str, status: str, detail: str) -> None: ...


@dataclass(frozen=True)
class Decision:
    name: str
    version: str
    status: str
    reason: str


def _record(conn: Any, *, name: str, version: str, status: str, reason: str, now: float) -> None:
    conn.execute(
        "INSERT INTO model_updates (name, version, status, reason, decided_at, reported) "
        "VALUES (?, ?, ?, ?, ?, 0) ON CONFLICT(name, version) DO UPDATE SET status = "
        "excluded.status, reason = excluded.reason, decided_at = excluded.decided_at, "
        "reported = 0",
        (name, version, status, reason[:2000], now),
    )


@dataclass(frozen=True, kw_only=True)
class WatchSettings:
    """When an updated version is rolled back for its error rate (``inference.*``)."""

    max_error_rate: float = 0.5
    window_jobs: int = 20
    min_jobs: int = 5


def _auto_rollback(
    conn: Any, *, name: str, bad: str, good: str, since: float, reason: str, now: float
) -> int:
    set_active(conn, name=name, version=good, now=now)
    _record(conn, name=name, version=bad, status=AUTO_ROLLED_BACK, reason=reason, now=now)
    return rerun_on(conn, name=name, bad=bad, good=good, since=since, now=now)


class ModelUpdater:
    def __init__(
        self,
        *,
        store: Store,
        registry: Registry,
        source: ArtifactSource,
        trusted: Mapping[str, Ed25519PublicKey],
        threshold: int,
        staging: Path,
        clock: Clock,
        watch: WatchSettings | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._watch = watch or WatchSettings()
        self._metrics = metrics
        self._shadow_reported: dict[tuple[str, str], int] = {}
        self._stuck: set[tuple[str, str]] = set()  # failing, nothing to roll back to (logged)
        self._store = store
        self._registry = registry
        self._source = source
        self._trusted = trusted
        self._threshold = threshold
        self._staging = staging
        self._clock = clock

    def _accepted_versions(self, applying: tuple[str, str]) -> dict[str, str]:
        """Highest accepted version per model: decisions recorded here, and versions
        installed otherwise, except ``applying`` itself (installed by an earlier attempt that
        crashed before its decision was recorded: finishing it is not a rollback)."""
        best: dict[str, str] = {}
        for name, version in self._store.query(
            "SELECT name, version FROM model_updates WHERE status = ?", (ACCEPTED,)
        ):
            if name not in best or semver(version) > semver(best[name]):
                best[name] = version
        for m in self._registry.installed():  # versions installed by hand count too
            if (m.name, m.version) == applying:
                continue
            if m.name not in best or semver(m.version) > semver(best[m.name]):
                best[m.name] = m.version
        return best

    def pending(self) -> list[dict[str, Any]]:
        """Assignments from the change feed not decided yet (a version running as a shadow
        is pending again when it is assigned normally: that is its promotion)."""
        decided = {
            (r[0], r[1]): r[2]
            for r in self._store.query("SELECT name, version, status FROM model_updates")
        }
        out = []
        for row in self._store.query(
            "SELECT payload FROM replica WHERE type = ?", (ChangeType.MODEL_ASSIGNMENT.value,)
        ):
            a = json.loads(row[0])
            status = decided.get((a["name"], a["version"]))
            if status is None or (status == SHADOW and a.get("mode", "active") != SHADOW):
                out.append(a)
        return out

    async def check(self) -> list[Decision]:
        """Handle every pending assignment and rollback order, then tell the hub what it
        does not know yet; returns the decisions."""
        decisions = []
        for a in self.pending():
            decisions.append(await self.apply(a))
        for row in self._store.query(
            "SELECT payload FROM replica WHERE type = ?", (ChangeType.MODEL_ROLLBACK.value,)
        ):
            d = await self.rollback(json.loads(row[0]))
            if d is not None:
                decisions.append(d)
        await self.flush_reports()
        return decisions

    async def flush_reports(self) -> int:
        """Send every decision the hub has not acknowledged, and each shadow version's
        agreement when it changed. Returns how many reports got through."""
        sent = 0
        for name, version, status, reason in self._store.query(
            "SELECT name, version, status, reason FROM model_updates WHERE reported = 0"
        ):
            if status == SHADOW:
                continue  # reported below, with its agreement
            if await self._report(name, version, HUB_STATUS.get(status, status), reason):
                self._mark_reported(name, version, status)
                sent += 1
        for name, m in self._registry.shadows().items():
            with self._store.read() as conn:
                ag = agreement(conn, name, m.version)
            if self._shadow_reported.get((name, m.version)) == ag.series:
                continue
            if await self._report(name, m.version, SHADOW, ag.summary()):
                self._shadow_reported[(name, m.version)] = ag.series
                self._mark_reported(name, m.version, SHADOW)
                sent += 1
        return sent

    def _mark_reported(self, name: str, version: str, status: str) -> None:
        self._store.writer.call(
            lambda c: c.execute(
                "UPDATE model_updates SET reported = 1 WHERE name = ? AND version = ? "
                "AND status = ?",
                (name, version, status),
            )
        )

    def watch(self) -> list[Decision]:
        """Roll back every version activated by an update whose error rate over its recent
        jobs is above the bound (to the newest older version installed), re-running the
        series it failed. Local only: works while the hub is unreachable (the decision is
        reported later by :meth:`flush_reports`)."""
        updated = {
            (r[0], r[1])
            for r in self._store.query(
                "SELECT name, version FROM model_updates WHERE status = ?", (ACCEPTED,)
            )
        }
        w = self._watch
        decisions = []
        for m in self._registry.active():
            if (m.name, m.version) not in updated:
                continue
            since = m.activated_at or m.installed_at
            with self._store.read() as conn:
                finished, failed = job_outcomes(
                    conn, name=m.name, version=m.version, since=since, last=w.window_jobs
                )
            if finished < w.min_jobs or failed / finished <= w.max_error_rate:
                continue
            older = sorted(
                (
                    o.version
                    for o in self._registry.installed()
                    if o.name == m.name and semver(o.version) < semver(m.version)
                ),
                key=semver,
            )
            why = (
                f"{failed} of its last {finished} jobs failed "
                f"(rate {failed / finished:.2f} > {w.max_error_rate})"
            )
            if not older:
                if (m.name, m.version) in self._stuck:
                    continue
                self._stuck.add((m.name, m.version))
                log.error(
                    "updated model version is failing but no older version is installed",
                    extra={"model": m.name, "version": m.version, "why": why},
                )
                continue
            good, now = older[-1], self._clock.now()
            reason = f"automatic rollback: {why}; re-activated {good}"
            rerun: int = self._store.writer.call(
                partial(
                    _auto_rollback,
                    name=m.name,
                    bad=m.version,
                    good=good,
                    since=since,
                    reason=reason,
                    now=now,
                )
            )
            if self._metrics is not None:
                self._metrics.model_rollbacks.labels(m.name, "error_rate").inc()
            log.error(
                "model version rolled back automatically",
                extra={"model": m.name, "from": m.version, "to": good, "why": why, "rerun": rerun},
            )
            decisions.append(Decision(m.name, m.version, AUTO_ROLLED_BACK, reason))
        return decisions

    async def run_watch(self, stop: asyncio.Event, interval_s: float) -> None:
        """:meth:`watch` every ``interval_s`` until ``stop``; tries to report at once."""
        while not stop.is_set():
            try:
                if await asyncio.to_thread(self.watch):
                    await self.flush_reports()
            except Exception:
                log.exception("model watch failed; retrying next interval")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval_s)

    async def rollback(self, order: Mapping[str, Any]) -> Decision | None:
        """Ops rolled a version back: if it is active here, re-activate the previous installed
        version (``to_version`` when it may be, else the newest one below that may). None =
        nothing to do (already done, or that version never became active here).

        The order is not signed (the hub is not trusted), so it can only choose among
        versions this node already trusts: one whose last decision here is *accepted*, or
        one the operator installed on this node (no decision recorded). A version refused
        here (a bad signature, a failed self-test: it may stay installed), one only ever
        run in shadow and one already rolled back are never re-activated by an order."""
        name, bad = str(order["name"]), str(order["from_version"])
        active = next((m for m in self._registry.active() if m.name == name), None)
        if active is None or active.version != bad:
            return None
        decided = {
            str(v): str(st)
            for v, st in self._store.query(
                "SELECT version, status FROM model_updates WHERE name = ?", (name,)
            )
        }
        installed = {
            m.version
            for m in self._registry.installed()
            if m.name == name and m.version != bad and decided.get(m.version, ACCEPTED) == ACCEPTED
        }
        target = order.get("to_version")
        if target is not None and target not in installed:
            log.warning(
                "rollback order names a version this node may not re-activate; ignored",
                extra={"model": name, "to": str(target), "decision": decided.get(str(target))},
            )
            target = None
        if target is None:
            older = sorted((v for v in installed if semver(v) < semver(bad)), key=semver)
            target = older[-1] if older else None
        if target is None:
            reason = "rollback ordered but no older version accepted here is installed"
            await self._report(name, bad, "rollback_failed", reason)
            return Decision(name, bad, "rollback_failed", reason)
        now, reason = self._clock.now(), f"ordered by ops; re-activated {target}"

        def tx(c: Any) -> None:
            set_active(c, name=name, version=str(target), now=now)
            _record(c, name=name, version=bad, status=ROLLED_BACK, reason=reason, now=now)

        self._store.writer.call(tx)
        if self._metrics is not None:
            self._metrics.model_rollbacks.labels(name, "ops").inc()
        log.warning(
            "model version rolled back by ops", extra={"model": name, "from": bad, "to": target}
        )
        if await self._report(name, bad, ROLLED_BACK, reason):
            self._mark_reported(name, bad, ROLLED_BACK)
        return Decision(name, bad, ROLLED_BACK, reason)

    async def apply(self, assignment: Mapping[str, Any]) -> Decision:
        name, version = str(assignment["name"]), str(assignment["version"])
        mode = str(assignment.get("mode", "active"))
        was = self._store.query(
            "SELECT status FROM model_updates WHERE name = ? AND version = ?", (name, version)
        )
        try:
            if mode not in ("active", SHADOW):
                raise ReleaseError("malformed", f"unknown assignment mode {mode!r}")
            verified = verify_release(
                str(assignment["document"]).encode(),
                trusted=self._trusted,
                threshold=self._threshold,
                accepted_versions=self._accepted_versions((name, version)),
                now=self._clock.now(),
            )
            rel = verified.release
            if (rel.name, rel.version) != (name, version):
                raise ReleaseError("malformed", "assignment and signed release disagree")
            installed = self._registry.get(name, version)
            if installed is not None and installed.active:
                return await self._accept(name, version, "already the active version")
            if installed is None or not (was and was[0][0] == SHADOW):
                installed = await self._fetch_and_install(rel, assignment)
            # else: promoting our shadow, installed from this signed release: no new download
            await self._report(name, version, "self_test", "loading in ONNX Runtime")
            ModelRunner(self._registry.load(installed), providers=["cpu"])  # self-test
            if mode == SHADOW:
                self._registry.set_shadow(name, version)
            else:
                self._registry.activate(name, version)
        except ReleaseError as exc:
            if exc.reason == "incomplete":  # not a decision: resume next time
                log.warning("model download incomplete; will resume", extra={"error": str(exc)})
                return Decision(name, version, "pending", str(exc))
            return await self._refuse(name, version, str(exc))
        except EdgeError as exc:  # package, registry, ORT load, self-test
            return await self._refuse(name, version, f"{type(exc).__name__}: {exc}")
        signed = f"signed by {', '.join(verified.signed_by)}"
        if mode == SHADOW:
            now = self._clock.now()
            self._store.writer.call(
                lambda c: _record(
                    c, name=name, version=version, status=SHADOW, reason=signed, now=now
                )
            )
            self._shadow_reported.pop((name, version), None)
            log.info("model version running as a shadow", extra={"model": name, "version": version})
            await self.flush_reports()
            return Decision(name, version, SHADOW, "")
        return await self._accept(name, version, signed)

    async def _accept(self, name: str, version: str, reason: str) -> Decision:
        now = self._clock.now()
        self._store.writer.call(
            lambda c: _record(
                c, name=name, version=version, status=ACCEPTED, reason=reason, now=now
            )
        )
        log.info("model version activated", extra={"model": name, "version": version})
        if await self._report(name, version, "active", reason):
            self._mark_reported(name, version, ACCEPTED)
        return Decision(name, version, ACCEPTED, "")

    async def _fetch_and_install(
        self, rel: Release, assignment: Mapping[str, Any]
    ) -> InstalledModel:
        """Download (resuming), verify the archive and its package, install (not active)."""
        self._staging.mkdir(parents=True, exist_ok=True)
        part = self._staging / f"{rel.archive_sha256}.part"
        have = part.stat().st_size if part.exists() else 0
        await self._report(
            rel.name, rel.version, "downloading", f"{have} of {rel.archive_size} bytes here"
        )
        await self._source.download(str(assignment["archive"]), part, limit=rel.archive_size)
        data = part.read_bytes()
        if len(data) < rel.archive_size:
            raise ReleaseError(
                "incomplete",
                f"download stopped at {len(data)} of {rel.archive_size} bytes; will resume",
            )
        await self._report(rel.name, rel.version, "verifying", "archive hash, package files")
        verify_archive(data, rel)
        archive = part.with_suffix(".tar")
        part.replace(archive)
        pkg = open_package(archive, staging=self._staging)
        try:
            m = pkg.manifest
            if (m.name, m.version) != (rel.name, rel.version):
                raise ReleaseError(
                    "malformed",
                    f"package is {m.name} {m.version}, the release says {rel.name} {rel.version}",
                )
            return self._registry.install(pkg.root, activate=False)
        finally:
            shutil.rmtree(pkg.root, ignore_errors=True)
            archive.unlink(missing_ok=True)

    async def _refuse(self, name: str, version: str, reason: str) -> Decision:
        now = self._clock.now()
        shadow = self._registry.shadows().get(name)
        if shadow is not None and shadow.version == version:  # a refused version stops
            self._registry.set_shadow(name, None)
        self._store.writer.call(
            lambda c: _record(c, name=name, version=version, status=REFUSED, reason=reason, now=now)
        )
        log.error(
            "model version refused; the active version stays",
            extra={"model": name, "version": version, "reason": reason},
        )
        if await self._report(name, version, REFUSED, reason):
            self._mark_reported(name, version, REFUSED)
        return Decision(name, version, REFUSED, reason)

    async def _report(self, name: str, version: str, status: str, detail: str) -> bool:
        try:
            await self._source.report_model(name, version, status, detail)
        except EdgeError as exc:  # the decision stands; re-sent after the next pull
            log.warning("could not report model status", extra={"error": str(exc)})
            return False
        return True
