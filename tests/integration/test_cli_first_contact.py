"""What a new user meets first on the command line: ``init`` leaves a store every command can
use, and the listings say what they did (filters, truncation, unknown UIDs, closed pipes,
readable job output)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import pytest

from edge_agent.cli import main

PASSWORD = "a-long-enough-password-1"


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ``edge-agent init`` folder (the agent never ran); returns its config file."""
    for name in [k for k in os.environ if k.startswith("EDGE_")]:
        monkeypatch.delenv(name)
    assert main(["init", str(tmp_path / "site"), "--port", "11112", "--ae-title", "EDGE"]) == 0
    return tmp_path / "site" / "edge-agent.toml"


def _db(cfg: Path) -> Path:
    return cfg.parent / "data" / "edge.db"


def _add_studies(cfg: Path, states: list[str]) -> list[str]:
    """Study rows in ``states`` (newest last), written as the agent's store would hold them."""
    uids = [f"1.2.826.0.1.3680043.10.1.{i + 1}" for i in range(len(states))]
    conn = sqlite3.connect(_db(cfg))
    with conn:
        for i, (uid, state) in enumerate(zip(uids, states, strict=True)):
            conn.execute(
                "INSERT INTO studies (study_uid, patient_id, modality, state, first_received_at,"
                " last_received_at, instance_count) VALUES (?, ?, 'CT', ?, ?, ?, 3)",
                (uid, f"PAT-{i + 1}", state, 1000.0 + i, 1000.0 + i),
            )
    conn.close()
    return uids


def _edge_agent(*args: str, cfg: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "edge_agent", *args, "--config", str(cfg)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )


def test_init_leaves_a_ready_store(site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _db(site).exists()  # migrated before any `run`
    os.environ["EDGE_USER_PASSWORD"] = PASSWORD
    try:
        assert main(["users", "add", "alice", "--role", "radiologist", "--config", str(site)]) == 0
    finally:
        del os.environ["EDGE_USER_PASSWORD"]
    assert main(["users", "list", "--config", str(site)]) == 0
    assert main(["storage", "status", "--config", str(site)]) == 0
    assert main(["studies", "--config", str(site)]) == 0
    out = capsys.readouterr()
    assert "added alice (radiologist)" in out.out and "alice" in out.out.split("added", 2)[-1]
    assert "hot" in out.out and "no studies yet" in out.out
    assert "has the agent run yet" not in out.err


def test_audit_since_takes_iso_dates_and_times(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    early = datetime(2026, 11, 30, 12, 0).astimezone().timestamp()  # local time
    late = datetime(2026, 12, 1, 9, 0).astimezone().timestamp()
    conn = sqlite3.connect(_db(site))
    with conn:
        for at, who in ((early, "before"), (late, "after")):
            conn.execute(
                "INSERT INTO audit_log (at, username, action, target, remote, request_id) "
                "VALUES (?, ?, 'study.view', '1.2.3', '10.0.0.9', 'r')",
                (at, who),
            )
    conn.close()
    for since in ("2026-12-01", "2026-12-01T08:59", str(late - 1)):
        capsys.readouterr()
        assert main(["users", "audit", "--since", since, "--config", str(site)]) == 0
        out = capsys.readouterr().out
        assert "after" in out and "before" not in out, since
    assert main(["users", "audit", "--since", "2026-11-30", "--config", str(site)]) == 0
    assert "before" in capsys.readouterr().out
    # an offset is honoured: 12:00+00:00 is not local noon unless the zone is UTC
    utc_noon = datetime.fromisoformat("2026-11-30T12:00+00:00").timestamp()
    assert main(["users", "audit", "--since", "2026-11-30T12:00Z", "--config", str(site)]) == 0
    assert ("before" in capsys.readouterr().out) == (early >= utc_noon)
    with pytest.raises(SystemExit) as bad:
        main(["users", "audit", "--since", "last week", "--config", str(site)])
    assert bad.value.code == 2
    assert "not a time: 'last week'" in capsys.readouterr().err


def test_results_of_an_unknown_study_fail_clearly(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (uid,) = _add_studies(site, ["RECEIVING"])
    assert main(["results", "1.2.3.4.5", "--config", str(site)]) == 1
    err = capsys.readouterr().err
    assert "no study 1.2.3.4.5 on this agent" in err
    assert main(["results", uid, "--config", str(site)]) == 0  # known, nothing yet: not an error
    out = capsys.readouterr().out
    assert f"no results for study {uid} yet (state RECEIVING; edge-agent studies show" in out


def test_studies_filter_by_state_and_say_when_the_limit_cut(
    site: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    uids = _add_studies(site, ["DONE"] * 7 + ["FAILED"] * 2)
    assert main(["studies", "--state", "FAILED", "--config", str(site)]) == 0
    out = capsys.readouterr().out
    assert out.count("FAILED") == 2 and "DONE" not in out and "showing" not in out
    assert uids[-1] in out and uids[-2] in out
    assert main(["studies", "--state", "failed", "--config", str(site)]) == 0  # any case
    assert capsys.readouterr().out.count("FAILED") == 2
    assert main(["studies", "--state", "COMPLETE", "--config", str(site)]) == 0
    assert "no COMPLETE studies (9 studies in other states" in capsys.readouterr().out
    assert main(["studies", "--limit", "3", "--config", str(site)]) == 0
    out = capsys.readouterr().out
    assert len([ln for ln in out.splitlines() if ln.startswith("1.2.826")]) == 3
    assert "showing 3 of 9 studies" in out
    assert main(["studies", "--state", "DONE", "--limit", "5", "--config", str(site)]) == 0
    assert "showing 5 of 7 DONE studies" in capsys.readouterr().out
    assert main(["studies", "--limit", "3", "--json", "--config", str(site)]) == 0
    cut = capsys.readouterr()
    assert cut.out.lstrip().startswith("[") and "showing 3 of 9 studies" in cut.err


def test_a_closed_pipe_ends_the_listing_quietly(site: Path) -> None:
    _add_studies(site, ["DONE"] * 1500)  # more than a pipe buffer holds
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGE_")}
    # the reader takes one line and goes away, as `edge-agent studies | head -1` does
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent", "studies", "--limit", "1500", "--config", str(site)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    with proc:
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.readline().startswith(b"STUDY INSTANCE UID")
        proc.stdout.close()
        err = proc.stderr.read().decode()
        code = proc.wait(60)
    assert code == 141  # 128 + SIGPIPE, as a Unix tool reports it
    assert err == "", err  # no "Broken pipe", no traceback


def test_storage_run_prints_readable_job_outcomes(site: Path) -> None:
    r = _edge_agent("storage", "run", cfg=site)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = dict(ln.split(None, 1) for ln in r.stdout.splitlines())
    assert set(lines) == {"tiers", "archive", "integrity", "maintenance"}
    assert all(v.startswith("ok ") for v in lines.values()), lines
    assert "archived 0 instance(s), 0 B" in lines["archive"]
    for repr_like in ("busy=", "vacuum=", "False", "True", "{", "'"):
        assert repr_like not in r.stdout, repr_like
