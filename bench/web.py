"""Web latency: p50/p95/p99 of the worklist API and the study page with a full store and many
concurrent users, against a trivial aiohttp handler serving a document of the same size, same
run. Target: p95 < 200 ms for the worklist API.

The store gets ``--studies`` studies (CT/MR/CR, mostly DONE, spread over 30 days), one series
each with its instances, and for about 70 % of them one or two current AI results (with their
SR/SEG object rows, inference jobs and a few reviews), inserted directly with SQL. The agent
then serves its web app (``create_app(app.web_deps())``, its production JSON logging going to
a file in the run folder) in a child process; the trivial reference server is another child
process; the load generator (``--users`` asyncio tasks, each with its own HTTP session, logged
in once, doing ``--requests`` sequential requests) runs in this process. The three share the
machine's cores, so the reference pays the same load-generator overhead as the agent.

Measured, one phase after the other (each after a short unmeasured warm-up):

- trivial JSON: ``web.json_response`` of a copy of a real worklist page (100 rows);
- worklist API: ``GET /api/v1/studies?limit=100``, and with a search (``&q=smith``);
- trivial HTML: a copy of a real study page, as ``text/html``;
- study page: ``GET /studies/{uid}`` for random studies (server-rendered, writes an audit row);
- the worklist API (plain and searched) with a single user alone, to separate the cost of
  one request from queueing;
- the worklist API with every user fetching it once per ``web.refresh_s`` (5 s) from a
  random start, as an open worklist page does (``--poll-rounds`` rounds; 0 skips it).

"Back to back" (closed loop, no think time) is a far heavier load than 50 radiologists
produce; the polled line is closer to a real reading room.

Prints percentiles, requests/s, the ratios of our p95 to the trivial one's, and whether the
worklist target is met. Nothing is asserted about speed.

Usage::

    python bench/web.py                               # 10,000 studies, 50 users x 40 requests
    python bench/web.py --studies 2000 --users 20 --requests 20 --poll-rounds 0
    python bench/web.py --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.app import EdgeApp
from edge_agent.clock import SystemClock
from edge_agent.config import Config
from tests.conftest import free_port, make_config

SERVE_AGENT = "--serve-agent"
SERVE_TRIVIAL = "--serve-trivial"
USERNAME = "bench"
PASSWORD = "correct horse battery staple"
TARGET_P95_MS = 200.0
STARTUP_TIMEOUT_S = 60.0
DAY = 86400.0

SURNAMES = (
    "SMITH", "JOHNSON", "WILLIAMS", "BROWN", "JONES", "GARCIA", "MILLER", "DAVIS", "MARTIN",
    "LOPEZ", "WILSON", "ANDERSON", "THOMAS", "TAYLOR", "MOORE", "JACKSON", "LEE", "PEREZ",
    "WHITE", "HARRIS", "CLARK", "LEWIS", "ROBINSON", "WALKER", "YOUNG", "ALLEN", "KING",
    "WRIGHT", "SCOTT", "HILL", "GREEN", "ADAMS", "BAKER", "NELSON", "CARTER", "MITCHELL",
    "MULLER", "SCHMIDT", "DUBOIS", "ROSSI",
)  # fmt: skip
GIVEN = ("JOHN", "MARY", "ANNA", "PETER", "LUCAS", "EMMA", "OLIVIA", "NOAH", "SOFIA", "LIAM")
# modality -> (descriptions, body part, slices low, slices high, SOP class)
MODALITIES: dict[str, tuple[tuple[str, ...], str, int, int, str]] = {
    "CT": (
        ("CT CHEST W/O CONTRAST", "CT ABDOMEN PELVIS", "CT HEAD"),
        "CHEST",
        40,
        160,
        "1.2.840.10008.5.1.4.1.1.2",
    ),
    "MR": (("MR BRAIN", "MR LIVER", "MR KNEE"), "BRAIN", 20, 60, "1.2.840.10008.5.1.4.1.1.4"),
    "CR": (("CHEST PA", "CHEST AP PORTABLE"), "CHEST", 1, 2, "1.2.840.10008.5.1.4.1.1.1"),
}
# task -> (model name, version, sha256)
MODELS = {
    "segmentation": ("ct-lesion-seg", "1.4.0", "5e" * 32),
    "classification": ("cxr-resnet50", "2.1.0", "ab" * 32),
}
UID_ROOT = "1.2.826.0.1.3680043.10.999"

TRIVIAL_SERVER = """
import sys
from aiohttp import web
from pathlib import Path
doc = __import__("json").loads(Path(sys.argv[2]).read_text())
html = Path(sys.argv[3]).read_text()
async def as_json(request):
    return web.json_response(doc)
