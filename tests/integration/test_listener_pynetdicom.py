"""The listener against a pynetdicom SCU: exact bytes on the wire, bad input of every kind,
association limits, DICOM TLS. Each bad input gets its status and the server keeps serving."""

from __future__ import annotations

import gc
import hashlib
import io
import ssl
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, build_context
from pynetdicom.sop_class import Verification

from tests.conftest import (
    TEST_FILES,
    associations_closed,
    make_config,
    self_signed,
    split_part10,
    wait_until,
)


@pytest.fixture(autouse=True)
def raw_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make pynetdicom send a file's dataset bytes as they are, not decoded and re-encoded,
    so these tests control exactly what goes on the wire."""
    from pynetdicom import _config

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def part10(dataset: bytes, *, sop_class: str, sop_instance: str, ts: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = UID(sop_instance)
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationClassUID = UID("1.2.3.4")
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_file_meta_info(buf, meta, enforce_standard=True)
    return b"\x00" * 128 + b"DICM" + buf.getvalue() + dataset


def scu(ae_title: str = "PYSCU", ts: tuple[str, ...] = (ExplicitVRLittleEndian,)) -> AE:
    ae = AE(ae_title=ae_title)
    ae.add_requested_context(CTImageStorage, list(ts))
    ae.add_requested_context(Verification)
    return ae


def send(port: int, data: bytes, tmp_path: Path, *, ae: AE | None = None) -> Any:
    """Send a Part 10 file's bytes as they are (no re-encoding); return the response."""
    path = tmp_path / f"send-{hashlib.sha1(data).hexdigest()[:10]}.dcm"
    path.write_bytes(data)
    assoc = (ae or scu()).associate("127.0.0.1", port, ae_title="EDGE_TEST")
    assert assoc.is_established
    try:
        return assoc.send_c_store(path)
    finally:
        assoc.release()


def echo_ok(port: int) -> bool:
    assoc = scu().associate("127.0.0.1", port, ae_title="EDGE_TEST")
    try:
        return bool(assoc.is_established and assoc.send_c_echo().Status == 0)
    finally:
        if assoc.is_established:
            assoc.release()


@pytest.fixture
def ct() -> tuple[bytes, str]:
    """(dataset bytes, SOP Instance UID) of CT_small.dcm in explicit VR little endian."""
    ts, data = split_part10((TEST_FILES / "CT_small.dcm").read_bytes())
    assert ts == ExplicitVRLittleEndian
    uid = str(pydicom.dcmread(TEST_FILES / "CT_small.dcm").SOPInstanceUID)
    return data, uid


def test_exact_bytes_kept(app_factory: Any, ct: tuple[bytes, str], tmp_path: Path) -> None:
    data, uid = ct
    app = app_factory()
    rsp = send(
        app.listener.port,
        part10(data, sop_class=CTImageStorage, sop_instance=uid, ts=ExplicitVRLittleEndian),
        tmp_path,
    )
    assert rsp.Status == 0x0000
    (row,) = app.store.query("SELECT * FROM instances")
    stored = (app.spool.root / row["path"]).read_bytes()
    ts, ds = split_part10(stored)
    assert ds == data and ts == ExplicitVRLittleEndian
    assert row["sha256"] == hashlib.sha256(data).hexdigest()
    meta = pydicom.dcmread(io.BytesIO(stored)).file_meta
    assert meta.SourceApplicationEntityTitle == "PYSCU"
    assert meta.MediaStorageSOPInstanceUID == uid


@pytest.mark.parametrize("cut", [1, 2, 7, 100, 1000, 30000])
def test_truncated_dataset_quarantined(
    app_factory: Any, ct: tuple[bytes, str], tmp_path: Path, cut: int
) -> None:
    data, uid = ct
    app = app_factory()
    bad = data[:-cut]
    rsp = send(
        app.listener.port,
        part10(bad, sop_class=CTImageStorage, sop_instance=uid, ts=ExplicitVRLittleEndian),
        tmp_path,
    )
    assert rsp.Status == 0xC000
    assert "truncated" in rsp.ErrorComment
    assert app.store.query("SELECT count(*) FROM instances")[0][0] == 0
    (q,) = app.store.query("SELECT * FROM quarantine")
    assert q["status"] == 0xC000 and q["sop_instance_uid"] == uid
    raw = app.cfg.storage.path("quarantine_dir") / q["path"]
    assert raw.read_bytes() == bad
    assert "truncated" in raw.with_suffix(".json").read_text()
    assert echo_ok(app.listener.port)


