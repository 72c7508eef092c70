"""Strict structural check of a received dataset and extraction of the attributes we index.

:func:`inspect_dataset` walks the encoded dataset exactly as received (no pixel decoding):
every element header must be complete, every defined length must fit in what remains,
every undefined-length sequence, item and encapsulated pixel data must be closed by its
delimiter, and the walk must end exactly at the end of the bytes. This catches truncated
transfers and garbage that a lenient parser would accept. While walking it keeps the raw
bytes of the few top-level attributes we index, then decodes those with pydicom's character
set rules.

Raises :class:`InvalidInstance` with a 0xC0xx status and a reason a person can act on.
"""

from __future__ import annotations

import functools
import re
import struct
import zlib
from dataclasses import dataclass
from typing import Any

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR
from pydicom.uid import UID
from pydicom.valuerep import PersonName

from edge_agent.errors import InvalidInstance

# DIMSE statuses we answer with (PS3.4 Annex B: 0xCxxx = "Cannot understand").
STATUS_CANNOT_PARSE = 0xC000
STATUS_MISSING_ATTRIBUTE = 0xC001
STATUS_INVALID_UID = 0xC002
STATUS_UID_MISMATCH = 0xC003
STATUS_SOP_CLASS_MISMATCH = 0xA900  # "Data Set does not match SOP Class"

MAX_DEPTH = 32
MAX_INFLATED_BYTES = 64 * 1024**2  # default: a deflated dataset may not inflate past 64 MiB

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
_PIXEL_DATA = 0x7FE00010
_ITEM = 0xFFFEE000
_ITEM_DELIM = 0xFFFEE00D
_SEQ_DELIM = 0xFFFEE0DD

# The top-level attributes we index, by tag.
_CHARSET = 0x00080005
_SOP_CLASS = 0x00080016
_SOP_INSTANCE = 0x00080018
_STUDY_DATE = 0x00080020
_ACCESSION = 0x00080050
_MODALITY = 0x00080060
_STUDY_DESC = 0x00081030
_SERIES_DESC = 0x0008103E
_PATIENT_NAME = 0x00100010
_PATIENT_ID = 0x00100020
_BODY_PART = 0x00180015
_STUDY_UID = 0x0020000D
_SERIES_UID = 0x0020000E
_SERIES_NUMBER = 0x00200011
_INSTANCE_NUMBER = 0x00200013
_STUDY_INSTANCES = 0x00201208
_WANTED = frozenset(
    {
        _CHARSET,
        _SOP_CLASS,
        _SOP_INSTANCE,
        _STUDY_DATE,
        _ACCESSION,
        _MODALITY,
        _STUDY_DESC,
        _SERIES_DESC,
        _PATIENT_NAME,
        _PATIENT_ID,
        _BODY_PART,
        _STUDY_UID,
        _SERIES_UID,
        _SERIES_NUMBER,
        _INSTANCE_NUMBER,
        _STUDY_INSTANCES,
    }
)


