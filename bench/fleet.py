"""Hub fleet throughput: N simulated sites (the real edge client, ``HttpHubClient``) pushing
batches of results to 1, then 3, ``cloud-hub run`` replicas on one real PostgreSQL (started
here with initdb), in one run; the 1-replica run is the reference the 3-replica run is
compared with.

Prints records/s, push latency p50/p95, hub CPU and PostgreSQL CPU per 1,000 records (user +
system time of the hub processes and of the PostgreSQL server processes, from /proc), and the
3-vs-1 ratios.

Usage::

    python bench/fleet.py                     # 500 sites, 20 s per shape
    python bench/fleet.py --sites 100 --seconds 10 --batch 50
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_hub.store import HubStore, connect
from edge_agent.sync.client import Credential, HttpHubClient, HubUnavailable, enroll
from hub_protocol import HLC, Lane, PushBatch, Record, RecordType
from tests.conftest import free_port, start_replica

TICK = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def postgres_pids(postmaster: int) -> list[int]:
    out = [postmaster]
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            fields = Path(stat).read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == postmaster:
            out.append(int(stat.split("/")[2]))
    return out


def start_postgres(root: Path) -> tuple[str, int, list[str]]:
    """(URL, postmaster pid, pg_ctl command) of a new server in ``root``."""
    bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
    data, sock = root / "data", root / "sock"
    sock.mkdir()
    as_pg: list[str] = []
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sock, "postgres")
        as_pg = ["runuser", "-u", "postgres", "--"]
    subprocess.run(
        [*as_pg, f"{bindir}/initdb", "-D", str(data), "--auth=trust", "-U", "postgres"],
        capture_output=True,
        check=True,
    )
    port = free_port()
    ctl = [*as_pg, f"{bindir}/pg_ctl", "-D", str(data), "-l", str(root / "log")]
    opts = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c max_connections=200"
    subprocess.run([*ctl, "-w", "-o", opts, "start"], capture_output=True, check=True)
    pid = int((data / "postmaster.pid").read_text().split()[0])
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", pid, ctl


def new_database(server: str, name: str) -> str:
    import psycopg

    with psycopg.connect(server.replace("+psycopg", ""), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return server.rsplit("/", 1)[0] + f"/{name}"


def start_replicas(db: str, n: int, tmp: Path) -> dict[int, subprocess.Popen[bytes]]:
    procs = {}
    for _ in range(n):
        port = free_port()
        procs[port] = start_replica(db, port, tmp)
    for port in procs:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"replica {port} did not start") from None
                time.sleep(0.1)
    return procs


async def enroll_all(ports: list[int], tokens: list[str]) -> list[Credential]:
    """Each site enrolls at a replica, round robin (before the measured window)."""
    return await asyncio.gather(
        *(enroll(f"http://127.0.0.1:{ports[i % len(ports)]}", t) for i, t in enumerate(tokens))
    )


async def fleet(creds: list[Credential], seconds: float, batch: int) -> tuple[int, list[float]]:
    """Every site pushes batches back to back for ``seconds``; (records stored, latencies)."""
    latencies: list[float] = []
    stored = 0
    start = time.monotonic()

    async def site(i: int, cred: Credential) -> None:
        nonlocal stored
        client = HttpHubClient(cred)
        seq = 0
        try:
            while time.monotonic() - start < seconds:
                recs = tuple(
                    Record(
                        key=f"result/{seq + j}",
                        seq=seq + j,
                        type=RecordType.RESULT,
                        lane=Lane.NORMAL,
                        hlc=HLC(seq + j, 0, "edge"),
                        base_version=0,
                        payload={"study_uid": f"1.2.{seq + j}", "findings": {"p": 0.5}},
                    )
                    for j in range(1, batch + 1)
                )
                t0 = time.perf_counter()
                try:
                    await client.push(PushBatch(protocol=1, site_id=cred.site_id, records=recs))
                except HubUnavailable:
                    await asyncio.sleep(0.5)
                    continue
                latencies.append(time.perf_counter() - t0)
                seq += batch
                stored += batch
        finally:
            await client.close()

    await asyncio.gather(*(site(i, c) for i, c in enumerate(creds)))
    return stored, latencies


def shape(
    server: str, postmaster: int, replicas: int, args: argparse.Namespace, tmp: Path
) -> dict[str, float]:
    db = new_database(server, f"bench_{replicas}")
    store = HubStore(connect(db))
    tokens = [store.create_enrollment_token(f"site-{i}") for i in range(args.sites)]
    store.engine.dispose()
    procs = start_replicas(db, replicas, tmp)
    try:
        creds = asyncio.run(enroll_all(list(procs), tokens))
        hub0 = sum(cpu_s(p.pid) for p in procs.values())
        pg_pids = postgres_pids(postmaster)
        pg0 = sum(cpu_s(p) for p in pg_pids)
        t0 = time.monotonic()
        stored, lat = asyncio.run(fleet(creds, args.seconds, args.batch))
        wall = time.monotonic() - t0
        hub = sum(cpu_s(p.pid) for p in procs.values()) - hub0
        pg_pids = sorted(set(pg_pids) | set(postgres_pids(postmaster)))
        pg = sum(cpu_s(p) for p in pg_pids) - pg0
    finally:
        for p in procs.values():
            p.send_signal(signal.SIGTERM)
        for p in procs.values():
            p.wait(timeout=30)
    q = statistics.quantiles(lat, n=20)
    return {
        "records_s": stored / wall,
        "p50_ms": statistics.median(lat) * 1000,
        "p95_ms": q[18] * 1000,
        "hub_cpu_ms_per_1k": hub / stored * 1e6,
        "pg_cpu_ms_per_1k": pg / stored * 1e6,
        "records": stored,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sites", type=int, default=500)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--batch", type=int, default=50, help="records per push")
    args = p.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    server, postmaster, ctl = start_postgres(root)
    try:
        one = shape(server, postmaster, 1, args, root)
        three = shape(server, postmaster, 3, args, root)
    finally:
        subprocess.run([*ctl, "-m", "fast", "stop"], capture_output=True, check=False)
        shutil.rmtree(root, ignore_errors=True)
    print(f"{args.sites} sites, batches of {args.batch}, {args.seconds:g} s per shape")
    print(f"{'':>26} {'1 replica':>12} {'3 replicas':>12} {'3 / 1':>8}")
    for key, label in (
        ("records_s", "records/s"),
        ("p50_ms", "push p50 (ms)"),
        ("p95_ms", "push p95 (ms)"),
        ("hub_cpu_ms_per_1k", "hub CPU ms / 1,000 rec"),
        ("pg_cpu_ms_per_1k", "PostgreSQL CPU ms / 1,000"),
    ):
        print(f"{label:>26} {one[key]:>12.1f} {three[key]:>12.1f} {three[key] / one[key]:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
