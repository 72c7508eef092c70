"""2,000 results through a TCP proxy that drops, stalls, cuts and delays connections, with
the hub killed and restarted: every result reaches the hub exactly once, in lane order, and
the edge outbox ends empty."""

from __future__ import annotations

import asyncio
import random
import signal
import sqlite3
import time
from pathlib import Path

import pytest

from cloud_hub.store import HubStore, connect
from edge_agent.clock import SystemClock
from edge_agent.store import Store
from edge_agent.sync import outbox
from edge_agent.sync.client import Credential, HttpHubClient, enroll
from edge_agent.sync.uplink import Uplink, UplinkSettings
from hub_protocol import HybridClock, Lane, RecordType
from tests.conftest import free_port, start_hub
from tests.faultproxy import FaultProxy

pytestmark = pytest.mark.slow

RESULTS = 2000
MIN_FAULTS = 50
HUB_RESTARTS = 3


def test_faulty_network_and_hub_restarts(tmp_path: Path) -> None:
    hub_db, port, log = tmp_path / "hub.db", free_port(), tmp_path / "hub.log"
    token = HubStore(connect(f"sqlite:///{hub_db}")).create_enrollment_token("faulty")
    hub = start_hub(hub_db, port, log)
    proxy = FaultProxy(port, fault_rate=0.35, seed=7).start()
    store = Store(tmp_path / "edge.db")
    hlc = HybridClock("edge")
    rng = random.Random(11)
    lanes: list[Lane] = []

    def produce(n: int) -> None:
        for _ in range(n):
            lane = rng.choices(list(Lane), weights=[1, 6, 3])[0]
            key = f"result/r{len(lanes):05d}"
            store.writer.call(
                lambda c, k=key, ln=lane: outbox.enqueue(
                    c,
                    key=k,
                    type=RecordType.RESULT,
                    lane=ln,
                    payload={"study_uid": "1.2.3", "n": k},
                    hlc=hlc.now(),
                    now=time.time(),
                )
            )
            lanes.append(lane)

    async def scenario() -> int:
        nonlocal hub
        cred = await enroll(f"http://127.0.0.1:{port}", token)  # enrollment goes direct
        via_proxy = Credential(f"http://127.0.0.1:{proxy.port}", cred.site_id, cred.credential)
        up = Uplink(
            HttpHubClient(via_proxy, timeout_s=1.0, keepalive=False),
            store=store,
            clock=SystemClock(),
            settings=UplinkSettings(
                max_records=20, retry_initial_s=0.02, retry_max_s=0.2, heartbeat_interval_s=3600
            ),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(up.run(stop))
        restarts = 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if len(lanes) < RESULTS:
                await asyncio.to_thread(produce, 100)
                up.wake()
            if restarts < HUB_RESTARTS and len(lanes) >= (restarts + 1) * RESULTS // 4:
                hub.send_signal(signal.SIGKILL)
                hub.wait(10)
                await asyncio.sleep(0.2)
                hub = await asyncio.to_thread(start_hub, hub_db, port, log)
                restarts += 1
            if len(lanes) >= RESULTS and restarts == HUB_RESTARTS:
                with store.read() as conn:
                    if sum(outbox.stats(conn).depth.values()) == 0:
                        break
            await asyncio.sleep(0.05)
        stop.set()
        await task
        return restarts

    try:
        restarts = asyncio.run(scenario())
    finally:
        proxy.stop()
        hub.terminate()
        hub.wait(10)
    with store.read() as conn:
        st = outbox.stats(conn)
    store.close()
    assert restarts == HUB_RESTARTS
    assert proxy.faults >= MIN_FAULTS, proxy.counts
    assert sum(st.depth.values()) == 0 and st.dead == 0
    conn = sqlite3.connect(hub_db)
    try:
        keys = [r[0] for r in conn.execute("SELECT key FROM records")]
        seqs = {
            lane: [
                r[0]
                for r in conn.execute(
                    "SELECT seq FROM lane_seqs WHERE lane = ? ORDER BY seq", (lane.value,)
                )
            ]
            for lane in Lane
        }
        statuses = {r[0] for r in conn.execute("SELECT DISTINCT status FROM lane_seqs")}
    finally:
        conn.close()
    assert len(keys) == len(set(keys)) == RESULTS
    for lane in Lane:
        assert seqs[lane] == list(range(1, lanes.count(lane) + 1))
    assert statuses == {"applied"}
    print(f"faults injected: {dict(proxy.counts)}; hub restarts: {restarts}")
