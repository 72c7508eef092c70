"""Storage lifecycle with an injected clock (no test sleeps for days): a study ages hot ->
warm -> cold -> hub archive -> local delete and is restored, bytes identical at every stage;
cold data is readable only with its key; corruption and tampering are found and reported.

Real parts: storescu, the agent's listener/store/inference, the hub app (aiohttp test
server) with the real HTTP client for the archive."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from cloud_hub.app import HubConfig, create_app
from cloud_hub.store import HubStore, connect
from edge_agent.inference.reference_models import SEG_NAME
from edge_agent.lifecycle.coldcrypt import ColdDataError, KeyRing, decrypt
from edge_agent.lifecycle.manager import DAY, Lifecycle
from edge_agent.lifecycle.tiers import Placement
from edge_agent.samples import make_study
from edge_agent.sync.client import Credential, HttpHubClient
from edge_agent.sync.uplink import Uplink
from tests.conftest import make_config, storescu

pytestmark = pytest.mark.dcmtk


def _rows(app: Any, study_uid: str) -> list[Any]:
    return app.store.query(
        "SELECT id, sha256, tier, path, archive_sha256 FROM instances WHERE study_uid = ? "
        "ORDER BY id",
        (study_uid,),
    )


def _bytes(app: Any, study_uid: str) -> dict[int, bytes]:
    return {r["id"]: app.tiers.read(r["tier"], r["path"]) for r in _rows(app, study_uid)}


def _tiers(app: Any, study_uid: str) -> set[str]:
    return {r["tier"] for r in _rows(app, study_uid)}


def _files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "objects").rglob("*") if p.is_file()) if root.exists() else []


def _send(app: Any, clock: Any, tmp: Path, tag: str, slices: int = 4) -> str:
    s = make_study(tmp / tag, modality="CT", slices=slices, size=128, seed=tag)
    assert storescu(app.listener.port, *s.files).returncode == 0
    clock.advance(11)
    app.assembly.tick()
    app.inference.drain()
    return s.study_uid


async def _with_hub(
    tmp_path: Path,
    app: Any,
    body: Callable[[HubStore, HttpHubClient, Uplink], Awaitable[None]],
    url: str | None = None,
) -> None:
    url = url or f"sqlite:///{tmp_path / 'hub.db'}"
    hub_store = HubStore(connect(url))
    cfg = HubConfig(
        database_url=url,
        artifact_dir=str(tmp_path / "artifacts"),
        archive_dir=str(tmp_path / "hub-archive"),
    )
    async with TestClient(TestServer(create_app(cfg, store=hub_store))) as client:
        token = hub_store.create_enrollment_token("edge")
        enrolled = await (await client.post("/v1/enroll", json={"token": token})).json()
        cred = Credential(
            str(client.make_url("")).rstrip("/"), enrolled["site_id"], enrolled["credential"]
        )
        hub = HttpHubClient(cred)
        try:
            await body(hub_store, hub, Uplink(hub, store=app.store, clock=app.clock))
        finally:
            await hub.close()
            hub_store.engine.dispose()


def _lifecycle(app: Any, hub: HttpHubClient | None) -> Lifecycle:
    return Lifecycle(
        app.cfg,
        store=app.store,
        tiers=app.tiers,
        clock=app.clock,
        metrics=app.metrics,
        archive=hub,
        hlc=app.hlc,
    )


def test_a_study_ages_through_every_tier_to_the_archive_and_back(
    app_factory: Any, tmp_path: Path, clock: Any, ref_models: dict[str, Path], hub_db_url: str
) -> None:
    app = app_factory(make_config(tmp_path))
    app.registry.install(ref_models[SEG_NAME])
    uid = _send(app, clock, tmp_path, "age")
    hot_root, warm_root, cold_root = (app.tiers.root(t) for t in ("hot", "warm", "cold"))
    original = _bytes(app, uid)
    assert _tiers(app, uid) == {"hot"} and len(original) == 4
    assert app.store.query("SELECT state FROM studies")[0][0] == "DONE"

    async def body(hub_store: HubStore, hub: HttpHubClient, up: Uplink) -> None:
        lc = _lifecycle(app, hub)
        await lc.run_due()  # day 0: nothing is old enough
        assert _tiers(app, uid) == {"hot"}
        clock.advance(7 * DAY + 60)
        await lc.run_due(only=["tiers"])
        assert _tiers(app, uid) == {"warm"} and _bytes(app, uid) == original
        assert not _files(hot_root) and len(_files(warm_root)) == 4
        for r in _rows(app, uid):  # a plain copy on warm
            assert (warm_root / r["path"]).read_bytes() == original[r["id"]]
        clock.advance(23 * DAY)
        await lc.run_due(only=["tiers"])
        assert _tiers(app, uid) == {"cold"} and _bytes(app, uid) == original
        assert not _files(warm_root) and len(_files(cold_root)) == 4
        ring = app.tiers.ring()
        stranger = KeyRing({ring.active: os.urandom(32)}, ring.active)
        for r in _rows(app, uid):
            raw = (cold_root / r["path"]).read_bytes()
            assert original[r["id"]][128:] not in raw  # encrypted at rest
            assert decrypt(raw, ring) == original[r["id"]]
            with pytest.raises(ColdDataError, match="authentication failed"):
                decrypt(raw, stranger)  # only with the key
        # the inference worker reads cold instances too (e.g. a late arrival re-runs)
        series = app.store.query("SELECT series_uid FROM series WHERE study_uid = ?", (uid,))
        assert len(app.inference._load_series(series[0][0])) == 4
        clock.advance(60 * DAY + 60)
        # its result is not at the hub yet: nothing may be archived
        assert await lc.archive_due() == (0, 0)
        lc.update_metrics()
        gauge = app.metrics.registry.get_sample_value
        assert gauge("edge_storage_pending_archive") == 0  # not eligible while unsynced
        assert gauge("edge_storage_tier_bytes", {"tier": "cold"}) == sum(
            len(b) for b in original.values()
        )
        await up.drain()
        lc.update_metrics()
        assert gauge("edge_storage_pending_archive") == 4
        n, nbytes = await lc.archive_due()
        assert n == 4 and nbytes > 0
        assert _tiers(app, uid) == {"archived"} and not _files(cold_root)
        for r in _rows(app, uid):  # the hub holds the encrypted bytes under their hash
            assert r["path"] == r["archive_sha256"]
            assert hub_store.archived_size(hub.site_id, r["archive_sha256"]) is not None
            blob = (tmp_path / "hub-archive" / r["archive_sha256"]).read_bytes()
            assert decrypt(blob, ring) == original[r["id"]]
        tomb = app.store.query(
            "SELECT type, payload FROM outbox WHERE key = ?", (f"archive/{uid}",)
        )
        assert tomb[0][0] == "tombstone" and json.loads(tomb[0][1])["instances"] == 4
        await up.drain()
        import sqlalchemy as sa

        from cloud_hub.store.schema import records

        with hub_store.engine.connect() as conn:
            keys = set(conn.execute(sa.select(records.c.key)).scalars())
        assert f"archive/{uid}" in keys
        status = lc.status()
        assert status["archived_instances"] == 4 and status["pending_archive"] == 0
        lc.update_metrics()
        assert gauge("edge_storage_pending_archive") == 0
        assert app.health()["storage"]["cold"]["instances"] == 0
        # restore on request: back on hot, bytes identical, and it stays there a while
        lc.request_restore(uid, by="test")
        await lc.run_due(only=["tiers"])
        assert _tiers(app, uid) == {"hot"} and _bytes(app, uid) == original
        req = app.store.query("SELECT finished_at, error FROM restore_requests")[0]
        assert req[0] is not None and req[1] is None
        await lc.run_due(only=["tiers"])
        assert _tiers(app, uid) == {"hot"}  # ages from its restore
        clock.advance(7 * DAY + 60)
        await lc.run_due(only=["tiers"])  # the hub has it: the copy just goes
        assert _tiers(app, uid) == {"archived"} and not _files(hot_root)

    asyncio.run(_with_hub(tmp_path, app, body, hub_db_url))


def test_retention_per_modality_and_keep_days(app_factory: Any, tmp_path: Path, clock: Any) -> None:
    cfg = make_config(
        tmp_path,
        lifecycle={"cold_days_by_modality": {"CT": 40.0}, "keep_days_after_archive": 5.0},
    )
    app = app_factory(cfg)
    uid = _send(app, clock, tmp_path, "ret", slices=2)

    async def body(hub_store: HubStore, hub: HttpHubClient, up: Uplink) -> None:
        lc = _lifecycle(app, hub)
        clock.advance(41 * DAY)
        await lc.run_due(only=["tiers"])
        assert _tiers(app, uid) == {"cold"}  # 41 d: past hot and warm ages
        await lc.run_due(only=["archive"])  # CT archives after 40 days, not 90
        rows = _rows(app, uid)
        assert all(r["archive_sha256"] for r in rows) and _tiers(app, uid) == {"cold"}
        clock.advance(4 * DAY)
        await lc.run_due(only=["tiers"])
        assert _tiers(app, uid) == {"cold"}  # kept 5 days after the archive
        clock.advance(1 * DAY + 60)
        await lc.run_due(only=["tiers"])
        assert _tiers(app, uid) == {"archived"}

    asyncio.run(_with_hub(tmp_path, app, body))


def test_corruption_is_detected_reported_and_never_moved(
    app_factory: Any, tmp_path: Path, clock: Any
) -> None:
    app = app_factory(make_config(tmp_path, lifecycle={"integrity_sample": 1000}))
    uid = _send(app, clock, tmp_path, "rot", slices=3)
    lc = _lifecycle(app, None)
    clock.advance(8 * DAY)
    asyncio.run(lc.run_due(only=["tiers"]))
    rows = _rows(app, uid)
    victim = app.tiers.locate("warm", rows[0]["path"])
    data = bytearray(victim.read_bytes())
    data[-100] ^= 0x01  # one flipped bit in the pixel data
    victim.write_bytes(bytes(data))
    checked, bad = lc.integrity_sample()
    assert (checked, bad) == (3, 1)
    (report,) = app.store.query("SELECT instance_id, tier, problem FROM integrity_reports")
    assert report["instance_id"] == rows[0]["id"] and report["tier"] == "warm"
    assert "is not the received" in report["problem"]
    metric = app.metrics.registry.get_sample_value(
        "edge_storage_corrupt_files_total", {"tier": "warm"}
    )
    assert metric == 1.0
    # the warm -> cold move leaves the corrupt file where it is (evidence), moves the rest
    clock.advance(30 * DAY)
    asyncio.run(lc.run_due(only=["tiers"]))
    assert [r["tier"] for r in _rows(app, uid)] == ["warm", "cold", "cold"]
    # a tampered cold file fails decryption with a clear error, and is reported too
    cold = app.tiers.locate("cold", _rows(app, uid)[1]["path"])
    blob = bytearray(cold.read_bytes())
    blob[60] ^= 0x01
    cold.write_bytes(bytes(blob))
    with pytest.raises(ColdDataError, match="authentication failed at frame 0"):
        app.tiers.read("cold", _rows(app, uid)[1]["path"])
    assert lc.integrity_sample()[1] == 2


def test_interrupted_moves_are_finished_or_undone_at_restart(
    app_factory: Any, tmp_path: Path, clock: Any
) -> None:
    """Both sides of the commit, with the files a crash would leave."""
    app = app_factory(make_config(tmp_path))
    uid = _send(app, clock, tmp_path, "jr", slices=2)
    (a, b) = [Placement(r["id"], r["sha256"], r["tier"], r["path"]) for r in _rows(app, uid)]
    original = _bytes(app, uid)
    warm = app.tiers.root("warm")
    # a: crashed after writing the warm copy, before the commit -> undone
    (warm / a.path).parent.mkdir(parents=True, exist_ok=True)
    (warm / a.path).write_bytes(original[a.id][:100])  # even a partial copy
    # b: crashed after the commit, before deleting the hot copy -> finished
    (warm / b.path).parent.mkdir(parents=True, exist_ok=True)
    (warm / b.path).write_bytes(original[b.id])
    app.store.writer.call(
        lambda c: (
            c.executemany(
                "INSERT INTO tier_moves VALUES (?, 'hot', ?, 'warm', ?, 0)",
                [(a.id, a.path, a.path), (b.id, b.path, b.path)],
            ),
            c.execute("UPDATE instances SET tier = 'warm' WHERE id = ?", (b.id,)),
        )
    )
    assert app.tiers.recover() == (1, 1)
    assert [r["tier"] for r in _rows(app, uid)] == ["hot", "warm"]
    assert not (warm / a.path).exists() and (app.tiers.root("hot") / a.path).exists()
    assert not (app.tiers.root("hot") / b.path).exists() and (warm / b.path).exists()
    assert _bytes(app, uid) == original
    assert app.store.query("SELECT count(*) FROM tier_moves")[0][0] == 0


def test_jobs_keep_their_schedule_across_restarts_and_never_overlap(
    app_factory: Any, tmp_path: Path, clock: Any
) -> None:
    import datetime as dt
    import fcntl

    from edge_agent.lifecycle.manager import LifecycleBusy

    cfg = make_config(
        tmp_path,
        lifecycle={
            "tier_interval_s": 300.0,
            "archive_interval_s": 600.0,
            "integrity_interval_s": 3600.0,
        },
    )
    app = app_factory(cfg)
    start = dt.datetime(2026, 11, 26, 1, 0, tzinfo=dt.UTC).timestamp()
    clock.set(start)
    ran = asyncio.run(_lifecycle(app, None).run_due())
    assert set(ran) == {"tiers", "archive", "integrity"}  # maintenance waits for 03:30 UTC
    jobs = {r["name"]: r["next_run_at"] for r in app.store.query("SELECT * FROM lifecycle_jobs")}
    assert jobs == {
        "tiers": start + 300,
        "archive": start + 600,
        "integrity": start + 3600,
        "maintenance": dt.datetime(2026, 11, 26, 3, 30, tzinfo=dt.UTC).timestamp(),
    }
    restarted = _lifecycle(app, None)  # a new process: the schedule is in the store
    clock.advance(299)
    assert asyncio.run(restarted.run_due()) == {}
    clock.advance(2)
    assert set(asyncio.run(restarted.run_due())) == {"tiers"}
    clock.set(dt.datetime(2026, 11, 26, 3, 30, 5, tzinfo=dt.UTC).timestamp())
    assert set(asyncio.run(restarted.run_due())) == {"tiers", "archive", "integrity", "maintenance"}
    # another process holding the lock: this one runs nothing, and says why
    fd = os.open(Path(cfg.storage.data_dir) / "lifecycle.lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(LifecycleBusy, match="another process"):
            asyncio.run(restarted.run_due(only=["tiers"]))
    finally:
        os.close(fd)