@dataclass(frozen=True, kw_only=True)
class InstanceInfo:
    """What we index about one received instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_uid: str
    series_uid: str
    transfer_syntax: str
    modality: str = ""
    patient_id: str = ""
    patient_name: str = ""
    study_date: str = ""
    accession_number: str = ""
    study_description: str = ""
    series_description: str = ""
    series_number: str = ""
    instance_number: str = ""
    body_part: str = ""
    expected_study_instances: int | None = None


class _Truncated(Exception):
    pass


#: Every VR of PS3.5 6.2 (an explicit VR outside it cannot be read back)
_KNOWN_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL "
    b"UN UR US UT UV".split()
)
#: value length must be a multiple of this (pydicom refuses to convert the value otherwise)
_VR_UNIT = {
    b"US": 2, b"SS": 2, b"OW": 2, b"UL": 4, b"SL": 4, b"FL": 4, b"AT": 4, b"OF": 4,
    b"OL": 4, b"FD": 8, b"SV": 8, b"UV": 8, b"OD": 8, b"OV": 8,
}  # fmt: skip


@functools.lru_cache(maxsize=4096)
def _dictionary_unit(tag: int) -> int:
    """The value size unit of ``tag``'s dictionary VR (implicit VR data), 0 if variable or
    unknown; for an ambiguous VR ("US or SS") the unit they share."""
    try:
        vrs = {v.strip().encode() for v in dictionary_VR(tag).split(" or ")}
    except KeyError:
        return 0
    units = {_VR_UNIT.get(v, 0) for v in vrs}
    return units.pop() if len(units) == 1 else 0


@functools.lru_cache(maxsize=4096)
def _dictionary_sq(tag: int) -> bool:
    """True if the data dictionary says ``tag`` is a sequence (pydicom reads a defined-length
    implicit VR element, or an explicit UN, of such a tag as one, so we must walk it)."""
    try:
        return bool(dictionary_VR(tag) == "SQ")
    except KeyError:
        return False


class _Walker:
    """Walks an encoded dataset; see the module docstring."""

    def __init__(
        self, buf: Any, *, little: bool, implicit: bool, max_depth: int = MAX_DEPTH
    ) -> None:
        self.buf = buf
        self.found: dict[int, bytes] = {}
        self._little = little
        self._implicit = implicit
        self._max_depth = max_depth
        e = "<" if little else ">"
        self._hh = struct.Struct(e + "HH")
        self._h = struct.Struct(e + "H")
        self._i = struct.Struct(e + "I")

    def dataset(self, start: int, end: int) -> None:
        pos = self._elements(start, end, depth=0, in_item=False)
        if pos != end:  # pragma: no cover - _elements consumes to `end` or raises
            raise _Truncated(f"{end - pos} trailing bytes")

    def _elements(self, pos: int, end: int, *, depth: int, in_item: bool) -> int:
        buf = self.buf
        implicit = self._implicit
        while pos < end:
            if end - pos < 8:
                raise _Truncated(f"element header at byte {pos} is cut short")
            group, elem = self._hh.unpack_from(buf, pos)
            tag = (group << 16) | elem
            if group == 0xFFFE:
                if in_item and tag == _ITEM_DELIM:
                    return pos + 8
                raise _Truncated(f"unexpected delimiter ({group:04X},{elem:04X}) at byte {pos}")
            if implicit:
                vr = b""
                length = self._i.unpack_from(buf, pos + 4)[0]
                pos += 8
            else:
                vr = bytes(buf[pos + 4 : pos + 6])
                if vr not in _KNOWN_VRS:
                    raise _Truncated(
                        f"invalid VR {vr!r} for ({group:04X},{elem:04X}) at byte {pos}"
                    )
                if vr in _LONG_VRS:
                    if end - pos < 12:
                        raise _Truncated(f"element header at byte {pos} is cut short")
                    length = self._i.unpack_from(buf, pos + 8)[0]
                    pos += 12
                else:
                    length = self._h.unpack_from(buf, pos + 6)[0]
                    pos += 8
            if length == 0xFFFFFFFF:
                if depth >= self._max_depth:
                    raise _Truncated(f"sequences nested deeper than {self._max_depth}")
                if tag == _PIXEL_DATA and depth == 0:
                    pos = self._fragments(pos, end)
                elif implicit or vr == b"SQ":
                    pos = self._sequence(pos, end, depth=depth + 1)
                elif vr == b"UN":
                    # PS3.5 6.2.2: undefined-length UN holds implicit VR little endian data.
                    sub = _Walker(buf, little=True, implicit=True, max_depth=self._max_depth)
                    pos = sub._sequence(pos, end, depth=depth + 1)
                else:
                    raise _Truncated(f"undefined length on ({group:04X},{elem:04X}) VR {vr!r}")
                continue
            if length > end - pos:
                raise _Truncated(
                    f"({group:04X},{elem:04X}) declares {length} bytes but only {end - pos} remain"
                )
            if vr == b"SQ" or (
                (implicit or vr == b"UN") and group & 1 == 0 and _dictionary_sq(tag)
            ):
                # a defined-length sequence: its items are read back too, so walk them
                if depth >= self._max_depth:
                    raise _Truncated(f"sequences nested deeper than {self._max_depth}")
                walker = self
                if vr == b"UN" and not implicit:
                    walker = _Walker(buf, little=True, implicit=True, max_depth=self._max_depth)
                walker._sequence(pos, pos + length, depth=depth + 1, defined=True)
            else:
                unit = (
                    _VR_UNIT.get(vr, 0) if vr else (_dictionary_unit(tag) if group & 1 == 0 else 0)
                )
                if unit and length % unit:
                    raise _Truncated(
                        f"({group:04X},{elem:04X}) has {length} bytes, not a multiple of its "
                        f"value size {unit}"
                    )
                if depth == 0 and tag in _WANTED:
                    self.found[tag] = bytes(buf[pos : pos + length])
            pos += length
        if in_item:
            raise _Truncated("item without its delimiter (data ends inside a sequence)")
        return pos

    def _sequence(self, pos: int, end: int, *, depth: int, defined: bool = False) -> int:
        """Items up to the sequence delimiter, or (``defined``) exactly up to ``end``."""
        while True:
            if defined and pos == end:
                return pos
            if end - pos < 8:
                raise _Truncated("sequence without its delimiter (data ends inside a sequence)")
            group, elem = self._hh.unpack_from(self.buf, pos)
            tag = (group << 16) | elem
            length = self._i.unpack_from(self.buf, pos + 4)[0]
            pos += 8
            if tag == _SEQ_DELIM and not defined:
                return pos
            if tag != _ITEM:
                raise _Truncated(f"expected an item, found ({group:04X},{elem:04X}) at {pos - 8}")
            if length == 0xFFFFFFFF:
                pos = self._elements(pos, end, depth=depth, in_item=True)
            elif length > end - pos:
                raise _Truncated(f"item declares {length} bytes but only {end - pos} remain")
            else:
                self._elements(pos, pos + length, depth=depth, in_item=False)
                pos += length

    def _fragments(self, pos: int, end: int) -> int:
        while True:
            if end - pos < 8:
                raise _Truncated("encapsulated pixel data without its sequence delimiter")
            group, elem = self._hh.unpack_from(self.buf, pos)
            tag = (group << 16) | elem
            length = self._i.unpack_from(self.buf, pos + 4)[0]
            pos += 8
            if tag == _SEQ_DELIM:
                return pos
            if tag != _ITEM or length == 0xFFFFFFFF:
                raise _Truncated(f"bad pixel data fragment ({group:04X},{elem:04X}) at {pos - 8}")
            if length > end - pos:
                raise _Truncated(
                    f"pixel data fragment declares {length} bytes but only {end - pos} remain"
                )
            pos += length


def _inflate(data: Any, limit: int) -> bytes:
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = d.decompress(data, limit)
    except zlib.error as exc:
        raise InvalidInstance(
            STATUS_CANNOT_PARSE, f"deflated dataset cannot be inflated: {exc}"
        ) from exc
    if d.unconsumed_tail:
        raise InvalidInstance(STATUS_CANNOT_PARSE, "deflated dataset inflates past the size limit")
    if not d.eof:
        raise InvalidInstance(STATUS_CANNOT_PARSE, "deflated dataset is truncated")
    return out


def inspect_dataset(
    data: Any,
    transfer_syntax: str,
    *,
    expected_sop_class: str | None = None,
    expected_sop_instance: str | None = None,
    offset: int = 0,
    size: int | None = None,
    max_depth: int = MAX_DEPTH,
    max_inflated_bytes: int = MAX_INFLATED_BYTES,
) -> InstanceInfo:
    """Check ``data[offset:offset + size]`` (a dataset encoded in ``transfer_syntax``, without
    file meta; ``data`` is ``bytes`` or any buffer, e.g. an ``mmap`` of a spill file) and
    return its indexed attributes.

    ``expected_sop_*``: the Affected SOP Class/Instance UID of the C-STORE request; the dataset
    must agree. ``max_depth``: deepest sequence nesting accepted; ``max_inflated_bytes``: the
    most a deflated dataset may inflate to. Raises :class:`InvalidInstance` (status + reason)
    on any problem.
    """
    ts = UID(transfer_syntax)
    try:
        deflated = ts.is_deflated
        implicit = ts.is_implicit_VR
        little = ts.is_little_endian
    except ValueError:  # private/unknown syntaxes are encapsulated explicit VR little endian
        deflated, implicit, little = False, False, True
    end = len(data) if size is None else offset + size
    if deflated:
        buf = _inflate(memoryview(data)[offset:end], max_inflated_bytes)
        start, end = 0, len(buf)
    else:
        buf, start = data, offset
    if end <= start:
        raise InvalidInstance(STATUS_CANNOT_PARSE, "empty dataset")
    walker = _Walker(buf, little=little, implicit=implicit, max_depth=max_depth)
    try:
        walker.dataset(start, end)
    except _Truncated as exc:
        raise InvalidInstance(
            STATUS_CANNOT_PARSE, f"malformed or truncated dataset: {exc}"
        ) from None
    except struct.error as exc:  # pragma: no cover - bounds are checked before every unpack
        raise InvalidInstance(STATUS_CANNOT_PARSE, f"malformed dataset: {exc}") from None
    f = walker.found
    try:
        encodings = convert_encodings(_charset(f.get(_CHARSET, b"")))
    except (KeyError, ValueError, LookupError):
        # an unknown or corrupt Specific Character Set: index what we can with the default
        # repertoire rather than refuse an otherwise valid instance
        encodings = convert_encodings([""])

    def text(tag: int) -> str:
        raw = f.get(tag)
        if not raw:
            return ""
        return decode_bytes(raw, encodings, set()).rstrip(" \x00").strip()

    def uid(tag: int, name: str) -> str:
        raw = f.get(tag)
        value = raw.decode("ascii", "replace").rstrip("\x00 ").strip() if raw else ""
        if not value:
            raise InvalidInstance(STATUS_MISSING_ATTRIBUTE, f"missing {name}")
        if len(value) > 64 or not _UID_RE.match(value):
            raise InvalidInstance(STATUS_INVALID_UID, f"malformed {name} {value[:80]!r}")
        return value

    sop_class = uid(_SOP_CLASS, "SOP Class UID (0008,0016)")
    sop_instance = uid(_SOP_INSTANCE, "SOP Instance UID (0008,0018)")
    study_uid = uid(_STUDY_UID, "Study Instance UID (0020,000D)")
    series_uid = uid(_SERIES_UID, "Series Instance UID (0020,000E)")
    if expected_sop_instance is not None and expected_sop_instance.strip("\x00 ") != sop_instance:
        raise InvalidInstance(
            STATUS_UID_MISMATCH,
            f"SOP Instance UID in dataset ({sop_instance}) differs from the C-STORE request "
            f"({expected_sop_instance})",
        )
    if expected_sop_class is not None and expected_sop_class.strip("\x00 ") != sop_class:
        raise InvalidInstance(
            STATUS_SOP_CLASS_MISMATCH,
            f"SOP Class UID in dataset ({sop_class}) differs from the C-STORE request "
            f"({expected_sop_class})",
        )
    raw_name = f.get(_PATIENT_NAME)
    patient_name = ""
    if raw_name:
        patient_name = str(PersonName(raw_name.rstrip(b" \x00"), encodings)).strip()
    expected: int | None = None
    count = text(_STUDY_INSTANCES)
    if count and len(count) <= 12:  # IS: at most 12 characters; anything else is ignored
        try:
            n = int(count)
        except ValueError:
            n = 0
        expected = n if 0 < n < 2**31 else None
    return InstanceInfo(
        sop_class_uid=sop_class,
        sop_instance_uid=sop_instance,
        study_uid=study_uid,
        series_uid=series_uid,
        transfer_syntax=str(ts),
        modality=text(_MODALITY).upper(),
        patient_id=text(_PATIENT_ID),
        patient_name=patient_name,
        study_date=text(_STUDY_DATE),
        accession_number=text(_ACCESSION),
        study_description=text(_STUDY_DESC),
        series_description=text(_SERIES_DESC),
        series_number=text(_SERIES_NUMBER),
        instance_number=text(_INSTANCE_NUMBER),
        body_part=text(_BODY_PART).upper(),
        expected_study_instances=expected,
    )


def _charset(raw: bytes) -> list[str]:
    values = raw.decode("ascii", "replace").rstrip("\x00 ").split("\\")
    return [v.strip() for v in values] or [""]
