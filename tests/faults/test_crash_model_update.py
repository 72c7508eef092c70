"""kill -9 of the agent at random moments while it downloads, verifies, stages and activates
a model release: after every restart the active version is complete and verified (old or
new, never a mix), and the update finishes."""

from __future__ import annotations

import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from edge_agent.inference.reference_models import BENCH_NAME, build_reference_packages
from hub_protocol.package import verify_folder
from tests.conftest import release_rig, start_agent, wait_ready

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

KILLS = 8


def _active(db: Path, name: str) -> tuple[str, str] | None:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        row = conn.execute(
            "SELECT version, path FROM model_versions WHERE name = ? AND active = 1", (name,)
        ).fetchone()
    finally:
        conn.close()
    return (str(row[0]), str(row[1])) if row else None


def test_sigkill_during_model_update(tmp_path: Path) -> None:

    # the ResNet-50-sized model makes each step long enough to be hit (~95 MB)
    pkgs = build_reference_packages(tmp_path / "ref", large=True)
    big = next(p for p in pkgs if p.name.startswith(BENCH_NAME))
    rig = release_rig(tmp_path, big, "EDGE_UPD")
    rel, hub, hub_store, cred, cfg, root, port = (
        rig.release,
        rig.hub,
        rig.hub_store,
        rig.cred,
        rig.cfg,
        rig.root,
        rig.port,
    )
    db, log = root / "data" / "edge.db", root / "agent.log"
    rng = random.Random(5)
    agent = start_agent(cfg, log)
    try:
        wait_ready(port, "EDGE_UPD", agent, log)
        hub_store.assign(rel.name, rel.version, [cred.site_id])
        for _ in range(KILLS):
            time.sleep(rng.uniform(0.1, 1.5))
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            state = _active(db, rel.name)
            if state is not None:  # whatever is active is whole and verified
                version, path = state
                assert version == rel.version
                verify_folder(root / "data" / "models" / path)
            agent = start_agent(cfg, log)
            wait_ready(port, "EDGE_UPD", agent, log)
        deadline = time.monotonic() + 120
        while _active(db, rel.name) is None and time.monotonic() < deadline:
            time.sleep(0.3)
        state = _active(db, rel.name)
        assert state is not None and state[0] == rel.version, log.read_text()[-3000:]
        verify_folder(root / "data" / "models" / state[1])
        conn = sqlite3.connect(db)
        try:
            decisions = conn.execute("SELECT status FROM model_updates").fetchall()
        finally:
            conn.close()
        assert decisions == [("accepted",)]
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        hub.terminate()
        hub.wait(10)
