"""The uplink against the in-memory fake hub: order, exactly-once, resync, dead letters."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from edge_agent.clock import FakeClock
from edge_agent.store import Store
from edge_agent.sync import outbox
from edge_agent.sync.client import FakeHubClient, HubRejected, HubUnavailable
from edge_agent.sync.uplink import Uplink, UplinkSettings
from hub_protocol import HLC, HybridClock, Lane, PushBatch, PushReceipt, RecordType


@pytest.fixture
def store(tmp_path: Path) -> Any:
    s = Store(tmp_path / "edge.db")
    yield s
    s.close()


def fill(store: Store, lanes: list[Lane]) -> list[str]:
    hlc = HybridClock("edge", wall=lambda: 1000.0)
    keys = []
    for i, lane in enumerate(lanes):
        key = f"result/{i:04d}"
        store.writer.call(
            lambda c, k=key, ln=lane: outbox.enqueue(
                c,
                key=k,
                type=RecordType.RESULT,
                lane=ln,
                payload={"i": k},
                hlc=hlc.now(),
                now=1000.0,
            )
        )
        keys.append(key)
    return keys


def test_drain_in_lane_order_exactly_once(store: Store) -> None:
    lanes = [Lane.BATCH, Lane.NORMAL, Lane.URGENT] * 20
    keys = fill(store, lanes)
    hub = FakeHubClient()
    up = Uplink(hub, store=store, clock=FakeClock(), settings=UplinkSettings(max_records=7))
    assert asyncio.run(up.drain()) == 60
    assert sorted(hub.order) == sorted(keys)
    ranks = [lanes[keys.index(k)].rank for k in hub.order]
    assert ranks == sorted(ranks)  # every urgent before any normal before any batch
    with store.read() as conn:
        assert sum(outbox.stats(conn).depth.values()) == 0


class LosesResponses(FakeHubClient):
    """Applies the push, then the response is lost on the way back."""

    def __init__(self) -> None:
        super().__init__()
        self.lose = 1

    async def push(self, batch: PushBatch) -> PushReceipt:
        receipt = await super().push(batch)
        if self.lose:
            self.lose -= 1
            raise HubUnavailable("connection reset while reading the response")
        return receipt


def test_lost_response_is_resolved_by_asking_the_hub(store: Store) -> None:
    keys = fill(store, [Lane.NORMAL] * 10)
    hub = LosesResponses()
    up = Uplink(hub, store=store, clock=FakeClock())
    with pytest.raises(HubUnavailable):
        asyncio.run(up.drain())
    up._resync = True  # what the run loop does after any failure
    asyncio.run(up.drain())
    assert hub.order == keys  # each applied once, none twice
    with store.read() as conn:
        assert sum(outbox.stats(conn).depth.values()) == 0


class RejectsOne(FakeHubClient):
    async def push(self, batch: PushBatch) -> PushReceipt:
        if any(r.key == "result/0003" for r in batch.records):
            raise HubRejected(400, "payload failed validation")
        return await super().push(batch)


def test_a_bad_record_is_dead_lettered_and_does_not_block(store: Store) -> None:
    keys = fill(store, [Lane.NORMAL] * 8)
    hub = RejectsOne()
    asyncio.run(Uplink(hub, store=store, clock=FakeClock()).drain())
    assert hub.order == [k for k in keys if k != "result/0003"]
    dead = store.query("SELECT key, error FROM outbox WHERE state = 'DEAD'")
    assert [(d["key"], "payload failed validation" in d["error"]) for d in dead] == [
        ("result/0003", True)
    ]


def test_backoff_grows_and_is_capped(store: Store) -> None:
    up = Uplink(
        FakeHubClient(),
        store=store,
        clock=FakeClock(),
        settings=UplinkSettings(retry_initial_s=1.0, retry_max_s=30.0),
    )
    delays = []
    for n in range(1, 12):
        up.failures = n
        delays.append(up.backoff_s())
    assert delays[0] <= 2.0 and delays[3] >= 8.0
    assert all(d <= 31.0 for d in delays) and max(delays) >= 29.0


def test_run_loop_goes_offline_then_online_and_heartbeats(store: Store) -> None:
    fill(store, [Lane.URGENT] * 3)
    hub = FakeHubClient()
    hub.fail_next = 3
    clock = FakeClock()
    up = Uplink(
        hub,
        store=store,
        clock=clock,
        settings=UplinkSettings(retry_initial_s=0.01, retry_max_s=0.02, heartbeat_interval_s=3600),
    )
    states = []

    async def go() -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(up.run(stop, health=lambda: {"ok": True}))
        for _ in range(400):
            states.append(up.state.value)
            if hub.heartbeats and len(hub.records) == 3:
                break
            await asyncio.sleep(0.01)
        stop.set()
        await task

    asyncio.run(go())
    assert "offline" in states and states[-1] == "online"
    assert len(hub.records) == 3 and hub.heartbeats == [{"ok": True}]
    assert HLC(0, 0, "x")  # keep the import honest


def test_pull_applies_the_feed_once_and_never_goes_back_a_version(store: Store) -> None:
    hub = FakeHubClient()
    hub.feed = [
        {
            "cursor": 1,
            "type": "record",
            "key": "system_config/c",
            "version": 3,
            "payload": {"value": {"a": 3}},
        },
        {
            "cursor": 2,
            "type": "record",
            "key": "system_config/c",
            "version": 2,
            "payload": {"value": {"a": 2}},
        },  # an older version arriving late
        {
            "cursor": 5,
            "type": "conflict_resolution",
            "key": "review/r",
            "version": 4,
            "payload": {"take": "cloud", "value": {"verdict": "accept"}},
        },
    ]
    up = Uplink(hub, store=store, clock=FakeClock())
    assert asyncio.run(up.pull()) == 3
    assert asyncio.run(up.pull()) == 0
    rows = {r["key"]: (r["version"], r["payload"]) for r in store.query("SELECT * FROM replica")}
    assert rows == {"system_config/c": (3, '{"a": 3}'), "review/r": (4, '{"verdict": "accept"}')}
    assert store.query("SELECT value FROM sync_state WHERE name = 'feed_cursor'")[0][0] == "5"


def test_metrics_follow_connectivity_and_backlog(store: Store) -> None:
    from edge_agent.metrics import create_metrics

    fill(store, [Lane.URGENT, Lane.NORMAL, Lane.NORMAL])
    hub = FakeHubClient()
    hub.fail_next = 10
    m = create_metrics()
    up = Uplink(
        hub,
        store=store,
        clock=FakeClock(),
        metrics=m,
        settings=UplinkSettings(retry_initial_s=0.01, retry_max_s=0.01),
    )

    async def go(cycles: int) -> None:
        stop = asyncio.Event()
        task = asyncio.create_task(up.run(stop))
        await asyncio.sleep(cycles * 0.02)
        stop.set()
        await task

    asyncio.run(go(5))
    assert m.registry.get_sample_value("edge_outbox_depth", {"lane": "normal"}) == 2
    assert m.registry.get_sample_value("edge_sync_connectivity", {"state": "online"}) == 0
    hub.fail_next = 0
    asyncio.run(go(5))
    assert m.registry.get_sample_value("edge_outbox_depth", {"lane": "normal"}) == 0
    assert m.registry.get_sample_value("edge_sync_connectivity", {"state": "online"}) == 1
