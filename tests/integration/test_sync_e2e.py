"""The real sync client against the real hub process: killed with SIGKILL and restarted
while the edge keeps producing; every record arrives exactly once, lanes in order."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cloud_hub.store import HubStore, connect
from edge_agent.clock import SystemClock
from edge_agent.store import Store
from edge_agent.sync import outbox
from edge_agent.sync.client import HttpHubClient, enroll
from edge_agent.sync.uplink import Connectivity, Uplink, UplinkSettings
from hub_protocol import HybridClock, Lane, RecordType
from tests.conftest import free_port, start_hub


def test_backlog_survives_hub_kills_exactly_once_in_lane_order(tmp_path: Path) -> None:
    hub_db, port, log = tmp_path / "hub.db", free_port(), tmp_path / "hub.log"
    token = HubStore(connect(f"sqlite:///{hub_db}")).create_enrollment_token("edge under test")
    hub = start_hub(hub_db, port, log)
    store = Store(tmp_path / "edge.db")
    hlc = HybridClock("edge")
    rng = random.Random(4)
    produced: list[tuple[str, Lane]] = []

    def produce(n: int) -> None:
        for _ in range(n):
            lane = rng.choice(list(Lane))
            key = f"result/r{len(produced):05d}"
            store.writer.call(
                lambda c, k=key, ln=lane: outbox.enqueue(
                    c,
                    key=k,
                    type=RecordType.RESULT,
                    lane=ln,
                    payload={"study_uid": "1.2.3", "n": k, "pad": "x" * 200},
                    hlc=hlc.now(),
                    now=time.time(),
                )
            )
            produced.append((key, lane))

    async def scenario() -> Uplink:
        cred = await enroll(f"http://127.0.0.1:{port}", token)
        up = Uplink(
            HttpHubClient(cred, timeout_s=5),
            store=store,
            clock=SystemClock(),
            settings=UplinkSettings(
                max_records=25, retry_initial_s=0.05, retry_max_s=0.3, heartbeat_interval_s=0.5
            ),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(up.run(stop, health=lambda: {"ok": True}))
        nonlocal hub
        kills = 0
        produce(300)
        up.wake()
        for round_ in range(5):  # kill the hub mid-drain, keep producing, bring it back
            await asyncio.sleep(0.05 + 0.05 * round_)
            hub.send_signal(signal.SIGKILL)
            hub.wait(10)
            kills += 1
            produce(100)
            up.wake()
            await asyncio.sleep(0.4)
            assert up.state is not Connectivity.ONLINE
            hub = await asyncio.to_thread(start_hub, hub_db, port, log)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with store.read() as conn:
                if sum(outbox.stats(conn).depth.values()) == 0:
                    break
            await asyncio.sleep(0.1)
        stop.set()
        await task
        assert kills == 5
        return up

    try:
        up = asyncio.run(scenario())
    finally:
        hub.terminate()
        hub.wait(10)
    with store.read() as conn:
        st = outbox.stats(conn)
    store.close()
    assert sum(st.depth.values()) == 0 and st.dead == 0
    assert up.state is Connectivity.ONLINE
    hub_conn = sqlite3.connect(hub_db)
    try:
        keys = [r[0] for r in hub_conn.execute("SELECT key FROM records")]
        per_lane = {
            lane: [
                r[0]
                for r in hub_conn.execute(
                    "SELECT seq FROM lane_seqs WHERE lane = ? ORDER BY seq", (lane.value,)
                )
            ]
            for lane in Lane
        }
        statuses = {r[0] for r in hub_conn.execute("SELECT DISTINCT status FROM lane_seqs")}
        (health,) = hub_conn.execute("SELECT health FROM sites").fetchone()
    finally:
        hub_conn.close()
    assert sorted(keys) == sorted(k for k, _ in produced)  # each exactly once (PK)
    for lane in Lane:
        n = sum(1 for _, ln in produced if ln is lane)
        assert per_lane[lane] == list(range(1, n + 1))  # no gaps, no extras
    assert statuses == {"applied"}
    assert health == '{"ok": true}'


@pytest.mark.dcmtk
def test_phi_never_reaches_the_hub_in_clear(tmp_path: Path, app_factory: Any, clock: Any) -> None:
    """A CT study through inference and sync: the hub holds pseudonyms, never the patient's
    ID, name or accession number; the same patient always gets the same pseudonym."""
    from edge_agent.inference.reference_models import build_reference_packages
    from edge_agent.samples import make_study
    from tests.conftest import make_config, storescu

    hub_db, port = tmp_path / "hub.db", free_port()
    token = HubStore(connect(f"sqlite:///{hub_db}")).create_enrollment_token("phi")
    hub = start_hub(hub_db, port, tmp_path / "hub.log")
    try:
        app = app_factory(make_config(tmp_path))
        for pkg in build_reference_packages(tmp_path / "models"):
            app.registry.install(pkg)
        studies = [
            make_study(
                tmp_path / f"ct{i}",
                modality="CT",
                slices=2,
                size=64,
                seed=f"phi-{i}",
                patient_id="MRN-0042",
                patient_name="Doe^Jane",
            )
            for i in range(2)
        ]
        for s in studies:
            assert storescu(app.listener.port, *s.files).returncode == 0
        clock.advance(11)
        app.assembly.tick()
        app.inference.drain()

        async def push() -> None:
            cred = await enroll(f"http://127.0.0.1:{port}", token)
            up = Uplink(HttpHubClient(cred), store=app.store, clock=SystemClock())
            await up.drain()
            await up._client.close()

        asyncio.run(push())
    finally:
        hub.terminate()
        hub.wait(10)
    conn = sqlite3.connect(hub_db)
    try:
        payloads = [r[0] for r in conn.execute("SELECT payload FROM records")]
    finally:
        conn.close()
    assert len(payloads) == 4  # 2 studies x 2 models
    blob = "\n".join(payloads)
    for clear in ("MRN-0042", "Doe^Jane", "Doe", "ACCphi-"):
        assert clear not in blob
    pseudonyms = {json.loads(p)["study"]["patient_id"] for p in payloads}
    assert len(pseudonyms) == 1 and next(iter(pseudonyms)).startswith("pseudo:")
    assert all(json.loads(p)["study"]["modality"] == "CT" for p in payloads)  # not PHI: kept


def test_hub_over_tls_and_a_cloud_edit_reaches_the_site(tmp_path: Path) -> None:
    import ssl
    import urllib.request

    from edge_agent.clock import FakeClock
    from edge_agent.sync.client import HubUnavailable
    from tests.conftest import self_signed

    cert, key = self_signed(tmp_path)
    hub_db, port = tmp_path / "hub.db", free_port()
    hub_store = HubStore(connect(f"sqlite:///{hub_db}"))
    token = hub_store.create_enrollment_token("tls")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cloud_hub",
            "run",
            "--database-url",
            f"sqlite:///{hub_db}",
            "--port",
            str(port),
            "--tls-cert",
            str(cert),
            "--tls-key",
            str(key),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    ctx = ssl.create_default_context(cafile=str(cert))
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(
                f"https://127.0.0.1:{port}/healthz", timeout=1, context=ctx
            ):
                break
        except OSError:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.1)
    url = f"https://127.0.0.1:{port}"
    try:
        with pytest.raises(HubUnavailable, match=r"SSL|certificate"):
            asyncio.run(enroll(url, token))  # the system trust store does not know our CA
        cred = asyncio.run(enroll(url, token, ca_file=str(cert)))
        version = hub_store.cloud_edit(
            cred.site_id,
            key="system_config/thresholds",
            type=RecordType.SYSTEM_CONFIG,
            payload={"lesion_mm2": 400},
        )
        assert version == 1
        store = Store(tmp_path / "edge.db")
        try:

            async def pull() -> int:
                up = Uplink(HttpHubClient(cred, ca_file=str(cert)), store=store, clock=FakeClock())
                n = await up.pull()
                await up._client.close()
                return n

            assert asyncio.run(pull()) == 1
            (row,) = store.query("SELECT key, version, payload FROM replica")
            assert tuple(row) == ("system_config/thresholds", 1, '{"lesion_mm2": 400}')
        finally:
            store.close()
    finally:
        proc.terminate()
        proc.wait(10)
        hub_store.engine.dispose()
