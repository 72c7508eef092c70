"""The uplink: drains the outbox to the hub, lane by lane, and survives any network.

Loop: take a batch (urgent first) -> push -> apply the receipt in one transaction -> again at
once while there is more; then pull the hub's change feed (cloud-side edits, conflict
resolutions) into the local replica, cursor advanced in the same transaction; then wait for
a wake-up (new outbox rows) or the heartbeat timer. After any error the position is not
trusted: the next successful contact first asks the hub for its high-water marks and
acknowledges what it already holds (a response lost in flight never causes a duplicate, and
never a loss). Failures back off exponentially with jitter (tenacity's wait strategy),
capped. Connectivity is reported as online, degraded (a failure or two) or offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import StrEnum
from functools import partial
from typing import Any

from tenacity import RetryCallState, wait_exponential_jitter

from edge_agent.clock import Clock
from edge_agent.metrics import Metrics
from edge_agent.store import Store
from edge_agent.sync import outbox
from edge_agent.sync.client import HubAuthError, HubClient, HubRejected, HubUnavailable
from hub_protocol import PROTOCOL_VERSIONS, PushBatch, PushReceipt, Receipt, ReceiptStatus

log = logging.getLogger(__name__)


class Connectivity(StrEnum):
    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"


@dataclass(frozen=True, kw_only=True)
class UplinkSettings:
    max_records: int = 500
    max_bytes: int = 4 * 1024 * 1024
    retry_initial_s: float = 1.0
    retry_max_s: float = 300.0
    heartbeat_interval_s: float = 60.0
    offline_after_failures: int = 3


class Uplink:
    def __init__(
        self,
        client: HubClient,
        *,
        store: Store,
        clock: Clock,
        settings: UplinkSettings | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = metrics
        #: coroutines run after each pull that brought changes (e.g. model updates)
        self.after_pull: list[Callable[[], Awaitable[Any]]] = []
        self.after_pull_always = True  # also retry pending work (resumable downloads)
        self._client = client
        self._store = store
        self._clock = clock
        self.settings = settings or UplinkSettings()
        self.state = Connectivity.OFFLINE
        self.failures = 0
        self.last_error = ""
        self._resync = True  # first contact: ask the hub what it holds
        self._wake = asyncio.Event()
        # initial * 2^(n-1) + up to 25 % of initial in jitter, capped at retry_max_s
        self._wait = wait_exponential_jitter(
            multiplier=self.settings.retry_initial_s,
            max=self.settings.retry_max_s,
            jitter=self.settings.retry_initial_s / 4,
        )

    def wake(self) -> None:
        """New outbox rows: push without waiting for the timer (thread-safe via the loop)."""
        self._wake.set()

    def backoff_s(self) -> float:
        """Delay before the next try after ``failures`` consecutive failures."""
        state = RetryCallState(None, None, (), {})  # type: ignore[arg-type]
        state.attempt_number = max(self.failures, 1)
        return float(self._wait(state))

    def _update_metrics(self) -> None:
        if self._metrics is None:
            return
        m = self._metrics
        for state in Connectivity:
            m.sync_connectivity.labels(state.value).set(1 if state is self.state else 0)
        with self._store.read() as conn:
            st = outbox.stats(conn)
        for lane, n in st.depth.items():
            m.outbox_depth.labels(lane.value).set(n)
        m.outbox_oldest_seconds.set(
            max(self._clock.now() - st.oldest_pending_at, 0) if st.oldest_pending_at else 0
        )
        m.outbox_dead.set(st.dead)

    def _record_state(self) -> None:
        """Persist connectivity for ``edge-agent sync status`` (only when it changed)."""
        self._update_metrics()
        snapshot = (self.state.value, self.last_error[:500])
        if snapshot == getattr(self, "_recorded", None):
            return
        self._recorded = snapshot
        now = self._clock.now()

        def write(conn: Any) -> None:
            for name, value in (
                ("connectivity", snapshot[0]),
                ("last_error", snapshot[1]),
                ("state_changed_at", str(now)),
            ):
                conn.execute(
                    "INSERT INTO sync_state (name, value) VALUES (?, ?) ON CONFLICT"
                    "(name) DO UPDATE SET value = excluded.value",
                    (name, value),
                )

        self._store.writer.call(write)

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.last_error = str(exc)
        self._resync = True
        self.state = (
            Connectivity.OFFLINE
            if self.failures >= self.settings.offline_after_failures
            else Connectivity.DEGRADED
        )
        log.warning(
            "hub unreachable; backlog kept",
            extra={"error": str(exc)[:300], "failures": self.failures, "state": self.state.value},
        )

    async def _resync_position(self) -> int:
        hw = await self._client.high_water()
        acked, _ = await asyncio.to_thread(
            self._store.writer.call,
            partial(
                outbox.apply_receipt,
                receipt=PushReceipt(receipts=(), high_water=hw),
                now=self._clock.now(),
            ),
        )
        self._resync = False
        return int(acked)

    async def push_once(self) -> int:
        """One batch: returns how many outbox rows it settled (0 = nothing pending).
        Raises HubUnavailable/HubAuthError; a HubRejected batch is split until the bad
        record is found and dead-lettered."""
        if self._resync:
            await self._resync_position()
        with self._store.read() as conn:
            batch = outbox.next_batch(
                conn, max_records=self.settings.max_records, max_bytes=self.settings.max_bytes
            )
        if not batch:
            return 0
        return await self._push_records(batch)

    async def _push_records(self, records: list[Any]) -> int:
        try:
            receipt = await self._client.push(
                PushBatch(
                    protocol=PROTOCOL_VERSIONS[0],
                    site_id=self._client.site_id,
                    records=tuple(records),
                )
            )
        except HubRejected as exc:
            if len(records) > 1:  # find the bad one, let the others through
                mid = len(records) // 2
                return await self._push_records(records[:mid]) + await self._push_records(
                    records[mid:]
                )
            r = records[0]
            receipt = PushReceipt(
                receipts=(
                    Receipt(key=r.key, seq=r.seq, status=ReceiptStatus.REJECTED, error=str(exc)),
                )
            )
            log.error(
                "record rejected by the hub: dead-lettered",
                extra={"key": r.key, "seq": r.seq, "error": str(exc)},
            )
        acked, dead = await asyncio.to_thread(
            self._store.writer.call,
            partial(outbox.apply_receipt, receipt=receipt, now=self._clock.now()),
        )
        return int(acked) + int(dead)

    async def pull_once(self, limit: int = 500) -> int:
        """Apply the next page of the hub's change feed, and advance the cursor in the same
        transaction (a crash in between re-applies the page, which is idempotent)."""
        with self._store.read() as conn:
            row = conn.execute("SELECT value FROM sync_state WHERE name = 'feed_cursor'").fetchone()
        cursor = int(row[0]) if row else 0
        page = await self._client.changes(cursor, limit)
        if not page.changes:
            return 0
        now = self._clock.now()

        def apply(conn: Any) -> None:
            for c in page.changes:
                conn.execute(
                    "INSERT INTO replica (key, type, version, payload, feed_cursor, applied_at)"
                    " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                    "type = excluded.type, version = excluded.version, "
                    "payload = excluded.payload, feed_cursor = excluded.feed_cursor, "
                    "applied_at = excluded.applied_at WHERE excluded.version >= replica.version",
                    (
                        c.key,
                        c.type.value,
                        c.version,
                        json.dumps(c.value, sort_keys=True),
                        c.cursor,
                        now,
                    ),
                )
            conn.execute(
                "INSERT INTO sync_state (name, value) VALUES ('feed_cursor', ?) "
                "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (str(page.next_cursor),),
            )

        await asyncio.to_thread(self._store.writer.call, apply)
        return len(page.changes)

    async def pull(self) -> int:
        total = 0
        while n := await self.pull_once():
            total += n
        return total

    async def drain(self) -> int:
        """Push until the outbox is empty; returns rows settled. Raises on failure."""
        total = 0
        while True:
            n = await self.push_once()
            if n == 0:
                return total
            total += n

    async def run(self, stop: asyncio.Event, health: Any = None) -> None:
        """Until ``stop``: drain, heartbeat, back off on failure, wait for work."""
        next_heartbeat = 0.0
        while not stop.is_set():
            delay = self.settings.heartbeat_interval_s
            failed = False
            try:
                await self.drain()
                if await self.pull() or self.after_pull_always:
                    for hook in self.after_pull:
                        try:
                            await hook()
                        except (HubUnavailable, HubAuthError):
                            raise
                        except Exception:  # a hook's bug is not the hub being offline
                            log.exception("after-pull hook failed; retrying next pass")
                if self._clock.now() >= next_heartbeat and health is not None:
                    await self._client.heartbeat(health())
                    next_heartbeat = self._clock.now() + self.settings.heartbeat_interval_s
                if self.state is not Connectivity.ONLINE:
                    log.info("hub reachable: online")
                self.state, self.failures, self.last_error = Connectivity.ONLINE, 0, ""
            except (HubUnavailable, HubAuthError) as exc:
                self._failed(exc)
                delay, failed = self.backoff_s(), True
            except Exception as exc:  # a bug must not end the loop: log, back off, retry
                log.exception("uplink error")
                self._failed(exc)
                delay, failed = self.backoff_s(), True
            await asyncio.to_thread(self._record_state)
            self._wake.clear()
            # after a failure only the backoff (or stop) ends the wait: new rows arriving
            # while the hub is down must not turn into a retry storm
            waiter = asyncio.ensure_future(stop.wait() if failed else self._wake.wait())
            stopper = asyncio.ensure_future(stop.wait())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait(
                    {waiter, stopper}, timeout=delay, return_when=asyncio.FIRST_COMPLETED
                )
            for f in (waiter, stopper):
                f.cancel()
        await self._client.close()
