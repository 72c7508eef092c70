"""Semantic versions (semver.org 2.0): parsing and ordering, shared by edge and hub."""

from __future__ import annotations

import re

SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*)(?:\.(?:0|[1-9]\d*|\d*[A-Za-z-][0-9A-Za-z-]*))*))?"
    r"(?:\+([0-9A-Za-z-]+(?:\.[0-9A-Za-z-]+)*))?$"
)


#: An identifier of a pre-release, as it orders: numeric ones (0, n, "") before
#: alphanumeric ones (1, 0, text), numbers compared as numbers, text in ASCII order.
Identifier = tuple[int, int, str]
#: (major, minor, patch, 0 = pre-release | 1 = release, pre-release identifiers)
SemverKey = tuple[int, int, int, int, tuple[Identifier, ...]]


def parse(version: str) -> SemverKey:
    """The ordering key of a semantic version (semver.org 2.0, section 11): a release sorts
    after its pre-releases (``1.0.0-rc.1`` < ``1.0.0``); pre-release identifiers compare
    one by one, numeric ones as numbers (``rc.2`` < ``rc.10``) and before alphanumeric ones,
    and a longer list wins when the shorter is its prefix (``alpha`` < ``alpha.1``). Build
    metadata is ignored. Raises ValueError if not semver."""
    m = SEMVER_RE.match(version)
    if m is None:
        raise ValueError(f"not a semantic version: {version!r}")
    major, minor, patch = int(m.group(1)), int(m.group(2)), int(m.group(3))
    if m.group(4) is None:
        return major, minor, patch, 1, ()
    ids = tuple(
        (0, int(part), "") if part.isdigit() else (1, 0, part) for part in m.group(4).split(".")
    )
    return major, minor, patch, 0, ids