async def as_html(request):
    return web.Response(text=html, content_type="text/html")
app = web.Application()
app.router.add_get("/json", as_json)
app.router.add_get("/html", as_html)
app.router.add_get("/healthz", as_json)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


# -- the store ------------------------------------------------------------------------------


def _uuid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def _findings(task: str, rng: random.Random) -> tuple[str, list[str]]:
    """(findings JSON, finding names)."""
    if task == "segmentation":
        slices = rng.randint(40, 160)
        area = round(rng.uniform(0, 400), 1)
        return json.dumps(
            {
                "label": "lesion",
                "area_mm2_total": area,
                "slices": slices,
                "slices_with_finding": rng.randint(0, 12),
                "max_slice_area_mm2": round(area / 4, 1),
                "mean_intensity": round(rng.uniform(20, 90), 1),
                "volume_mm3": round(area * 2.5, 1),
                "slice_spacing_mm": 2.5,
                "per_slice": [],
            }
        ), ["lesion"]
    p = [rng.random() for _ in range(3)]
    total = sum(p)
    probs = {
        k: round(v / total, 3) for k, v in zip(("normal", "nodule", "effusion"), p, strict=True)
    }
    return json.dumps(
        {
            "probabilities": probs,
            "top_label": max(probs, key=lambda k: probs[k]),
            "instances": 1,
            "per_instance": [],
        }
    ), sorted(probs)


@dataclass
class Rows:
    studies: list[tuple[Any, ...]]
    series: list[tuple[Any, ...]]
    instances: list[tuple[Any, ...]]
    jobs: list[tuple[Any, ...]]
    results: list[tuple[Any, ...]]
    objects: list[tuple[Any, ...]]
    reviews: list[tuple[Any, ...]]


