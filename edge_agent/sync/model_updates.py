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

The decision (accepted or refused, with the reason) is recorded and reported to the hub.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from edge_agent.clock import Clock
from edge_agent.errors import EdgeError
from edge_agent.inference.package import open_package
from edge_agent.inference.registry import Registry
from edge_agent.inference.runner import ModelRunner
from edge_agent.store import Store
from hub_protocol.releases import ReleaseError, verify_archive, verify_release
from hub_protocol.semver import parse as semver

log = logging.getLogger(__name__)

ACCEPTED, REFUSED = "accepted", "refused"


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
        "INSERT INTO model_updates (name, version, status, reason, decided_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT(name, version) DO UPDATE SET status = "
        "excluded.status, reason = excluded.reason, decided_at = excluded.decided_at",
        (name, version, status, reason[:2000], now),
    )


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
    ) -> None:
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
        """Assignments from the change feed not decided yet."""
        decided = {
            (r[0], r[1]) for r in self._store.query("SELECT name, version FROM model_updates")
        }
        out = []
        for row in self._store.query("SELECT payload FROM replica WHERE type = 'model_assignment'"):
            a = json.loads(row[0])
            if (a["name"], a["version"]) not in decided:
                out.append(a)
        return out

    async def check(self) -> list[Decision]:
        """Handle every pending assignment and rollback order; returns the decisions."""
        decisions = []
        for a in self.pending():
            decisions.append(await self.apply(a))
        for row in self._store.query("SELECT payload FROM replica WHERE type = 'model_rollback'"):
            d = await self.rollback(json.loads(row[0]))
            if d is not None:
                decisions.append(d)
        return decisions

    async def rollback(self, order: Mapping[str, Any]) -> Decision | None:
        """Ops rolled a version back: if it is active here, re-activate the previous installed
        version (``to_version`` when installed, else the newest one below). None = nothing
        to do (already done, or that version never became active here)."""
        name, bad = str(order["name"]), str(order["from_version"])
        active = next((m for m in self._registry.active() if m.name == name), None)
        if active is None or active.version != bad:
            return None
        installed = {m.version for m in self._registry.installed() if m.name == name}
        target = order.get("to_version")
        if target not in installed:
            older = sorted((v for v in installed if semver(v) < semver(bad)), key=semver)
            target = older[-1] if older else None
        if target is None:
            reason = "rollback ordered but no older version is installed"
            await self._report(name, bad, "rollback_failed", reason)
            return Decision(name, bad, "rollback_failed", reason)
        self._registry.activate(name, str(target))
        log.warning(
            "model version rolled back by ops", extra={"model": name, "from": bad, "to": target}
        )
        await self._report(name, bad, "rolled_back", f"re-activated {target}")
        return Decision(name, bad, "rolled_back", f"re-activated {target}")

    async def apply(self, assignment: Mapping[str, Any]) -> Decision:
        name, version = str(assignment["name"]), str(assignment["version"])
        try:
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
            self._staging.mkdir(parents=True, exist_ok=True)
            part = self._staging / f"{rel.archive_sha256}.part"
            await self._source.download(str(assignment["archive"]), part, limit=rel.archive_size)
            data = part.read_bytes()
            if len(data) < rel.archive_size:
                raise ReleaseError(
                    "incomplete",
                    f"download stopped at {len(data)} of {rel.archive_size} bytes; will resume",
                )
            verify_archive(data, rel)
            archive = part.with_suffix(".tar")
            part.replace(archive)
            pkg = open_package(archive, staging=self._staging)
            try:
                m = pkg.manifest
                if (m.name, m.version) != (rel.name, rel.version):
                    raise ReleaseError(
                        "malformed",
                        f"package is {m.name} {m.version}, the "
                        f"release says {rel.name} {rel.version}",
                    )
                installed = self._registry.install(pkg.root, activate=False)
            finally:
                shutil.rmtree(pkg.root, ignore_errors=True)
                archive.unlink(missing_ok=True)
            ModelRunner(self._registry.load(installed), providers=["cpu"])  # self-test
            self._registry.activate(name, version)
        except ReleaseError as exc:
            if exc.reason == "incomplete":  # not a decision: resume next time
                log.warning("model download incomplete; will resume", extra={"error": str(exc)})
                return Decision(name, version, "pending", str(exc))
            return await self._refuse(name, version, str(exc))
        except EdgeError as exc:  # package, registry, ORT load, self-test
            return await self._refuse(name, version, f"{type(exc).__name__}: {exc}")
        now = self._clock.now()
        self._store.writer.call(
            lambda c: _record(c, name=name, version=version, status=ACCEPTED, reason="", now=now)
        )
        log.info("model version activated", extra={"model": name, "version": version})
        await self._report(name, version, "active", f"signed by {', '.join(verified.signed_by)}")
        return Decision(name, version, ACCEPTED, "")

    async def _refuse(self, name: str, version: str, reason: str) -> Decision:
        now = self._clock.now()
        self._store.writer.call(
            lambda c: _record(c, name=name, version=version, status=REFUSED, reason=reason, now=now)
        )
        log.error(
            "model version refused; the active version stays",
            extra={"model": name, "version": version, "reason": reason},
        )
        await self._report(name, version, REFUSED, reason)
        return Decision(name, version, REFUSED, reason)

    async def _report(self, name: str, version: str, status: str, detail: str) -> None:
        try:
            await self._source.report_model(name, version, status, detail)
        except EdgeError as exc:  # the decision stands; the hub learns it next time
            log.warning("could not report model status", extra={"error": str(exc)})
