"""PHI leaving the site: replaced by keyed pseudonyms (HMAC-SHA-256 with a site secret).

The same identifier always maps to the same pseudonym at one site (so the hub can group a
patient's studies), cannot be reversed without the site's key, and differs between sites.
The key is created on first use (32 random bytes, file mode 0600) and never leaves the site.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

DEFAULT_FIELDS = ("patient_id", "patient_name", "patient_birth_date", "accession_number")
PREFIX = "pseudo:"


def load_or_create_key(path: Path) -> bytes:
    """The site secret at ``path``, created (0600, fsynced) if missing."""
    if path.exists():
        key = path.read_bytes()
        if len(key) < 32:
            raise ValueError(f"site secret {path} is shorter than 32 bytes")
        return key
    path.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_bytes(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, key)
        os.fsync(fd)
    finally:
        os.close(fd)
    return key


class Pseudonymiser:
    def __init__(self, key: bytes, fields: Iterable[str] = DEFAULT_FIELDS) -> None:
        self._key = key
        self.fields = frozenset(fields)

    def pseudonym(self, value: str) -> str:
        digest = hmac.new(self._key, value.encode("utf-8"), hashlib.sha256).hexdigest()
        return PREFIX + digest[:32]

    def apply(self, payload: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``payload`` with every configured field (at any depth) pseudonymised;
        empty values stay empty."""
        out: dict[str, Any] = {}
        for k, v in payload.items():
            if k in self.fields and isinstance(v, str) and v:
                out[k] = self.pseudonym(v)
            elif isinstance(v, Mapping):
                out[k] = self.apply(v)
            elif isinstance(v, list):
                out[k] = [self.apply(x) if isinstance(x, Mapping) else x for x in v]
            else:
                out[k] = v
        return out
