"""A short fleet run: 30 simulated sites (the real edge client, ``HttpHubClient``) push to 3
``cloud-hub run`` replicas started at the same moment on one real PostgreSQL, switching
replica on every batch, while one replica is SIGKILLed and restarted and PostgreSQL itself is
restarted; cloud edits race the sites' edits of the same records. Afterwards: every
acknowledged record is stored exactly once, no two writers of a record got the same version
(no lost update) and each record ends at the highest version handed out, every conflict
resolves once (edge and cloud choosing at the same moment: one wins, one gets 409), and every
high-water mark a site was told only grew."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from cloud_hub.store import HubStore, connect
from edge_agent.sync.client import (
    Credential,
    HttpHubClient,
    HubRejected,
    HubUnavailable,
    enroll,
)
from hub_protocol import HLC, Lane, PushBatch, ReceiptStatus, Record, RecordType
from tests.conftest import PostgresServer, free_port, fresh_database, start_replica

pytestmark = pytest.mark.slow

SITES, REPLICAS, RUN_S, BATCH = 30, 3, 24.0, 10


def wait_ready(procs: dict[int, subprocess.Popen[bytes]], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    for port, proc in procs.items():
        while True:
            assert proc.poll() is None, f"replica {port} exited with {proc.returncode}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                    break
            except OSError:
                assert time.monotonic() < deadline, f"replica {port} not ready"
                time.sleep(0.1)


def test_a_fleet_through_replica_kills_and_a_database_restart(
    postgres_server: PostgresServer, tmp_path: Path
) -> None:
    db = fresh_database(postgres_server.url)
    ports = [free_port() for _ in range(REPLICAS)]
    # all at the same moment
    procs = {p: start_replica(db, p, tmp_path, tmp_path / f"hub-{p}.log") for p in ports}
    store = HubStore(connect(db))
    try:
        wait_ready(procs)
        tokens = [store.create_enrollment_token(f"site-{i}") for i in range(SITES)]
        acked: dict[str, set[str]] = {}
        versions: dict[tuple[str, str], list[int]] = {}
        hw_seen: dict[str, list[dict[Lane, int]]] = {}
        lock = threading.Lock()
        creds: dict[str, Credential] = {}
        stop = threading.Event()

        def note(site: str, key: str, version: int) -> None:
            with lock:
                versions.setdefault((site, key), []).append(version)

        async def site_loop(i: int) -> None:
            url = f"http://127.0.0.1:{ports[i % REPLICAS]}"
            cred = await enroll(url, tokens[i])
            site = cred.site_id
            creds[site] = cred
            acked[site], hw_seen[site] = set(), []
            seq, base, n = 0, 0, 0
            while not stop.is_set():
                n += 1
                port = ports[n % REPLICAS]
                client = HttpHubClient(
                    Credential(f"http://127.0.0.1:{port}", site, cred.credential)
                )
                recs = [
                    Record(
                        key=f"result/{seq + j + 1}",
                        seq=seq + j + 1,
                        type=RecordType.RESULT,
                        lane=Lane.NORMAL,
                        hlc=HLC(seq + j + 1, 0, "edge"),
                        base_version=0,
                        payload={"study_uid": f"1.{seq + j + 1}"},
                    )
                    for j in range(BATCH - 1)
                ]
                recs.append(
                    Record(
                        key="system_config/shared",
                        seq=seq + BATCH,
                        type=RecordType.SYSTEM_CONFIG,
                        lane=Lane.NORMAL,
                        hlc=HLC(int(time.time() * 1000), 0, "edge"),
                        base_version=base,
                        payload={f"edge{n % 3}": n},
                    )
                )
                try:
                    receipt = await client.push(
                        PushBatch(protocol=1, site_id=site, records=tuple(recs))
                    )
                except (HubUnavailable, HubRejected):
                    await asyncio.sleep(0.2)
                    continue  # resend the same batch: always safe
                finally:
                    await client.close()
                seq += BATCH
                hw_seen[site].append(dict(receipt.high_water))
                for r in receipt.receipts:
                    if r.key.startswith("result/") and r.status in (
                        ReceiptStatus.APPLIED,
                        ReceiptStatus.DUPLICATE,
                    ):
                        acked[site].add(r.key)
                    elif r.key == "system_config/shared":
                        base = r.version
                        if r.status is ReceiptStatus.APPLIED or (
                            r.status is ReceiptStatus.CONFLICT and "merge" in r.error
                        ):
                            note(site, r.key, r.version)
                await asyncio.sleep(0.05)

        def cloud_edits() -> None:
            n = 0
            while not stop.is_set():
                for site in list(acked):
                    n += 1
                    try:
                        v = store.cloud_edit(
                            site,
                            key="system_config/shared",
                            type=RecordType.SYSTEM_CONFIG,
                            payload={"cloud": n},
                        )
                    except Exception:  # the database restart: the edit did not happen
                        time.sleep(0.2)
                        continue
                    note(site, "system_config/shared", v)
                time.sleep(0.3)

        def chaos() -> None:
            time.sleep(RUN_S / 4)
            victim = ports[1]
            procs[victim].send_signal(signal.SIGKILL)
            procs[victim].wait()
            time.sleep(1.0)
            procs[victim] = start_replica(db, victim, tmp_path, tmp_path / f"hub-{victim}.log")
            time.sleep(RUN_S / 4)
            postgres_server.restart()

        async def fleet() -> None:
            tasks = [asyncio.create_task(site_loop(i)) for i in range(SITES)]
            await asyncio.sleep(RUN_S)
            stop.set()
            await asyncio.gather(*tasks)

        editor = threading.Thread(target=cloud_edits)
        chaos_thread = threading.Thread(target=chaos)
        editor.start()
        chaos_thread.start()
        asyncio.run(fleet())
        editor.join()
        chaos_thread.join()
        wait_ready(procs)

        total = 0
        for site, keys in acked.items():
            stored = {r["key"] for r in store.results(site, limit=100_000)}
            assert keys <= stored, f"{site}: acknowledged but not stored"
            total += len(keys)
            for earlier, later in zip(hw_seen[site], hw_seen[site][1:], strict=False):
                for lane, mark in earlier.items():
                    assert later.get(lane, 0) >= mark, f"{site}: high-water mark went back"
        assert total > SITES * BATCH
        for (site, key), handed in versions.items():
            assert len(handed) == len(set(handed)), f"{site} {key}: two writers, one version"
            with store.engine.connect() as conn:
                from cloud_hub.store.schema import records

                final = conn.execute(
                    records.select()
                    .with_only_columns(records.c.version)
                    .where(records.c.site_id == site, records.c.key == key)
                ).scalar_one()
            # (>=: a write whose answer was cut by the kill or restart is not in ``handed``)
            assert final >= max(handed), f"{site} {key}: ends at {final}, below {max(handed)}"
        assert len(versions) == SITES
        asyncio.run(resolve_each_conflict_once(store, creds, ports))
    finally:
        stop_all = list(procs.values())
        for proc in stop_all:
            proc.send_signal(signal.SIGTERM)
        for proc in stop_all:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        store.engine.dispose()


async def resolve_each_conflict_once(
    store: HubStore, creds: dict[str, Credential], ports: list[int]
) -> None:
    """Every site's review edited at the hub and at the edge from the same base: queued for
    manual review; the edge (through a replica) and ops (through the store) choose at the
    same moment: exactly one wins, the other is told it was decided."""
    outcomes: list[tuple[bool, bool]] = []
    for n, (site, cred) in enumerate(creds.items()):
        url = f"http://127.0.0.1:{ports[n % len(ports)]}"
        client = HttpHubClient(Credential(url, site, cred.credential))
        try:
            hw = await client.high_water()
            seq = hw.get(Lane.URGENT, 0) + 1

            def review(seq: int, verdict: str) -> Record:
                return Record(
                    key="review/1",
                    seq=seq,
                    type=RecordType.REVIEW,
                    lane=Lane.URGENT,
                    hlc=HLC(seq, 0, "edge"),
                    base_version=0 if seq == 1 else 1,
                    payload={"verdict": verdict},
                )

            await client.push(PushBatch(protocol=1, site_id=site, records=(review(seq, "a"),)))
            store.cloud_edit(site, key="review/1", type=RecordType.REVIEW, payload={"v": "c"})
            got = await client.push(
                PushBatch(protocol=1, site_id=site, records=(review(seq + 1, "b"),))
            )
            assert got.receipts[0].status is ReceiptStatus.CONFLICT
            (conflict,) = await client.conflicts()

            async def edge(client: HttpHubClient, cid: int) -> bool:
                try:
                    await client.resolve_conflict(cid, "edge", "dr.edge")
                except HubRejected as exc:
                    assert exc.code == "already_resolved"
                    return False
                return True

            def cloud(cid: int) -> bool:
                from cloud_hub.store import AlreadyResolved

                try:
                    store.resolve_conflict(None, cid, take="cloud", by="ops")
                except AlreadyResolved:
                    return False
                return True

            cid = int(conflict["id"])
            won = await asyncio.gather(edge(client, cid), asyncio.to_thread(cloud, cid))
            outcomes.append((won[0], won[1]))
        finally:
            await client.close()
    assert all(a != b for a, b in outcomes), outcomes  # one winner each, never both
    assert store.conflicts(None) == []
