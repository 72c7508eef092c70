"""kill -9 while inference jobs run: after restart every job finishes exactly once."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import free_port, start_agent, wait_ready

pytestmark = [pytest.mark.dcmtk, pytest.mark.slow]


def _q(db: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def test_sigkill_during_inference_finishes_every_job_once(tmp_path: Path) -> None:
    from edge_agent.cli import main as cli
    from edge_agent.inference.reference_models import build_reference_packages
    from edge_agent.samples import make_study

    port = free_port()
    root = tmp_path / "agent"
    assert (
        cli(
            [
                "init",
                str(root),
                "--port",
                str(port),
                "--ae-title",
                "EDGE_INF",
                "--bind-address",
                "127.0.0.1",
                "--min-free-mb",
                "0",
                "--quiet-period",
                "0.5",
            ]
        )
        == 0
    )
    cfg, log, db = root / "edge-agent.toml", root / "agent.log", root / "data" / "edge.db"
    for pkg in build_reference_packages(tmp_path / "models"):
        assert cli(["models", "install", str(pkg), "--config", str(cfg)]) == 0
    studies = [
        make_study(tmp_path / f"s{i}", modality="CT", slices=12, size=256, seed=f"kill-inf-{i}")
        for i in range(6)
    ]
    agent = start_agent(cfg, log)
    kills = 0
    try:
        wait_ready(port, "EDGE_INF", agent, log)
        files = [str(f) for s in studies for f in s.files]
        r = subprocess.run(
            ["storescu", "-aet", "STORESCU", "-aec", "EDGE_INF", "127.0.0.1", str(port), *files],
            capture_output=True,
            text=True,
            timeout=120,
            env=dict(os.environ, TCP_NODELAY="1"),
            check=False,
        )
        assert r.returncode == 0, r.stderr
        # kill -9 whenever a job runs for the first time (a job killed twice is FAILED by
        # design, tested elsewhere), restart, repeat a few times
        deadline = time.monotonic() + 120
        while kills < 3 and time.monotonic() < deadline:
            if _q(db, "SELECT 1 FROM inference_jobs WHERE state = 'RUNNING' AND attempts = 1"):
                agent.send_signal(signal.SIGKILL)
                agent.wait(10)
                kills += 1
                agent = start_agent(cfg, log)
                wait_ready(port, "EDGE_INF", agent, log)
            elif not _q(
                db, "SELECT 1 FROM studies WHERE state IN ('RECEIVING', 'COMPLETE', 'INFERRING')"
            ):
                break
            time.sleep(0.005)
        while time.monotonic() < deadline and _q(
            db, "SELECT 1 FROM studies WHERE state IN ('RECEIVING', 'COMPLETE', 'INFERRING')"
        ):
            time.sleep(0.2)
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0
    assert kills >= 1, "never caught a job running; the test did not test anything"
    states = _q(db, "SELECT state, count(*) FROM studies GROUP BY state")
    assert states == [("DONE", 6)], states
    jobs = _q(
        db,
        "SELECT study_uid, series_uid, model_name, state, attempts FROM inference_jobs ORDER BY id",
    )
    assert len(jobs) == 12 and all(j[3] == "DONE" for j in jobs), jobs
    assert any(int(j[4]) == 2 for j in jobs), "a killed job must have been retried"
    # exactly one result per (study, series, model), none superseded
    results = _q(
        db, "SELECT study_uid, series_uid, model_name, superseded_by, findings FROM results"
    )
    keys = [(r[0], r[1], r[2]) for r in results]
    assert len(keys) == len(set(keys)) == 12
    assert all(r[3] is None for r in results)
    assert all(json.loads(str(r[4])) for r in results)
    objects = _q(db, "SELECT count(*) FROM result_objects")[0][0]
    assert objects == 12 + sum(  # an SR per result, a SEG and a KOS per segmentation with a
        2  # finding
        for r in results
        if r[2] == "ct-lesion-seg" and json.loads(str(r[4]))["slices_with_finding"] > 0
    )
