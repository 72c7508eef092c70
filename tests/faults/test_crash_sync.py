"""kill -9 of the edge agent at random points while it drains its outbox to the hub, 20
times: every record reaches the hub exactly once, lanes gap-free, and the outbox ends empty."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from cloud_hub.store import HubStore, connect
from edge_agent.store import Store
from edge_agent.sync import outbox
from edge_agent.sync.client import enroll
from hub_protocol import HybridClock, Lane, RecordType
from tests.conftest import free_port, start_agent, start_hub, wait_ready

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]

RECORDS = 4000
KILLS = 20


def _pending(db: Path) -> int:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return int(
            conn.execute("SELECT count(*) FROM outbox WHERE state = 'PENDING'").fetchone()[0]
        )
    finally:
        conn.close()


def test_sigkill_during_sync(tmp_path: Path) -> None:
    from edge_agent.cli import main as cli

    hub_db, hub_port = tmp_path / "hub.db", free_port()
    token = HubStore(connect(f"sqlite:///{hub_db}")).create_enrollment_token("killed edge")
    hub = start_hub(hub_db, hub_port, tmp_path / "hub.log")
    port, root = free_port(), tmp_path / "agent"
    assert (
        cli(
            [
                "init",
                str(root),
                "--port",
                str(port),
                "--ae-title",
                "EDGE_SYNC",
                "--bind-address",
                "127.0.0.1",
                "--min-free-mb",
                "0",
            ]
        )
        == 0
    )
    cfg, log, db = root / "edge-agent.toml", root / "agent.log", root / "data" / "edge.db"
    cred = asyncio.run(enroll(f"http://127.0.0.1:{hub_port}", token))
    cred.save(root / "data" / "sync-credential.json")
    store = Store(db)  # prefill the outbox as results would have
    hlc = HybridClock("edge")
    rng = random.Random(3)
    lanes = [rng.choice(list(Lane)) for _ in range(RECORDS)]

    def prefill(c: sqlite3.Connection) -> None:
        for i, lane in enumerate(lanes):
            outbox.enqueue(
                c,
                key=f"result/r{i:05d}",
                type=RecordType.RESULT,
                lane=lane,
                payload={"n": i, "pad": "x" * 100},
                hlc=hlc.now(),
                now=time.time(),
            )

    store.writer.call(prefill)
    store.close()
    os.environ["EDGE_SYNC_BATCH_MAX_RECORDS"] = "3"  # many small pushes: many kill points
    kills = 0
    try:
        agent = start_agent(cfg, log)
        while kills < KILLS:
            wait_ready(port, "EDGE_SYNC", agent, log)
            time.sleep(rng.uniform(0.02, 0.15))
            agent.send_signal(signal.SIGKILL)
            agent.wait(10)
            kills += 1
            agent = start_agent(cfg, log)
        wait_ready(port, "EDGE_SYNC", agent, log)
        assert _pending(db) > 0, "the kills should have interrupted the drain"
        deadline = time.monotonic() + 120
        while _pending(db) and time.monotonic() < deadline:
            time.sleep(0.2)
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0
    finally:
        os.environ.pop("EDGE_SYNC_BATCH_MAX_RECORDS", None)
        if agent.poll() is None:
            agent.kill()
        hub.terminate()
        hub.wait(10)
    assert _pending(db) == 0
    conn = sqlite3.connect(db)
    try:
        (dead,) = conn.execute("SELECT count(*) FROM outbox WHERE state = 'DEAD'").fetchone()
    finally:
        conn.close()
    assert dead == 0
    hub_conn = sqlite3.connect(hub_db)
    try:
        keys = [r[0] for r in hub_conn.execute("SELECT key FROM records")]
        seqs = {
            lane: [
                r[0]
                for r in hub_conn.execute(
                    "SELECT seq FROM lane_seqs WHERE lane = ? ORDER BY seq", (lane.value,)
                )
            ]
            for lane in Lane
        }
    finally:
        hub_conn.close()
    assert len(keys) == len(set(keys)) == RECORDS
    for lane in Lane:
        assert seqs[lane] == list(range(1, lanes.count(lane) + 1))
