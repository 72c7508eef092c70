"""Ingest throughput: the edge agent against DCMTK's ``storescp``, same data, same run.

Both receivers get the same synthetic files from DCMTK's ``storescu`` over loopback, with one
association (one ``storescu`` process) and with four concurrent associations (four processes,
each sending a quarter of the files). Only the sending is timed: from launching the
``storescu`` process(es) until all of them have exited with code 0.

The two receivers do not do the same work, and the numbers must be read with that in mind:
the agent parses every instance, fsyncs its file and commits a SQLite row (synchronous=FULL)
before it acknowledges; ``storescp`` writes the bytes and acknowledges without any fsync.

Usage::

    python bench/ingest.py                          # 2000 MR 64x64 + 300 CT 512x512
    python bench/ingest.py --small 400 --large 60   # quick run
    python bench/ingest.py --repeat 3 --json out.json
    python bench/ingest.py --profile                # plus one profiled agent run (small, 1 assoc)
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import os
import platform
import pstats
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

AE_TITLE = "EDGE_BENCH"
CALLING_AE = "STORESCU"
ECHO_AE = "ECHOSCU"
RECEIVERS = ("agent", "storescp")
NOFSYNC = "nofsync"  # the agent with storage.fsync = false: shows what durability costs
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 60.0  # the agent gives in-flight associations up to 30 s on SIGTERM
SETTLE_TIMEOUT_S = 10.0
PROFILE_TOP = 25
SHIM_FLAG = "--run-agent-profiled"


class BenchError(Exception):
    """A run did not do what it must (a sender failed, instances are missing, ...)."""


@dataclass(frozen=True)
class DataSet:
    name: str
    description: str
    files: tuple[Path, ...]
    total_bytes: int


@dataclass
class Run:
    """One timed send to one freshly started receiver."""

    receiver: str
    dataset: str
    associations: int
    seconds: float
    instances: int
    total_bytes: int
    run_dir: str
    log: str
    interval_ms: dict[str, float] | None = None
    cpu_ms_per_instance: float | None = None  # receiver process CPU (all threads) / instances
    peak_rss_mb: float | None = None  # the receiver's peak resident memory (VmHWM)
    log_levels: dict[str, int] = field(default_factory=dict)
    log_problems: list[str] = field(default_factory=list)

    @property
    def inst_per_s(self) -> float:
        return self.instances / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.total_bytes / 1e6 / self.seconds


# -- processes ------------------------------------------------------------------------------


def dcmtk_env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of process ``pid`` (all its threads) so far, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float | None:
    """VmHWM (peak resident set) of ``pid`` in MiB, from /proc."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def durability_cost(folder: Path, rounds: int = 200) -> dict[str, float]:
    """This disk's price of keeping one instance, measured now, in ms per instance: a file
    per instance (write, fsync, rename, folder fsync) and an append to an open journal file
    (write, fdatasync), for 10 kB and 512 kB."""
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, float] = {}
    dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for label, size in (("10kB", 10_240), ("512kB", 524_288)):
            data = os.urandom(size)
            t0 = time.perf_counter()
            for i in range(rounds):
                tmp = folder / f"{i}.partial"
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
                os.write(fd, data)
                os.fsync(fd)
                os.close(fd)
                os.replace(tmp, folder / f"{i}.dcm")
                os.fsync(dir_fd)
            out[f"file_{label}_ms"] = (time.perf_counter() - t0) / rounds * 1000
            journal = folder / f"journal-{label}"
            fd = os.open(journal, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
            try:
                os.posix_fallocate(fd, 0, size * rounds)
                os.fsync(fd)
                t0 = time.perf_counter()
                for i in range(rounds):
                    os.pwrite(fd, data, i * size)
                    os.fdatasync(fd)
                out[f"journal_{label}_ms"] = (time.perf_counter() - t0) / rounds * 1000
            finally:
                os.close(fd)
    finally:
        os.close(dir_fd)
        shutil.rmtree(folder, ignore_errors=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stop_group(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> int | None:
    """SIGTERM the process group led by ``proc`` (it was started in a new session), wait up to
    ``timeout``, then SIGKILL whatever of the group is left. Returns the leader's exit code."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            print(f"  ! pid {proc.pid} ignored SIGTERM for {timeout:g} s: killing it", flush=True)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    with contextlib.suppress(ProcessLookupError):  # forked storescp children, if any remain
        os.killpg(proc.pid, signal.SIGKILL)
    return proc.returncode


@contextlib.contextmanager
def started(
    cmd: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``cmd`` in its own process group (output to ``log_path``); always stop it after."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            list(cmd), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield proc
    finally:
        stop_group(proc)


def wait_for_echo(port: int, proc: subprocess.Popen[bytes], log_path: Path) -> None:
    """Poll with C-ECHO until the receiver answers (it then accepts associations)."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    cmd = ["echoscu", "-aet", ECHO_AE, "-aec", AE_TITLE, "127.0.0.1", str(port)]
    while True:
        with contextlib.suppress(subprocess.TimeoutExpired):
            r = subprocess.run(cmd, capture_output=True, env=dcmtk_env(), timeout=15, check=False)
            if r.returncode == 0:
                return
        if proc.poll() is not None:
            raise BenchError(f"receiver exited with {proc.returncode} at startup; see {log_path}")
        if time.monotonic() > deadline:
            raise BenchError(f"no C-ECHO answer in {STARTUP_TIMEOUT_S:g} s; see {log_path}")
        time.sleep(0.1)


def chunks(files: Sequence[Path], n: int) -> list[Sequence[Path]]:
    """``n`` contiguous, near-equal parts of ``files``."""
    size, extra = divmod(len(files), n)
    out, start = [], 0
    for i in range(n):
        end = start + size + (1 if i < extra else 0)
        out.append(files[start:end])
        start = end
    return [c for c in out if c]


def send(
    files: Sequence[Path], port: int, associations: int, run_dir: Path, timeout: float
) -> float:
    """Send ``files`` with ``associations`` concurrent storescu processes; return the seconds
    from launching them until all have exited (each must exit 0)."""
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    logs = []
    t0 = time.perf_counter()
    try:
        for i, part in enumerate(chunks(files, associations)):
            log_path = run_dir / f"storescu-{i}.log"
            logs.append(log_path.open("wb"))
            cmd = [
                "storescu",
                "-aet",
                CALLING_AE,
                "-aec",
                AE_TITLE,
                "127.0.0.1",
                str(port),
                *map(str, part),
            ]
            procs.append(
                (
                    subprocess.Popen(
                        cmd, stdout=logs[-1], stderr=subprocess.STDOUT, env=dcmtk_env()
                    ),
                    log_path,
                )
            )
        deadline = time.monotonic() + timeout
        for proc, _ in procs:
            proc.wait(max(0.1, deadline - time.monotonic()))
        elapsed = time.perf_counter() - t0
    except subprocess.TimeoutExpired as exc:
        raise BenchError(f"storescu did not finish within {timeout:g} s") from exc
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        for f in logs:
            f.close()
    failed = [f"{log} (exit {p.returncode})" for p, log in procs if p.returncode != 0]
    if failed:
        raise BenchError("storescu failed: " + ", ".join(failed))
    return elapsed


# -- receivers ------------------------------------------------------------------------------


def init_agent(agent_dir: Path, port: int) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "edge_agent",
        "init",
        str(agent_dir),
        "--port",
        str(port),
        "--ae-title",
        AE_TITLE,
        "--bind-address",
        "127.0.0.1",
        "--min-free-mb",
        "0",
        "--allow",
        CALLING_AE,
        "--allow",
        ECHO_AE,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)
    if r.returncode != 0:
        raise BenchError(f"edge_agent init failed ({r.returncode}): {r.stderr.strip()}")
    return agent_dir / "edge-agent.toml"


def agent_db_rows(db: Path) -> list[float]:
    """``received_at`` of every stored instance, oldest first."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        (count,) = conn.execute("SELECT count(*) FROM instances").fetchone()
        times = [r[0] for r in conn.execute("SELECT received_at FROM instances ORDER BY 1")]
    finally:
        conn.close()
    assert count == len(times)
    return times


def intervals_ms(times: Sequence[float]) -> dict[str, float] | None:
    gaps = [(b - a) * 1000 for a, b in pairwise(times)]
    if len(gaps) < 2:
        return None
    q = statistics.quantiles(gaps, n=100, method="inclusive")
    return {"p50": q[49], "p95": q[94], "p99": q[98], "max": max(gaps)}


def is_fresh_start_warning(rec: dict[str, Any]) -> bool:
    """The agent warns "startup recovery" when it finds no clean-stop marker, which a folder
    fresh from ``edge-agent init`` never has; with nothing recovered it is expected here."""
    return rec.get("msg") == "startup recovery" and not any(
        rec.get(k) for k in ("partials_removed", "orphans_quarantined", "missing_files")
    )


def scan_agent_log(log_path: Path) -> tuple[dict[str, int], list[str]]:
    """Count log lines by level; return the distinct WARNING/ERROR messages (and stray text)."""
    levels: Counter[str] = Counter()
    problems: list[str] = []
    for line in log_path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            level, msg = str(rec.get("level", "?")), str(rec.get("msg", ""))
        except (json.JSONDecodeError, AttributeError):
            rec, level, msg = {}, "NON-JSON", line.strip()[:160]
        if level == "WARNING" and is_fresh_start_warning(rec):
            level = "WARNING (expected: fresh data folder)"
        levels[level] += 1
        if level in ("WARNING", "ERROR", "CRITICAL", "NON-JSON"):
            text = f"{level}: {msg}"
            if text not in problems and len(problems) < 8:
                problems.append(text)
    return dict(levels), problems


def run_agent(
    ds: DataSet,
    associations: int,
    run_dir: Path,
    timeout: float,
    profile_out: Path | None = None,
    *,
    fsync: bool = True,
) -> Run:
    port = free_port()
    agent_dir = run_dir / "agent"
    cfg = init_agent(agent_dir, port)
    text = cfg.read_text()
    if not fsync:
        text = text.replace("fsync = true", "fsync = false", 1)
    if associations > 16:  # the default allows 16 at once; more would be refused
        text = text.replace("max_associations = 16", f"max_associations = {associations}", 1)
    cfg.write_text(text)
    log_path = run_dir / "agent.log"
    if profile_out is None:
        cmd = [sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)]
    else:
        cmd = [sys.executable, __file__, SHIM_FLAG, str(profile_out), "--config", str(cfg)]
    with started(cmd, log_path) as proc:
        wait_for_echo(port, proc, log_path)
        cpu0 = cpu_seconds(proc.pid)
        seconds = send(ds.files, port, associations, run_dir, timeout)
        cpu1 = cpu_seconds(proc.pid)
        rss = peak_rss_mb(proc.pid)
        rc = stop_group(proc)
    if rc != 0:
        raise BenchError(f"the agent exited with {rc} after SIGTERM; see {log_path}")
    times = agent_db_rows(agent_dir / "data" / "edge.db")
    if len(times) != len(ds.files):
        raise BenchError(
            f"the agent stored {len(times)} instances, {len(ds.files)} were sent "
            f"({ds.name}, {associations} assoc.); see {log_path}"
        )
    levels, problems = scan_agent_log(log_path)
    return Run(
        "agent" if fsync else NOFSYNC,
        ds.name,
        associations,
        seconds,
        len(ds.files),
        ds.total_bytes,
        str(run_dir),
        str(log_path),
        intervals_ms(times),
        (cpu1 - cpu0) * 1000 / len(ds.files) if cpu0 is not None and cpu1 is not None else None,
        rss,
        levels,
        problems,
    )


def count_files(folder: Path) -> int:
    return sum(1 for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def run_storescp(
    ds: DataSet, associations: int, run_dir: Path, timeout: float, pdu: int | None
) -> Run:
    port = free_port()
    out_dir = run_dir / "received"
    out_dir.mkdir(parents=True)
    log_path = run_dir / "storescp.log"
    cmd = ["storescp", "-aet", AE_TITLE, "-od", str(out_dir), "+B", "-dhl"]
    if pdu:
        cmd += ["-pdu", str(pdu)]
    if associations > 1:
        cmd.append("--fork")
    cmd.append(str(port))
    with started(cmd, log_path, env=dcmtk_env()) as proc:
        wait_for_echo(port, proc, log_path)
        cpu0 = cpu_seconds(proc.pid) if associations == 1 else None  # --fork: in children
        seconds = send(ds.files, port, associations, run_dir, timeout)
        cpu1 = cpu_seconds(proc.pid) if associations == 1 else None
        rss = peak_rss_mb(proc.pid)
        deadline = time.monotonic() + SETTLE_TIMEOUT_S  # not timed: forked children finishing
        while (n := count_files(out_dir)) < len(ds.files) and time.monotonic() < deadline:
            time.sleep(0.05)
    if n != len(ds.files):
        raise BenchError(
            f"storescp wrote {n} files, {len(ds.files)} were sent "
            f"({ds.name}, {associations} assoc.); see {log_path}"
        )
    return Run(
        "storescp",
        ds.name,
        associations,
        seconds,
        len(ds.files),
        ds.total_bytes,
        str(run_dir),
        str(log_path),
        None,
        (cpu1 - cpu0) * 1000 / len(ds.files) if cpu0 is not None and cpu1 is not None else None,
        rss,
    )


def discard_received(run_dir: Path) -> None:
    """Free the disk between runs; keep configs and logs."""
    for sub in ("agent/data/hot", "agent/data/warm", "agent/data/cold", "received"):
        shutil.rmtree(run_dir / sub, ignore_errors=True)


# -- profiling ------------------------------------------------------------------------------


def run_agent_profiled(out: Path, config: str) -> int:
    """Run the agent in this process with cProfile on *every* thread, then write one merged
    profile to ``out`` (and per-thread totals to ``out``.threads.json).

    ``python -m cProfile -m edge_agent run`` would only profile the main thread, which runs
    the asyncio loop and just waits for SIGTERM: pynetdicom handles each association on its
    own thread and the store has its own writer thread. So every thread gets a profiler from
    the moment it starts. The agent returns from ``main`` on SIGTERM, so this gets to write.
    """
    lock = threading.Lock()
    finished: list[tuple[str, cProfile.Profile]] = []
    original = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def bootstrap_inner(self: threading.Thread) -> None:
        prof = cProfile.Profile()
        prof.enable()
        try:
            original(self)
        finally:
            prof.disable()
            with lock:
                finished.append((self.name, prof))

    threading.Thread._bootstrap_inner = bootstrap_inner  # type: ignore[attr-defined]
    from edge_agent.cli import main as agent_main

    main_prof = cProfile.Profile()
    main_prof.enable()
    try:
        code = agent_main(["run", "--config", config])
    finally:
        main_prof.disable()
        with lock:
            done = list(finished)
        stats = pstats.Stats(main_prof)
        threads = [{"name": "MainThread", "seconds": stats.total_tt}]  # type: ignore[attr-defined]
        for name, prof in done:
            one = pstats.Stats(prof)
            threads.append({"name": name, "seconds": one.total_tt})  # type: ignore[attr-defined]
            stats.add(one)
        stats.dump_stats(out)
        unfinished = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
        Path(f"{out}.threads.json").write_text(
            json.dumps({"threads": threads, "not_profiled_still_running": unfinished})
        )
    return code


IDLE_WAITS = (
    "'acquire' of '_thread.lock'",
    "'poll' of 'select.",
    "'select' of 'select.",
    "time.sleep",
    "'get' of '_queue.SimpleQueue'",
)
IDLE_NOTE = "lock acquire, poll/select, sleep, SimpleQueue.get"


def shorten(file: str) -> str:
    for marker in ("/site-packages/", "/lib/python3"):
        if marker in file:
            return "..." + marker + file.split(marker, 1)[1]
    with contextlib.suppress(ValueError):
        return str(Path(file).relative_to(Path.cwd()))
    return file


def thread_group(name: str) -> str:
    """'Thread-12 (process_request_thread)' -> 'Thread-N (process_request_thread)'."""
    head, sep, tail = name.partition(" ")
    base = head.rstrip("0123456789")
    return (base + ("N" if base != head else "")) + sep + tail


def print_profile(prof_path: Path, run: Run) -> dict[str, Any]:
    print(f"\n== profile: agent, {run.dataset}, {run.associations} association(s), all threads ==")
    print(
        f"  sending took {run.seconds:.2f} s under the profiler ({run.inst_per_s:.1f} inst/s; "
        "profiling slows the agent, so this is not a throughput number)"
    )
    print(f"  profile: {prof_path}   (inspect: python -m pstats {prof_path})")
    meta = json.loads(Path(f"{prof_path}.threads.json").read_text())
    groups: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for t in meta["threads"]:
        groups[thread_group(t["name"])] += t["seconds"]
        counts[thread_group(t["name"])] += 1
    print("  wall time per thread kind, from thread start to end (includes waiting):")
    for name, secs in groups.most_common():
        print(f"    {secs:8.2f} s  {counts[name]:4d} x {name}")
    if meta["not_profiled_still_running"]:
        left = ", ".join(meta["not_profiled_still_running"])
        print(f"  threads still running at exit (not in the profile): {left}")
    print(
        "  note: times are summed over all threads, so cumulative times can exceed wall time;\n"
        "  waits (fsync, the writer queue, socket reads) show up as time in those calls."
    )
    for key, title in (("cumulative", "cumulative time"), ("tottime", "own time (tottime)")):
        print(f"\n-- top {PROFILE_TOP} by {title} --", flush=True)
        pstats.Stats(str(prof_path), stream=sys.stdout).sort_stats(key).print_stats(PROFILE_TOP)
    print(f"\n-- the agent's own code (edge_agent/*), top {PROFILE_TOP} by cumulative time --")
    agent_code = pstats.Stats(str(prof_path), stream=sys.stdout).sort_stats("cumulative")
    agent_code.print_stats(r"/edge_agent/", PROFILE_TOP)
    print(f"\n-- top {PROFILE_TOP} by own time, leaving out idle waits ({IDLE_NOTE}) --")
    stats = pstats.Stats(str(prof_path))
    busy = [
        (tt, nc, ct, func)
        for func, (_cc, nc, tt, ct, _callers) in stats.stats.items()  # type: ignore[attr-defined]
        if not (func[0] == "~" and any(w in func[2] for w in IDLE_WAITS))
    ]
    busy.sort(reverse=True)
    print(f"{'tottime':>9} {'cumtime':>9} {'ncalls':>9}  function")
    for tt, nc, ct, (file, line, name) in busy[:PROFILE_TOP]:
        where = name if file == "~" else f"{shorten(file)}:{line}({name})"
        print(f"{tt:>9.3f} {ct:>9.3f} {nc:>9}  {where}")
    sys.stdout.flush()
    return {"path": str(prof_path), "run": run_json(run), "threads": dict(groups)}


# -- reporting ------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    try:
        v = subprocess.run(
            ["storescp", "--version"], capture_output=True, text=True, timeout=15, check=False
        )
        lines = [x for x in v.stdout.splitlines() if x.strip()]
        storescp_version = lines[0].strip() if lines else "?"
    except (OSError, subprocess.TimeoutExpired) as exc:
        storescp_version = f"unavailable ({exc})"
    return {
        "nproc": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "storescp": storescp_version,
    }


def filesystem_of(path: Path) -> str:
    """'ext4 on /dev/vda (/)': the mount that holds ``path``, from /proc/mounts."""
    best = ("?", "?", "")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype, *_ = line.split()
            if str(path.resolve()).startswith(mnt.rstrip("/") + "/") and len(mnt) >= len(best[2]):
                best = (fstype, dev, mnt)
    return f"{best[0]} on {best[1]} ({best[2] or '?'})"


def run_json(run: Run) -> dict[str, Any]:
    return {**asdict(run), "inst_per_s": run.inst_per_s, "mb_per_s": run.mb_per_s}


def summarize(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per (data set, associations, receiver): median over repeats."""
    rows: list[dict[str, Any]] = []
    keys = list(dict.fromkeys((r.dataset, r.associations, r.receiver) for r in runs))
    for key in keys:
        dataset, assoc, receiver = key
        group = [r for r in runs if (r.dataset, r.associations, r.receiver) == key]
        first = group[0]
        rows.append(
            {
                "dataset": dataset,
                "associations": assoc,
                "receiver": receiver,
                "runs": len(group),
                "instances": first.instances,
                "total_bytes": first.total_bytes,
                "seconds_each": [r.seconds for r in group],
                "median_seconds": statistics.median(r.seconds for r in group),
                "inst_per_s": statistics.median(r.inst_per_s for r in group),
                "mb_per_s": statistics.median(r.mb_per_s for r in group),
                "interval_ms_last_run": group[-1].interval_ms,
                "peak_rss_mb": max((r.peak_rss_mb or 0) for r in group) or None,
                "cpu_ms_per_instance": (
                    statistics.median(cpus)
                    if (cpus := [r.cpu_ms_per_instance for r in group if r.cpu_ms_per_instance])
                    else None
                ),
            }
        )
    for row in rows:
        if row["receiver"] not in ("agent", NOFSYNC):
            continue
        ref = next(
            (
                r
                for r in rows
                if r["receiver"] == "storescp"
                and (r["dataset"], r["associations"]) == (row["dataset"], row["associations"])
            ),
            None,
        )
        row["agent_over_storescp"] = row["inst_per_s"] / ref["inst_per_s"] if ref else None
    return rows


def print_table(rows: list[dict[str, Any]], datasets: dict[str, DataSet]) -> None:
    print("\n== ingest throughput (median of runs; time = launching storescu until all exit 0) ==")
    for ds in datasets.values():
        print(f"  {ds.name}: {ds.description}, {ds.total_bytes / 1e6:.1f} MB in files")
    header = (
        f"{'data set':<8} {'assoc':>5} {'receiver':<9} {'runs':>4} {'seconds':>8} "
        f"{'inst/s':>9} {'MB/s':>8} {'agent/storescp':>15} {'CPU ms/inst':>12} "
        f"{'peak RSS MiB':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ratio = r.get("agent_over_storescp")
        ratio_s = f"{ratio:.3f}" if ratio is not None else ""
        cpu = r.get("cpu_ms_per_instance")
        cpu_s = f"{cpu:.3f}" if cpu is not None else "n/a"
        print(
            f"{r['dataset']:<8} {r['associations']:>5} {r['receiver']:<9} {r['runs']:>4} "
            f"{r['median_seconds']:>8.3f} {r['inst_per_s']:>9.1f} {r['mb_per_s']:>8.2f} "
            f"{ratio_s:>15} {cpu_s:>12} {r.get('peak_rss_mb') or 0:>13.0f}"
        )
    print(
        "\nagent received_at spacing (ms between consecutive stored instances, all associations;"
        "\nstamped on the ack path before the journal flush; an inter-arrival interval,"
        "\nNOT a per-instance latency):"
    )
    for r in rows:
        iv = r["interval_ms_last_run"]
        if r["receiver"] in ("agent", NOFSYNC) and iv:
            print(
                f"  {r['receiver']:<8} {r['dataset']:<6} {r['associations']} assoc.: "
                f"p50 {iv['p50']:.2f}  "
                f"p95 {iv['p95']:.2f}  p99 {iv['p99']:.2f}  max {iv['max']:.2f}"
            )


# -- main -----------------------------------------------------------------------------------


def make_datasets(root: Path, small: int, large: int, multiframe_mb: int = 0) -> dict[str, DataSet]:
    from edge_agent.samples import make_multiframe, make_study

    specs = [
        ("small", small, "MR", 64),
        ("large", large, "CT", 512),
    ]
    out: dict[str, DataSet] = {}
    for name, n, modality, size in specs:
        if n <= 0:
            continue
        t0 = time.perf_counter()
        study = make_study(
            root / name, modality=modality, slices=n, size=size, seed=f"bench-{name}-{n}"
        )
        total = sum(p.stat().st_size for p in study.files)
        desc = f"{len(study.files)} {modality} instances {size}x{size}"
        print(f"  generated {name}: {desc} in {time.perf_counter() - t0:.1f} s", flush=True)
        out[name] = DataSet(name, desc, study.files, total)
    if multiframe_mb > 0:
        t0 = time.perf_counter()
        mf = make_multiframe(root / "multiframe" / "MF_0001.dcm", multiframe_mb)  # 512x512
        size = mf.stat().st_size
        desc = f"1 multiframe MR instance of {size / 1e6:.0f} MB"
        print(f"  generated multiframe: {desc} in {time.perf_counter() - t0:.1f} s", flush=True)
        out["multiframe"] = DataSet("multiframe", desc, (mf,), size)
    return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--small", type=int, default=2000, help="MR 64x64 instances (default 2000)")
    p.add_argument("--large", type=int, default=300, help="CT 512x512 instances (default 300)")
    p.add_argument("--repeat", type=int, default=1, help="runs per combination; median is shown")
    p.add_argument(
        "--concurrency",
        default="1,4",
        help="associations at once, comma-separated (default 1,4; e.g. 1,4,32)",
    )
    p.add_argument(
        "--multiframe-mb",
        type=int,
        default=0,
        help="also send one multiframe instance of this many MB (e.g. 1000), 1 association",
    )
    p.add_argument("--json", type=Path, help="also write the results as JSON here")
    p.add_argument("--profile", action="store_true", help="add one profiled agent run")
    p.add_argument(
        "--workdir",
        type=Path,
        help="run folder (default: a new folder under the temp dir, kept for its logs)",
    )
    p.add_argument(
        "--storescp-pdu",
        type=int,
        default=131072,
        help="storescp max receive PDU (its max is 131072, its default 16384; the agent's "
        "default config accepts 262144); 0 = storescp's default",
    )
    p.add_argument(
        "--timeout", type=float, default=900.0, help="seconds one send may take (default 900)"
    )
    p.add_argument("--keep", action="store_true", help="keep sample files and received data")
    p.add_argument(
        "--with-nofsync",
        action="store_true",
        help="also run the agent with storage.fsync = false (NOT a production setting: "
        "shows what durability costs)",
    )
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    for tool in ("storescu", "storescp", "echoscu"):
        if shutil.which(tool) is None:
            print(f"bench: {tool} not found on PATH (install DCMTK)", file=sys.stderr)
            return 2
    work = args.workdir or Path(tempfile.mkdtemp(prefix="edge-ingest-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = {**machine_info(), "run_folder_fs": filesystem_of(work)}
    print("== machine ==")
    for k, v in machine.items():
        print(f"  {k}: {v}")
    print(f"  run folder: {work}", flush=True)

    cost = durability_cost(work / "durability-probe")
    print("== this disk's durability cost (ms per instance, measured now) ==")
    print(
        f"  file per instance (write+fsync+rename+folder fsync): 10 kB "
        f"{cost['file_10kB_ms']:.3f}, 512 kB {cost['file_512kB_ms']:.3f}"
    )
    print(
        f"  append to an open journal (pwrite+fdatasync): 10 kB {cost['journal_10kB_ms']:.3f}, "
        f"512 kB {cost['journal_512kB_ms']:.3f}",
        flush=True,
    )
    notes = [
        "agent: durability on: each C-STORE is answered after its journal record is flushed "
        "(one fdatasync shared by the associations waiting); instances over "
        "storage.journal_max_record_mb (the multiframe) after file fsync + rename + SQLite "
        "commit; storescp (+B, bit-preserving) writes files WITHOUT fsync; an untimed `sync` "
        "follows every run so no run pays for the previous one's dirty pages",
        "nofsync: the agent with storage.fsync = false, which also commits SQLite with "
        "synchronous=OFF: no flush at all",
        "CPU ms/inst: the receiver process (all threads) over the timed send; n/a for "
        "storescp --fork (the work is in its children)",
        "storescp: single process for 1 association, --fork for several; "
        f"max receive PDU {args.storescp_pdu or 'default (16384)'}",
        "senders: DCMTK storescu, TCP_NODELAY=1 for storescu and storescp; "
        "N associations = N storescu processes started together, 1/N of the files each",
        "MB = 1e6 bytes of the sample files sent (Part 10 files incl. their meta header)",
    ]
    runs: list[Run] = []
    profile: dict[str, Any] | None = None
    code = 0
    samples = work / "samples"
    try:
        datasets = make_datasets(samples, args.small, args.large, args.multiframe_mb)
        concurrency = [int(c) for c in str(args.concurrency).split(",") if c.strip()]
        n = 0
        for ds in datasets.values():
            for assoc in concurrency if len(ds.files) > 1 else [1]:
                for rep in range(args.repeat):
                    for receiver in RECEIVERS + ((NOFSYNC,) if args.with_nofsync else ()):
                        n += 1
                        run_dir = work / f"{n:02d}-{ds.name}-{assoc}a-{receiver}-r{rep + 1}"
                        run_dir.mkdir(parents=True)
                        print(
                            f"  run {n}: {receiver:<8} {ds.name} x{len(ds.files)}, "
                            f"{assoc} assoc. ... ",
                            end="",
                            flush=True,
                        )
                        if receiver in ("agent", NOFSYNC):
                            run = run_agent(
                                ds, assoc, run_dir, args.timeout, fsync=receiver == "agent"
                            )
                        else:
                            run = run_storescp(ds, assoc, run_dir, args.timeout, args.storescp_pdu)
                        print(f"{run.seconds:.3f} s, {run.inst_per_s:.1f} inst/s", flush=True)
                        if run.log_problems:
                            print(f"    agent log ({run.log}): {run.log_levels}")
                            for line in run.log_problems:
                                print(f"      {line[:200]}")
                        runs.append(run)
                        if not args.keep:
                            discard_received(run_dir)
                        # storescp (and the agent with fsync off) leave dirty pages: write
                        # them back now, untimed, not during the next timed run
                        os.sync()
        rows = summarize(runs)
        print_table(rows, datasets)
        print("\nnotes:")
        for note in notes:
            print(f"  - {note}")
        agent_logs = [r for r in runs if r.receiver in ("agent", NOFSYNC)]
        bad = sum(
            n
            for r in agent_logs
            for level, n in r.log_levels.items()
            if level in ("WARNING", "ERROR", "CRITICAL", "NON-JSON")
        )
        print(
            f"  - agent logs (JSON, stderr): {work}/*-agent-*/agent.log; {bad} unexpected "
            "WARNING/ERROR/non-JSON lines in all"
        )
        if args.profile and "small" in datasets:
            run_dir = work / "profile-small-1a-agent"
            run_dir.mkdir(parents=True)
            prof_path = run_dir / "agent.prof"
            prun = run_agent(datasets["small"], 1, run_dir, args.timeout, profile_out=prof_path)
            if not args.keep:
                discard_received(run_dir)
            profile = print_profile(prof_path, prun)
    except BenchError as exc:
        print(f"\n{'!' * 78}\n!! BENCHMARK ERROR: {exc}\n{'!' * 78}", file=sys.stderr, flush=True)
        code = 1
    finally:
        if not args.keep:
            shutil.rmtree(samples, ignore_errors=True)
    if args.json:
        result = {
            "machine": machine,
            "durability_cost_ms": cost,
            "settings": {
                "small": args.small,
                "large": args.large,
                "repeat": args.repeat,
                "storescp_pdu": args.storescp_pdu,
                "run_folder": str(work),
            },
            "notes": notes,
            "summary": summarize(runs) if runs else [],
            "runs": [run_json(r) for r in runs],
            "profile": profile,
            "error": code != 0,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nJSON written to {args.json}")
    return code


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == SHIM_FLAG and sys.argv[3] == "--config":
        sys.exit(run_agent_profiled(Path(sys.argv[2]), sys.argv[4]))
    sys.exit(main())