def make_rows(n: int, now: float, seed: int = 7) -> Rows:
    rng = random.Random(seed)
    rows = Rows([], [], [], [], [], [], [])
    job_id = 0
    for i in range(n):
        modality = ("CT", "MR", "CR")[i % 3]
        descs, body, lo, hi, sop_class = MODALITIES[modality]
        study_uid, series_uid = f"{UID_ROOT}.1.{i}", f"{UID_ROOT}.2.{i}"
        first = now - rng.uniform(0, 30 * DAY)
        last = first + rng.uniform(5, 600)
        x = rng.random()
        state = (
            "DONE"
            if x < 0.95
            else "RECEIVING"
            if x < 0.965
            else "INFERRING"
            if x < 0.985
            else "FAILED"
        )
        count = rng.randint(lo, hi)
        desc = rng.choice(descs)
        rows.studies.append(
            (
                study_uid,
                f"PID{rng.randrange(10**7):07d}",
                f"{rng.choice(SURNAMES)}^{rng.choice(GIVEN)}",
                dt.datetime.fromtimestamp(first, dt.UTC).strftime("%Y%m%d"),
                f"ACC{rng.randrange(10**8):08d}",
                desc,
                modality,
                state,
                first,
                last,
                last if state != "RECEIVING" else None,
                "quiet period" if state != "RECEIVING" else None,
                count if state != "RECEIVING" else 0,
            )
        )
        rows.series.append((series_uid, study_uid, modality, "1", desc, body, count, first, last))
        for k in range(count):
            sha = f"{rng.getrandbits(256):064x}"
            rows.instances.append(
                (
                    f"{UID_ROOT}.3.{i}.{k + 1}",
                    1,
                    sop_class,
                    series_uid,
                    study_uid,
                    str(k + 1),
                    "1.2.840.10008.1.2.1",
                    sha,
                    524_288 if modality != "CR" else 8_388_608,
                    "hot",
                    f"objects/{sha[:2]}/{sha}.dcm",
                    first + k * (last - first) / max(count, 1),
                    "MODALITY",
                )
            )
        if state != "DONE" or rng.random() >= 0.74:
            continue
        first_task = "classification" if modality == "CR" else "segmentation"
        tasks = [first_task]
        if rng.random() < 0.3:
            tasks.append("classification" if first_task == "segmentation" else "segmentation")
        for task in tasks:
            job_id += 1
            name, version, model_sha = MODELS[task]
            result_id = _uuid(rng)
            created = last + rng.uniform(10, 120)
            findings, names = _findings(task, rng)
            rows.jobs.append(
                (
                    job_id,
                    study_uid,
                    series_uid,
                    name,
                    version,
                    "DONE",
                    0,
                    1,
                    created - 5,
                    created - 4,
                    created,
                    result_id,
                )
            )
            rows.results.append(
                (
                    result_id,
                    job_id,
                    study_uid,
                    series_uid,
                    name,
                    version,
                    model_sha,
                    "CPUExecutionProvider",
                    task,
                    findings,
                    int(rng.random() < 0.05),
                    count if task == "segmentation" else 1,
                    round(rng.uniform(50, 400), 1),
                    round(rng.uniform(100, 3000), 1),
                    created,
                )
            )
            kinds = ("SR", "SEG") if task == "segmentation" else ("SR",)
            for kind in kinds:
                rows.objects.append(
                    (
                        result_id,
                        kind,
                        "1.2.840.10008.5.1.4.1.1.88.22"
                        if kind == "SR"
                        else "1.2.840.10008.5.1.4.1.1.66.4",
                        f"{UID_ROOT}.4.{job_id}.{kind == 'SEG':d}",
                        f"results/{result_id}/{kind.lower()}.dcm",
                    )
                )
            if rng.random() < 0.25:
                rows.reviews.append(
                    (
                        _uuid(rng),
                        result_id,
                        rng.choice(names),
                        rng.choice(("accept", "accept", "reject")),
                        "",
                        USERNAME,
                        created + rng.uniform(60, DAY),
                    )
                )
    return rows


def populate(app: EdgeApp, rows: Rows) -> None:
    def fill(c: sqlite3.Connection) -> None:
        c.executemany(
            "INSERT INTO studies (study_uid, patient_id, patient_name, study_date, "
            "accession_number, description, modality, state, first_received_at, "
            "last_received_at, completed_at, completed_reason, instance_count) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows.studies,
        )
        c.executemany(
            "INSERT INTO series (series_uid, study_uid, modality, series_number, description, "
            "body_part, instance_count, first_received_at, last_received_at) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows.series,
        )
        c.executemany(
            "INSERT INTO instances (sop_instance_uid, version, sop_class_uid, series_uid, "
            "study_uid, instance_number, transfer_syntax, sha256, size_bytes, tier, path, "
            "received_at, calling_ae) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows.instances,
        )
        c.executemany(
            "INSERT INTO inference_jobs (id, study_uid, series_uid, model_name, model_version, "
            "state, round, attempts, created_at, started_at, finished_at, result_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            rows.jobs,
        )
        c.executemany(
            "INSERT INTO results (result_id, job_id, study_uid, series_uid, model_name, "
            "model_version, model_sha256, provider, task, findings, critical, instances, "
            "preprocess_ms, inference_ms, created_at, supersedes, superseded_by) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, NULL)",
            rows.results,
        )
        c.executemany(
            "INSERT INTO result_objects (result_id, kind, sop_class_uid, sop_instance_uid, "
            "path) VALUES (?, ?, ?, ?, ?)",
            rows.objects,
        )
        c.executemany(
            "INSERT INTO reviews (review_id, result_id, finding, decision, comment, username, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            rows.reviews,
        )

    app.store.writer.call(fill)


