"""Model releases and staged rollouts: signed releases and their archives, assignments sent
through the change feed, install reports, and rollouts from canary sites to a percentage to
every site (paused at the first refusal, rolled back by telling sites to re-activate the
version before)."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from cloud_hub.artifacts import ArtifactStore, open_artifacts
from cloud_hub.store.base import lock_site, lock_sites
from cloud_hub.store.feed import write_change
from cloud_hub.store.schema import (
    assignments,
    install_status,
    releases,
    rollouts,
    shadow_assignments,
)
from cloud_hub.store.sites import SitesStore
from hub_protocol import ChangeType
from hub_protocol.releases import Release, verify_archive

#: install steps a site reports while it works on a version (not a decision yet)
IN_PROGRESS = frozenset({"downloading", "verifying", "self_test"})


class ReleaseStore(SitesStore):
    """Publishing, assigning and rolling out releases (a rollout widens to every enrolled
    site, so this part builds on the site list)."""

    def publish(
        self,
        document: bytes,
        archive: bytes,
        artifacts: Path | str | ArtifactStore,
        *,
        now: float | None = None,
    ) -> Release:
        """Store a signed release and its archive (content-addressed in ``artifacts``: a
        folder, ``s3://bucket/prefix``, or a store). The hub checks the archive against the
        signed size and hash so it never serves garbage, but trust is decided by the edges,
        which verify the signatures."""
        doc = json.loads(document)
        release = Release.from_json(doc["signed"])
        verify_archive(archive, release)
        if isinstance(artifacts, (str, Path)):
            artifacts = open_artifacts(artifacts)
        artifacts.put(release.archive_sha256, archive)
        with self.writing() as conn:
            exists = conn.execute(
                sa.select(releases.c.archive_sha256).where(
                    releases.c.name == release.name, releases.c.version == release.version
                )
            ).first()
            if exists is not None and exists[0] != release.archive_sha256:
                raise ValueError(
                    f"{release.name} {release.version} was already published with another archive"
                )
            if exists is None:
                conn.execute(
                    releases.insert().values(
                        name=release.name,
                        version=release.version,
                        document=document.decode(),
                        archive_sha256=release.archive_sha256,
                        archive_size=release.archive_size,
                        published_at=time.time() if now is None else now,
                    )
                )
            else:  # more signatures (k of n) arrive as a new document for the same archive
                conn.execute(
                    releases.update()
                    .where(releases.c.name == release.name, releases.c.version == release.version)
                    .values(document=document.decode())
                )
        return release

    def assign(
        self,
        name: str,
        version: str,
        site_ids: Sequence[str],
        *,
        shadow: bool = False,
        now: float | None = None,
    ) -> int:
        """Assign a published release to sites; each gets it through its change feed.
        ``shadow``: the sites run it beside their active version without publishing its
        results, and report how far the two agree; assigning it normally later promotes it."""
        now = time.time() if now is None else now
        with self.writing() as conn:
            rel = (
                conn.execute(
                    sa.select(releases).where(
                        releases.c.name == name, releases.c.version == version
                    )
                )
                .mappings()
                .first()
            )
            if rel is None:
                raise KeyError(f"{name} {version} is not published")
            table = shadow_assignments if shadow else assignments
            lock_sites(conn, list(site_ids))
            for site in site_ids:
                conn.execute(table.delete().where(table.c.site_id == site, table.c.name == name))
                conn.execute(
                    table.insert().values(site_id=site, name=name, version=version, assigned_at=now)
                )
                write_change(
                    conn,
                    site,
                    type=ChangeType.MODEL_ASSIGNMENT,
                    key=f"model/{name}",
                    version=int(now * 1000),
                    now=now,
                    payload={
                        "name": name,
                        "version": version,
                        "document": rel["document"],
                        "archive": f"/v1/artifacts/{rel['archive_sha256']}",
                        "archive_size": rel["archive_size"],
                        "mode": "shadow" if shadow else "active",
                    },
                )
        return len(site_ids)

    def report_install(
        self,
        site_id: str,
        name: str,
        version: str,
        status: str,
        detail: str,
        *,
        now: float | None = None,
    ) -> None:
        with self.writing() as conn:
            lock_site(conn, site_id)  # two reports of one version: one after the other
            conn.execute(
                install_status.delete().where(
                    install_status.c.site_id == site_id,
                    install_status.c.name == name,
                    install_status.c.version == version,
                )
            )
            conn.execute(
                install_status.insert().values(
                    site_id=site_id,
                    name=name,
                    version=version,
                    status=status,
                    detail=detail[:2000],
                    at=time.time() if now is None else now,
                )
            )

    def start_rollout(
        self,
        name: str,
        version: str,
        *,
        canary: Sequence[str],
        percent: int,
        previous: str | None = None,
        now: float | None = None,
    ) -> None:
        """Stage 1: assign to the canary sites only."""
        if not canary:
            raise ValueError("a rollout needs at least one canary site")
        if not 1 <= percent <= 100:
            raise ValueError("percent must be 1..100")
        now = time.time() if now is None else now
        with self.writing() as conn:
            conn.execute(
                rollouts.delete().where(rollouts.c.name == name, rollouts.c.version == version)
            )
            conn.execute(
                rollouts.insert().values(
                    name=name,
                    version=version,
                    stage="canary",
                    canary=json.dumps(list(canary)),
                    percent=percent,
                    previous=previous,
                    reason="",
                    updated_at=now,
                )
            )
        self.assign(name, version, list(canary), now=now)

    def _rollout(self, name: str, version: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            row = (
                conn.execute(
                    sa.select(rollouts).where(
                        rollouts.c.name == name, rollouts.c.version == version
                    )
                )
                .mappings()
                .first()
            )
        if row is None:
            raise KeyError(f"no rollout of {name} {version}")
        return dict(row)

    def _set_stage(self, name: str, version: str, stage: str, reason: str) -> None:
        with self.writing() as conn:
            conn.execute(
                rollouts.update()
                .where(rollouts.c.name == name, rollouts.c.version == version)
                .values(stage=stage, reason=reason, updated_at=time.time())
            )

    def advance_rollout(self, name: str, version: str) -> str:
        """Move to the next stage once every site of the current one reports the version
        active; pause at the first refusal. Returns the stage after the call."""
        r = self._rollout(name, version)
        if r["stage"] in ("paused", "rolled_back", "all"):
            return str(r["stage"])
        with self.engine.connect() as conn:
            targets = [
                s
                for (s,) in conn.execute(
                    sa.select(assignments.c.site_id).where(
                        assignments.c.name == name, assignments.c.version == version
                    )
                )
            ]
            reports = {
                row.site_id: (row.status, row.detail)
                for row in conn.execute(
                    sa.select(install_status).where(
                        install_status.c.name == name, install_status.c.version == version
                    )
                )
            }
        reports = {s: r for s, r in reports.items() if r[0] not in IN_PROGRESS}  # not yet
        refused = {s: reports[s][1] for s in targets if s in reports and reports[s][0] != "active"}
        if refused:
            site, why = next(iter(refused.items()))
            self._set_stage(name, version, "paused", f"{site}: {why}")
            return "paused"
        if any(s not in reports for s in targets):
            return str(r["stage"])  # still waiting for reports
        everyone = sorted(s["site_id"] for s in self.list_sites())
        if r["stage"] == "canary":
            rest = sorted(
                (s for s in everyone if s not in targets),
                key=lambda s: hashlib.sha256(f"{s}/{version}".encode()).hexdigest(),
            )
            take = rest[: max(1, len(rest) * int(r["percent"]) // 100)] if rest else []
            if take:
                self.assign(name, version, take)
            self._set_stage(name, version, "percent", f"{len(take)} more site(s)")
            return "percent"
        rest = [s for s in everyone if s not in targets]
        if rest:
            self.assign(name, version, rest)
        self._set_stage(name, version, "all", "every site")
        return "all"

    def pause_rollout(self, name: str, version: str, reason: str = "paused by ops") -> None:
        self._rollout(name, version)
        self._set_stage(name, version, "paused", reason)

    def rollback_rollout(self, name: str, version: str, *, now: float | None = None) -> int:
        """Tell every site that got ``version`` to re-activate the previous version it has
        installed (no new release is needed, so edge rollback protection is not bypassed).
        Returns how many sites were told."""
        r = self._rollout(name, version)
        now = time.time() if now is None else now
        with self.writing() as conn:
            # every site that has it or had it assigned (a later assignment replaces the
            # assignment row; the install reports stay)
            sites_ = sorted(
                {
                    s
                    for (s,) in conn.execute(
                        sa.select(assignments.c.site_id).where(
                            assignments.c.name == name, assignments.c.version == version
                        )
                    )
                }
                | {
                    s
                    for (s,) in conn.execute(
                        sa.select(install_status.c.site_id).where(
                            install_status.c.name == name, install_status.c.version == version
                        )
                    )
                }
            )
            lock_sites(conn, sites_)
            for site in sites_:
                write_change(
                    conn,
                    site,
                    type=ChangeType.MODEL_ROLLBACK,
                    key=f"model/{name}",
                    version=int(now * 1000),
                    now=now,
                    payload={"name": name, "from_version": version, "to_version": r["previous"]},
                )
        self._set_stage(name, version, "rolled_back", f"{len(sites_)} site(s) told")
        return len(sites_)

    def rollout_status(self, name: str | None = None) -> list[dict[str, Any]]:
        q = sa.select(install_status)
        if name is not None:
            q = q.where(install_status.c.name == name)
        with self.engine.connect() as conn:
            return [dict(r) for r in conn.execute(q.order_by(install_status.c.at)).mappings()]
