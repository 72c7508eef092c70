"""A raw DICOM upper-layer client for tests: every byte on the wire is the test's choice.

Independent of the code under test: the A-ASSOCIATE-RQ is encoded with pynetdicom's PDU
classes and command sets with pydicom's writer; responses are read with pydicom.
"""

from __future__ import annotations

import contextlib
import io
import socket
import struct
from dataclasses import dataclass

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.uid import UID
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    ImplementationClassUIDNotification,
    MaximumLengthNotification,
    UserIdentityNegotiation,
)
from pynetdicom.presentation import PresentationContext

VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


class Closed(Exception):
    """The peer closed the connection."""


@dataclass
class Pdu:
    type: int
    body: bytes


def associate_rq(
    *,
    calling: str = "PYSCU",
    called: str = "EDGE_TEST",
    contexts: list[tuple[int, str, list[str]]] | None = None,
    max_pdu: int = 16384,
    user_identity: tuple[int, bytes, bytes] | None = None,
) -> bytes:
    """An encoded A-ASSOCIATE-RQ PDU."""
    prim = A_ASSOCIATE()
    prim.application_context_name = UID("1.2.840.10008.3.1.1.1")
    prim.calling_ae_title = calling
    prim.called_ae_title = called
    cxs = []
    for cid, abstract, tss in contexts or [
        (1, VERIFICATION, [IMPLICIT_LE]),
        (3, CT_IMAGE, [EXPLICIT_LE, IMPLICIT_LE]),
    ]:
        cx = PresentationContext()
        cx.context_id = cid
        cx.abstract_syntax = UID(abstract)
        cx.transfer_syntax = [UID(t) for t in tss]
        cxs.append(cx)
    prim.presentation_context_definition_list = cxs
    ml = MaximumLengthNotification()
    ml.maximum_length_received = max_pdu
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = UID("1.2.826.0.1.3680043.9.3811.0")
    items: list[object] = [ml, impl]
    if user_identity is not None:
        ui = UserIdentityNegotiation()
        ui.user_identity_type = user_identity[0]
        ui.primary_field = user_identity[1]
        if user_identity[0] == 2:
            ui.secondary_field = user_identity[2]
        items.append(ui)
    prim.user_information = items
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(prim)
    return bytes(rq.encode())


def command(elements: dict[str, object]) -> bytes:
    """A command set (group 0000, implicit VR little endian) with its group length."""
    ds = Dataset()
    for k, v in elements.items():
        setattr(ds, k, v)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, True
    write_dataset(buf, ds)
    body = buf.getvalue()
    return b"\x00\x00\x00\x00\x04\x00\x00\x00" + struct.pack("<I", len(body)) + body


def pdv(context_id: int, mch: int, data: bytes) -> bytes:
    return struct.pack(">IBB", len(data) + 2, context_id, mch) + data


def p_data(*pdvs: bytes) -> bytes:
    body = b"".join(pdvs)
    return struct.pack(">BBI", 4, 0, len(body)) + body


class Client:
    """One TCP connection to the acceptor."""

    def __init__(self, port: int, *, source: str = "127.0.0.1", timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(
            ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
        )
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.accepted: dict[int, str] = {}
        self.max_pdu = 16384

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise Closed()
            out += chunk
        return bytes(out)

    def read_pdu(self) -> Pdu:
        ptype, _, length = struct.unpack(">BBI", self._exact(6))
        return Pdu(ptype, self._exact(length))

    def closed_by_peer(self) -> bool:
        """True if the peer closed (EOF) before sending anything more."""
        try:
            return self.sock.recv(1) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True

    def associate(self, **kwargs: object) -> Pdu:
        """Send an A-ASSOCIATE-RQ; return the answer (AC: ``accepted`` is filled in)."""
        self.send(associate_rq(**kwargs))  # type: ignore[arg-type]
        rsp = self.read_pdu()
        if rsp.type == 0x02:
            ac = A_ASSOCIATE_AC()
            ac.decode(struct.pack(">BBI", 2, 0, len(rsp.body)) + rsp.body)
            prim = ac.to_primitive()
            for cx in prim.presentation_context_definition_results_list:
                if cx.result == 0 and cx.transfer_syntax:
                    self.accepted[int(cx.context_id)] = str(cx.transfer_syntax[0])
            for item in prim.user_information:
                if isinstance(item, MaximumLengthNotification):
                    self.max_pdu = int(item.maximum_length_received)
        return rsp

    def response(self) -> Dataset:
        """Read P-DATA until a complete command set; return it decoded."""
        data = b""
        while True:
            p = self.read_pdu()
            if p.type != 0x04:
                raise AssertionError(f"expected P-DATA-TF, got PDU type {p.type:#x}")
            pos = 0
            while pos < len(p.body):
                length, _cid, mch = struct.unpack_from(">IBB", p.body, pos)
                data += p.body[pos + 6 : pos + 4 + length]
                pos += 4 + length
                if mch & 0x01 and mch & 0x02:
                    return read_dataset(io.BytesIO(data), True, True)

    def c_echo(self, context_id: int = 1, message_id: int = 1) -> int:
        cmd = command(
            {
                "AffectedSOPClassUID": VERIFICATION,
                "CommandField": 0x0030,
                "MessageID": message_id,
                "CommandDataSetType": 0x0101,
            }
        )
        self.send(p_data(pdv(context_id, 0x03, cmd)))
        return int(self.response().Status)

    def c_store(
        self,
        dataset: bytes,
        *,
        sop_instance: str,
        sop_class: str = CT_IMAGE,
        context_id: int = 3,
        message_id: int = 1,
    ) -> tuple[int, str]:
        cmd = command(
            {
                "AffectedSOPClassUID": sop_class,
                "CommandField": 0x0001,
                "MessageID": message_id,
                "Priority": 0,
                "CommandDataSetType": 0x0000,
                "AffectedSOPInstanceUID": sop_instance,
            }
        )
        self.send(p_data(pdv(context_id, 0x03, cmd)))
        chunk = max(self.max_pdu - 6, 1) if self.max_pdu else len(dataset) or 1
        view = memoryview(dataset)
        for start in range(0, max(len(dataset), 1), chunk):
            last = start + chunk >= len(dataset)
            self.send(
                p_data(pdv(context_id, 0x02 if last else 0x00, bytes(view[start : start + chunk])))
            )
        rsp = self.response()
        return int(rsp.Status), str(rsp.get("ErrorComment", ""))

    def release(self) -> None:
        self.send(b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00")
        rp = self.read_pdu()
        assert rp.type == 0x06, rp
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()
