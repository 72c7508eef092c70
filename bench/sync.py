"""Sync throughput: draining an outbox backlog to a real local hub, against a raw aiohttp
client posting the same bytes in the same batch sizes to a trivial endpoint, same run.

Prints results/s and MB/s for both, the ratio, what that means for a 24 h backlog of a
1,000-studies/day site, and the time from the first successful contact with a hub that was
down to the first urgent record stored there.

Usage::

    python bench/sync.py                      # 50,000 results, batches of 500
    python bench/sync.py --records 5000 --batch 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_hub.store import HubStore, connect
from edge_agent.clock import SystemClock
from edge_agent.store import Store
from edge_agent.sync import outbox
from edge_agent.sync.client import Credential, HttpHubClient, enroll
from edge_agent.sync.uplink import Uplink, UplinkSettings
from hub_protocol import HLC, HybridClock, Lane, PushBatch, RecordType
from tests.conftest import free_port, start_hub

TRIVIAL = """
import sys
from aiohttp import web
async def ok(request):
    await request.read()
    return web.json_response({"receipts": [], "high_water": {}})
app = web.Application(client_max_size=64 * 1024 * 1024)
app.router.add_post("/v1/push", ok)
app.router.add_get("/healthz", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def payload(i: int) -> dict[str, Any]:
    """A realistic classification result (~600 bytes of JSON)."""
    return {
        "result_id": f"0192f4c3-0000-7000-8000-{i:012d}",
        "study_uid": f"2.25.{10**20 + i}",
        "series_uid": f"2.25.{2 * 10**20 + i}",
        "model_name": "cxr-resnet50",
        "model_version": "2.1.0",
        "model_sha256": "ab" * 32,
        "provider": "CUDAExecutionProvider",
        "task": "classification",
        "critical": i % 50 == 0,
        "instances": 1,
        "findings": {
            "probabilities": {"normal": 0.91, "nodule": 0.06, "effusion": 0.03},
            "top_label": "normal",
        },
    }


def prefill(store: Store, n: int) -> list[Lane]:
    hlc = HybridClock("edge")
    lanes = [Lane.URGENT if i % 50 == 0 else Lane.NORMAL for i in range(n)]

    def fill(c: sqlite3.Connection) -> None:
        for i, lane in enumerate(lanes):
            outbox.enqueue(
                c,
                key=f"result/r{i:06d}",
                type=RecordType.RESULT,
                lane=lane,
                payload=payload(i),
                hlc=hlc.now(),
                now=time.time(),
            )

    store.writer.call(fill)
    return lanes


async def raw_client(port: int, batches: list[bytes]) -> float:
    started = time.perf_counter()
    async with aiohttp.ClientSession() as s:
        for body in batches:
            async with s.post(
                f"http://127.0.0.1:{port}/v1/push",
                data=body,
                headers={"Content-Type": "application/json"},
            ) as r:
                await r.read()
    return time.perf_counter() - started


class Timed(HttpHubClient):
    first_ok: float | None = None

    async def high_water(self) -> dict[Lane, int]:
        hw = await super().high_water()
        if self.first_ok is None:
            self.first_ok = time.perf_counter()
        return hw


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--records", type=int, default=50_000)
    p.add_argument("--batch", type=int, default=500)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="edge-sync-bench-"))
    hub_db, hub_port = work / "hub.db", free_port()
    token = HubStore(connect(f"sqlite:///{hub_db}")).create_enrollment_token("bench")
    hub = start_hub(hub_db, hub_port, work / "hub.log")
    trivial_port = free_port()
    trivial = subprocess.Popen([sys.executable, "-c", TRIVIAL, str(trivial_port)])
    try:
        store = Store(work / "edge.db")
        t = time.perf_counter()
        prefill(store, args.records)
        print(
            f"prefilled {args.records} results in {time.perf_counter() - t:.1f} s "
            f"(run folder {work})"
        )
        with store.read() as conn:
            batches = []
            # the exact bytes the uplink will send, for the raw client
            recs = outbox.next_batch(conn, max_records=args.records, max_bytes=1 << 40)
        for i in range(0, len(recs), args.batch):
            batches.append(
                PushBatch(
                    protocol=1, site_id="site-raw", records=tuple(recs[i : i + args.batch])
                ).encode()
            )
        total_bytes = sum(len(b) for b in batches)

        async def edge() -> tuple[float, Credential]:
            cred = await enroll(f"http://127.0.0.1:{hub_port}", token)
            up = Uplink(
                HttpHubClient(cred),
                store=store,
                clock=SystemClock(),
                settings=UplinkSettings(max_records=args.batch, max_bytes=64 << 20),
            )
            started = time.perf_counter()
            await up.drain()
            elapsed = time.perf_counter() - started
            await up._client.close()
            return elapsed, cred

        for _ in range(50):  # trivial server up?
            try:
                import urllib.request

                urllib.request.urlopen(f"http://127.0.0.1:{trivial_port}/healthz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        raw_s = asyncio.run(raw_client(trivial_port, batches))
        edge_s, cred = asyncio.run(edge())
        with store.read() as conn:
            left = sum(outbox.stats(conn).depth.values())
        assert left == 0, f"{left} records not drained"

        # time to first urgent record after the link returns
        hub.terminate()
        hub.wait(10)
        hlc = HybridClock("edge", last=HLC(int(time.time() * 1000) + 10_000, 0, "edge"))
        store.writer.call(
            lambda c: outbox.enqueue(
                c,
                key="result/urgent-after-outage",
                type=RecordType.RESULT,
                lane=Lane.URGENT,
                payload=payload(1),
                hlc=hlc.now(),
                now=time.time(),
            )
        )

        async def outage() -> float:
            client = Timed(cred, timeout_s=2)
            up = Uplink(
                client,
                store=store,
                clock=SystemClock(),
                settings=UplinkSettings(
                    retry_initial_s=0.2, retry_max_s=0.5, heartbeat_interval_s=3600
                ),
            )
            stop = asyncio.Event()
            task = asyncio.create_task(up.run(stop))
            await asyncio.sleep(1.0)  # a few failed attempts while the hub is down
            nonlocal hub
            hub = await asyncio.to_thread(start_hub, hub_db, hub_port, work / "hub.log")
            while True:
                conn = sqlite3.connect(hub_db)
                try:
                    got = conn.execute(
                        "SELECT received_at FROM records WHERE key = ?",
                        ("result/urgent-after-outage",),
                    ).fetchone()
                finally:
                    conn.close()
                if got:
                    arrived = time.perf_counter()
                    break
                await asyncio.sleep(0.01)
            stop.set()
            await task
            assert client.first_ok is not None
            return arrived - client.first_ok

        urgent_s = asyncio.run(outage())
        store.close()
    finally:
        trivial.terminate()
        hub.terminate()
        hub.wait(10)
    n = args.records
    rows = {
        "records": n,
        "batch": args.batch,
        "bytes": total_bytes,
        "edge_results_s": n / edge_s,
        "edge_mb_s": total_bytes / edge_s / 1e6,
        "raw_results_s": n / raw_s,
        "raw_mb_s": total_bytes / raw_s / 1e6,
        "ratio": raw_s / edge_s,
        "backlog_24h_1000_studies_s": 2000 / (n / edge_s),
        "first_urgent_after_contact_s": urgent_s,
    }
    print(f"\n== drain {n} results ({total_bytes / 1e6:.1f} MB), batches of {args.batch} ==")
    print(
        f"  edge -> real hub (SQLite):      {rows['edge_results_s']:9.0f} results/s "
        f"{rows['edge_mb_s']:6.2f} MB/s"
    )
    print(
        f"  raw aiohttp -> trivial endpoint: {rows['raw_results_s']:9.0f} results/s "
        f"{rows['raw_mb_s']:6.2f} MB/s"
    )
    print(f"  ratio edge/raw: {rows['ratio']:.2f}")
    print(
        f"  24 h backlog of a 1,000-studies/day site (~2,000 results): "
        f"{rows['backlog_24h_1000_studies_s']:.2f} s"
    )
    print(
        f"  first urgent record stored {urgent_s * 1000:.0f} ms after the first successful "
        "contact with a hub that was down"
    )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