def test_garbage_bytes_quarantined(app_factory: Any, tmp_path: Path) -> None:
    app = app_factory()
    garbage = bytes(range(256)) * 40
    rsp = send(
        app.listener.port,
        part10(
            garbage, sop_class=CTImageStorage, sop_instance="1.2.3.4.5", ts=ExplicitVRLittleEndian
        ),
        tmp_path,
    )
    assert 0xC000 <= rsp.Status <= 0xCFFF
    assert rsp.ErrorComment
    assert app.store.query("SELECT count(*) FROM quarantine")[0][0] == 1
    assert echo_ok(app.listener.port)


def _edited(ds_edit: Any) -> tuple[bytes, str]:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    uid = str(ds.SOPInstanceUID)
    with warnings.catch_warnings():  # we write invalid UIDs on purpose
        warnings.simplefilter("ignore")
        ds_edit(ds)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pydicom.filewriter.write_dataset(buf, ds)
    return buf.getvalue(), uid


@pytest.mark.parametrize(
    ("edit", "status", "words"),
    [
        (lambda ds: delattr(ds, "StudyInstanceUID"), 0xC001, "missing Study Instance UID"),
        (lambda ds: delattr(ds, "SeriesInstanceUID"), 0xC001, "missing Series Instance UID"),
        (lambda ds: setattr(ds, "StudyInstanceUID", "1.2.03.4"), 0xC002, "malformed Study"),
        (lambda ds: setattr(ds, "SeriesInstanceUID", "abc.def"), 0xC002, "malformed Series"),
        (lambda ds: setattr(ds, "SeriesInstanceUID", "1." + "2" * 70), 0xC002, "malformed"),
        (lambda ds: setattr(ds, "SOPInstanceUID", "1.2.3.999"), 0xC003, "differs"),
    ],
)
def test_bad_uids_quarantined(
    app_factory: Any, tmp_path: Path, edit: Any, status: int, words: str
) -> None:
    data, uid = _edited(edit)
    app = app_factory()
    rsp = send(
        app.listener.port,
        part10(data, sop_class=CTImageStorage, sop_instance=uid, ts=ExplicitVRLittleEndian),
        tmp_path,
    )
    assert rsp.Status == status
    assert words in rsp.ErrorComment
    assert app.store.query("SELECT count(*) FROM instances")[0][0] == 0
    assert words in app.store.query("SELECT reason FROM quarantine")[0][0]
    assert echo_ok(app.listener.port)


def test_missing_sop_instance_uid(app_factory: Any, tmp_path: Path) -> None:
    data, uid = _edited(lambda ds: delattr(ds, "SOPInstanceUID"))
    app = app_factory()
    rsp = send(
        app.listener.port,
        part10(data, sop_class=CTImageStorage, sop_instance=uid, ts=ExplicitVRLittleEndian),
        tmp_path,
    )
    assert rsp.Status == 0xC001
    assert "missing SOP Instance UID" in rsp.ErrorComment


def test_same_uid_different_bytes_is_new_version(
    app_factory: Any, ct: tuple[bytes, str], tmp_path: Path
) -> None:
    data, uid = ct
    changed, _ = _edited(lambda ds: setattr(ds, "SeriesDescription", "re-sent with a fix"))
    app = app_factory()
    port = app.listener.port
    for payload in (data, data, changed, changed):
        rsp = send(
            port,
            part10(payload, sop_class=CTImageStorage, sop_instance=uid, ts=ExplicitVRLittleEndian),
            tmp_path,
        )
        assert rsp.Status == 0x0000
    rows = app.store.query("SELECT version, sha256 FROM instances ORDER BY version")
    assert [(r["version"], r["sha256"]) for r in rows] == [
        (1, hashlib.sha256(data).hexdigest()),
        (2, hashlib.sha256(changed).hexdigest()),
    ]
    assert len(app.spool.iter_objects()) == 2
    (study,) = app.store.query("SELECT instance_count FROM studies")
    assert study["instance_count"] == 1  # one SOP instance, two versions


