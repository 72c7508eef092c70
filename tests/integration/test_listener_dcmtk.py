"""The listener against real DCMTK peers (storescu, echoscu) and DCMTK's storescp as the
reference for "byte-identical to what was sent"."""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import (
    STORESCU_PROPOSE,
    TEST_FILES,
    associations_closed,
    free_port,
    make_config,
    run_tool,
    split_part10,
    storescu,
    wait_until,
)

pytestmark = pytest.mark.dcmtk

# One file per transfer syntax (files whose UIDs are all present and valid).
SYNTAX_FILES = {
    "explicit VR little endian": "CT_small.dcm",
    "implicit VR little endian": "MR_small_implicit.dcm",
    "explicit VR big endian": "MR_small_bigendian.dcm",
    "deflated explicit VR little endian": "image_dfl.dcm",
    "JPEG baseline": "SC_rgb_jpeg_dcmtk.dcm",
    "JPEG extended": "JPGExtended.dcm",
    "JPEG lossless SV1": "SC_rgb_jpeg_gdcm.dcm",
    "JPEG-LS lossless": "MR_small_jpeg_ls_lossless.dcm",
    "JPEG 2000 lossless": "MR_small_jp2klossless.dcm",
    "JPEG 2000": "JPEG2000.dcm",
    "RLE lossless": "MR_small_RLE.dcm",
}


