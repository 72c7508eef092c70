"""The hub's operations surface, on the real app (aiohttp test server, the app opening its own
database pool from its config) on SQLite and on a real PostgreSQL: ``/readyz`` checks the
database and both blob stores and names only the check that failed; a pool with no free
connection answers 503 with Retry-After; ``/metrics`` needs a token and counts what the hub
did (requests by route, pushes by outcome, conflicts, feed lag, the pool)."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from cloud_hub.app import STORE, HubConfig, create_app
from cloud_hub.store import HubStore
from hub_protocol import PushBatch, Record, RecordType
from tests.integration.test_hub import mutable

OPS, METRICS = "ops-secret", "metrics-secret"


@asynccontextmanager
async def hub_app(cfg: HubConfig) -> AsyncIterator[tuple[TestClient[Any, Any], HubStore]]:
    """The app as ``cloud-hub run`` builds it: it opens (and disposes) its own store."""
    async with TestClient(TestServer(create_app(cfg))) as client:
        yield client, client.server.app[STORE]


def config(url: str, tmp_path: Path, **kw: Any) -> HubConfig:
    fields: dict[str, Any] = {
        "database_url": url,
        "artifact_dir": str(tmp_path / "artifacts"),
        "archive_dir": str(tmp_path / "archive"),
        "ops_token": OPS,
        "metrics_token": METRICS,
        **kw,
    }
    return HubConfig(**fields)


async def enrolled(client: TestClient[Any, Any], store: HubStore) -> tuple[str, dict[str, str]]:
    token = await asyncio.to_thread(store.create_enrollment_token, "site")
    body = await (await client.post("/v1/enroll", json={"token": token})).json()
    return body["site_id"], {"Authorization": f"Bearer {body['credential']}"}


def no_hosts(text: str, url: str) -> None:
    """Nothing of the database's or the blob store's address (host, port, path) is shown."""
    parts = urlsplit(url.replace("+psycopg", ""))
    for secret in ("127.0.0.1", "localhost", str(parts.port), parts.path):
        assert not secret or secret not in text, text


def test_readyz_checks_the_database_and_names_what_failed(hub_db_url: str, tmp_path: Path) -> None:
    async def go() -> None:
        async with hub_app(config(hub_db_url, tmp_path, probe_timeout_s=0.5)) as (client, _):
            ready = await client.get("/readyz")
            assert ready.status == 200
            assert await ready.json() == {
                "status": "ready",
                "checks": {"database": "ok", "artifacts": "ok", "archive": "ok"},
            }
            hold, release = _database_down(hub_db_url)
            await asyncio.to_thread(hold)
            try:
                down = await client.get("/readyz")
                text = await down.text()
                assert down.status == 503 and down.headers["Retry-After"] == "5"
                body = await down.json()
                assert body["status"] == "unready"
                assert body["checks"]["database"] in ("failed", "timeout")
                assert body["checks"]["artifacts"] == body["checks"]["archive"] == "ok"
                no_hosts(text, hub_db_url)
                # liveness stays up: a database outage must not get replicas restarted
                assert (await client.get("/healthz")).status == 200
            finally:
                await asyncio.to_thread(release)
            assert (await client.get("/readyz")).status == 200

    asyncio.run(go())


def _database_down(url: str) -> tuple[Any, Any]:
    """(make the database refuse the hub, let it in again): PostgreSQL refuses connections
    to the database and its sessions are ended; SQLite is locked by another writer."""
    if url.startswith("sqlite"):
        lock = sqlite3.connect(url.removeprefix("sqlite:///"), check_same_thread=False)
        lock.isolation_level = None

        def hold() -> None:
            lock.execute("BEGIN EXCLUSIVE")

        def release() -> None:
            lock.execute("ROLLBACK")
            lock.close()

        return hold, release
    server, name = url.rsplit("/", 1)
    admin = server.replace("postgresql+psycopg", "postgresql") + "/postgres"

    def sql(*statements: str) -> None:
        with psycopg.connect(admin, autocommit=True) as conn:
            for s in statements:
                conn.execute(s)

    def hold_pg() -> None:
        sql(
            f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false',
            f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'",
        )

    return hold_pg, lambda: sql(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def test_readyz_checks_both_blob_stores(hub_db_url: str, tmp_path: Path, s3_endpoint: str) -> None:
    """A bucket that does not exist and a folder that cannot be made: each named."""
    (tmp_path / "a-file").write_text("")

    async def go() -> None:
        good = config(hub_db_url, tmp_path, artifact_dir="s3://releases/rel")
        async with hub_app(good) as (client, _):
            assert (await client.get("/readyz")).status == 200
        bad = config(
            hub_db_url,
            tmp_path,
            artifact_dir="s3://no-such-bucket/rel",
            archive_dir=str(tmp_path / "a-file" / "archive"),
        )
        async with hub_app(bad) as (client, _):
            r = await client.get("/readyz")
            text = await r.text()
            assert r.status == 503
            assert (await r.json())["checks"] == {
                "database": "ok",
                "artifacts": "failed",
                "archive": "failed",
            }
            assert "no-such-bucket" not in text and "a-file" not in text
            no_hosts(text, s3_endpoint)

    asyncio.run(go())


def test_an_exhausted_pool_is_503_with_retry_after(hub_db_url: str, tmp_path: Path) -> None:
    """A pool of one connection, held: the next request waits the pool timeout, then gets
    503 and Retry-After (not a 500), counted by cause; once released, it is served."""
    cfg = config(hub_db_url, tmp_path, db_pool_size=1, db_max_overflow=0, db_pool_timeout_s=0.2)
    assert cfg.threads == 1

    async def go() -> None:
        async with hub_app(cfg) as (client, store):
            _, auth = await enrolled(client, store)
            held = await asyncio.to_thread(store.engine.connect)
            try:
                r = await client.get("/v1/high-water", headers=auth)
                text = await r.text()
                assert r.status == 503, text
                assert r.headers["Retry-After"] == "5"
                assert (await r.json())["error"]["code"] == "unavailable"
                no_hosts(text, hub_db_url)
            finally:
                await asyncio.to_thread(held.close)
            assert (await client.get("/v1/high-water", headers=auth)).status == 200
            m = await scrape(client)
            assert m[("hub_unavailable_total", (("cause", "db_pool_timeout"),))] == 1
            assert m[("hub_db_pool_limit", ())] == 1

    asyncio.run(go())


async def scrape(client: TestClient[Any, Any]) -> dict[tuple[str, tuple[Any, ...]], float]:
    r = await client.get("/metrics", headers={"Authorization": f"Bearer {METRICS}"})
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
    out = {}
    for family in text_string_to_metric_families(await r.text()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_metrics_count_requests_pushes_conflicts_and_feed_lag(
    hub_db_url: str, tmp_path: Path
) -> None:
    async def go() -> None:
        async with hub_app(config(hub_db_url, tmp_path)) as (client, store):
            site, auth = await enrolled(client, store)
            for headers in ({}, auth, {"Authorization": "Bearer wrong"}):
                assert (await client.get("/metrics", headers=headers)).status == 401
            ops = await client.get("/metrics", headers={"Authorization": f"Bearer {OPS}"})
            assert ops.status == 200

            async def push(*recs: Record) -> None:
                body = PushBatch(protocol=1, site_id=site, records=recs).encode()
                r = await client.post("/v1/push", data=body, headers=auth)
                assert r.status == 200

            result = mutable("result/1", 1, RecordType.RESULT, 0, 1, {"study_uid": "1.2"})
            review = mutable("review/1", 2, RecordType.REVIEW, 0, 2, {"verdict": "accept"})
            await push(result, review)
            await push(result)  # a resend: duplicate
            # the same review edited at the edge on an old base: kept for manual review
            await push(mutable("review/1", 3, RecordType.REVIEW, 0, 3, {"verdict": "reject"}))
            await asyncio.to_thread(
                store.cloud_edit,
                site,
                key="system_config/c",
                type=RecordType.SYSTEM_CONFIG,
                payload={"a": 1},
            )
            m = await scrape(client)
            assert m[("hub_push_records_total", (("outcome", "applied"),))] == 2
            assert m[("hub_push_records_total", (("outcome", "duplicate"),))] == 1
            assert m[("hub_push_records_total", (("outcome", "conflict"),))] == 1
            assert m[("hub_conflicts_opened_total", ())] == 1
            assert m[("hub_conflicts_resolved_total", ())] == 0
            push_ok = (("method", "POST"), ("route", "/v1/push"), ("status", "200"))
            assert m[("hub_http_requests_total", push_ok)] == 3
            assert m[("hub_http_request_seconds_count", (("route", "/v1/push"),))] == 3
            metrics_401 = (("method", "GET"), ("route", "/metrics"), ("status", "401"))
            assert m[("hub_http_requests_total", metrics_401)] == 3
            assert m[("hub_database_up", ())] == 1
            assert m[("hub_sites", ())] == 1
            assert m[("hub_feed_pending_changes", ())] == 1  # the cloud edit
            assert m[("hub_feed_sites_behind", ())] == 1
            assert m[("hub_feed_oldest_pending_seconds", ())] >= 0
            assert m[("hub_db_pool_connections", (("state", "in_use"),))] >= 0

            conflicts = await (await client.get("/v1/conflicts", headers=auth)).json()
            (c,) = conflicts["conflicts"]
            r = await client.post(
                f"/v1/conflicts/{c['id']}/resolve", json={"take": "edge"}, headers=auth
            )
            assert r.status == 200
            assert (await client.get("/no/such/path")).status == 404
            feed = await (await client.get("/v1/changes?cursor=0", headers=auth)).json()
            assert len(feed["changes"]) == 2  # the cloud edit, the resolution
            m = await scrape(client)
            assert m[("hub_conflicts_resolved_total", ())] == 1
            assert m[("hub_conflict_resolutions_total", (("take", "edge"),))] == 1
            assert m[("hub_feed_pending_changes", ())] == 2  # fetched, not yet applied
            unmatched = (("method", "GET"), ("route", "unmatched"), ("status", "404"))
            assert m[("hub_http_requests_total", unmatched)] == 1
            # the edge asks for what comes after what it applied: nothing is pending
            await client.get(f"/v1/changes?cursor={feed['next_cursor']}", headers=auth)
            m = await scrape(client)
            assert m[("hub_feed_pending_changes", ())] == 0
            assert m[("hub_feed_sites_behind", ())] == 0
            assert m[("hub_feed_oldest_pending_seconds", ())] == 0
            # a position only grows: an older cursor (a restored edge) does not move it back
            await client.get("/v1/changes?cursor=1", headers=auth)
            assert (await scrape(client))[("hub_feed_pending_changes", ())] == 0

    asyncio.run(go())


@pytest.mark.parametrize(
    "field", ["db_pool_size", "retry_after_s", "db_max_overflow", "db_pool_timeout_s"]
)
def test_pool_settings_are_checked(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        HubConfig(**{field: -1})
    assert HubConfig().threads == HubConfig().pool_limit == 10
    assert HubConfig(worker_threads=3).threads == 3


def test_non_ascii_tokens_are_refused_not_a_500(hub_db_url: str, tmp_path: Path) -> None:
    async def go() -> None:
        async with hub_app(config(hub_db_url, tmp_path)) as (client, _):
            for path in ("/v1/fleet", "/metrics"):
                for token in ("ops-sécret", "\u043e\u0440s-secret", OPS + "\u00e9"):
                    r = await client.get(path, headers={"Authorization": f"Bearer {token}"})
                    assert r.status == 401, (path, token, r.status)

    asyncio.run(go())
