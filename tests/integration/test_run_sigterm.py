"""``edge-agent run`` as a user runs it: JSON logs, and SIGTERM finishes the association in
flight, refuses new ones, and exits 0 with everything acknowledged on disk."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.dcmtk


def _echo(port: int) -> int:
    return subprocess.run(
        ["echoscu", "-aet", "ECHOSCU", "-aec", "EDGE_RUN", "127.0.0.1", str(port)],
        capture_output=True,
        check=False,
    ).returncode


def _run_once(cfg: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``edge-agent run`` expected to exit by itself (a startup error)."""
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ, **(env or {})},
    )


def _stored(db: Path) -> int:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
        try:
            return int(conn.execute("SELECT count(*) FROM instances").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def test_sigterm_drains_in_flight_association(tmp_path: Path) -> None:
    from edge_agent.cli import main as cli
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
                "EDGE_RUN",
                "--bind-address",
                "127.0.0.1",
                "--min-free-mb",
                "0",
            ]
        )
        == 0
    )
    study = make_study(tmp_path / "mr", modality="MR", size=64, slices=2000, seed="term")
    log = root / "agent.log"
    with log.open("wb") as fh:
        agent = subprocess.Popen(
            [sys.executable, "-m", "edge_agent", "run", "--config", str(root / "edge-agent.toml")],
            stdout=fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 30
        while _echo(port) != 0:
            assert time.monotonic() < deadline and agent.poll() is None, log.read_text()
            time.sleep(0.1)
        sender = subprocess.Popen(
            [
                "storescu",
                "-aet",
                "STORESCU",
                "-aec",
                "EDGE_RUN",
                "127.0.0.1",
                str(port),
                *map(str, study.files),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, TCP_NODELAY="1"),
        )
        db_path = root / "data" / "edge.db"
        deadline = time.monotonic() + 30
        while _stored(db_path) < 50:  # the association is in flight
            assert time.monotonic() < deadline, "nothing stored"
            time.sleep(0.02)
        agent.send_signal(signal.SIGTERM)
        time.sleep(0.1)
        assert sender.poll() is None, "the sender should still be streaming"
        assert _echo(port) != 0, "a new association must be refused while draining"
        _, err = sender.communicate(timeout=120)
        assert sender.returncode == 0, err  # every instance of the in-flight one succeeded
        assert agent.wait(60) == 0
    finally:
        if agent.poll() is None:
            agent.kill()
    db = sqlite3.connect(root / "data" / "edge.db")
    try:
        assert db.execute("SELECT count(*) FROM instances").fetchone()[0] == 2000
        assert (
            db.execute("SELECT outcome FROM associations WHERE calling_ae = 'STORESCU'").fetchone()[
                0
            ]
            == "released"
        )
    finally:
        db.close()
    assert (root / "data" / "clean-stop").exists()
    lines = [json.loads(ln) for ln in log.read_text().splitlines() if ln.strip()]
    assert all({"ts", "level", "logger", "msg"} <= set(r) for r in lines)
    assert lines[-1]["msg"] == "edge agent stopped"


def test_bad_config_is_named(tmp_path: Path) -> None:
    cfg = tmp_path / "edge-agent.toml"
    cfg.write_text("[dicom]\nport = 70000\nallow_any_caller = true\n")
    r = subprocess.run(
        [sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert r.returncode == 2
    assert "dicom.port" in r.stderr and "1..65535" in r.stderr


def test_port_in_use_is_a_clear_error(tmp_path: Path) -> None:
    from edge_agent.cli import main as cli

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert (
            cli(
                [
                    "init",
                    str(tmp_path),
                    "--port",
                    str(port),
                    "--bind-address",
                    "127.0.0.1",
                    "--min-free-mb",
                    "0",
                ]
            )
            == 0
        )
        r = _run_once(tmp_path / "edge-agent.toml")
    assert r.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}: Address already in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_unwritable_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    cfg = tmp_path / "edge-agent.toml"
    blocker = tmp_path / "file-not-dir"
    blocker.write_text("x")
    cfg.write_text(f'[dicom]\nallow_any_caller = true\n[storage]\ndata_dir = "{blocker}/data"\n')
    r = _run_once(cfg)
    assert r.returncode == 1
    assert "Not a directory" in r.stderr and "Traceback" not in r.stderr


def test_second_agent_on_the_same_data_folder_touches_nothing(tmp_path: Path) -> None:
    """A second ``edge-agent run`` on a live agent's folder (same port or another) exits with
    the first one's pid before any recovery: an in-flight partial and an uncommitted object
    stay where they are, and the first agent keeps serving."""
    from edge_agent.cli import main as cli
    from tests.conftest import start_agent, wait_ready

    port = free_port()
    root = tmp_path / "agent"
    args = ["init", str(root), "--port", str(port), "--ae-title", "EDGE_RUN"]
    args += ["--bind-address", "127.0.0.1", "--min-free-mb", "0", "--allow", "ECHOSCU"]
    assert cli(args) == 0
    log = root / "agent.log"
    first = start_agent(root / "edge-agent.toml", log)
    try:
        wait_ready(port, "EDGE_RUN", first, log)
        hot = root / "data" / "hot"
        partial = hot / "tmp" / "in-flight.partial"
        partial.write_bytes(b"being received")
        orphan = hot / "objects" / "ab" / ("ab" + "0" * 62 + ".dcm")
        orphan.write_bytes(b"renamed, not yet committed")
        for extra in ({}, {"EDGE_DICOM_PORT": str(free_port())}):
            r = _run_once(root / "edge-agent.toml", extra)
            assert r.returncode == 1, r.stderr
            assert f"another edge-agent (pid {first.pid}) is using" in r.stderr
            assert "Traceback" not in r.stderr
            assert partial.read_bytes() == b"being received"
            assert orphan.read_bytes() == b"renamed, not yet committed"
        assert _echo(port) == 0
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)
