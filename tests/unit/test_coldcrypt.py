"""Cold-file encryption: round trip, key rotation by key id, and every tampering detected."""

from __future__ import annotations

import base64
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edge_agent.errors import ConfigError
from edge_agent.lifecycle import coldcrypt
from edge_agent.lifecycle.coldcrypt import ColdDataError, KeyRing, add_key, decrypt, encrypt


def ring(tmp_path: Path) -> KeyRing:
    path = tmp_path / "keys"
    if not path.exists():
        add_key(path, "k1")
    return KeyRing.load(path)


@given(st.binary(max_size=5000))
def test_round_trip(data: bytes) -> None:
    r = KeyRing({"k": os.urandom(32)}, "k")
    assert decrypt(encrypt(data, r), r) == data


def test_large_file_spans_frames_and_is_compressed(tmp_path: Path) -> None:
    r = ring(tmp_path)
    data = bytes(range(256)) * 20000 + os.urandom(3 * coldcrypt.FRAME)  # > 3 frames
    blob = encrypt(data, r)
    assert decrypt(blob, r) == data
    assert len(encrypt(bytes(5_000_000), r)) < 100_000  # zeros compress


def test_key_file_is_private_and_rotation_keeps_old_files_readable(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    add_key(path, "k1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    old = encrypt(b"old data", KeyRing.load(path))
    add_key(path, "k2")
    r = KeyRing.load(path)
    assert r.active == "k2"
    new = encrypt(b"new data", r)
    assert coldcrypt.key_id_of(new) == "k2" and coldcrypt.key_id_of(old) == "k1"
    assert decrypt(old, r) == b"old data" and decrypt(new, r) == b"new data"
    # without the old key: a clear error naming the missing key
    only_new = KeyRing({"k2": r.keys["k2"]}, "k2")
    with pytest.raises(ColdDataError, match="key 'k1', which is not in the key ring"):
        decrypt(old, only_new)


def test_environment_key_ring_overrides_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    monkeypatch.setenv(coldcrypt.ENV, f"envkey {key}\n")
    r = KeyRing.load(tmp_path / "absent")
    assert r.active == "envkey" and not (tmp_path / "absent").exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "holds no key"),
        ("k1", "expected '<key-id> <base64>'"),
        ("k1 !!!", "not base64"),
        (f"k1 {base64.b64encode(b'short').decode()}", "AES-256 needs 32"),
    ],
)
def test_bad_key_ring_is_a_config_error(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as exc:
        KeyRing.parse(text, where="test")
    assert exc.value.field == "lifecycle.cold_key_file"


def test_every_tampering_fails_authentication(tmp_path: Path) -> None:
    r = ring(tmp_path)
    data = os.urandom(coldcrypt.FRAME + 1000)  # 2 frames (random data does not compress)
    blob = encrypt(data, r)
    header = len(coldcrypt.MAGIC) + 1 + 2 + 8
    flipped = bytearray(blob)
    flipped[header + 100] ^= 1
    with pytest.raises(ColdDataError, match="authentication failed at frame 0"):
        decrypt(bytes(flipped), r)
    with pytest.raises(ColdDataError):
        decrypt(blob[:-20], r)  # truncated inside the last frame
    first_frame_len = int.from_bytes(blob[header : header + 4], "big")
    with pytest.raises(ColdDataError, match="authentication failed"):
        decrypt(blob[: header + 4 + first_frame_len], r)  # last frame dropped
    other = encrypt(data, r)  # same key, another file: frames cannot be swapped in
    swapped = blob[: header + 4 + first_frame_len] + other[header + 4 + first_frame_len :]
    with pytest.raises(ColdDataError):
        decrypt(swapped, r)
    with pytest.raises(ColdDataError, match="bad magic"):
        decrypt(b"DICM" + blob, r)
