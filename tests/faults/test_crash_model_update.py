"""kill -9 of the agent at random moments while it downloads, verifies, stages and activates
a model release: after every restart the active version is complete and verified (old or
new, never a mix), and the update finishes."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from cloud_hub.db import HubStore, connect
from cloud_hub.ops import add_signature, keygen, load_private, make_release
from edge_agent.inference.package import verify_folder
from edge_agent.inference.reference_models import BENCH_NAME, build_reference_packages
from edge_agent.sync.client import enroll
from tests.conftest import free_port, start_agent, start_hub, wait_ready

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
    from edge_agent.cli import main as cli

    # the ResNet-50-sized model makes each step long enough to be hit (~95 MB)
    pkgs = build_reference_packages(tmp_path / "ref", large=True)
    big = next(p for p in pkgs if p.name.startswith(BENCH_NAME))
    keygen(tmp_path / "ops.key", b"correct horse battery")
    key = load_private(tmp_path / "ops.key", b"correct horse battery")
    rel, archive, doc = make_release(big, tmp_path / "rel")
    add_signature(doc, key)
    hub_db, hub_port = tmp_path / "hub.db", free_port()
    hub_store = HubStore(connect(f"sqlite:///{hub_db}"))
    hub_store.publish(doc.read_bytes(), archive.read_bytes(), tmp_path / "artifacts")
    token = hub_store.create_enrollment_token("killed during update")
    hub = start_hub(hub_db, hub_port, tmp_path / "hub.log", artifact_dir=tmp_path / "artifacts")
    port, root = free_port(), tmp_path / "agent"
    assert (
        cli(
            [
                "init",
                str(root),
                "--port",
                str(port),
                "--bind-address",
                "127.0.0.1",
                "--ae-title",
                "EDGE_UPD",
                "--min-free-mb",
                "0",
            ]
        )
        == 0
    )
    cfg = root / "edge-agent.toml"
    text = cfg.read_text().replace(
        "trusted_keys = []", f'trusted_keys = ["{tmp_path / "ops.key.pub"}"]'
    )
    cfg.write_text(text.replace("heartbeat_interval_s = 60.0", "heartbeat_interval_s = 1.0"))
    cred = asyncio.run(enroll(f"http://127.0.0.1:{hub_port}", token))
    cred.save(root / "data" / "sync-credential.json")
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
