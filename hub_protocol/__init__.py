"""The wire contract between edge agents and the cloud hub (both sides import this).

JSON over HTTPS under ``/v1``. See :mod:`hub_protocol.messages` for the envelopes and
:mod:`hub_protocol.hlc` for the hybrid logical clock every mutable record carries.
"""

from hub_protocol.hlc import HLC, HLCError, HybridClock
from hub_protocol.messages import (
    PROTOCOL_VERSIONS,
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
