"""The conflict rules live in :mod:`hub_protocol.conflicts` (the hub applies the same ones)."""

from hub_protocol.conflicts import (
    DEFAULT_RULES,
    Outcome,
    Resolution,
    Rule,
    Version,
    is_conflict,
    resolve,
)

__all__ = ["DEFAULT_RULES", "Outcome", "Resolution", "Rule", "Version", "is_conflict", "resolve"]
