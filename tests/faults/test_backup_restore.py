"""The documented backup/restore procedure, run for real: back up a live agent while storescu
is still sending, restore into an empty agent (other tier folders), and the restored agent
serves every instance acknowledged before the backup, hash-identical, cold ones included
(the key ring travels with the backup)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from edge_agent.cli import main as cli
from edge_agent.lifecycle.manager import DAY, Lifecycle
from edge_agent.lifecycle.tiers import Placement
from edge_agent.samples import make_study
from edge_agent.store.backup import BackupError, backup, restore
from tests.conftest import make_config, storescu

pytestmark = pytest.mark.dcmtk


def _rows(app: Any) -> dict[str, Any]:
    return {
        r["sop_instance_uid"]: r
        for r in app.store.query("SELECT id, sop_instance_uid, sha256, tier, path FROM instances")
    }


def test_backup_while_ingesting_then_restore_serves_every_acknowledged_instance(
    app_factory: Any, tmp_path: Path, clock: Any
) -> None:
    app = app_factory(make_config(tmp_path / "a"))
    old = make_study(tmp_path / "old", modality="CT", slices=6, size=128, seed="bk-old")
    assert storescu(app.listener.port, *old.files).returncode == 0
    clock.advance(11)
    app.assembly.tick()
    app.inference.drain()
    lc = Lifecycle(app.cfg, store=app.store, tiers=app.tiers, clock=clock, metrics=app.metrics)
    clock.advance(31 * DAY)
    asyncio.run(lc.run_due(only=["tiers"]))  # the old study is now encrypted on cold
    assert {r["tier"] for r in _rows(app).values()} == {"cold"}

    live = make_study(tmp_path / "live", modality="MR", slices=300, size=64, seed="bk-live")
    sending = threading.Thread(target=storescu, args=(app.listener.port, *live.files))
    sending.start()
    try:
        deadline = time.monotonic() + 60
        while len(_rows(app)) < 6 + 60:  # part of the live study is in
            assert time.monotonic() < deadline, "storescu is not sending"
            time.sleep(0.01)
        before = _rows(app)  # acknowledged before the backup starts
        rep = backup(app.cfg, tmp_path / "backup")
    finally:
        sending.join(120)
    after = _rows(app)
    assert len(after) == 306 and rep.instances >= len(before)
    assert (tmp_path / "backup" / "secrets" / "cold-keys").exists()
    with pytest.raises(BackupError, match="not empty"):
        backup(app.cfg, tmp_path / "backup")

    # restore into an empty agent whose tiers live elsewhere
    cfg_b = make_config(
        tmp_path / "b",
        storage={
            "hot_dir": str(tmp_path / "mnt" / "nvme"),
            "warm_dir": str(tmp_path / "mnt" / "ssd"),
            "cold_dir": str(tmp_path / "mnt" / "hdd"),
        },
    )
    restored = restore(tmp_path / "backup", cfg_b)
    assert restored.instances == rep.instances
    with pytest.raises(BackupError, match="restore only into an empty agent"):
        restore(tmp_path / "backup", cfg_b)
    app_b = app_factory(cfg_b)
    rows_b = _rows(app_b)
    assert set(before) <= set(rows_b)  # every instance acknowledged before the backup
    for uid, r in rows_b.items():  # and every row restored has its file, hash-identical
        data = app_b.tiers.read_verified(Placement(r["id"], r["sha256"], r["tier"], r["path"]))
        assert data == app.tiers.read(after[uid]["tier"], after[uid]["path"])
    assert app_b.ready() == {"store": "", "listener": "", "models": "no active model installed"}
    # the restored agent keeps ingesting
    more = make_study(tmp_path / "more", modality="MR", slices=3, size=64, seed="bk-more")
    assert storescu(app_b.listener.port, *more.files).returncode == 0
    assert len(_rows(app_b)) == len(rows_b) + 3


def test_a_damaged_backup_is_refused_with_the_file_named(
    app_factory: Any, tmp_path: Path, clock: Any
) -> None:
    app = app_factory(make_config(tmp_path / "a"))
    s = make_study(tmp_path / "s", modality="MR", slices=3, size=64, seed="bk-bad")
    assert storescu(app.listener.port, *s.files).returncode == 0
    backup(app.cfg, tmp_path / "backup")
    victim = next((tmp_path / "backup" / "tiers" / "hot").rglob("*.dcm"))
    data = bytearray(victim.read_bytes())
    data[-1] ^= 1
    victim.write_bytes(bytes(data))
    with pytest.raises(BackupError, match="missing or damaged"):
        restore(tmp_path / "backup", make_config(tmp_path / "b"))
    assert not (tmp_path / "b" / "data" / "edge.db").exists()  # no half-restored store
    # the CLI says the same thing, as an error exit
    cfg_file = tmp_path / "b.toml"
    cfg_file.write_text(
        f'[dicom]\nallow_any_caller = true\n[storage]\ndata_dir = "{tmp_path / "c"}"\n'
    )
    assert cli(["restore", str(tmp_path / "nope"), "--config", str(cfg_file)]) == 1
