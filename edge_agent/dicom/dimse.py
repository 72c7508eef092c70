"""DIMSE command sets (PS3.7 9.3, 10.3): group 0000 in implicit VR little endian.

A small, exact reader and writer instead of pydicom's general-purpose codec: a command set
holds a dozen short elements, and decoding it through pydicom cost more than the rest of the
C-STORE protocol work. The reader accepts only group 0000 elements, each inside the bytes
and in ascending tag order, and only a bounded total size.
"""

from __future__ import annotations

import struct

MAX_COMMAND_BYTES = 65_536

# Command Field values (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF  # any other request is answered 0x0211 (its field | 0x8000)

NO_DATASET = 0x0101

# tags (element numbers of group 0000)
GROUP_LENGTH = 0x0000
AFFECTED_SOP_CLASS = 0x0002
COMMAND_FIELD = 0x0100
MESSAGE_ID = 0x0110
MESSAGE_ID_RESPONDED = 0x0120
DATASET_TYPE = 0x0800
STATUS = 0x0900
ERROR_COMMENT = 0x0902
AFFECTED_SOP_INSTANCE = 0x1000

# statuses (PS3.7 C)
STATUS_UNRECOGNIZED_OPERATION = 0x0211
STATUS_MISSING_ATTRIBUTE = 0xC001  # our 0xC0xx: the request lacks a required attribute

_ELEM = struct.Struct("<HHI")
_US = struct.Struct("<H")
_UL = struct.Struct("<I")


class CommandError(Exception):
    """A command set that cannot be read (answered with A-ABORT: the message cannot be
    told apart from the next one, so no response can be matched to it)."""


class Command:
    """A decoded command set: raw element values by element number (group 0000)."""

    __slots__ = ("values",)

    def __init__(self, values: dict[int, bytes]) -> None:
        self.values = values

    def us(self, elem: int) -> int | None:
        raw = self.values.get(elem)
        if raw is None or len(raw) != 2:
            return None
        return int(_US.unpack(raw)[0])

    def uid(self, elem: int) -> str:
        raw = self.values.get(elem)
        return raw.decode("ascii", "replace").rstrip("\x00 ").strip() if raw else ""

    @property
    def command_field(self) -> int | None:
        return self.us(COMMAND_FIELD)

    @property
    def message_id(self) -> int | None:
        return self.us(MESSAGE_ID)

    @property
    def has_dataset(self) -> bool:
        t = self.us(DATASET_TYPE)
        return t is not None and t != NO_DATASET


def decode(data: bytes) -> Command:
    """Read a command set. Raises :class:`CommandError`."""
    if len(data) > MAX_COMMAND_BYTES:
        raise CommandError(f"command set of {len(data)} bytes exceeds {MAX_COMMAND_BYTES}")
    values: dict[int, bytes] = {}
    pos, end, last = 0, len(data), -1
    while pos < end:
        if end - pos < 8:
            raise CommandError(f"command element header at byte {pos} is cut short")
        group, elem, length = _ELEM.unpack_from(data, pos)
        pos += 8
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{elem:04X}) in a command set")
        if elem <= last:
            raise CommandError(f"command element (0000,{elem:04X}) out of order or repeated")
        if length > end - pos:
            raise CommandError(
                f"command element (0000,{elem:04X}) declares {length} bytes, {end - pos} remain"
            )
        values[elem] = data[pos : pos + length]
        pos += length
        last = elem
    gl = values.get(GROUP_LENGTH)
    if gl is not None:
        if len(gl) != 4:
            raise CommandError("Command Group Length is not a UL")
        if _UL.unpack(gl)[0] != end - 12:
            raise CommandError("Command Group Length does not match the command set")
    return Command(values)


def _uid(value: str) -> bytes:
    raw = value.encode("ascii")
    return raw + b"\x00" if len(raw) % 2 else raw


def _text(value: str) -> bytes:
    raw = value.encode("ascii", "replace")
    return raw + b" " if len(raw) % 2 else raw


def encode(elements: list[tuple[int, bytes]]) -> bytes:
    """A command set from ``[(element, value), ...]`` in ascending order; the group length
    is computed and put first."""
    body = b"".join(_ELEM.pack(0, e, len(v)) + v for e, v in elements)
    return _ELEM.pack(0, GROUP_LENGTH, 4) + _UL.pack(len(body)) + body


def response(
    command_field: int,
    *,
    message_id: int,
    status: int,
    sop_class: str = "",
    sop_instance: str = "",
    comment: str = "",
) -> bytes:
    """A response command set (no dataset) answering ``message_id``."""
    elements: list[tuple[int, bytes]] = []
    if sop_class:
        elements.append((AFFECTED_SOP_CLASS, _uid(sop_class)))
    elements.append((COMMAND_FIELD, _US.pack(command_field)))
    elements.append((MESSAGE_ID_RESPONDED, _US.pack(message_id)))
    elements.append((DATASET_TYPE, _US.pack(NO_DATASET)))
    elements.append((STATUS, _US.pack(status)))
    if comment:
        elements.append((ERROR_COMMENT, _text(comment[:64])))
    if sop_instance:
        elements.append((AFFECTED_SOP_INSTANCE, _uid(sop_instance)))
    return encode(elements)
