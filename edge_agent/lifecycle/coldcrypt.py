"""Cold-tier files: compressed (zlib) and encrypted (AES-256-GCM), in authenticated frames.

Format (all integers big-endian)::

    b"EDGECOLD1\\n"  | key-id length (1 byte) | key id (ASCII) | nonce prefix (8 random bytes)
    frames: ciphertext length (4 bytes) | ciphertext (plaintext <= 1 MiB, + 16-byte GCM tag)

Frame ``i`` is sealed with nonce = prefix || i (4 bytes), and its associated data is the
whole header, ``i`` and a last-frame flag, so frames cannot be reordered, dropped, truncated
or moved to another file without failing authentication. The plaintext is the zlib stream of
the original file. The key id in the header names the key in the key ring, so keys can be
rotated: new files use the ring's active (last) key; older files stay readable with theirs.

Key ring: a text file (``lifecycle.cold_key_file``, mode 0600) or the ``EDGE_COLD_KEYS``
environment variable, one ``<key-id> <base64 of 32 bytes>`` per line; the last line is the
active key. Without its key, cold data (and the site's archive at the hub, which holds the
same encrypted bytes) cannot be read: back the key file up apart from the data.
"""

from __future__ import annotations

import base64
import os
import re
import secrets
import zlib
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from edge_agent.errors import ConfigError, UntrustedError

MAGIC = b"EDGECOLD1\n"
FRAME = 1 << 20
ENV = "EDGE_COLD_KEYS"
_KEY_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


class ColdDataError(UntrustedError):
    """A cold file cannot be decrypted: tampered, truncated, or its key is not in the ring."""


@dataclass(frozen=True)
class KeyRing:
    keys: dict[str, bytes]
    active: str

    @classmethod
    def parse(cls, text: str, *, where: str) -> KeyRing:
        keys: dict[str, bytes] = {}
        active = ""
        for n, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 2 or not _KEY_ID.fullmatch(parts[0]):
                raise ConfigError(
                    "lifecycle.cold_key_file", f"{where} line {n}: expected '<key-id> <base64>'"
                )
            try:
                raw = base64.b64decode(parts[1], validate=True)
            except ValueError as exc:
                raise ConfigError(
                    "lifecycle.cold_key_file", f"{where} line {n}: not base64"
                ) from exc
            if len(raw) != 32:
                raise ConfigError(
                    "lifecycle.cold_key_file",
                    f"{where} line {n}: key {parts[0]} is {len(raw)} bytes, AES-256 needs 32",
                )
            keys[parts[0]] = raw
            active = parts[0]
        if not keys:
            raise ConfigError("lifecycle.cold_key_file", f"{where} holds no key")
        return cls(keys, active)

    @classmethod
    def load(cls, path: Path, *, create: bool = False) -> KeyRing:
        """From ``$EDGE_COLD_KEYS`` if set, else ``path`` (created with one fresh key if
        ``create`` and absent)."""
        env = os.environ.get(ENV)
        if env:
            return cls.parse(env, where=f"${ENV}")
        if not path.exists():
            if not create:
                raise ConfigError("lifecycle.cold_key_file", f"{path} does not exist")
            add_key(path)
        return cls.parse(path.read_text(), where=str(path))


def add_key(path: Path, key_id: str | None = None) -> str:
    """Append a fresh random key to the ring at ``path`` (created 0600); it becomes the
    active key for new cold files. Returns its id."""
    existing = path.read_text() if path.exists() else ""
    n = sum(1 for ln in existing.splitlines() if ln.split("#", 1)[0].strip())
    key_id = key_id or f"k{n + 1}-{secrets.token_hex(4)}"
    if not _KEY_ID.fullmatch(key_id):
        raise ValueError(f"bad key id {key_id!r}")
    line = f"{key_id} {base64.b64encode(secrets.token_bytes(32)).decode()}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    return key_id


def _header(key_id: str, prefix: bytes) -> bytes:
    kid = key_id.encode("ascii")
    return MAGIC + bytes([len(kid)]) + kid + prefix


def _aad(header: bytes, index: int, last: bool) -> bytes:
    return header + index.to_bytes(4, "big") + (b"\x01" if last else b"\x00")


def encrypt(data: bytes, ring: KeyRing, *, level: int = 1) -> bytes:
    """The cold-file bytes for ``data`` (compressed, then sealed with the active key)."""
    plain = zlib.compress(data, level)
    prefix = secrets.token_bytes(8)
    header = _header(ring.active, prefix)
    aes = AESGCM(ring.keys[ring.active])
    out = [header]
    frames = [plain[i : i + FRAME] for i in range(0, len(plain), FRAME)] or [b""]
    for i, chunk in enumerate(frames):
        sealed = aes.encrypt(
            prefix + i.to_bytes(4, "big"), chunk, _aad(header, i, i == len(frames) - 1)
        )
        out.append(len(sealed).to_bytes(4, "big"))
        out.append(sealed)
    return b"".join(out)


def key_id_of(blob: bytes) -> str:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 1:
        raise ColdDataError("not a cold-tier file (bad magic)")
    n = blob[len(MAGIC)]
    return blob[len(MAGIC) + 1 : len(MAGIC) + 1 + n].decode("ascii", "replace")


def decrypt(blob: bytes, ring: KeyRing, *, what: str = "cold file") -> bytes:
    """The original bytes; :class:`ColdDataError` with the reason if anything is wrong."""
    key_id = key_id_of(blob)
    key = ring.keys.get(key_id)
    if key is None:
        raise ColdDataError(
            f"{what}: encrypted with key {key_id!r}, which is not in the key ring "
            f"({', '.join(sorted(ring.keys))})"
        )
    hlen = len(MAGIC) + 1 + len(key_id.encode()) + 8
    header, prefix = blob[:hlen], blob[hlen - 8 : hlen]
    aes = AESGCM(key)
    pos, index, plain = hlen, 0, []
    while pos < len(blob):
        if pos + 4 > len(blob):
            raise ColdDataError(f"{what}: truncated frame header")
        size = int.from_bytes(blob[pos : pos + 4], "big")
        sealed = blob[pos + 4 : pos + 4 + size]
        if len(sealed) != size:
            raise ColdDataError(f"{what}: truncated (frame {index})")
        pos += 4 + size
        last = pos == len(blob)
        try:
            plain.append(
                aes.decrypt(prefix + index.to_bytes(4, "big"), sealed, _aad(header, index, last))
            )
        except InvalidTag as exc:
            raise ColdDataError(
                f"{what}: authentication failed at frame {index} (tampered, truncated or "
                f"wrong key {key_id!r})"
            ) from exc
        index += 1
    if index == 0:
        raise ColdDataError(f"{what}: no data frames")
    try:
        return zlib.decompress(b"".join(plain))
    except zlib.error as exc:  # authenticated but not ours: a bug, not an attack
        raise ColdDataError(f"{what}: decompression failed: {exc}") from exc
