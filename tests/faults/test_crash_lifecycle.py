"""kill -9 at random moments while the lifecycle moves instances between tiers, uploads them
to the hub archive, drops local copies and restores them: after every crash (and the next
process's recovery) each instance exists exactly once in the store's view, hash-identical,
and no stray copy is left on disk.

Real parts: the agent (`edge-agent run`) to ingest, `edge-agent storage run` processes for
the jobs (killed with SIGKILL), the hub as its own process (`cloud-hub run`)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge_agent.config import load_config
from edge_agent.inference.reference_models import SEG_NAME, build_reference_packages
from edge_agent.lifecycle.tiers import ARCHIVED, LOCAL_TIERS, Placement, Tiers
from edge_agent.samples import make_study
from edge_agent.store import Store
from tests.conftest import release_rig, start_agent, storescu, wait_ready

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

KILLS = 20
DAYS = 1e-6  # ~0.09 s: every age threshold passes at once


def _check(cfg_path: Path, hub_store: object, site: str) -> dict[str, int]:
    """Recover like the next process would, then check every instance and every file."""
    cfg = load_config(cfg_path)
    store = Store(Path(cfg.storage.data_dir) / cfg.storage.database)
    try:
        tiers = Tiers(cfg, store)
        tiers.recover()
        rows = store.query("SELECT id, sha256, tier, path, archive_sha256 FROM instances")
        counts = dict.fromkeys((*LOCAL_TIERS, ARCHIVED), 0)
        referenced: dict[str, set[str]] = {t: set() for t in LOCAL_TIERS}
        for r in rows:
            counts[r["tier"]] += 1
            if r["tier"] == ARCHIVED:
                assert r["path"] == r["archive_sha256"]
                assert hub_store.archived_size(site, r["path"]) is not None  # type: ignore[attr-defined]
            else:
                tiers.read_verified(Placement(r["id"], r["sha256"], r["tier"], r["path"]))
                referenced[r["tier"]].add(r["path"])
        for t in LOCAL_TIERS:  # exactly one copy: nothing on disk the store does not name
            root = tiers.root(t)
            on_disk = {
                p.relative_to(root).as_posix() for p in (root / "objects").rglob("*") if p.is_file()
            }
            assert on_disk == referenced[t], (t, on_disk ^ referenced[t])
        assert store.query("SELECT count(*) FROM tier_moves")[0][0] == 0
        return counts
    finally:
        store.close()


def _request_restores(cfg_path: Path) -> None:
    cfg = load_config(cfg_path)
    store = Store(Path(cfg.storage.data_dir) / cfg.storage.database)
    try:
        now = time.time()
        store.writer.call(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO restore_requests (study_uid, requested_at, requested_by)"
                " SELECT DISTINCT study_uid, ?, 'test' FROM instances WHERE tier = ?",
                (now, ARCHIVED),
            )
        )
    finally:
        store.close()


def test_sigkill_during_moves_archive_and_restore(tmp_path: Path) -> None:
    pkg = next(r for r in build_reference_packages(tmp_path / "ref") if r.name.startswith(SEG_NAME))
    rig = release_rig(tmp_path, pkg, "EDGE_LC")
    text = rig.cfg.read_text()
    for key, value in (
        ("hot_days", DAYS),
        ("warm_days", 2 * DAYS),
        ("cold_days", 3 * DAYS),
        ("quiet_period_s", 1.0),
    ):
        text = text.replace(f"\n{key} = ", f"\n{key} = {value} # ", 1)
    rig.cfg.write_text(text)
    log = rig.root / "agent.log"
    agent = start_agent(rig.cfg, log)
    try:
        wait_ready(rig.port, "EDGE_LC", agent, log)
        for i in range(4):
            s = make_study(tmp_path / f"s{i}", modality="CT", slices=40, size=256, seed=f"lc{i}")
            assert storescu(rig.port, *s.files, aec="EDGE_LC").returncode == 0
        deadline = time.monotonic() + 60
        db = rig.root / "data" / "edge.db"
        while time.monotonic() < deadline:
            st = Store(db)
            try:
                busy = st.query("SELECT count(*) FROM studies WHERE state NOT IN ('DONE')")[0][0]
            finally:
                st.close()
            if not busy:
                break
            time.sleep(0.3)
        assert not busy, log.read_text()[-2000:]
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
    total = sum(_check(rig.cfg, rig.hub_store, rig.cred.site_id).values())
    assert total == 160

    rng = random.Random(11)
    kills = completed = 0
    cmd = [sys.executable, "-m", "edge_agent", "storage", "run", "tiers", "archive"]
    seen: set[str] = set()
    # a process's start-up (imports, config, store) varies with the machine: time one that
    # does no work and kill the job runs at random moments after it, not before
    t0 = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "edge_agent", "storage", "status", "--config", str(rig.cfg)],
        check=True,
        capture_output=True,
    )
    startup = time.monotonic() - t0
    try:
        out = tmp_path / "runs.log"
        while kills < KILLS and kills + completed < 120:
            with out.open("ab") as fh:
                proc = subprocess.Popen(
                    [*cmd, "--config", str(rig.cfg)], stdout=fh, stderr=subprocess.STDOUT
                )
            try:
                proc.wait(startup + rng.uniform(0.0, 1.5))
                completed += 1
                assert proc.returncode == 0, out.read_text()[-3000:]
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
                kills += 1
            counts = _check(rig.cfg, rig.hub_store, rig.cred.site_id)
            assert sum(counts.values()) == 160
            seen |= {t for t, n in counts.items() if n}
            if counts[ARCHIVED]:  # bring archived studies back: keeps every job busy
                _request_restores(rig.cfg)
        # a last, uninterrupted run finishes whatever is left
        subprocess.run([*cmd, "--config", str(rig.cfg)], check=True, capture_output=True)
        counts = _check(rig.cfg, rig.hub_store, rig.cred.site_id)
    finally:
        rig.hub.terminate()
        rig.hub.wait(10)
    assert kills >= KILLS, (kills, completed)
    assert sum(counts.values()) == 160
    assert {"cold", ARCHIVED} <= seen  # the crashes hit moves, uploads and restores
