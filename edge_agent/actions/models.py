"""The data types of the study actions."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Actor:
    """Who asked for an action, as the audit log records it: a web user (with the request's
    remote address and id) or a command-line user (``cli:<login>``)."""

    username: str
    remote: str
    request_id: str

    @classmethod
    def cli(cls) -> Actor:
        """The person running an ``edge-agent`` command."""
        return cls(
            username=f"cli:{os.environ.get('USER', '?')}",
            remote="cli",
            request_id=uuid.uuid4().hex,
        )
