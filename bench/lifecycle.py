"""Tier-move throughput against a plain copy, same files, same run.

The reference is what an administrator would do by hand: ``cp -r`` of the hot objects to
another folder, then ``sync``. Ours is :meth:`Tiers.move` (journal, read + hash check, write,
fsync every file and folder, read back + hash check, commit, delete the source): hot -> warm
(a plain copy, comparable to ``cp``) and warm -> cold (zlib + AES-256-GCM on top), each in
MB/s of instance bytes and as a ratio to the reference.

Usage::

    python bench/lifecycle.py                       # 200 CT slices of 512 x 512 (~100 MB)
    python bench/lifecycle.py --slices 100 --repeat 3
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edge_agent.app import EdgeApp
from edge_agent.clock import FakeClock
from edge_agent.lifecycle.tiers import Placement
from edge_agent.samples import make_study
from tests.conftest import make_config, storescu


def _rows(app: EdgeApp, tier: str) -> list[Placement]:
    return [
        Placement(r["id"], r["sha256"], r["tier"], r["path"])
        for r in app.store.query(
            "SELECT id, sha256, tier, path FROM instances WHERE tier = ?", (tier,)
        )
    ]


def one_round(work: Path, slices: int) -> dict[str, float]:
    study = make_study(work / "src", modality="CT", slices=slices, size=512, seed="bench-lc")
    cfg = make_config(work / "agent", inference={"enabled": False})
    app = EdgeApp(cfg, clock=FakeClock())
    app.listener.start()
    try:
        assert storescu(app.listener.port, *study.files).returncode == 0
        hot = app.tiers.root("hot")
        total = sum(p.stat().st_size for p in (hot / "objects").rglob("*.dcm"))
        mb = total / 1e6
        # reference: cp -r + sync of the same files
        subprocess.run(["sync"], check=True)
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(hot / "objects"), str(work / "cp-copy")], check=True)
        subprocess.run(["sync"], check=True)
        ref_s = time.perf_counter() - t0
        subprocess.run(["sync"], check=True)
        t0 = time.perf_counter()
        rep = app.tiers.move(_rows(app, "hot"), "warm", now=0.0)
        warm_s = time.perf_counter() - t0
        assert rep.moved == slices and not rep.failed
        t0 = time.perf_counter()
        rep = app.tiers.move(_rows(app, "warm"), "cold", now=0.0)
        cold_s = time.perf_counter() - t0
        assert rep.moved == slices and not rep.failed
        cold_bytes = rep.bytes_written
    finally:
        app.listener.stop(grace_s=1.0)
        app.close()
    return {
        "mb": mb,
        "ref": mb / ref_s,
        "warm": mb / warm_s,
        "cold": mb / cold_s,
        "cold_ratio_size": cold_bytes / total,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--slices", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    logging.disable(logging.WARNING)
    runs = []
    for i in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-lc-") as d:
            r = one_round(Path(d), args.slices)
        runs.append(r)
        print(
            f"round {i + 1}: {r['mb']:.0f} MB  cp+sync {r['ref']:.0f} MB/s  "
            f"hot->warm {r['warm']:.0f} MB/s ({r['warm'] / r['ref']:.2f}x)  "
            f"warm->cold {r['cold']:.0f} MB/s ({r['cold'] / r['ref']:.2f}x), "
            f"cold size {r['cold_ratio_size']:.0%} of the original",
            flush=True,
        )
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    print(
        f"\nmedian of {args.repeat}: cp+sync {med['ref']:.0f} MB/s; hot->warm "
        f"{med['warm']:.0f} MB/s = {med['warm'] / med['ref']:.2f}x (target >= 0.7x); "
        f"warm->cold (compress + encrypt) {med['cold']:.0f} MB/s = "
        f"{med['cold'] / med['ref']:.2f}x; cold files {med['cold_ratio_size']:.0%} of the size"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