# -- the servers ----------------------------------------------------------------------------


def agent_config(work: Path) -> Config:
    return make_config(work, inference={"enabled": False})


def serve_agent(work: Path, port: int) -> int:
    """Child process: the agent's web app on the populated store until SIGTERM."""
    from edge_agent.logs import setup_logging
    from edge_agent.web.app import create_app

    cfg = agent_config(work)
    setup_logging(cfg.logging.level, json_format=cfg.logging.json)  # stderr: a file

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        app = EdgeApp(cfg, clock=SystemClock())
        runner = web.AppRunner(create_app(app.web_deps()), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()
            await asyncio.to_thread(app.close)

    asyncio.run(main())
    return 0


def wait_up(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{what} exited with code {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{what} did not answer /healthz within {STARTUP_TIMEOUT_S:.0f} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def child(cmd: list[str], log: Path, port: int, what: str) -> Iterator[None]:
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=out)
        try:
            wait_up(port, proc, what)
            yield
        finally:
            stop(proc)


# -- the load -------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    latencies_s: list[float]
    wall_s: float
    errors: int
    body_bytes: int

    def pct(self, q: float) -> float:
        """Nearest-rank percentile, in milliseconds."""
        xs = sorted(self.latencies_s)
        k = max(0, min(len(xs) - 1, math.ceil(q / 100 * len(xs)) - 1))
        return xs[k] * 1000

    @property
    def rate(self) -> float:
        return len(self.latencies_s) / self.wall_s

    def row(self) -> dict[str, float | int | str]:
        return {
            "name": self.name,
            "requests": len(self.latencies_s),
            "p50_ms": self.pct(50),
            "p95_ms": self.pct(95),
            "p99_ms": self.pct(99),
            "max_ms": max(self.latencies_s) * 1000,
            "req_s": self.rate,
            "errors": self.errors,
            "mean_body_bytes": self.body_bytes // max(1, len(self.latencies_s)),
        }


Path_ = Callable[[int, int], str]  # (user, request number) -> path


async def open_users(base: str, users: int, *, login: bool) -> list[aiohttp.ClientSession]:
    sessions = [
        aiohttp.ClientSession(base_url=base, cookie_jar=aiohttp.CookieJar(unsafe=True))
        for _ in range(users)
    ]
    if login:

        async def log_in(s: aiohttp.ClientSession) -> None:
            async with s.post(
                "/login",
                data={"username": USERNAME, "password": PASSWORD, "next": "/worklist"},
                allow_redirects=False,
            ) as r:
                await r.read()
                if r.status != 302:
                    raise SystemExit(f"login failed: HTTP {r.status}")

        await asyncio.gather(*(log_in(s) for s in sessions))
    return sessions


async def run_phase(
    name: str,
    sessions: list[aiohttp.ClientSession],
    path: Path_,
    requests: int,
    *,
    warmup: int = 2,
    every_s: float = 0.0,
) -> Phase:
    """Each session does ``requests`` GETs one after the other: back to back (closed loop,
    no think time), or with ``every_s`` one every ``every_s`` seconds from a random start
    (like the worklist page's auto-refresh)."""

    async def one(s: aiohttp.ClientSession, p: str) -> tuple[float, bool, int]:
        t0 = time.perf_counter()
        async with s.get(p, allow_redirects=False) as r:
            body = await r.read()
        return time.perf_counter() - t0, r.status == 200, len(body)

    async def user(u: int, s: aiohttp.ClientSession, n: int, out: list[float]) -> list[int]:
        errors = size = 0
        start = time.perf_counter() + random.Random(u).uniform(0, every_s)
        for j in range(n):
            if every_s:
                await asyncio.sleep(max(0.0, start + j * every_s - time.perf_counter()))
            took, ok, nbytes = await one(s, path(u, j))
            out.append(took)
            errors += not ok
            size += nbytes
        return [errors, size]

    # warm-up: open connections, fill caches (not measured)
    await asyncio.gather(*(user(u, s, warmup, []) for u, s in enumerate(sessions)))
    lat: list[float] = []
    t0 = time.perf_counter()
    counts = await asyncio.gather(*(user(u, s, requests, lat) for u, s in enumerate(sessions)))
    wall = time.perf_counter() - t0
    return Phase(name, lat, wall, sum(c[0] for c in counts), sum(c[1] for c in counts))


async def fetch(s: aiohttp.ClientSession, path: str) -> tuple[int, bytes]:
    async with s.get(path, allow_redirects=False) as r:
        return r.status, await r.read()


async def close_all(sessions: list[aiohttp.ClientSession]) -> None:
    await asyncio.gather(*(s.close() for s in sessions))


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 3 and argv[0] == SERVE_AGENT:
        return serve_agent(Path(argv[1]), int(argv[2]))
    logging.disable(logging.WARNING)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--studies", type=int, default=10_000)
    p.add_argument("--users", type=int, default=50, help="concurrent users")
    p.add_argument("--requests", type=int, default=40, help="sequential requests per user")
    p.add_argument(
        "--poll-rounds",
        type=int,
        default=4,
        help="rounds of the paced phase: every user fetching the worklist once per "
        "web.refresh_s, as the open worklist page does (0: skip)",
    )
    p.add_argument("--json", type=Path, help="also write the figures here")
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="edge-web-bench-"))

    t = time.perf_counter()
    now = time.time()
    rows = make_rows(args.studies, now)
    app = EdgeApp(agent_config(work), clock=SystemClock())
    try:
        populate(app, rows)
        app.accounts.add_user(USERNAME, "radiologist", PASSWORD, now=now)
    finally:
        app.close()
    print(
        f"store: {len(rows.studies)} studies, {len(rows.instances)} instances, "
        f"{len(rows.results)} results ({sum(r[10] for r in rows.results)} critical), "
        f"{len(rows.reviews)} reviews in {time.perf_counter() - t:.1f} s (run folder {work})"
    )
    uids = [s[0] for s in rows.studies]
    del rows

    agent_port, trivial_port = free_port(), free_port()
    agent_cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        SERVE_AGENT,
        str(work),
        str(agent_port),
    ]
    n, users = args.requests, args.users
    refresh_s = agent_config(work).web.refresh_s

    def random_study(u: int, j: int) -> str:
        return f"/studies/{random.Random(u * 1_000_003 + j).choice(uids)}"

    async def against_agent() -> tuple[list[Phase], bytes, bytes, int]:
        sessions = await open_users(f"http://127.0.0.1:{agent_port}", users, login=True)
        try:
            status, worklist_body = await fetch(sessions[0], "/api/v1/studies?limit=100")
            total = json.loads(worklist_body)["total"] if status == 200 else -1
            if total != len(uids):
                raise SystemExit(f"worklist: HTTP {status}, total {total} != {len(uids)}")
            _, search_body = await fetch(sessions[0], "/api/v1/studies?limit=100&q=smith")
            matches = int(json.loads(search_body)["total"])
            pages = [await fetch(sessions[0], random_study(0, -1 - k)) for k in range(21)]
            if any(status != 200 for status, _ in pages):
                raise SystemExit(f"study page: HTTP {[status for status, _ in pages]}")
            page = sorted((body for _, body in pages), key=len)[10]  # a median-size page
            phases = [
                await run_phase(
                    "worklist API, 1 user", sessions[:1], lambda u, j: "/api/v1/studies", 20
                ),
                await run_phase(
                    "worklist API ?q=smith, 1 user",
                    sessions[:1],
                    lambda u, j: "/api/v1/studies?q=smith",
                    20,
                ),
                await run_phase(
                    "worklist API", sessions, lambda u, j: "/api/v1/studies?limit=100", n
                ),
                await run_phase(
                    "worklist API ?q=smith",
                    sessions,
                    lambda u, j: "/api/v1/studies?limit=100&q=smith",
                    n,
                ),
                await run_phase("study page", sessions, random_study, n),
            ]
            if args.poll_rounds:
                phases.append(
                    await run_phase(
                        "worklist API, polled",
                        sessions,
                        lambda u, j: "/api/v1/studies?limit=100",
                        args.poll_rounds,
                        every_s=refresh_s,
                    )
                )
        finally:
            await close_all(sessions)
        return phases, worklist_body, page, matches

    async def against_trivial() -> list[Phase]:
        sessions = await open_users(f"http://127.0.0.1:{trivial_port}", users, login=False)
        try:
            return [
                await run_phase("trivial JSON", sessions, lambda u, j: "/json", n),
                await run_phase("trivial HTML", sessions, lambda u, j: "/html", n),
            ]
        finally:
            await close_all(sessions)

    with child(agent_cmd, work / "agent.log", agent_port, "the agent's web server"):
        ours, worklist_body, page, matches = asyncio.run(against_agent())
    (work / "worklist.json").write_bytes(worklist_body)
    (work / "study.html").write_bytes(page)
    trivial_cmd = [
        sys.executable,
        "-c",
        TRIVIAL_SERVER,
        str(trivial_port),
        str(work / "worklist.json"),
        str(work / "study.html"),
    ]
    with child(trivial_cmd, work / "trivial.log", trivial_port, "the trivial server"):
        ref = asyncio.run(against_trivial())
    single, single_search, worklist, search, study = ours[:5]
    polled = ours[5] if len(ours) > 5 else None
    tjson, thtml = ref

    print(
        f"\n== web latency: {len(uids)} studies, {users} users x {n} requests back to back, "
        "loopback, load generator and servers on the same machine =="
    )
    print(f"  {'':44s} {'p50 ms':>8s} {'p95 ms':>8s} {'p99 ms':>8s} {'req/s':>8s} {'errors':>7s}")
    lines = [
        (tjson, f"trivial aiohttp JSON ({len(worklist_body) / 1000:.0f} kB)"),
        (worklist, "worklist API ?limit=100"),
        (search, f"worklist API ?q=smith ({matches} matches)"),
        (thtml, f"trivial aiohttp HTML ({len(page) / 1000:.0f} kB)"),
        (study, "study page /studies/{uid}"),
        (single, "worklist API, 1 user alone"),
        (single_search, "worklist API ?q=smith, 1 user alone"),
    ]
    if polled is not None:
        lines.append((polled, f"worklist API, {users} users, 1 per {refresh_s:g} s each"))
    for ph, what in lines:
        print(
            f"  {what:44s} {ph.pct(50):8.1f} {ph.pct(95):8.1f} {ph.pct(99):8.1f} "
            f"{ph.rate:8.1f} {ph.errors:7d}"
        )
    r_wl, r_search = worklist.pct(95) / tjson.pct(95), search.pct(95) / tjson.pct(95)
    r_study = study.pct(95) / thtml.pct(95)
    print(
        f"  p95 ratio ours/trivial: worklist {r_wl:.1f}x, search {r_search:.1f}x, "
        f"study page {r_study:.1f}x"
    )
    met = worklist.pct(95) < TARGET_P95_MS
    print(
        f"  target worklist API p95 < {TARGET_P95_MS:.0f} ms with {users} users back to back: "
        f"{'met' if met else 'NOT met'} ({worklist.pct(95):.0f} ms)"
        + (f"; polled every {refresh_s:g} s: {polled.pct(95):.0f} ms" if polled is not None else "")
    )
    if args.json:
        out = {
            "studies": len(uids),
            "users": users,
            "requests_per_user": n,
            "phases": [ph.row() for ph, _ in lines],
            "p95_ratio_worklist": r_wl,
            "p95_ratio_search": r_search,
            "p95_ratio_study_page": r_study,
            "target_met": met,
        }
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
