"""Semantic versions (semver.org 2.0): parsing and ordering, shared by edge and hub."""

from __future__ import annotations

import re

SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)


def parse(version: str) -> tuple[int, int, int, str]:
    """(major, minor, patch, pre-release) for ordering; a release sorts after its
    pre-releases (``1.0.0-rc.1`` < ``1.0.0``). Raises ValueError if not semver."""
    m = SEMVER_RE.match(version)
    if m is None:
        raise ValueError(f"not a semantic version: {version!r}")
    # "~" sorts after every pre-release identifier character, so releases come last.
    return int(m.group(1)), int(m.group(2)), int(m.group(3)), m.group(4) or "~"
