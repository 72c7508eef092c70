"""Records and the push/pull messages, with strict parsing (bad input -> ProtocolError).

Push: the edge sends a :class:`PushBatch` of :class:`Record` s; the hub applies each
``(site, key)`` at most once and answers a :class:`PushReceipt`: one :class:`Receipt` per
record and its high-water seq per lane (the highest seq of that lane it holds with every
lower one of the lane also held). After any error the edge asks for the high-water marks
instead of trusting its own memory.

Pull: the hub keeps a change feed per site (edits made at the hub, conflict outcomes, model
assignments and rollback orders); the edge asks for the :class:`Change` s after its cursor and
gets a :class:`ChangePage`. Each change has a :class:`ChangeType`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, TypeVar

from hub_protocol.hlc import HLC, HLCError

#: Protocol versions this code speaks, newest first.
PROTOCOL_VERSIONS: tuple[int, ...] = (1,)
MAX_KEY_LENGTH = 200
#: "<kind>/<id>", e.g. result/0192f4c3-...; no "..", no leading "/", so never a path.
_KEY = re.compile(r"^[a-z_]{1,32}/[A-Za-z0-9._:-]{1,160}$")
_E = TypeVar("_E", bound=StrEnum)


class ProtocolError(ValueError):
    """A message that does not follow the contract (permanent: do not resend as is)."""


class Lane(StrEnum):
    """Priority lanes, drained in this order."""

    URGENT = "urgent"
    NORMAL = "normal"
    BATCH = "batch"

    @property
    def rank(self) -> int:
        return _LANE_RANK[self]


_LANE_RANK = {Lane.URGENT: 0, Lane.NORMAL: 1, Lane.BATCH: 2}


class RecordType(StrEnum):
    RESULT = "result"
    REVIEW = "review"
    HEARTBEAT = "heartbeat"
    TOMBSTONE = "tombstone"
    STUDY_METADATA = "study_metadata"
    PATIENT_DATA = "patient_data"
    USER_PREFERENCES = "user_preferences"
    SYSTEM_CONFIG = "system_config"
    CONFLICT_RESOLUTION = "conflict_resolution"


class ReceiptStatus(StrEnum):
    APPLIED = "applied"  # new at the hub
    DUPLICATE = "duplicate"  # the hub already had this (site, key, seq): safe resend
    CONFLICT = "conflict"  # applied through the conflict rules (see the change feed)
    REJECTED = "rejected"  # permanent: dead-letter it, with ``error``


class ChangeType(StrEnum):
    """What a change-feed entry tells the site."""

    RECORD = "record"  # a record's value, changed at the hub or by a conflict rule
    CONFLICT_RESOLUTION = "conflict_resolution"  # a person decided a queued conflict
    MODEL_ASSIGNMENT = "model_assignment"  # install (or shadow) a published release
    MODEL_ROLLBACK = "model_rollback"  # re-activate the version installed before this one


def negotiate_version(offered: Sequence[int], supported: Sequence[int] = PROTOCOL_VERSIONS) -> int:
    """The highest version both sides speak; ProtocolError if none."""
    common = set(offered) & set(supported)
    if not common:
        raise ProtocolError(
            f"no common protocol version (offered {sorted(offered)}, supported {sorted(supported)})"
        )
    return max(common)


def _need(obj: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    if name not in obj:
        raise ProtocolError(f"missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise ProtocolError(f"field {name!r} has the wrong type")
    return value


def _need_enum(obj: Mapping[str, Any], name: str, kind: type[_E]) -> _E:
    try:
        return kind(_need(obj, name, str))
    except ValueError as exc:
        raise ProtocolError(str(exc)) from exc


@dataclass(frozen=True, kw_only=True)
class Record:
    """One change from the edge: ``key`` names the thing (``result/<uuid>``), ``seq`` its
    position in its lane (1, 2, 3, ... per site and lane, without gaps, so the hub can tell
    what it holds), ``base_version`` the hub version the change was based on (0 = new)."""

    key: str
    seq: int
    type: RecordType
    lane: Lane
    hlc: HLC
    base_version: int
    payload: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "seq": self.seq,
            "type": self.type.value,
            "lane": self.lane.value,
            "hlc": self.hlc.encode(),
            "base_version": self.base_version,
            "payload": dict(self.payload),
        }

    @classmethod
    def from_json(cls, obj: Any) -> Record:
        if not isinstance(obj, dict):
            raise ProtocolError("record must be an object")
        key = _need(obj, "key", str)
        if not _KEY.match(key) or ".." in key:
            raise ProtocolError(f"bad record key {key[:60]!r}")
        seq = _need(obj, "seq", int)
        base = _need(obj, "base_version", int)
        if seq < 1 or base < 0:
            raise ProtocolError("seq must be >= 1 and base_version >= 0")
        try:
            rtype = RecordType(_need(obj, "type", str))
            lane = Lane(_need(obj, "lane", str))
            hlc = HLC.decode(_need(obj, "hlc", str))
        except (ValueError, HLCError) as exc:
            raise ProtocolError(str(exc)) from exc
        payload = _need(obj, "payload", dict)
        return cls(
            key=key, seq=seq, type=rtype, lane=lane, hlc=hlc, base_version=base, payload=payload
        )


@dataclass(frozen=True, kw_only=True)
class PushBatch:
    protocol: int
    site_id: str
    records: tuple[Record, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "protocol": self.protocol,
            "site_id": self.site_id,
            "records": [r.to_json() for r in self.records],
        }

    def encode(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, obj: Any) -> PushBatch:
        if not isinstance(obj, dict):
            raise ProtocolError("batch must be an object")
        protocol = _need(obj, "protocol", int)
        negotiate_version([protocol])
        records = _need(obj, "records", list)
        parsed = tuple(Record.from_json(r) for r in records)
        seqs = [(r.lane, r.seq) for r in parsed]
        if len(set(seqs)) != len(seqs):
            raise ProtocolError("duplicate (lane, seq) in one batch")
        return cls(protocol=protocol, site_id=_need(obj, "site_id", str), records=parsed)


@dataclass(frozen=True, kw_only=True)
class Receipt:
    key: str
    seq: int
    status: ReceiptStatus
    version: int = 0
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "key": self.key,
            "seq": self.seq,
            "status": self.status.value,
            "version": self.version,
        }
        if self.error:
            out["error"] = self.error
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Receipt:
        if not isinstance(obj, dict):
            raise ProtocolError("receipt must be an object")
        return cls(
            key=_need(obj, "key", str),
            seq=_need(obj, "seq", int),
            status=_need_enum(obj, "status", ReceiptStatus),
            version=int(obj.get("version", 0)),
            error=str(obj.get("error", "")),
        )


@dataclass(frozen=True, kw_only=True)
class PushReceipt:
    receipts: tuple[Receipt, ...]
    high_water: Mapping[Lane, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "receipts": [r.to_json() for r in self.receipts],
            "high_water": {lane.value: seq for lane, seq in self.high_water.items()},
        }

    @classmethod
    def from_json(cls, obj: Any) -> PushReceipt:
        if not isinstance(obj, dict):
            raise ProtocolError("push receipt must be an object")
        hw = _need(obj, "high_water", dict)
        try:
            high_water = {Lane(k): int(v) for k, v in hw.items()}
        except (ValueError, TypeError) as exc:
            raise ProtocolError(f"bad high_water: {exc}") from exc
        return cls(
            receipts=tuple(Receipt.from_json(r) for r in _need(obj, "receipts", list)),
            high_water=high_water,
        )


@dataclass(frozen=True, kw_only=True)
class Change:
    """One entry of a site's change feed. ``cursor`` is its position (it only grows),
    ``version`` the version of ``key`` it carries; ``payload`` depends on ``type`` (for
    records and conflict resolutions the new value is under ``value``)."""

    cursor: int
    type: ChangeType
    key: str
    version: int
    payload: Mapping[str, Any]
    site_id: str = ""
    created_at: float = 0.0

    @property
    def value(self) -> Any:
        """The value the change carries: ``payload["value"]``, else the whole payload."""
        return self.payload.get("value", self.payload)

    def to_json(self) -> dict[str, Any]:
        return {
            "cursor": self.cursor,
            "site_id": self.site_id,
            "type": self.type.value,
            "key": self.key,
            "version": self.version,
            "payload": dict(self.payload),
            "created_at": self.created_at,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Change:
        if not isinstance(obj, dict):
            raise ProtocolError("change must be an object")
        return cls(
            cursor=_need(obj, "cursor", int),
            type=_need_enum(obj, "type", ChangeType),
            key=_need(obj, "key", str),
            version=_need(obj, "version", int),
            payload=_need(obj, "payload", dict),
            site_id=str(obj.get("site_id", "")),
            created_at=float(obj.get("created_at", 0.0)),
        )


@dataclass(frozen=True, kw_only=True)
class ChangePage:
    """The answer to a pull: the next changes after a cursor, and the cursor to ask from
    next time (the last change's, or the one asked from when there are none)."""

    changes: tuple[Change, ...]
    next_cursor: int

    def to_json(self) -> dict[str, Any]:
        return {"changes": [c.to_json() for c in self.changes], "next_cursor": self.next_cursor}

    @classmethod
    def from_json(cls, obj: Any) -> ChangePage:
        if not isinstance(obj, dict):
            raise ProtocolError("change page must be an object")
        return cls(
            changes=tuple(Change.from_json(c) for c in _need(obj, "changes", list)),
            next_cursor=_need(obj, "next_cursor", int),
        )