def test_implicit_vr_bytes_kept(app_factory: Any, tmp_path: Path) -> None:
    ts, data = split_part10((TEST_FILES / "MR_small_implicit.dcm").read_bytes())
    assert ts == ImplicitVRLittleEndian
    ds = pydicom.dcmread(TEST_FILES / "MR_small_implicit.dcm", stop_before_pixels=True)
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(ds.SOPClassUID, [ImplicitVRLittleEndian])
    app = app_factory()
    rsp = send(
        app.listener.port,
        part10(data, sop_class=ds.SOPClassUID, sop_instance=ds.SOPInstanceUID, ts=ts),
        tmp_path,
        ae=ae,
    )
    assert rsp.Status == 0
    (row,) = app.store.query("SELECT path FROM instances")
    assert split_part10((app.spool.root / row["path"]).read_bytes()) == (ts, data)


def test_max_associations(app_factory: Any, tmp_path: Path) -> None:
    app = app_factory(make_config(tmp_path, dicom={"max_associations": 2}))
    held = [scu().associate("127.0.0.1", app.listener.port, ae_title="EDGE_TEST") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = scu().associate("127.0.0.1", app.listener.port, ae_title="EDGE_TEST")
        assert third.is_rejected
        rj = third.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)
    finally:
        for a in held:
            a.release()
    assert echo_ok(app.listener.port)  # capacity is back
    rows = app.store.query("SELECT reject_reason FROM associations WHERE outcome = 'rejected'")
    assert [r[0] for r in rows] == ["local limit exceeded"]


def test_tls(app_factory: Any, ct: tuple[bytes, str], tmp_path: Path) -> None:
    from edge_agent.config import TlsConfig

    cert, key = self_signed(tmp_path)
    app = app_factory(
        make_config(
            tmp_path, dicom={"tls": TlsConfig(enabled=True, cert_file=str(cert), key_file=str(key))}
        )
    )
    client_ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    assoc = scu().associate(
        "127.0.0.1", app.listener.port, ae_title="EDGE_TEST", tls_args=(client_ctx, "localhost")
    )
    assert assoc.is_established
    data, uid = ct
    path = tmp_path / "ct.dcm"
    path.write_bytes(
        part10(data, sop_class=CTImageStorage, sop_instance=uid, ts=ExplicitVRLittleEndian)
    )
    assert assoc.send_c_store(path).Status == 0
    assoc.release()
    wait_until(lambda: associations_closed(app))
    (row,) = app.store.query("SELECT tls FROM associations")
    assert row["tls"] == 1
    plain = scu().associate("127.0.0.1", app.listener.port, ae_title="EDGE_TEST")
    assert not plain.is_established  # a peer without TLS cannot talk to a TLS listener
    if plain.dul.socket and plain.dul.socket.socket:  # pynetdicom leaves it open on failure
        plain.dul.socket.socket.close()
    gc.collect()  # a socket leaked by a failed handshake would raise ResourceWarning here


def test_context_for_unsupported_syntax_rejected(app_factory: Any) -> None:
    ae = AE(ae_title="PYSCU")
    ae.add_requested_context(CTImageStorage, ["1.2.840.10008.1.2.4.100"])  # MPEG2
    ae.add_requested_context(Verification)
    app = app_factory()
    assoc = ae.associate("127.0.0.1", app.listener.port, ae_title="EDGE_TEST")
    assert assoc.is_established
    assert [cx.abstract_syntax for cx in assoc.accepted_contexts] == [Verification]
    assoc.release()


def test_build_context_smoke() -> None:
    # pins that pynetdicom's API we rely on for the SCU side is there
    assert build_context(Verification).abstract_syntax == Verification
