"""The edge agent's error tree, classified by what the caller should do.

::

    EdgeError                      base of everything raised on purpose
    ├── ConfigError                bad configuration: fix the file/env and restart (names the field)
    ├── TransientError             retry later; nothing is wrong with the input
    │   └── OutOfResources         disk below its floor or full (ENOSPC): DICOM status 0xA700
    ├── PermanentError             the input is bad; retrying will not help: tell a person
    │   ├── InvalidInstance        a C-STORE dataset we cannot accept: status 0xC0xx, quarantined
    │   ├── InvalidRequest         a value a person or client sent is not acceptable (HTTP 400)
    │   ├── NotFound               the named record does not exist (HTTP 404)
    │   └── Conflict               the record's state forbids the change (HTTP 409, with a code)
    ├── UntrustedError             reject and alert (tampered model, bad signature; later issues)
    └── StoreError                 the SQLite store itself is unusable (migration, corruption)
"""

from __future__ import annotations

# The root and the three classes come from the contract, so that its errors (an invalid
# manifest, a package failing verification) are EdgeErrors classified like the edge's own.
from hub_protocol.errors import Error as EdgeError
from hub_protocol.errors import PermanentError, TransientError, UntrustedError

__all__ = [
    "ConfigError",
    "Conflict",
    "EdgeError",
    "InvalidInstance",
    "InvalidRequest",
    "NotFound",
    "OutOfResources",
    "PermanentError",
    "StoreError",
    "TransientError",
    "UntrustedError",
]


class ConfigError(EdgeError):
    """A configuration value is invalid.

    ``field`` is the dotted path of the offending setting (``dicom.port``), so the
    operator knows exactly what to fix.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class OutOfResources(TransientError):
    """Storage is below its free-space floor or the filesystem is full."""


class InvalidInstance(PermanentError):
    """A received DICOM instance cannot be accepted.

    ``status`` is the DIMSE failure status to answer with (0xC000 range) and ``reason`` a
    short, human-readable explanation that goes into the Error Comment and the quarantine row.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class InvalidRequest(PermanentError):
    """A value a person or a client sent is not acceptable (names what is wrong)."""


class NotFound(PermanentError):
    """The named record does not exist."""


class Conflict(PermanentError):
    """The record's current state forbids the change; ``code`` names the state
    (``superseded``), so a client can react without parsing the message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class StoreError(EdgeError):
    """The SQLite store cannot be opened, migrated or written."""
