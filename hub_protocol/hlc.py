"""Hybrid logical clock (Kulkarni et al.): wall time plus a counter, never going backwards.

A timestamp is (physical ms, logical counter, node id). ``now()`` is taken for a local event
or a send; ``observe(remote)`` merges a received timestamp. The result is always strictly
greater than every timestamp this clock produced or observed, whatever the wall clock does
(NTP steps back, a VM resumes with an old time): ordering by HLC is safe across sites whose
wall clocks drift. Encoded as a fixed-width string that sorts like the tuple.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

_ENCODED = re.compile(r"^(\d{15})-(\d{6})-([A-Za-z0-9._-]{1,64})$")
MAX_COUNTER = 999_999


class HLCError(ValueError):
    """A malformed HLC string, or a remote timestamp too far ahead of our wall clock."""


@dataclass(frozen=True, order=True)
class HLC:
    """One timestamp; compares as (ms, counter, node)."""

    ms: int
    counter: int
    node: str

    def encode(self) -> str:
        return f"{self.ms:015d}-{self.counter:06d}-{self.node}"

    @classmethod
    def decode(cls, text: str) -> HLC:
        m = _ENCODED.match(text)
        if m is None:
            raise HLCError(f"not an HLC timestamp: {text!r}")
        return cls(int(m.group(1)), int(m.group(2)), m.group(3))

    def __str__(self) -> str:
        return self.encode()


class HybridClock:
    """Thread-safe HLC for one node. ``wall`` returns epoch seconds (inject for tests).

    ``max_drift_s``: a remote timestamp more than this far ahead of our wall clock is refused
    (HLCError) instead of dragging every later timestamp into the future.
    """

    def __init__(
        self,
        node: str,
        wall: Callable[[], float] = time.time,
        max_drift_s: float = 300.0,
        last: HLC | None = None,
    ) -> None:
        if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", node):
            raise HLCError(f"bad node id {node!r}")
        self.node = node
        self._wall = wall
        self._max_drift_ms = int(max_drift_s * 1000)
        self._last = last or HLC(0, 0, node)
        self._lock = threading.Lock()

    def _advance(self, ms: int, counter: int) -> HLC:
        if counter > MAX_COUNTER:  # a million events in one ms: borrow the next ms
            ms, counter = ms + 1, 0
        self._last = HLC(ms, counter, self.node)
        return self._last

    def now(self) -> HLC:
        """A timestamp for a local event or a send."""
        with self._lock:
            wall = int(self._wall() * 1000)
            last = self._last
            if wall > last.ms:
                return self._advance(wall, 0)
            return self._advance(last.ms, last.counter + 1)

    def observe(self, remote: HLC) -> HLC:
        """Merge a received timestamp; returns the new local timestamp (greater than both)."""
        with self._lock:
            wall = int(self._wall() * 1000)
            if remote.ms - wall > self._max_drift_ms:
                raise HLCError(
                    f"remote clock {remote.ms - wall} ms ahead of ours (limit {self._max_drift_ms})"
                )
            last = self._last
            ms = max(wall, last.ms, remote.ms)
            if ms == last.ms == remote.ms:
                counter = max(last.counter, remote.counter) + 1
            elif ms == last.ms:
                counter = last.counter + 1
            elif ms == remote.ms:
                counter = remote.counter + 1
            else:
                counter = 0
            return self._advance(ms, counter)

    @property
    def last(self) -> HLC:
        with self._lock:
            return self._last
