"""PDU framing (PS3.8 9.3) and the small PDUs we encode by hand.

A PDU is a 6-byte header (type, reserved, 32-bit big-endian length) and its body. The
A-ASSOCIATE PDUs are decoded and encoded with pynetdicom's item codecs (see
:mod:`edge_agent.dicom.negotiation`); everything on the data path is done here, with no
intermediate objects.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

A_ASSOCIATE_RQ = 0x01
A_ASSOCIATE_AC = 0x02
A_ASSOCIATE_RJ = 0x03
P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_RELEASE_RP = 0x06
A_ABORT = 0x07
KNOWN_TYPES = frozenset(range(1, 8))

HEADER = struct.Struct(">BBI")
_PDV_HEADER = struct.Struct(">IBB")

# A-ABORT source (PS3.8 9.3.8)
ABORT_SOURCE_USER = 0x00
ABORT_SOURCE_PROVIDER = 0x02
# A-ABORT reasons when the source is the service provider
ABORT_REASON_NOT_SPECIFIED = 0x00
ABORT_UNRECOGNIZED_PDU = 0x01
ABORT_UNEXPECTED_PDU = 0x02
ABORT_UNRECOGNIZED_PARAMETER = 0x04
ABORT_UNEXPECTED_PARAMETER = 0x05
ABORT_INVALID_PARAMETER = 0x06

# A-ASSOCIATE-RJ (result, source, reason), PS3.8 9.3.4
REJECT_CALLING_AE = (0x01, 0x01, 0x03)
REJECT_CALLED_AE = (0x01, 0x01, 0x07)
REJECT_NO_REASON = (0x01, 0x01, 0x01)
REJECT_APPLICATION_CONTEXT = (0x01, 0x01, 0x02)
REJECT_PROTOCOL_VERSION = (0x01, 0x02, 0x02)
REJECT_LOCAL_LIMIT = (0x02, 0x03, 0x02)

#: PDV message control header bits (PS3.8 E.2)
MCH_COMMAND = 0x01
MCH_LAST = 0x02


class PduError(Exception):
    """A PDU that does not follow PS3.8 (answered with A-ABORT)."""

    def __init__(self, message: str, reason: int = ABORT_INVALID_PARAMETER) -> None:
        super().__init__(message)
        self.reason = reason


def associate_rj(result: int, source: int, reason: int) -> bytes:
    return HEADER.pack(A_ASSOCIATE_RJ, 0, 4) + bytes((0, result, source, reason))


def release_rp() -> bytes:
    return HEADER.pack(A_RELEASE_RP, 0, 4) + b"\x00\x00\x00\x00"


def abort(source: int = ABORT_SOURCE_PROVIDER, reason: int = ABORT_REASON_NOT_SPECIFIED) -> bytes:
    return HEADER.pack(A_ABORT, 0, 4) + bytes((0, 0, source, reason))


def p_data(context_id: int, mch: int, data: bytes | memoryview) -> bytes:
    """One P-DATA-TF PDU holding one PDV."""
    n = len(data)
    return HEADER.pack(P_DATA_TF, 0, n + 6) + _PDV_HEADER.pack(n + 2, context_id, mch) + data


def fragments(context_id: int, data: bytes, *, command: bool, max_pdu: int) -> Iterator[bytes]:
    """``data`` as P-DATA-TF PDUs no longer than the peer's ``max_pdu`` (0 = unlimited):
    each PDU carries one PDV; the last one has the "last fragment" bit."""
    chunk = len(data) if max_pdu == 0 else max(max_pdu - 6, 1)
    base = MCH_COMMAND if command else 0
    view = memoryview(data)
    if not data:
        yield p_data(context_id, base | MCH_LAST, b"")
        return
    for start in range(0, len(data), chunk):
        part = view[start : start + chunk]
        last = start + chunk >= len(data)
        yield p_data(context_id, base | (MCH_LAST if last else 0), part)


def pdvs(body: bytes) -> Iterator[tuple[int, int, memoryview]]:
    """The PDVs of a P-DATA-TF body: ``(context_id, message control header, data)``.

    Raises :class:`PduError` if the items do not exactly fill the body."""
    view = memoryview(body)
    pos, end = 0, len(body)
    if end == 0:
        raise PduError("P-DATA-TF without a presentation data value")
    while pos < end:
        if end - pos < 6:
            raise PduError("P-DATA-TF item header cut short")
        length, context_id, mch = _PDV_HEADER.unpack_from(body, pos)
        if length < 2 or length > end - pos - 4:
            raise PduError(f"PDV item length {length} does not fit the P-DATA-TF PDU")
        if mch & 0xFC:
            raise PduError(f"PDV message control header 0x{mch:02X} has reserved bits set")
        yield context_id, mch, view[pos + 6 : pos + 4 + length]
        pos += 4 + length
