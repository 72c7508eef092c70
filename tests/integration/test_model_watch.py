"""After a model update: a version that fails on live studies is rolled back automatically
(its failed series re-run on the previous version), and a shadow version runs beside the
active one without publishing anything, its agreement reported to the hub before promotion.

Real parts: the hub app (aiohttp test server, SQLite), the agent's store, listener, inference
worker and updater, DCMTK storescu for the studies."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub.app import HubConfig, create_app
from cloud_hub.ops import make_release
from cloud_hub.store import HubStore, connect
from edge_agent.inference.reference_models import CLS_NAME, SEG_NAME, build_reference_packages
from edge_agent.inference.shadow import ShadowMismatch, score
from edge_agent.inference.store import agreement
from edge_agent.samples import make_study
from edge_agent.sync.client import Credential, HttpHubClient
from edge_agent.sync.model_updates import ModelUpdater, WatchSettings
from edge_agent.sync.uplink import Uplink
from hub_protocol.manifest import parse_manifest
from hub_protocol.package import write_manifest_files
from hub_protocol.releases import envelope, key_id, sign
from tests.conftest import make_config, storescu

pytestmark = pytest.mark.dcmtk


def variant(src: Path, dest: Path, version: str, *, fixed_input: int | None = None) -> Path:
    """A copy of ``src`` as ``version``. ``fixed_input``: the ONNX graph only accepts
    images of that size. The manifest still says any size, and the self-test uses 32 x 32, so
    such a version passes its self-test and then fails on real images: the kind of defect
    only live traffic shows."""
    shutil.copytree(src, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["version"] = version
    if fixed_input is not None:
        model = onnx.load(str(dest / m["model_file"]))
        for d in model.graph.input[0].type.tensor_type.shape.dim[2:]:
            d.Clear()
            d.dim_value = fixed_input
        onnx.save(model, str(dest / m["model_file"]))
    write_manifest_files(dest, m)
    return dest


class Rig:
    """A hub app, one enrolled agent (EdgeApp from app_factory) and its updater."""

    def __init__(self, tmp_path: Path, app: Any, clock: Any) -> None:
        self.tmp, self.app, self.clock = tmp_path, app, clock
        self.ops = Ed25519PrivateKey.generate()
        self.hub_url = f"sqlite:///{tmp_path / 'hub.db'}"
        self.artifacts = tmp_path / "artifacts"
        self.hub_store = HubStore(connect(self.hub_url))

    def publish(self, pkg: Path, *, expires_days: float = 30) -> str:
        rel, archive, _ = make_release(
            pkg, self.tmp / "out", now=self.clock.now(), expires_days=expires_days
        )
        self.hub_store.publish(
            envelope(rel, [sign(rel, self.ops)]), archive.read_bytes(), self.artifacts
        )
        return rel.archive_sha256

    async def run(self, body: Callable[[Rig], Awaitable[None]]) -> None:
        cfg = HubConfig(database_url=self.hub_url, artifact_dir=str(self.artifacts))
        async with TestClient(TestServer(create_app(cfg, store=self.hub_store))) as client:
            token = self.hub_store.create_enrollment_token("edge")
            enrolled = await (await client.post("/v1/enroll", json={"token": token})).json()
            self.site = enrolled["site_id"]
            url = str(client.make_url("")).rstrip("/")
            self.hub = HttpHubClient(Credential(url, self.site, enrolled["credential"]))
            inf = self.app.cfg.inference
            self.updater = ModelUpdater(
                store=self.app.store,
                registry=self.app.registry,
                source=self.hub,
                trusted={key_id(self.ops.public_key()): self.ops.public_key()},
                threshold=1,
                staging=self.tmp / "staging",
                clock=self.clock,
                watch=WatchSettings(
                    max_error_rate=inf.rollback_error_rate,
                    window_jobs=inf.rollback_window_jobs,
                    min_jobs=inf.rollback_min_jobs,
                ),
                metrics=self.app.metrics,
            )
            self.uplink = Uplink(self.hub, store=self.app.store, clock=self.clock)
            try:
                await body(self)
            finally:
                await self.hub.close()

    async def assign(self, version: str, *, shadow: bool = False) -> Any:
        self.hub_store.assign(SEG_NAME, version, [self.site], shadow=shadow)
        await self.uplink.pull()
        (decision,) = await self.updater.check()
        return decision

    def send_ct(self, n: int, tag: str) -> list[str]:
        uids = []
        for i in range(n):
            s = make_study(
                self.tmp / f"{tag}{i}", modality="CT", slices=2, size=128, seed=f"{tag}{i}"
            )
            assert storescu(self.app.listener.port, *s.files).returncode == 0
            uids.append(s.study_uid)
        self.clock.advance(11)
        self.app.assembly.tick()
        self.app.inference.drain()
        return uids

    def states(self, uids: list[str]) -> list[str]:
        q = "SELECT state FROM studies WHERE study_uid = ?"
        return [str(self.app.store.query(q, (u,))[0][0]) for u in uids]

    def active(self) -> str:
        return next(m.version for m in self.app.registry.active() if m.name == SEG_NAME)

    def hub_status(self, version: str) -> dict[str, Any]:
        (row,) = [r for r in self.hub_store.rollout_status(SEG_NAME) if r["version"] == version]
        return row


def test_version_failing_on_live_studies_is_rolled_back_and_its_series_rerun(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    cfg = make_config(
        tmp_path,
        inference={"rollback_min_jobs": 3, "rollback_window_jobs": 5, "rollback_error_rate": 0.5},
    )
    app = app_factory(cfg)
    app.registry.install(ref_models[SEG_NAME])  # 1.0.0, active
    rig = Rig(tmp_path, app, clock)
    rig.publish(variant(ref_models[SEG_NAME], tmp_path / "v110", "1.1.0", fixed_input=32))

    async def body(r: Rig) -> None:
        d = await r.assign("1.1.0")
        assert d.status == "accepted" and r.active() == "1.1.0"  # its self-test passed
        first = r.send_ct(2, "a")
        assert r.states(first) == ["FAILED", "FAILED"]
        assert r.updater.watch() == []  # 2 finished jobs: below rollback_min_jobs
        assert r.active() == "1.1.0"
        second = r.send_ct(1, "b")
        (d,) = r.updater.watch()
        assert d.status == "auto_rolled_back" and "3 of its last 3 jobs failed" in d.reason
        assert r.active() == "1.0.0"
        assert r.updater.watch() == []  # decided once
        # the failed series run again on 1.0.0 and their studies end DONE
        assert r.states(first + second) == ["INFERRING"] * 3
        assert app.inference.drain() == 3
        assert r.states(first + second) == ["DONE"] * 3
        rows = app.store.query("SELECT model_version FROM results")
        assert sorted(x[0] for x in rows) == ["1.0.0"] * 3
        cancelled = app.store.query(
            "SELECT error FROM inference_jobs WHERE model_version = '1.1.0'"
        )
        assert len(cancelled) == 3
        assert all("re-run on 1.0.0 after 1.1.0 was rolled back" in e[0] for e in cancelled)
        events = app.store.query(
            "SELECT reason FROM study_events WHERE study_uid = ? ORDER BY rowid", (first[0],)
        )
        assert any("after 1.1.0 was rolled back" in e[0] for e in events)
        # ops learn it (the rollout would pause on it), and it is not offered again
        await r.updater.flush_reports()
        st = r.hub_status("1.1.0")
        assert st["status"] == "auto_rolled_back" and "re-activated 1.0.0" in st["detail"]
        assert await r.updater.check() == []
        metric = app.metrics.registry.get_sample_value(
            "edge_model_rollbacks_total", {"model": SEG_NAME, "trigger": "error_rate"}
        )
        assert metric == 1.0

    asyncio.run(rig.run(body))


def test_rollback_report_reaches_the_hub_after_an_outage(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    """The decision is taken offline; it is re-sent until the hub has it."""
    cfg = make_config(tmp_path, inference={"rollback_min_jobs": 1, "rollback_window_jobs": 1})
    app = app_factory(cfg)
    app.registry.install(ref_models[SEG_NAME])
    rig = Rig(tmp_path, app, clock)
    rig.publish(variant(ref_models[SEG_NAME], tmp_path / "v110", "1.1.0", fixed_input=32))

    async def body(r: Rig) -> None:
        assert (await r.assign("1.1.0")).status == "accepted"
        r.send_ct(1, "c")
        real = r.hub.report_model

        async def down(*a: Any) -> None:
            from edge_agent.sync.client import HubUnavailable

            raise HubUnavailable("hub unreachable (test)")

        r.hub.report_model = down  # type: ignore[method-assign]
        (d,) = r.updater.watch()
        assert d.status == "auto_rolled_back" and r.active() == "1.0.0"
        assert await r.updater.flush_reports() == 0
        assert r.hub_status("1.1.0")["status"] == "active"  # the hub does not know yet
        r.hub.report_model = real  # type: ignore[method-assign]
        assert await r.updater.flush_reports() == 1
        assert r.hub_status("1.1.0")["status"] == "auto_rolled_back"
        assert await r.updater.flush_reports() == 0  # sent once

    asyncio.run(rig.run(body))


def test_shadow_version_publishes_nothing_reports_agreement_and_is_promoted(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    app = app_factory(make_config(tmp_path))
    app.registry.install(ref_models[SEG_NAME])
    rig = Rig(tmp_path, app, clock)
    sha = rig.publish(variant(ref_models[SEG_NAME], tmp_path / "v110", "1.1.0"))

    async def body(r: Rig) -> None:
        d = await r.assign("1.1.0", shadow=True)
        assert d.status == "shadow" and r.active() == "1.0.0"
        assert set(app.registry.shadows()) == {SEG_NAME}
        studies = r.send_ct(2, "s")
        assert r.states(studies) == ["DONE", "DONE"]
        # nothing from the shadow: results, outbox and PACS sends are the active version's
        versions = {x[0] for x in app.store.query("SELECT model_version FROM results")}
        assert versions == {"1.0.0"}
        assert len(app.store.query("SELECT 1 FROM results")) == 2
        runs = app.store.query("SELECT agree, score, error, shadow_version FROM shadow_runs")
        assert [(x[0], x[1], x[2], x[3]) for x in runs] == [(1, 1.0, None, "1.1.0")] * 2
        with app.store.read() as conn:
            ag = agreement(conn, SEG_NAME, "1.1.0")
        assert (ag.series, ag.agreeing, ag.rate) == (2, 2, 1.0)
        await r.updater.flush_reports()
        st = r.hub_status("1.1.0")
        assert st["status"] == "shadow" and "agreement 1.000 over 2 series" in st["detail"]
        assert await r.updater.flush_reports() == 0  # unchanged: not re-sent
        # promotion: a normal assignment of the same version, no second download (the
        # artifact is gone from the hub and it still works)
        (r.artifacts / sha).unlink()
        d = await r.assign("1.1.0")
        assert d.status == "accepted" and r.active() == "1.1.0"
        assert app.registry.shadows() == {}
        assert r.hub_status("1.1.0")["status"] == "active"

    asyncio.run(rig.run(body))


def test_offline_an_installed_version_keeps_running_after_its_release_expires(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    """Expiry guards installation (freeze attacks), not what is already verified and
    running: a site cut off from the hub for longer than the release's lifetime keeps
    reading studies with it; but nothing is installed or promoted from expired metadata."""
    app = app_factory(make_config(tmp_path))
    app.registry.install(ref_models[SEG_NAME])
    rig = Rig(tmp_path, app, clock)
    rig.publish(variant(ref_models[SEG_NAME], tmp_path / "v110", "1.1.0"), expires_days=1)
    rig.publish(variant(ref_models[SEG_NAME], tmp_path / "v120", "1.2.0"), expires_days=1)

    async def body(r: Rig) -> None:
        assert (await r.assign("1.1.0")).status == "accepted"
        assert (await r.assign("1.2.0", shadow=True)).status == "shadow"
        clock.advance(3 * 86400)  # both releases have expired
        studies = r.send_ct(1, "e")
        assert r.states(studies) == ["DONE"]
        assert app.store.query("SELECT model_version FROM results")[0][0] == "1.1.0"
        d = await r.assign("1.2.0")  # promoting the shadow needs valid metadata
        assert d.status == "refused" and "expired" in d.reason
        assert r.active() == "1.1.0" and app.registry.shadows() == {}  # refused: stops

    asyncio.run(rig.run(body))


def test_a_failing_shadow_is_recorded_as_disagreement_and_never_fails_the_job(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path]
) -> None:
    app = app_factory(make_config(tmp_path))
    app.registry.install(ref_models[SEG_NAME])
    rig = Rig(tmp_path, app, clock)
    rig.publish(variant(ref_models[SEG_NAME], tmp_path / "v120", "1.2.0", fixed_input=32))

    async def body(r: Rig) -> None:
        assert (await r.assign("1.2.0", shadow=True)).status == "shadow"
        studies = r.send_ct(1, "f")
        assert r.states(studies) == ["DONE"]
        ((agree, error),) = app.store.query("SELECT agree, error FROM shadow_runs")
        assert agree == 0 and error  # the ONNX Runtime error, for ops
        await r.updater.flush_reports()
        assert "0 agree, 1 shadow errors" in r.hub_status("1.2.0")["detail"]

    asyncio.run(rig.run(body))


def test_shadow_score() -> None:
    seg = parse_manifest_of(SEG_NAME)
    cls = parse_manifest_of(CLS_NAME)
    a = np.zeros((2, 1, 4, 4), np.float32)
    a[0, 0, :2, :2] = 0.9  # 4 pixels
    b = a.copy()
    assert score(seg, a, seg, b) == 1.0
    b[0, 0, 0, 0] = 0.1  # 3 of them
    assert score(seg, a, seg, b) == pytest.approx(2 * 3 / 7)
    empty = np.zeros_like(a)
    assert score(seg, empty, seg, empty) == 1.0
    with pytest.raises(ShadowMismatch):
        score(seg, a, seg, np.zeros((2, 1, 8, 8), np.float32))
    with pytest.raises(ShadowMismatch):
        score(seg, a, cls, a)
    n = len(cls.output.labels)
    p = np.eye(n, dtype=np.float32)[[0, 1, 0, 1]]
    q = np.eye(n, dtype=np.float32)[[0, 1, 1, 1]]
    assert score(cls, p, cls, q) == 0.75


_MANIFESTS: dict[str, Any] = {}


def parse_manifest_of(name: str) -> Any:
    if name not in _MANIFESTS:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            for pkg in build_reference_packages(Path(d)):
                m = parse_manifest((pkg / "manifest.json").read_text())
                _MANIFESTS[m.name] = m
    return _MANIFESTS[name]


def test_shadow_sites_do_not_hold_up_a_rollout_and_get_the_version_when_it_reaches_them(
    tmp_path: Path, ref_models: dict[str, Path], hub_db_url: str
) -> None:
    import sqlalchemy as sa

    from cloud_hub.store.schema import assignments, shadow_assignments

    ops = Ed25519PrivateKey.generate()
    store = HubStore(connect(hub_db_url))
    try:
        rel, archive, _ = make_release(ref_models[SEG_NAME], tmp_path / "out")
        store.publish(envelope(rel, [sign(rel, ops)]), archive.read_bytes(), tmp_path / "a")
        a, b = (store.enroll(store.create_enrollment_token(n)).site_id for n in ("A", "B"))
        store.assign(rel.name, rel.version, [b], shadow=True)
        store.report_install(b, rel.name, rel.version, "shadow", "shadow: agreement 0.5")
        store.start_rollout(rel.name, rel.version, canary=[a], percent=100)
        for step in ("downloading", "verifying", "self_test"):  # the canary at work: wait
            store.report_install(a, rel.name, rel.version, step, "")
            assert store.advance_rollout(rel.name, rel.version) == "canary"
        store.report_install(a, rel.name, rel.version, "active", "")
        assert store.advance_rollout(rel.name, rel.version) == "percent"  # not paused by B
        with store.engine.connect() as conn:
            active_sites = set(conn.execute(sa.select(assignments.c.site_id)).scalars())
            shadow_sites = set(conn.execute(sa.select(shadow_assignments.c.site_id)).scalars())
        assert active_sites == {a, b} and shadow_sites == {b}
    finally:
        store.engine.dispose()
