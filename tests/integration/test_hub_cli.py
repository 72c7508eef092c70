"""``cloud-hub`` as ops run it, as a real process, on SQLite and on a real PostgreSQL: sign
and publish releases, enroll sites, assign, a staged rollout, rollback, status, a cloud-side
edit and a conflict's resolution."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from cloud_hub.store import HubStore, connect
from cloud_hub.store.schema import changes
from edge_agent.inference.reference_models import SEG_NAME
from hub_protocol import HLC, Lane, PushBatch, Record, RecordType
from tests.integration.test_model_updates import variant


def _hub(*args: str, env: dict[str, str]) -> str:
    r = subprocess.run(
        [sys.executable, "-m", "cloud_hub", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert r.returncode == 0, f"cloud-hub {' '.join(args)}: {r.stderr}"
    return r.stdout


def test_models_and_records_commands(
    tmp_path: Path, hub_db_url: str, ref_models: dict[str, Path]
) -> None:
    env = {
        **os.environ,
        "HUB_DATABASE_URL": hub_db_url,
        "HUB_KEY_PASSPHRASE": "correct horse",
        "HUB_ARTIFACT_DIR": str(tmp_path / "artifacts"),
    }
    key = tmp_path / "ops.key"
    _hub("models", "keygen", str(key), env=env)
    for version in ("1.0.0", "1.1.0"):
        pkg = variant(ref_models[SEG_NAME], tmp_path / f"pkg-{version}", version)
        out = tmp_path / f"rel-{version}"
        _hub("models", "release", str(pkg), "--out", str(out), env=env)
        (doc,) = out.glob("*.release.json")
        (tar,) = out.glob("*.tar")
        _hub("models", "sign", str(doc), "--key", str(key), env=env)
        assert "published" in _hub("models", "publish", str(doc), str(tar), env=env)
    store = HubStore(connect(hub_db_url))
    try:
        sites = [store.enroll(store.create_enrollment_token(n)).site_id for n in "ABC"]
        out = _hub("models", "assign", SEG_NAME, "1.0.0", "--all", env=env)
        assert "assigned to 3 site(s)" in out
        out = _hub(
            "models", "rollout", "start", SEG_NAME, "1.1.0", "--canary", sites[0],
            "--percent", "50", "--previous", "1.0.0", env=env,
        )  # fmt: skip
        assert "canary stage" in out
        for s in sites:  # every site reports what it runs
            store.report_install(s, SEG_NAME, "1.0.0", "active", "")
        store.report_install(sites[0], SEG_NAME, "1.1.0", "active", "")
        assert "percent" in _hub("models", "rollout", "advance", SEG_NAME, "1.1.0", env=env)
        assert "rollback sent to" in _hub(
            "models", "rollout", "rollback", SEG_NAME, "1.1.0", env=env
        )
        status = _hub("models", "status", SEG_NAME, env=env)
        assert all(s in status for s in sites)
        with store.engine.connect() as conn:
            kinds = list(
                conn.execute(
                    sa.select(changes.c.type, changes.c.version).where(
                        changes.c.site_id == sites[0]
                    )
                )
            )
        assert [k for k, _ in kinds] == ["model_assignment", "model_assignment", "model_rollback"]
        assert all(v > 2**31 for _, v in kinds)  # milliseconds: a 64-bit column
        # a cloud-side edit, then an edge edit of the older version: a conflict, resolved
        out = _hub(
            "records", "set", sites[1], "review/r1", "review", '{"verdict": "accept"}', env=env
        )
        assert "is now version 1" in out
        rec = Record(
            key="review/r1",
            seq=1,
            type=RecordType.REVIEW,
            lane=Lane.NORMAL,
            hlc=HLC(1, 0, "edge"),
            base_version=0,
            payload={"verdict": "reject"},
        )
        store.push(sites[1], PushBatch(protocol=1, site_id=sites[1], records=(rec,)))
        (conflict,) = store.conflicts(sites[1])
        cid = str(conflict["id"])
        out = _hub("conflicts", "resolve", cid, "--take", "edge", "--by", "ops", env=env)
        assert "resolved (edge version kept by ops)" in out
        again = subprocess.run(
            [sys.executable, "-m", "cloud_hub", "conflicts", "resolve", cid, "--take", "cloud"],
            capture_output=True, text=True, env=env, timeout=60, check=False,
        )  # fmt: skip
        assert again.returncode != 0 and "already resolved: edge version kept by ops" in (
            again.stderr
        )
    finally:
        store.engine.dispose()
        shutil.rmtree(tmp_path / "artifacts", ignore_errors=True)