@pytest.fixture
def storescp(tmp_path: Path) -> Iterator[tuple[int, Path]]:
    """DCMTK's storescp, bit-preserving, accepting every transfer syntax it knows."""
    out = tmp_path / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        ["storescp", "-aet", "EDGE_TEST", "+xa", "+B", "-dhl", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if run_tool("echoscu", "-aec", "EDGE_TEST", "127.0.0.1", str(port)).returncode == 0:
            break
        time.sleep(0.1)
    yield port, out
    proc.terminate()
    proc.wait(10)


def stored_dataset(app: Any, sop_uid: str) -> tuple[str, bytes]:
    rows = app.store.query(
        "SELECT path, transfer_syntax FROM instances WHERE sop_instance_uid = ?", (sop_uid,)
    )
    assert len(rows) == 1, rows
    ts, data = split_part10((app.spool.root / rows[0]["path"]).read_bytes())
    assert ts == rows[0]["transfer_syntax"]
    return ts, data


def test_echoscu(app_factory: Any) -> None:
    app = app_factory()
    r = run_tool(
        "echoscu", "-aet", "ECHOSCU", "-aec", "EDGE_TEST", "127.0.0.1", str(app.listener.port)
    )
    assert r.returncode == 0, r.stderr
    wait_until(lambda: associations_closed(app))
    rows = app.store.query("SELECT outcome FROM associations")
    assert [r["outcome"] for r in rows] == ["released"]


@pytest.mark.parametrize("name", sorted(SYNTAX_FILES))
def test_storescu_each_transfer_syntax_byte_identical_to_storescp(
    name: str, app_factory: Any, storescp: tuple[int, Path]
) -> None:
    """The dataset we keep is byte-for-byte what storescp (bit-preserving) kept of the same
    send. (storescu itself may re-encode a file, e.g. sequence lengths, so the source file is
    not the reference; the pynetdicom tests pin exact bytes against what was put on the wire.)"""
    src = TEST_FILES / SYNTAX_FILES[name]
    src_ts, _ = split_part10(src.read_bytes())
    flag = STORESCU_PROPOSE[src_ts]
    app = app_factory()
    r = storescu(app.listener.port, src, extra=("-R", flag))
    assert r.returncode == 0, r.stderr
    ref_port, ref_dir = storescp
    r = storescu(ref_port, src, extra=("-R", flag))
    assert r.returncode == 0, r.stderr
    (ref_file,) = [p for p in ref_dir.iterdir() if p.is_file()]
    ref_ts, ref_data = split_part10(ref_file.read_bytes())

    import pydicom

    sop_uid = str(pydicom.dcmread(src, stop_before_pixels=True).SOPInstanceUID)
    ts, data = stored_dataset(app, sop_uid)
    assert ts == ref_ts == src_ts
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(ref_data).hexdigest()
    row = app.store.query("SELECT * FROM instances WHERE sop_instance_uid = ?", (sop_uid,))[0]
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    assert row["calling_ae"] == "STORESCU"


def test_storescu_study_and_duplicates(app_factory: Any, tmp_path: Path) -> None:
    from edge_agent.samples import make_study

    study = make_study(tmp_path / "mr", modality="MR", size=64, slices=12, seed="dup")
    app = app_factory()
    assert storescu(app.listener.port, *study.files).returncode == 0
    assert storescu(app.listener.port, *study.files).returncode == 0  # identical resend
    rows = app.store.query("SELECT count(*) AS n, count(DISTINCT sha256) AS d FROM instances")
    assert (rows[0]["n"], rows[0]["d"]) == (12, 12)
    assert len(app.spool.iter_objects()) == 12
    wait_until(lambda: associations_closed(app))
    assoc = app.store.query("SELECT received, duplicates FROM associations ORDER BY started_at")
    assert [(a["received"], a["duplicates"]) for a in assoc] == [(12, 0), (0, 12)]
    (s,) = app.store.query("SELECT instance_count, state FROM studies")
    assert (s["instance_count"], s["state"]) == (12, "RECEIVING")


def test_unknown_calling_ae_rejected_and_audited(app_factory: Any) -> None:
    app = app_factory()
    r = storescu(app.listener.port, TEST_FILES / "CT_small.dcm", aet="INTRUDER")
    assert r.returncode != 0
    assert "Called AE Title Not Recognized" not in r.stderr
    assert "Calling AE Title Not Recognized" in r.stderr, r.stderr
    wait_until(lambda: bool(app.store.query("SELECT 1 FROM associations")))
    (row,) = app.store.query("SELECT * FROM associations")
    assert row["outcome"] == "rejected"
    assert row["reject_reason"] == "calling AE title not recognised"
    assert row["calling_ae"] == "INTRUDER" and row["peer_host"] == "127.0.0.1"
    assert app.store.query("SELECT count(*) FROM instances")[0][0] == 0
    # and the listener keeps serving
    ok = run_tool(
        "echoscu", "-aet", "ECHOSCU", "-aec", "EDGE_TEST", "127.0.0.1", str(app.listener.port)
    )
    assert ok.returncode == 0


def test_wrong_called_ae_rejected(app_factory: Any) -> None:
    app = app_factory()
    r = storescu(app.listener.port, TEST_FILES / "CT_small.dcm", aec="SOMEONE_ELSE")
    assert r.returncode != 0
    assert "Called AE Title Not Recognized" in r.stderr, r.stderr
    wait_until(lambda: bool(app.store.query("SELECT 1 FROM associations")))
    (row,) = app.store.query("SELECT reject_reason FROM associations")
    assert row["reject_reason"] == "called AE title not recognised"


def test_caller_restricted_to_network(app_factory: Any, tmp_path: Path) -> None:
    from edge_agent.config import AllowedCaller

    cfg = make_config(
        tmp_path,
        dicom={
            "allowed_callers": (
                AllowedCaller(ae_title="STORESCU", host="10.99.0.0/16"),
                AllowedCaller(ae_title="ECHOSCU", host="127.0.0.1"),
            )
        },
    )
    app = app_factory(cfg)
    r = storescu(app.listener.port, TEST_FILES / "CT_small.dcm")
    assert r.returncode != 0 and "Calling AE Title Not Recognized" in r.stderr
    ok = run_tool(
        "echoscu", "-aet", "ECHOSCU", "-aec", "EDGE_TEST", "127.0.0.1", str(app.listener.port)
    )
    assert ok.returncode == 0, ok.stderr


def test_disk_floor_answers_out_of_resources(app_factory: Any, tmp_path: Path) -> None:
    """Below the free-space floor storescu gets 0xA700; what was stored before is intact;
    when the floor is met again, ingest resumes without a restart."""
    from edge_agent.samples import make_study

    study = make_study(tmp_path / "mr", modality="MR", size=64, slices=3, seed="floor")
    app = app_factory()
    assert storescu(app.listener.port, study.files[0]).returncode == 0
    before = {p: p.read_bytes() for p in app.spool.iter_objects()}
    app.ingestor.min_free_bytes = app.spool.free_bytes() + 10 * 2**30  # floor above what is free
    r = storescu(app.listener.port, study.files[1], extra=("-v",))
    assert r.returncode != 0
    assert "Received Store Response (Refused: OutOfResources" in r.stderr, r.stderr
    assert app.metrics.out_of_resources._value.get() == 1
    assert {p: p.read_bytes() for p in app.spool.iter_objects()} == before
    app.ingestor.min_free_bytes = 0
    assert storescu(app.listener.port, study.files[1]).returncode == 0
    assert app.store.query("SELECT count(*) FROM instances")[0][0] == 2
    wait_until(lambda: associations_closed(app))
    _, a2, _ = app.store.query("SELECT received, refused FROM associations ORDER BY started_at")
    assert (a2["received"], a2["refused"]) == (0, 1)
