"""A full disk: the listener answers 0xA700, loses nothing already acknowledged, leaves no
partial file behind, and ingests again as soon as space returns, without a restart."""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import make_config, split_part10, storescu

pytestmark = pytest.mark.dcmtk


def _statuses(stderr: str) -> list[str]:
    return [
        ln.split("(", 1)[1].rstrip(")")
        for ln in stderr.splitlines()
        if ln.startswith("I: Received Store Response")
    ]


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (needs root, as CI and `make test` run); skipped where mount is denied."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    r = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_real_enospc_on_small_filesystem(app_factory: Any, tmp_path: Path, small_fs: Path) -> None:
    from edge_agent.samples import make_study

    study = make_study(tmp_path / "ct", modality="CT", size=512, slices=12, seed="enospc")
    cfg = make_config(tmp_path, storage={"hot_dir": str(small_fs / "hot"), "min_free_mb": 0})
    app = app_factory(cfg)
    r = storescu(app.listener.port, *study.files, extra=("-v",))
    statuses = _statuses(r.stderr)
    assert "Success" in statuses
    assert any(s.startswith("Refused: OutOfResources") for s in statuses), statuses
    stored = app.store.query("SELECT sop_instance_uid, path, sha256 FROM instances")
    assert len(stored) == statuses.count("Success")
    for row in stored:  # everything acknowledged is whole
        data = split_part10((app.spool.root / row["path"]).read_bytes())[1]
        assert hashlib.sha256(data).hexdigest() == row["sha256"]
    assert not list(app.spool.tmp.iterdir()), "partial file left behind"
    assert app.metrics.out_of_resources._value.get() >= 1

    # Space comes back (the operator grows the volume): ingest resumes, no restart.
    subprocess.run(["mount", "-o", "remount,size=16m", str(small_fs)], check=True)
    r = storescu(app.listener.port, *study.files, extra=("-v",))
    assert r.returncode == 0, r.stderr
    assert app.store.query("SELECT count(*) FROM instances")[0][0] == len(study.files)


def test_injected_enospc_mid_write(
    app_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC injected at the file layer after the first instance: 0xA700, temp removed."""
    from edge_agent.samples import make_study
    from edge_agent.store import spool as spool_module

    study = make_study(tmp_path / "mr", modality="MR", size=64, slices=4, seed="inject")
    app = app_factory()
    assert storescu(app.listener.port, study.files[0]).returncode == 0
    real_write = os.write
    calls = {"n": 0}

    def failing_write(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] > 1:  # let one chunk through, then the disk is "full"
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    def failing_writev(fd: int, buffers: Any, *args: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    # spool_module.os is the os module: this patches os.write process-wide for the test,
    # and the ingest journal's os.pwritev (the write on the ack path when it is on).
    monkeypatch.setattr(spool_module.os, "write", failing_write)
    monkeypatch.setattr(spool_module.os, "pwritev", failing_writev)
    r = storescu(app.listener.port, study.files[1], extra=("-v",))
    assert _statuses(r.stderr) == ["Refused: OutOfResources"], r.stderr
    assert not list(app.spool.tmp.iterdir())
    monkeypatch.undo()
    assert storescu(app.listener.port, *study.files[1:]).returncode == 0
    assert app.store.query("SELECT count(*) FROM instances")[0][0] == 4


def test_disk_pressure_evicts_only_what_the_hub_has_then_refuses_then_recovers(
    app_factory: Any, tmp_path: Path, clock: Any, small_fs: Path
) -> None:
    """A full hot tier: the lifecycle drops archived copies (the hub has them), never a study
    that is not at the hub nor one still being received; with nothing else safe to free the
    listener answers 0xA700 and the pressure alert is on; once that study is at rest and
    moves to warm (another filesystem), ingest resumes without a restart."""
    import asyncio

    from edge_agent.lifecycle.manager import DAY
    from edge_agent.samples import make_study
    from tests.integration.test_lifecycle import _lifecycle, _send, _tiers, _with_hub

    subprocess.run(["mount", "-o", "remount,size=6m", str(small_fs)], check=True)
    cfg = make_config(
        tmp_path,
        storage={"hot_dir": str(small_fs / "hot"), "min_free_mb": 1},
        lifecycle={"hot_high_watermark": 0.5, "hot_low_watermark": 0.3},
    )
    app = app_factory(cfg)
    pressure = ("edge_storage_pressure", {"tier": "hot"})

    async def body(hub_store: Any, hub: Any, up: Any) -> None:
        lc = _lifecycle(app, hub)
        archived = _send(app, clock, tmp_path, "arch", slices=8)
        clock.advance(91 * DAY)
        await lc.run_due(only=["tiers"])
        await lc.run_due(only=["archive"])
        assert _tiers(app, archived) == {"archived"}
        lc.request_restore(archived, by="radiologist")  # a prior, read again today
        await lc.run_due(only=["tiers"])
        assert _tiers(app, archived) == {"hot"}
        # a big study arrives and is still being received (RECEIVING: not at rest)
        big = make_study(tmp_path / "big", modality="CT", slices=42, size=256, seed="big")
        r = storescu(app.listener.port, *big.files[:30])
        assert r.returncode == 0, r.stderr
        receiving = app.store.query("SELECT study_uid FROM studies WHERE state = 'RECEIVING'")
        assert [x[0] for x in receiving] == [big.study_uid]
        assert lc._fs_used("hot") > 0.5
        lc.relieve_pressure()
        assert _tiers(app, archived) == {"archived"}  # the archived copy went first
        assert _tiers(app, big.study_uid) == {"hot"}  # untouched: not at rest, not at the hub
        assert app.metrics.registry.get_sample_value(*pressure) == 1.0
        # the rest of the big study does not fit: 0xA700, nothing acknowledged is lost
        r = storescu(app.listener.port, *big.files[30:], extra=("-v",))
        assert any(s.startswith("Refused: OutOfResources") for s in _statuses(r.stderr))
        stored = app.store.query("SELECT path, sha256 FROM instances WHERE tier = 'hot'")
        for row in stored:
            data = split_part10((small_fs / "hot" / row["path"]).read_bytes())[1]
            assert hashlib.sha256(data).hexdigest() == row["sha256"]
        # the study completes (at rest): pressure moves it to warm, space returns
        clock.advance(11)
        app.assembly.tick()
        app.inference.drain()
        lc.relieve_pressure()
        assert _tiers(app, big.study_uid) == {"warm"}
        assert app.metrics.registry.get_sample_value(*pressure) == 0.0
        r = storescu(app.listener.port, *big.files[30:], extra=("-v",))
        assert r.returncode == 0 and "OutOfResources" not in r.stderr, r.stderr
        n = app.store.query("SELECT count(*) FROM instances WHERE study_uid = ?", (big.study_uid,))
        assert n[0][0] == 42

    asyncio.run(_with_hub(tmp_path, app, body))
