"""Attacks on the DICOM port by a peer with no AE title and no credentials. Each runs from
another loopback address (127.0.0.2) while a legitimate DCMTK ``storescu`` from 127.0.0.1
keeps storing, and each refusal is audited."""

from __future__ import annotations

import os
import resource
import socket
import ssl
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian

from edge_agent.samples import make_multiframe, make_study
from tests.conftest import TEST_FILES, make_config, self_signed, split_part10, storescu, wait_until
from tests.dicom_client import Client, Closed, associate_rq, p_data, pdv

pytestmark = pytest.mark.dcmtk

ATTACKER = "127.0.0.2"


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
def legit(tmp_path: Path) -> Iterator[Any]:
    """A sender that keeps storing a small study over and over from 127.0.0.1 while the
    test attacks; yields a function returning (rounds ok, rounds failed)."""
    study = make_study(tmp_path / "legit", modality="MR", size=32, slices=3, seed="legit")
    state = {"ok": 0, "failed": 0, "stop": False, "errors": []}

    def start(port: int) -> None:
        def loop() -> None:
            while not state["stop"]:
                r = storescu(port, *study.files)
                if r.returncode == 0:
                    state["ok"] += 1
                else:
                    state["failed"] += 1
                    state["errors"].append(r.stderr[-300:])
                time.sleep(0.05)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        state["thread"] = t

    def result() -> tuple[int, int]:
        state["stop"] = True
        t = state.get("thread")
        if t is not None:
            t.join(60)
        return int(state["ok"]), int(state["failed"])

    yield start, result, state
    state["stop"] = True


def audit(app: Any, where: str) -> list[Any]:
    return list(app.store.query(f"SELECT * FROM associations WHERE {where}"))


def test_silent_tls_connection_does_not_stop_the_listener(app_factory: Any, tmp_path: Path) -> None:
    cert, key = self_signed(tmp_path)
    cfg = make_config(
        tmp_path,
        dicom={
            "tls": __import__("edge_agent.config", fromlist=["TlsConfig"]).TlsConfig(
                enabled=True, cert_file=str(cert), key_file=str(key)
            ),
            "tls_handshake_timeout_s": 1.0,
        },
    )
    app = app_factory(cfg)
    silent = [
        socket.create_connection(("127.0.0.1", app.listener.port), source_address=(ATTACKER, 0))
        for _ in range(5)
    ]
    try:
        ctx = ssl.create_default_context(cafile=str(cert))
        ctx.check_hostname = False
        for _ in range(3):  # TLS associations complete while the silent sockets sit there
            # (a listener held shut by them would leave these reads to time out)
            raw = socket.create_connection(("127.0.0.1", app.listener.port), timeout=20)
            tls = ctx.wrap_socket(raw, server_hostname="localhost")
            tls.sendall(associate_rq())
            head = tls.recv(6)
            assert head[:1] == b"\x02", head  # A-ASSOCIATE-AC
            tls.close()
        wait_until(lambda: len(audit(app, "reject_reason LIKE 'TLS handshake%'")) == 5, 10)
    finally:
        for s in silent:
            s.close()
    assert app.metrics.limit_refusals.labels("tls_handshake")._value.get() == 5


def test_huge_pdu_claims_are_refused_before_buffering(app_factory: Any, legit: Any) -> None:
    app = app_factory()
    start, result, _ = legit
    start(app.listener.port)
    before = rss_mb()
    # 1. an A-ASSOCIATE-RQ that claims 4 GiB, then 2. a P-DATA-TF that does, on an
    # established association; both get an A-ABORT at once, nothing is buffered
    for _ in range(20):
        c = Client(app.listener.port, source=ATTACKER)
        c.send(struct.pack(">BBI", 1, 0, 0xFFFFFFFF) + b"\x00" * 65536)
        assert c.read_pdu().type == 0x07
        c.close()
        c = Client(app.listener.port, source=ATTACKER)
        assert c.associate().type == 0x02
        c.send(struct.pack(">BBI", 4, 0, 0xFFFFFFFF) + b"\x00" * 65536)
        assert c.read_pdu().type == 0x07
        c.close()
    assert rss_mb() - before < 100
    ok, failed = result()
    assert ok >= 1 and failed == 0
    wait_until(lambda: len(audit(app, "reject_reason LIKE '%exceeds the maximum%'")) == 40, 10)


