"""The real hub app over HTTP (aiohttp test server), on SQLite and on a real PostgreSQL:
enrollment, authentication, site isolation, idempotent push and high-water marks."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_hub.app import HubConfig, create_app
from cloud_hub.store import HubStore, connect
from hub_protocol import HLC, Lane, PushBatch, Record, RecordType


@pytest.fixture
def hub_url(hub_db_url: str) -> str:
    return hub_db_url


@asynccontextmanager
async def hub(
    url: str, ops_token: str = "ops-secret"
) -> AsyncIterator[tuple[TestClient[Any, Any], HubStore]]:
    store = HubStore(connect(url))
    app = create_app(HubConfig(database_url=url, ops_token=ops_token), store=store)
    async with TestClient(TestServer(app)) as client:
        yield client, store
    store.engine.dispose()


def run(coro_fn: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(coro_fn())  # type: ignore[arg-type]


async def enrolled(
    client: TestClient[Any, Any], store: HubStore, name: str
) -> tuple[str, dict[str, str]]:
    token = store.create_enrollment_token(name)
    r = await client.post("/v1/enroll", json={"token": token})
    assert r.status == 200, await r.text()
    body = await r.json()
    return body["site_id"], {"Authorization": f"Bearer {body['credential']}"}


def rec(
    key: str,
    seq: int,
    lane: Lane = Lane.NORMAL,
    rtype: RecordType = RecordType.RESULT,
    payload: dict[str, Any] | None = None,
) -> Record:
    return Record(
        key=key,
        seq=seq,
        type=rtype,
        lane=lane,
        hlc=HLC(seq, 0, "edge"),
        base_version=0,
        payload=payload or {"study_uid": "1.2.3", "n": seq},
    )


def test_enrollment_is_one_time_and_every_request_is_authenticated(hub_url: str) -> None:
    async def go() -> None:
        async with hub(hub_url) as (client, store):
            token = store.create_enrollment_token("St. Elsewhere")
            assert token.startswith("enroll_")  # never "-...": it goes on command lines
            first = await client.post("/v1/enroll", json={"token": token})
            assert first.status == 200
            replay = await client.post("/v1/enroll", json={"token": token})
            assert replay.status == 401
            assert "already used" in (await replay.json())["error"]["message"]
            for path in ("/v1/high-water", "/v1/results", "/v1/changes"):
                assert (await client.get(path)).status == 401
                assert (
                    await client.get(path, headers={"Authorization": "Bearer nope"})
                ).status == 401
            assert (await client.post("/v1/push", data=b"{}")).status == 401
            assert (await client.get("/v1/fleet")).status == 401
            fleet = await client.get("/v1/fleet", headers={"Authorization": "Bearer ops-secret"})
            assert fleet.status == 200 and len((await fleet.json())["sites"]) == 1
            # the fleet page (a browser: HTTP Basic with the ops token as password)
            page = await client.get("/fleet")
            assert page.status == 401 and "Basic" in page.headers["WWW-Authenticate"]
            cred = (await first.json())["credential"]
            health = {
                "outbox": {"urgent": 0, "normal": 3, "batch": 1},
                "oldest_unsynced_age_s": 42.0,
                "outbox_dead": 0,
                "studies": {"DONE": 7},
                "storage": {"hot": {"instances": 120, "bytes": 1, "fs_used": 0.5}},
                "version": "0.1.0",
            }
            r = await client.post(
                "/v1/heartbeat", json=health, headers={"Authorization": f"Bearer {cred}"}
            )
            assert r.status == 200

            def basic(password: str) -> dict[str, str]:
                raw = base64.b64encode(f"ops:{password}".encode()).decode()
                return {"Authorization": f"Basic {raw}"}

            assert (await client.get("/fleet", headers=basic("not-the-token"))).status == 401
            page = await client.get("/fleet", headers=basic("ops-secret"))
            text = await page.text()
            assert page.status == 200 and "St. Elsewhere" in text
            assert "hot 120 (50%)" in text
            # counts as text, not Python reprs
            assert "<td>urgent 0, normal 3, batch 1</td>" in text and "<td>DONE 7</td>" in text
            assert "<td>42 s</td>" in text
            assert "{" not in text.split("<table>", 1)[1] and "&#x27;" not in text

    run(go)


def test_push_is_idempotent_and_sites_are_isolated(hub_url: str) -> None:
    async def go() -> None:
        async with hub(hub_url) as (client, store):
            a, auth_a = await enrolled(client, store, "A")
            _, auth_b = await enrolled(client, store, "B")
            batch = PushBatch(
                protocol=1,
                site_id=a,
                records=(
                    rec("result/r1", 1),
                    rec("result/r2", 2),
                    rec("result/u1", 1, Lane.URGENT),
                ),
            )
            r = await client.post("/v1/push", data=batch.encode(), headers=auth_a)
            body = await r.json()
            assert [x["status"] for x in body["receipts"]] == ["applied"] * 3
            assert body["high_water"] == {"normal": 2, "urgent": 1}
            again = await (
                await client.post("/v1/push", data=batch.encode(), headers=auth_a)
            ).json()
            assert [x["status"] for x in again["receipts"]] == ["duplicate"] * 3
            # B cannot push as A, and sees none of A's results
            forged = await client.post("/v1/push", data=batch.encode(), headers=auth_b)
            assert forged.status == 403
            assert (await (await client.get("/v1/results", headers=auth_b)).json()) == {
                "results": []
            }
            mine = await (await client.get("/v1/results", headers=auth_a)).json()
            assert {x["key"] for x in mine["results"]} == {"result/r1", "result/r2", "result/u1"}
            # a result is immutable: the same key under a new seq is rejected, not applied
            twice = PushBatch(protocol=1, site_id=a, records=(rec("result/r1", 3),))
            body = await (await client.post("/v1/push", data=twice.encode(), headers=auth_a)).json()
            assert body["receipts"][0]["status"] == "rejected"
            assert body["high_water"]["normal"] == 3  # held (as rejected): the lane moves on
            assert (await client.post("/v1/push", data=b"not json", headers=auth_a)).status == 400
            bad = json.dumps({"protocol": 99, "site_id": a, "records": []}).encode()
            r = await client.post("/v1/push", data=bad, headers=auth_a)
            assert r.status == 400 and "protocol" in (await r.json())["error"]["message"]

    run(go)


@settings(
    max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(order=st.lists(st.integers(1, 8), min_size=1, max_size=30))
def test_any_interleaving_of_resends_applies_each_record_once(
    tmp_path_factory: pytest.TempPathFactory, order: list[int]
) -> None:
    """Resend batches in any order and with any repetition: each key is applied once, the
    high-water mark is the largest gap-free prefix of what arrived."""
    url = f"sqlite:///{tmp_path_factory.mktemp('hub') / 'hub.db'}"

    async def go() -> None:
        async with hub(url) as (client, store):
            site, auth = await enrolled(client, store, "S")
            applied: dict[str, int] = {}
            for seq in order:
                batch = PushBatch(protocol=1, site_id=site, records=(rec(f"result/k{seq}", seq),))
                body = await (
                    await client.post("/v1/push", data=batch.encode(), headers=auth)
                ).json()
                for x in body["receipts"]:
                    if x["status"] == "applied":
                        applied[x["key"]] = applied.get(x["key"], 0) + 1
            assert applied == {f"result/k{s}": 1 for s in set(order)}
            hw = 0
            while hw + 1 in set(order):
                hw += 1
            got = await (await client.get("/v1/high-water", headers=auth)).json()
            assert got["high_water"].get("normal", 0) == hw

    run(go)


def _push(site: str, *recs: Record) -> bytes:
    return PushBatch(protocol=1, site_id=site, records=recs).encode()


def mutable(
    key: str, seq: int, rtype: RecordType, base: int, hlc_ms: int, payload: dict[str, Any]
) -> Record:
    return Record(
        key=key,
        seq=seq,
        type=rtype,
        lane=Lane.NORMAL,
        hlc=HLC(hlc_ms, 0, "edge"),
        base_version=base,
        payload=payload,
    )


def test_conflict_rules_at_the_hub_and_the_manual_review_queue(
    hub_url: str, tmp_path: Path
) -> None:
    from edge_agent.clock import FakeClock
    from edge_agent.store import Store
    from edge_agent.sync.client import Credential, HttpHubClient
    from edge_agent.sync.uplink import Uplink

    async def go() -> None:
        async with hub(hub_url) as (client, store):
            site, auth = await enrolled(client, store, "A")
            _, auth_b = await enrolled(client, store, "B")
            r = RecordType

            async def push(*recs: Record) -> list[dict[str, Any]]:
                resp = await client.post("/v1/push", data=_push(site, *recs), headers=auth)
                return list((await resp.json())["receipts"])

            # a review edited on both sides -> kept for manual review, nothing lost
            assert (await push(mutable("review/s1", 1, r.REVIEW, 0, 10, {"verdict": "accept"})))[0][
                "status"
            ] == "applied"
            rec2 = mutable("review/s1", 2, r.REVIEW, 0, 20, {"verdict": "reject"})
            (rc,) = await push(rec2)
            assert rc["status"] == "conflict" and "manual review" in rc["error"]
            queue = (await (await client.get("/v1/conflicts", headers=auth)).json())["conflicts"]
            assert len(queue) == 1
            assert json.loads(queue[0]["edge_payload"]) == {"verdict": "reject"}
            assert json.loads(queue[0]["cloud_payload"]) == {"verdict": "accept"}
            cid = queue[0]["id"]
            other = await client.post(
                f"/v1/conflicts/{cid}/resolve", headers=auth_b, json={"take": "edge"}
            )
            assert other.status == 404  # site B cannot touch site A's queue
            ok = await client.post(
                f"/v1/conflicts/{cid}/resolve",
                headers=auth,
                json={"take": "edge", "by": "dr.smith"},
            )
            assert ok.status == 200 and (await ok.json())["version"] == 2
            assert (await (await client.get("/v1/conflicts", headers=auth)).json()) == {
                "conflicts": []
            }
            # study metadata: the later HLC wins; an older edge edit loses and is told so
            await push(mutable("study_metadata/x", 3, r.STUDY_METADATA, 0, 100, {"d": "new"}))
            (rc,) = await push(
                mutable("study_metadata/x", 4, r.STUDY_METADATA, 0, 50, {"d": "old"})
            )
            assert rc["status"] == "conflict" and "cloud" in rc["error"]
            # system config: fields merged
            await push(mutable("system_config/c", 5, r.SYSTEM_CONFIG, 0, 10, {"a": 1, "b": 1}))
            (rc,) = await push(
                mutable("system_config/c", 6, r.SYSTEM_CONFIG, 0, 20, {"b": 2, "c": 3})
            )
            assert rc["status"] == "conflict" and rc["version"] == 2
            feed = await (await client.get("/v1/changes?cursor=0", headers=auth)).json()
            kinds = [(c["type"], c["key"]) for c in feed["changes"]]
            assert ("conflict_resolution", "review/s1") in kinds
            assert ("record", "study_metadata/x") in kinds
            assert ("record", "system_config/c") in kinds
            merged = next(c for c in feed["changes"] if c["key"] == "system_config/c")
            assert merged["payload"]["value"] == {"a": 1, "b": 2, "c": 3}
            # the edge pulls the feed into its replica; cursor advanced, pull idempotent
            cred = Credential(
                str(client.make_url("")).rstrip("/"), site, auth["Authorization"].split(" ", 1)[1]
            )
            edge = Store(tmp_path / "edge.db")
            try:
                up = Uplink(HttpHubClient(cred), store=edge, clock=FakeClock())
                assert await up.pull() == 3
                assert await up.pull() == 0
                await up._client.close()
                rows = {
                    r2["key"]: json.loads(r2["payload"])
                    for r2 in edge.query("SELECT key, payload FROM replica")
                }
            finally:
                edge.close()
            assert rows["review/s1"] == {"verdict": "reject"}
            assert rows["study_metadata/x"] == {"d": "new"}
            assert rows["system_config/c"] == {"a": 1, "b": 2, "c": 3}

    run(go)
