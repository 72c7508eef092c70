"""Seeded fuzzing of the DICOM port: mutated pydicom test files through a real association,
and mutated PDUs. No crash (the acceptor keeps answering), no hang (every case is answered
or the connection ends within seconds), bounded memory, and no 0x0000 for a dataset that
pydicom cannot read back."""

from __future__ import annotations

import random
import struct
import warnings
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pydicom.dataset import Dataset

from tests.conftest import TEST_FILES, make_config, split_part10
from tests.dicom_client import Client, Closed, associate_rq, p_data, pdv
from tests.integration.test_acceptor_attacks import rss_mb

SOURCES = (
    "CT_small.dcm",
    "MR_small.dcm",
    "MR_small_implicit.dcm",
    "rtplan.dcm",
    "reportsi.dcm",
    "JPEG2000.dcm",
    "SC_rgb_rle.dcm",
)
SEED = 20261201
CASES = 1500
PDU_CASES = 300


def _read_back(path: Path) -> None:
    """Read every element's value, recursively (pydicom converts values lazily)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = pydicom.dcmread(path)

        def walk(d: Dataset) -> None:
            for elem in d:
                if elem.VR == "SQ":
                    for item in elem.value:
                        walk(item)
                else:
                    _ = elem.value

        walk(ds)


def _mutate(rng: random.Random, data: bytes) -> bytes:
    buf = bytearray(data)
    kind = rng.randrange(5)
    if kind == 0:  # flip bytes
        for _ in range(rng.randint(1, 6)):
            buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 1:  # truncate
        del buf[rng.randrange(1, len(buf)) :]
    elif kind == 2:  # insert junk
        at = rng.randrange(len(buf))
        buf[at:at] = rng.randbytes(rng.randint(1, 64))
    elif kind == 3:  # corrupt a length field near an element header
        at = rng.randrange(0, max(len(buf) - 8, 1))
        buf[at + 4 : at + 8] = struct.pack("<I", rng.choice((0xFFFFFFFF, 0, 1, 2**31, len(buf))))
    else:  # cut out a slice
        a = rng.randrange(len(buf))
        del buf[a : a + rng.randint(1, 256)]
    return bytes(buf)


@pytest.fixture
def fuzz_app(app_factory: Any, tmp_path: Path) -> Any:
    # short timeouts: a mutated length field makes the acceptor wait for bytes that never come
    return app_factory(
        make_config(
            tmp_path,
            dicom={"allow_any_caller": True, "pdu_read_timeout_s": 2.0, "acse_timeout_s": 2.0},
        )
    )


def _client(port: int, ts: str) -> Client:
    c = Client(port, timeout=5)
    rsp = c.associate(
        contexts=[
            (1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"]),
            *[(3 + 2 * i, sop, [ts]) for i, sop in enumerate(SOP_CLASSES)],
        ]
    )
    assert rsp.type == 0x02, rsp
    return c


SOP_CLASSES: list[str] = []


def test_mutated_datasets(fuzz_app: Any) -> None:
    rng = random.Random(SEED)
    port = fuzz_app.listener.port
    sources = []
    for name in SOURCES:
        raw = (TEST_FILES / name).read_bytes()
        ts, data = split_part10(raw)
        ds = pydicom.dcmread(TEST_FILES / name, stop_before_pixels=True)
        sources.append((ts, data, str(ds.SOPClassUID), str(ds.SOPInstanceUID)))
    SOP_CLASSES[:] = sorted({s[2] for s in sources})
    rss0 = rss_mb()
    answered = acked = 0
    clients: dict[str, Client] = {}
    for _ in range(CASES):
        ts, data, sop_class, uid = rng.choice(sources)
        mutated = _mutate(rng, data)
        c = clients.get(ts) or _client(port, ts)
        clients[ts] = c
        ctx = 3 + 2 * SOP_CLASSES.index(sop_class)
        try:
            status, _ = c.c_store(mutated, sop_instance=uid, sop_class=sop_class, context_id=ctx)
        except (Closed, ConnectionResetError, BrokenPipeError, AssertionError):
            c.close()  # the acceptor aborted: fine, as long as it answered at once
            clients.pop(ts)
            continue
        answered += 1
        acked += status == 0
    for c in clients.values():
        c.release()
    assert answered > CASES * 0.9
    assert rss_mb() - rss0 < 200
    rows = fuzz_app.store.query("SELECT path FROM instances")
    assert len(rows) >= 1 and acked >= len(rows)
    unreadable = []
    for r in rows:
        try:
            _read_back(fuzz_app.spool.root / r["path"])
        except Exception as exc:  # any failure to read back is a finding
            unreadable.append(f"{r['path']}: {exc!r}"[:200])
    assert not unreadable, unreadable[:5]
    c = _client(port, "1.2.840.10008.1.2")
    assert c.c_echo() == 0
    c.release()


def test_mutated_pdus(fuzz_app: Any) -> None:
    """Random changes to a valid association's PDUs: each connection gets an answer or is
    closed within its timeouts, and the acceptor keeps serving."""
    rng = random.Random(SEED + 1)
    port = fuzz_app.listener.port
    _, data = split_part10((TEST_FILES / "CT_small.dcm").read_bytes())
    uid = str(pydicom.dcmread(TEST_FILES / "CT_small.dcm").SOPInstanceUID)
    from tests.dicom_client import command

    cmd = command(
        {
            "AffectedSOPClassUID": "1.2.840.10008.5.1.4.1.1.2",
            "CommandField": 0x0001,
            "MessageID": 1,
            "Priority": 0,
            "CommandDataSetType": 0,
            "AffectedSOPInstanceUID": uid,
        }
    )
    stream = [associate_rq(), p_data(pdv(3, 0x03, cmd)), p_data(pdv(3, 0x02, data[:4000]))]
    for _ in range(PDU_CASES):
        pdus = [bytearray(p) for p in stream]
        target = pdus[rng.randrange(len(pdus))]
        for _ in range(rng.randint(1, 3)):
            target[rng.randrange(len(target))] = rng.randrange(256)
        c = Client(port, timeout=15)
        try:
            for p in pdus:
                c.send(bytes(p))
            c.sock.settimeout(15)
            while c.sock.recv(65536):  # read until the acceptor answers and closes or aborts
                c.send(b"\x07\x00\x00\x00\x00\x04\x00\x00\x00\x00")  # then we abort
        except (ConnectionResetError, BrokenPipeError):
            pass
        except TimeoutError:
            raise AssertionError(f"no answer, no close within 15 s: {pdus!r}"[:500]) from None
        finally:
            c.close()
    c = Client(port)
    assert c.associate().type == 0x02
    assert c.c_echo() == 0
    c.release()
