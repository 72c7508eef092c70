"""The wire contract between edge agents and the cloud hub (both sides import this).

JSON over HTTPS under ``/v1``. See :mod:`hub_protocol.messages` for the envelopes and
:mod:`hub_protocol.hlc` for the hybrid logical clock every mutable record carries. The
rest of the contract: :mod:`hub_protocol.conflicts` (the conflict rules both sides apply),
:mod:`hub_protocol.releases` (signed model releases), :mod:`hub_protocol.manifest` and
:mod:`hub_protocol.package` (what a model package holds and how it is verified).
"""

from hub_protocol.hlc import HLC, HLCError, HybridClock
from hub_protocol.messages import (
    PROTOCOL_VERSIONS,
    Change,
    ChangePage,
    ChangeType,
    Lane,
    ProtocolError,
    PushBatch,
    PushReceipt,
    Receipt,
    ReceiptStatus,
    Record,
    RecordType,
    negotiate_version,
)

__all__ = [
    "HLC",
    "PROTOCOL_VERSIONS",
    "Change",
    "ChangePage",
    "ChangeType",
    "HLCError",
    "HybridClock",
    "Lane",
    "ProtocolError",
    "PushBatch",
    "PushReceipt",
    "Receipt",
    "ReceiptStatus",
    "Record",
    "RecordType",
    "negotiate_version",
]