def test_a_thousand_idle_connections(app_factory: Any, tmp_path: Path, legit: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"needs 4096 file descriptors, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4096), hard))
    app = app_factory(make_config(tmp_path, dicom={"acse_timeout_s": 3.0}))
    start, result, state = legit
    idle: list[socket.socket] = []
    try:
        for _ in range(1000):
            idle.append(
                socket.create_connection(
                    ("127.0.0.1", app.listener.port), source_address=(ATTACKER, 0)
                )
            )
        start(app.listener.port)
        time.sleep(4)  # past the ARTIM time: the 32 the per-IP cap let in are dropped too
        ok, failed = result()
    finally:
        for s in idle:
            s.close()
    assert ok >= 2 and failed == 0, state["errors"]
    wait_until(lambda: len(audit(app, f"peer_host = '{ATTACKER}'")) == 1000, 20)
    capped = audit(app, "reject_reason LIKE 'too many connections from%'")
    artim = audit(app, "reject_reason LIKE 'no A-ASSOCIATE-RQ within%'")
    # 32 held until ARTIM dropped them, the rest closed at once (on a slow machine a few
    # late connects may find a slot the first ARTIM drops freed: still one or the other)
    assert len(capped) + len(artim) == 1000 and len(artim) >= 32 and len(capped) >= 900
    assert {r["outcome"] for r in capped + artim} == {"dropped"}


def test_slow_loris_is_dropped(app_factory: Any, tmp_path: Path, legit: Any) -> None:
    """Slow senders from one address get at most three quarters of the slots (the rest is
    refused "local limit exceeded"), the legitimate sender stores meanwhile, and each slow
    one is aborted once its PDU body is overdue."""
    cfg = make_config(
        tmp_path, dicom={"pdu_read_timeout_s": 1.5, "max_associations": 4, "allow_any_caller": True}
    )
    app = app_factory(cfg)
    start, result, state = legit
    drips: list[Client] = []
    answers = []
    for _ in range(4):
        c = Client(app.listener.port, source=ATTACKER)
        answers.append(c.associate(calling="LORIS").type)
        if answers[-1] != 0x02:
            c.close()
            continue
        c.send(struct.pack(">BBI", 4, 0, 1000))  # declares 1000 bytes, sends them slowly
        drips.append(c)
    assert answers == [0x02, 0x02, 0x02, 0x03]  # the 4th: A-ASSOCIATE-RJ, per-address cap
    start(app.listener.port)  # the slot left is the legitimate sender's
    wait_until(lambda: state["ok"] >= 1, 10)
    aborted = 0
    deadline = time.monotonic() + 10
    for c in drips:
        c.sock.settimeout(0.3)
        while time.monotonic() < deadline:
            try:
                c.send(b"\x00")
                p = c.read_pdu()
                assert p.type == 0x07  # A-ABORT
                aborted += 1
                break
            except TimeoutError:
                continue
            except (Closed, BrokenPipeError, ConnectionResetError):
                aborted += 1
                break
    assert aborted == 3
    result()
    assert state["failed"] == 0, state["errors"]
    for c in drips:
        c.close()
    where = "calling_ae = 'LORIS' AND outcome = 'aborted' AND ended_at IS NOT NULL"
    wait_until(lambda: len(audit(app, where)) == 3, 10)
    assert all("PDU body not received" in r["reject_reason"] for r in audit(app, where))
    rej = audit(app, "calling_ae = 'LORIS' AND outcome = 'rejected'")
    assert len(rej) == 1 and "max_associations_per_ip" in rej[0]["reject_reason"]


def _ct() -> tuple[pydicom.Dataset, bytes]:
    ds = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    _, data = split_part10((TEST_FILES / "CT_small.dcm").read_bytes())
    return ds, data


def _store_raw(port: int, dataset: bytes, uid: str) -> tuple[int, str]:
    c = Client(port, source=ATTACKER)
    assert c.associate().type == 0x02
    try:
        return c.c_store(dataset, sop_instance=uid)
    finally:
        c.release()


def test_deep_nesting_and_garbage_in_sequences_are_refused(app_factory: Any) -> None:
    ds, data = _ct()
    app = app_factory()
    uid = str(ds.SOPInstanceUID)
    # 1,000 nested defined-length sequences (each an item holding the next)
    inner = b""
    for _ in range(1000):
        item = b"\xfe\xff\x00\xe0" + struct.pack("<I", len(inner)) + inner
        inner = b"\x08\x00\x15\x11SQ\x00\x00" + struct.pack("<I", len(item)) + item
    deep = data + b"\x09\x00" + inner[2:]  # private group 0009 keeps the tag order
    status, comment = _store_raw(app.listener.port, deep, uid)
    assert status == 0xC000 and "deeper" in comment
    # garbage inside a defined-length sequence item
    junk = b"\xfe\xff\x00\xe0\x10\x00\x00\x00" + os.urandom(16)
    bad = data + b"\x09\x00\x15\x11SQ\x00\x00" + struct.pack("<I", len(junk)) + junk
    status, comment = _store_raw(app.listener.port, bad, uid)
    assert 0xC000 <= status <= 0xC0FF, comment
    assert app.store.query("SELECT count(*) FROM instances")[0][0] == 0
    assert app.store.query("SELECT count(*) FROM quarantine")[0][0] == 2
    # and the sender after them is served
    assert storescu(app.listener.port, TEST_FILES / "CT_small.dcm").returncode == 0
    assert app.store.query("SELECT count(*) FROM instances")[0][0] == 1


def test_malformed_requests_are_answered_at_once(app_factory: Any) -> None:
    """The fuzz findings that got no answer for 30 s: each gets an RJ, an A-ABORT or a
    failure status at once."""
    app = app_factory()
    port = app.listener.port
    _ds, data = _ct()

    def answer(c: Client) -> int:
        c.sock.settimeout(3)
        return c.read_pdu().type

    # C-STORE-RQ without Affected SOP Instance UID: a failure status
    c = Client(port, source=ATTACKER)
    c.associate()
    status, comment = c.c_store(data, sop_instance="")
    assert status == 0xC001 and "Affected SOP Instance UID" in comment
    c.release()
    # an A-ASSOCIATE-RQ whose length field is short
    rq = bytearray(associate_rq())
    rq[2:6] = struct.pack(">I", 40)
    c = Client(port, source=ATTACKER)
    c.send(bytes(rq))
    assert answer(c) in (0x03, 0x07)  # what is left of it has no presentation context
    c.close()
    # duplicate presentation context ids
    c = Client(port, source=ATTACKER)
    c.send(associate_rq(contexts=[(1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"])] * 2))
    assert answer(c) == 0x07
    c.close()
    # a context without transfer syntaxes: refused context, association accepted
    c = Client(port, source=ATTACKER)
    p = c.associate(
        contexts=[
            (1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"]),
            (3, "1.2.840.10008.5.1.4.1.1.2", []),
        ]
    )
    assert p.type == 0x02 and list(c.accepted) == [1]
    assert c.c_echo() == 0
    c.release()
    # an unknown user identity type: A-ASSOCIATE-RJ
    c = Client(port, source=ATTACKER)
    rq = bytearray(associate_rq(user_identity=(1, b"x", b"")))
    at = rq.rindex(b"\x58\x00")  # the User Identity sub-item: make its type 9
    rq[at + 4] = 9
    c.send(bytes(rq))
    assert c.read_pdu().type in (0x03, 0x07)  # pynetdicom cannot even decode it: A-ABORT
    c.close()
    # stray bytes after a complete PDU: A-ABORT
    c = Client(port, source=ATTACKER)
    c.associate()
    c.send(b"\x99\x00\x00\x00\x00\x02ab")
    assert answer(c) == 0x07
    c.close()
    # a C-FIND on our context: "unrecognized operation", association stays usable
    c = Client(port, source=ATTACKER)
    c.associate()
    from tests.dicom_client import command

    find = command(
        {
            "AffectedSOPClassUID": "1.2.840.10008.1.1",
            "CommandField": 0x0020,
            "MessageID": 7,
            "Priority": 0,
            "CommandDataSetType": 0x0101,
        }
    )
    c.send(p_data(pdv(1, 0x03, find)))
    rsp = c.response()
    assert rsp.Status == 0x0211 and rsp.MessageIDBeingRespondedTo == 7
    assert rsp.CommandField == 0x8020
    assert c.c_echo() == 0
    c.release()
    wait_until(lambda: len(audit(app, f"peer_host = '{ATTACKER}'")) == 7, 10)


def test_stored_file_is_readable(app_factory: Any) -> None:
    ds, data = _ct()
    app = app_factory()
    status, _ = _store_raw(app.listener.port, data, str(ds.SOPInstanceUID))
    assert status == 0
    (row,) = app.store.query("SELECT * FROM instances")
    back = pydicom.dcmread(app.spool.root / row["path"])
    assert back.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert back.SOPInstanceUID == ds.SOPInstanceUID


def test_large_instance_is_received_into_its_file_with_bounded_memory(
    app_factory: Any, tmp_path: Path
) -> None:
    """A 300 MB multiframe goes straight to a spill file behind its header and is renamed
    into place: memory does not grow with the instance, the file is byte-identical."""
    import hashlib

    src = make_multiframe(tmp_path / "mf.dcm", 300, size=256)
    app = app_factory()
    before = rss_mb()
    r = storescu(app.listener.port, src)
    assert r.returncode == 0, r.stderr
    assert rss_mb() - before < 120
    (row,) = app.store.query("SELECT path, sha256 FROM instances")
    stored = app.spool.root / row["path"]
    assert hashlib.sha256(split_part10(stored.read_bytes())[1]).hexdigest() == row["sha256"]
    assert split_part10(stored.read_bytes())[1] == split_part10(src.read_bytes())[1]
    assert not list(app.spool.tmp.iterdir())


def test_dataset_over_the_size_limit_aborts(app_factory: Any, tmp_path: Path) -> None:
    src = make_multiframe(tmp_path / "mf.dcm", 3, size=256)
    app = app_factory(make_config(tmp_path, dicom={"max_dataset_mb": 1}))
    r = storescu(app.listener.port, src)
    assert r.returncode != 0
    wait_until(lambda: len(audit(app, "reject_reason LIKE 'dataset larger than the limit%'")) == 1)
    assert app.store.query("SELECT count(*) FROM instances")[0][0] == 0
    assert not list(app.spool.tmp.iterdir())  # the spill file is gone
    assert app.metrics.limit_refusals.labels("dataset_size")._value.get() == 1
    assert storescu(app.listener.port, TEST_FILES / "CT_small.dcm").returncode == 0
