"""Signed model versions from ops to an edge through the real hub app: the good ones are
activated, every attack is refused with its reason and the active model is untouched, and
an interrupted download resumes with an HTTP Range request."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub.app import HubConfig, create_app
from cloud_hub.ops import make_release
from cloud_hub.store import HubStore, connect
from edge_agent.clock import FakeClock
from edge_agent.inference.reference_models import SEG_NAME, build_reference_packages
from edge_agent.inference.registry import Registry
from edge_agent.store import Store
from edge_agent.sync.client import Credential, HttpHubClient
from edge_agent.sync.model_updates import ModelUpdater
from edge_agent.sync.uplink import Uplink
from hub_protocol.package import write_manifest_files
from hub_protocol.releases import envelope, key_id, sign

NOW = 1_800_000_000.0


def variant(src: Path, dest: Path, version: str, *, break_selftest: bool = False) -> Path:
    shutil.copytree(src, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["version"] = version
    if break_selftest:
        m["self_test"]["expect"]["mean"] += 0.5
    write_manifest_files(dest, m)
    return dest


def test_signed_rollout_to_an_edge(tmp_path: Path, hub_db_url: str) -> None:
    ops, stranger = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    base = next(
        r for r in build_reference_packages(tmp_path / "ref") if r.name.startswith(SEG_NAME)
    )
    hub_db, artifacts = hub_db_url, tmp_path / "artifacts"
    hub_store = HubStore(connect(hub_db))

    def publish(
        version: str,
        *,
        key: Ed25519PrivateKey = ops,
        expires_days: float = 30,
        break_selftest: bool = False,
        tamper: bool = False,
    ) -> None:
        pkg = variant(base, tmp_path / f"pkg-{version}", version, break_selftest=break_selftest)
        rel, archive, _ = make_release(pkg, tmp_path / "out", expires_days=expires_days, now=NOW)
        hub_store.publish(envelope(rel, [sign(rel, key)]), archive.read_bytes(), artifacts)
        if tamper:  # the hub (or its disk) swaps the archive after publication
            path = artifacts / rel.archive_sha256
            data = bytearray(path.read_bytes())
            data[-600] ^= 1
            path.write_bytes(bytes(data))

    async def go() -> None:
        app = create_app(
            HubConfig(database_url=hub_db, artifact_dir=str(artifacts)), store=hub_store
        )
        async with TestClient(TestServer(app)) as client:
            token = hub_store.create_enrollment_token("edge")
            body = await (await client.post("/v1/enroll", json={"token": token})).json()
            site = body["site_id"]
            cred = Credential(str(client.make_url("")).rstrip("/"), site, body["credential"])
            store = Store(tmp_path / "edge.db")
            hub = HttpHubClient(cred)
            clock = FakeClock(NOW + 60)
            registry = Registry(store=store, models_dir=tmp_path / "models", clock=clock)
            updater = ModelUpdater(
                store=store,
                registry=registry,
                source=hub,
                trusted={key_id(ops.public_key()): ops.public_key()},
                threshold=1,
                staging=tmp_path / "staging",
                clock=clock,
            )
            up = Uplink(hub, store=store, clock=clock)

            async def roll(version: str) -> Any:
                hub_store.assign(SEG_NAME, version, [site])
                await up.pull()
                (decision,) = await updater.check()
                return decision

            def active() -> str:
                return next(m.version for m in registry.active() if m.name == SEG_NAME)

            try:
                publish("1.0.0")
                assert (await roll("1.0.0")).status == "accepted" and active() == "1.0.0"
                cases = [
                    ("1.1.0", {"key": stranger}, "unknown_key"),
                    ("1.2.0", {"tamper": True}, "hash_mismatch"),
                    ("1.3.0", {"expires_days": -1}, "expired"),
                    ("1.4.0", {"break_selftest": True}, "SelfTestFailed"),
                ]
                for version, kw, reason in cases:
                    publish(version, **kw)
                    d = await roll(version)
                    assert d.status == "refused" and reason in d.reason, (version, d)
                    assert active() == "1.0.0"  # untouched
                publish("0.9.0")
                d = await roll("0.9.0")
                assert d.status == "refused" and "rollback" in d.reason
                # an interrupted download resumes from where it stopped (HTTP Range)
                publish("1.5.0")
                with hub_store.engine.connect() as conn:
                    rel_doc = json.loads(
                        conn.execute(
                            sa.text("SELECT document FROM releases WHERE version = '1.5.0'")
                        ).scalar_one()
                    )
                sha = rel_doc["signed"]["archive"]["sha256"]
                full = (artifacts / sha).read_bytes()
                (tmp_path / "staging").mkdir(exist_ok=True)
                (tmp_path / "staging" / f"{sha}.part").write_bytes(full[: len(full) // 2])
                d = await roll("1.5.0")
                assert d.status == "accepted" and active() == "1.5.0"
                assert hub.last_download_status == 206
                assert {m.version for m in registry.installed()} >= {"1.0.0", "1.5.0"}
                statuses = {(r["version"], r["status"]) for r in hub_store.rollout_status()}
                assert ("1.5.0", "active") in statuses and ("1.2.0", "refused") in statuses
            finally:
                await hub.close()
                store.close()

    try:
        asyncio.run(go())
    finally:
        hub_store.engine.dispose()


@pytest.mark.dcmtk
def test_running_agent_installs_an_assigned_release(tmp_path: Path) -> None:
    """The whole path with real processes: ops sign and publish, the hub assigns, the
    running agent (pinned key) pulls, verifies, self-tests and activates it."""
    import signal
    import sqlite3
    import time

    from tests.conftest import release_rig, start_agent, wait_ready

    base = next(
        r for r in build_reference_packages(tmp_path / "ref") if r.name.startswith(SEG_NAME)
    )
    rig = release_rig(tmp_path, base, "EDGE_ROLL")
    rel, hub, hub_store, cred, cfg, root, port, kid = (
        rig.release,
        rig.hub,
        rig.hub_store,
        rig.cred,
        rig.cfg,
        rig.root,
        rig.port,
        rig.key_id,
    )
    agent = start_agent(cfg, root / "agent.log")
    try:
        wait_ready(port, "EDGE_ROLL", agent, root / "agent.log")
        hub_store.assign(rel.name, rel.version, [cred.site_id])
        db = root / "data" / "edge.db"
        deadline = time.monotonic() + 60
        active = None
        while time.monotonic() < deadline and active is None:
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                row = conn.execute(
                    "SELECT version FROM model_versions WHERE name = ? AND active = 1", (rel.name,)
                ).fetchone()
            finally:
                conn.close()
            active = row[0] if row else None
            time.sleep(0.2)
        assert active == rel.version, (root / "agent.log").read_text()[-2000:]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not hub_store.rollout_status(rel.name):
            time.sleep(0.2)
        (status,) = hub_store.rollout_status(rel.name)
        assert status["status"] == "active" and kid in status["detail"]
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        hub.terminate()
        hub.wait(10)


def test_models_history_and_rollback_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from edge_agent.cli import main as cli

    base = next(
        r for r in build_reference_packages(tmp_path / "ref") if r.name.startswith(SEG_NAME)
    )
    v2 = variant(base, tmp_path / "v2", "1.1.0")
    assert cli(["init", str(tmp_path / "agent"), "--min-free-mb", "0"]) == 0
    cfg = str(tmp_path / "agent" / "edge-agent.toml")
    store = Store(tmp_path / "agent" / "data" / "edge.db")  # create the database
    store.close()
    assert cli(["models", "install", str(base), "--config", cfg]) == 0
    assert cli(["models", "install", str(v2), "--activate", "--config", cfg]) == 0
    assert cli(["models", "rollback", SEG_NAME, "--config", cfg]) == 0
    out = capsys.readouterr().out
    assert "1.1.0 -> 1.0.0 (active)" in out
    assert cli(["models", "rollback", SEG_NAME, "--config", cfg]) == 1  # nothing older
    assert "no older installed version" in capsys.readouterr().err
    assert cli(["models", "history", "--config", cfg]) == 0
    hist = capsys.readouterr().out
    assert f"* {SEG_NAME} 1.0.0" in hist and f"  {SEG_NAME} 1.1.0" in hist


def test_staged_rollout_across_sites_pauses_on_a_failing_canary(
    tmp_path: Path, hub_db_url: str
) -> None:
    ops = Ed25519PrivateKey.generate()
    base = next(
        r for r in build_reference_packages(tmp_path / "ref") if r.name.startswith(SEG_NAME)
    )
    hub_db, artifacts = hub_db_url, tmp_path / "artifacts"
    hub_store = HubStore(connect(hub_db))

    def publish(version: str, *, break_selftest: bool = False) -> None:
        pkg = variant(base, tmp_path / f"pkg-{version}", version, break_selftest=break_selftest)
        rel, archive, _ = make_release(pkg, tmp_path / "out", now=NOW)
        hub_store.publish(envelope(rel, [sign(rel, ops)]), archive.read_bytes(), artifacts)

    async def go() -> None:
        app = create_app(
            HubConfig(database_url=hub_db, artifact_dir=str(artifacts)), store=hub_store
        )
        async with TestClient(TestServer(app)) as client:
            edges: dict[str, Any] = {}
            for name in "ABCD":
                token = hub_store.create_enrollment_token(name)
                body = await (await client.post("/v1/enroll", json={"token": token})).json()
                cred = Credential(
                    str(client.make_url("")).rstrip("/"), body["site_id"], body["credential"]
                )
                store = Store(tmp_path / f"edge-{name}.db")
                clock = FakeClock(NOW + 60)
                hub = HttpHubClient(cred)
                registry = Registry(
                    store=store, models_dir=tmp_path / f"models-{name}", clock=clock
                )
                edges[name] = {
                    "site": body["site_id"],
                    "store": store,
                    "hub": hub,
                    "registry": registry,
                    "up": Uplink(hub, store=store, clock=clock),
                    "updater": ModelUpdater(
                        store=store,
                        registry=registry,
                        source=hub,
                        trusted={key_id(ops.public_key()): ops.public_key()},
                        threshold=1,
                        staging=tmp_path / f"staging-{name}",
                        clock=clock,
                    ),
                }

            async def sync_all() -> None:
                for e in edges.values():
                    await e["up"].pull()
                    await e["updater"].check()

            def forge(site: str, payload: dict[str, str]) -> None:
                """A rollback order written straight into a site's feed, as a hub that
                is not ops' would."""
                from cloud_hub.store.base import lock_sites
                from cloud_hub.store.feed import write_change
                from hub_protocol import ChangeType

                with hub_store.writing() as conn:
                    lock_sites(conn, [site])
                    write_change(
                        conn, site, type=ChangeType.MODEL_ROLLBACK, key=f"model/{SEG_NAME}",
                        version=int(time.time() * 1000), now=time.time(), payload=payload,
                    )  # fmt: skip

            def actives() -> dict[str, str]:
                return {
                    n: next((m.version for m in e["registry"].active()), "-")
                    for n, e in edges.items()
                }

            try:
                publish("1.0.0")
                hub_store.assign(SEG_NAME, "1.0.0", [e["site"] for e in edges.values()])
                await sync_all()
                assert set(actives().values()) == {"1.0.0"}

                publish("1.1.0")
                hub_store.start_rollout(
                    SEG_NAME, "1.1.0", canary=[edges["A"]["site"]], percent=34, previous="1.0.0"
                )
                await sync_all()
                assert actives() == {"A": "1.1.0", "B": "1.0.0", "C": "1.0.0", "D": "1.0.0"}
                assert hub_store.advance_rollout(SEG_NAME, "1.1.0") == "percent"
                await sync_all()
                assert sorted(actives().values()) == ["1.0.0", "1.0.0", "1.1.0", "1.1.0"]
                assert hub_store.advance_rollout(SEG_NAME, "1.1.0") == "all"
                await sync_all()
                assert set(actives().values()) == {"1.1.0"}

                publish("1.2.0", break_selftest=True)
                hub_store.start_rollout(SEG_NAME, "1.2.0", canary=[edges["A"]["site"]], percent=50)
                await sync_all()
                assert hub_store.advance_rollout(SEG_NAME, "1.2.0") == "paused"
                assert hub_store._rollout(SEG_NAME, "1.2.0")["reason"].startswith(
                    edges["A"]["site"]
                )
                assert hub_store.advance_rollout(SEG_NAME, "1.2.0") == "paused"  # stays
                await sync_all()
                assert set(actives().values()) == {"1.1.0"}  # nobody runs the bad one

                # a compromised hub (rollback orders are not signed) tells A to go "back"
                # from 1.1.0 to the 1.2.0 that A refused and still has installed: A may
                # only re-activate a version it accepted, so it goes to 1.0.0
                a = edges["A"]
                assert "1.2.0" in {m.version for m in a["registry"].installed()}
                forge(a["site"], {"name": SEG_NAME, "from_version": "1.1.0", "to_version": "1.2.0"})
                await a["up"].pull()
                (d,) = [d for d in await a["updater"].check() if d.version == "1.1.0"]
                assert d.status == "rolled_back" and "re-activated 1.0.0" in d.reason
                assert actives()["A"] == "1.0.0"
                # and with no accepted version left below, an order changes nothing
                forge(a["site"], {"name": SEG_NAME, "from_version": "1.0.0", "to_version": "1.2.0"})
                await a["up"].pull()
                (d,) = [d for d in await a["updater"].check() if d.version == "1.0.0"]
                assert d.status == "rollback_failed" and actives()["A"] == "1.0.0"

                # ops roll 1.1.0 back everywhere: each site re-activates 1.0.0
                assert hub_store.rollback_rollout(SEG_NAME, "1.1.0") == 4
                await sync_all()
                assert set(actives().values()) == {"1.0.0"}
                reports = {
                    (r["site_id"], r["status"])
                    for r in hub_store.rollout_status()
                    if r["version"] == "1.1.0"
                }
                assert {s for _, s in reports} == {"rolled_back"}
            finally:
                for e in edges.values():
                    await e["hub"].close()
                    e["store"].close()

    try:
        asyncio.run(go())
    finally:
        hub_store.engine.dispose()
