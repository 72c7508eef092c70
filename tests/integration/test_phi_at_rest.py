"""PHI at rest: ``edge-agent run``, started with the usual 022 umask over a data folder an
older version left world-readable, makes it private and writes every new file (store, WAL,
instances, results, journal) readable by its own user only."""

from __future__ import annotations

import os
import signal
import sqlite3
import stat
import time
from pathlib import Path

import pytest

from edge_agent.cli import main as cli
from edge_agent.config import load_config
from edge_agent.inference.reference_models import SEG_NAME, build_reference_packages
from edge_agent.perms import MARKER
from edge_agent.samples import make_study
from edge_agent.store import Store
from tests.conftest import free_port, start_agent, storescu, wait_ready

pytestmark = pytest.mark.dcmtk


def _done(db: Path) -> bool:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        busy = conn.execute("SELECT count(*) FROM studies WHERE state != 'DONE'").fetchone()[0]
        objects = conn.execute("SELECT count(*) FROM result_objects").fetchone()[0]
    finally:
        conn.close()
    return bool(busy == 0 and objects >= 1)


def test_the_agent_keeps_its_data_private_whatever_the_umask(tmp_path: Path) -> None:
    port = free_port()
    root = tmp_path / "agent"
    init = ["init", str(root), "--port", str(port), "--ae-title", "EDGE_PHI"]
    assert cli([*init, "--bind-address", "127.0.0.1", "--min-free-mb", "0"]) == 0
    cfg_path = root / "edge-agent.toml"
    cfg = load_config(cfg_path)
    data = Path(cfg.storage.data_dir)
    db = data / cfg.storage.database
    (pkg,) = (p for p in build_reference_packages(tmp_path / "models") if SEG_NAME in p.name)
    assert cli(["models", "install", str(pkg), "--config", str(cfg_path)]) == 0
    old = os.umask(0o022)  # what an older version, or a copy by hand, left behind
    try:
        Store(db).close()
        (data / MARKER).unlink()  # an install from before this version has none
        for p in (data, *data.rglob("*")):
            if not p.is_symlink():
                p.chmod(0o755 if p.is_dir() else 0o644)
        log = root / "agent.log"
        agent = start_agent(cfg_path, log)  # inherits the 022 umask
    finally:
        os.umask(old)
    try:
        wait_ready(port, "EDGE_PHI", agent, log)
        study = make_study(tmp_path / "ct", modality="CT", slices=6, size=96, seed="phi")
        assert storescu(port, *study.files, aec="EDGE_PHI").returncode == 0
        deadline = time.monotonic() + 90
        while not _done(db):
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.3)
        # while it runs: the WAL and everything written since start
        open_files = [
            p.relative_to(data).as_posix()
            for p in (data, *data.rglob("*"))
            if not p.is_symlink() and stat.S_IMODE(p.lstat().st_mode) & 0o077
        ]
        assert open_files == [], open_files
        assert (data / f"{cfg.storage.database}-wal").exists()
    finally:
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(60) == 0
    kinds = {p.suffix for p in data.rglob("*") if p.is_file()}
    assert ".dcm" in kinds  # instances and results were among what was checked
    assert "were made private (0600/0700)" in log.read_text()
