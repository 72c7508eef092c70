"""Archive uploads across hub replicas: two hub apps on one database and one blob store
(a folder, and moto's S3 server), on SQLite and on a real PostgreSQL. Chunks of one upload
reach either replica, resends get the same answer, a last chunk retried on both replicas at
once completes once with no error, the object reads back identical from either replica and
its parts are gone; wrong bytes are refused and the upload starts again; the edge client's
retries are bounded."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from cloud_hub.app import HubConfig, create_app
from cloud_hub.store import HubStore, connect
from edge_agent.sync.client import Credential, HttpHubClient, HubUnavailable

CHUNK = 64 * 1024


@pytest.fixture(params=["folder", "s3"])
def archive_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "folder":
        return str(tmp_path / "archive")
    request.getfixturevalue("s3_endpoint")
    return "s3://releases/site-archive"


@asynccontextmanager
async def replicas(
    url: str, location: str, n: int = 2
) -> AsyncIterator[tuple[list[TestClient[Any, Any]], HubStore, dict[str, str], Any]]:
    """``n`` hub apps sharing the database and the blob store; an enrolled site's auth
    header and enrollment."""
    stores = [HubStore(connect(url)) for _ in range(n)]
    clients = []
    for store in stores:
        cfg = HubConfig(database_url=url, artifact_dir=location + "-rel", archive_dir=location)
        clients.append(TestClient(TestServer(create_app(cfg, store=store))))
    for c in clients:
        await c.start_server()
    try:
        token = stores[0].create_enrollment_token("site")
        body = await (await clients[0].post("/v1/enroll", json={"token": token})).json()
        yield clients, stores[0], {"Authorization": f"Bearer {body['credential']}"}, body
    finally:
        for c in clients:
            await c.close()
        for store in stores:
            store.engine.dispose()


async def _patch(
    client: TestClient[Any, Any], auth: dict[str, str], sha: str, data: bytes, offset: int
) -> tuple[int, dict[str, Any]]:
    body = data[offset : offset + CHUNK]
    r = await client.patch(
        f"/v1/archive/{sha}",
        data=body,
        headers={
            "Authorization": auth["Authorization"],
            "Upload-Offset": str(offset),
            "Upload-Length": str(len(data)),
        },
    )
    return r.status, await r.json()


def _leftover_parts(location: str) -> list[str]:
    if location.startswith("s3://"):
        import boto3

        s3 = boto3.client("s3", endpoint_url=os.environ["HUB_S3_ENDPOINT_URL"])
        listing = s3.list_objects_v2(Bucket="releases", Prefix="site-archive/uploads/")
        return [o["Key"] for o in listing.get("Contents", [])]
    root = Path(location) / ".uploads"
    return [str(p) for p in root.rglob("*") if p.is_file()] if root.exists() else []


def test_an_upload_spread_over_replicas_completes_once(
    hub_db_url: str, archive_location: str
) -> None:
    data = os.urandom(3 * CHUNK + 1000)
    sha = hashlib.sha256(data).hexdigest()

    async def go() -> None:
        async with replicas(hub_db_url, archive_location) as ((a, b), store, auth, site):
            assert await _patch(a, auth, sha, data, 0) == (
                200,
                {"sha256": sha, "offset": CHUNK, "complete": False},
            )
            # the answer was lost: the same chunk again, on the other replica
            assert (await _patch(b, auth, sha, data, 0))[1]["offset"] == CHUNK
            state = await (await a.get(f"/v1/archive/{sha}/upload", headers=auth)).json()
            assert state == {"sha256": sha, "offset": CHUNK, "complete": False}
            # a gap is refused with what the hub holds
            status, body = await _patch(a, auth, sha, data, 2 * CHUNK)
            assert status == 409 and body["offset"] == CHUNK
            assert (await _patch(b, auth, sha, data, CHUNK))[1]["offset"] == 2 * CHUNK
            assert (await _patch(a, auth, sha, data, 2 * CHUNK))[1]["offset"] == 3 * CHUNK
            # the last chunk, retried on both replicas at the same moment
            both = await asyncio.gather(
                _patch(a, auth, sha, data, 3 * CHUNK), _patch(b, auth, sha, data, 3 * CHUNK)
            )
            assert sorted(s for s, _ in both) in ([200, 201], [201, 201]), both
            assert all(body["complete"] and body["offset"] == len(data) for _, body in both)
            assert store.archived_size(site["site_id"], sha) == len(data)
            for replica in (a, b):
                r = await replica.get(f"/v1/archive/{sha}", headers=auth)
                assert r.status == 200 and await r.read() == data
            assert _leftover_parts(archive_location) == []
            # and after completion any chunk is answered "complete"
            assert (await _patch(b, auth, sha, data, 0))[1]["complete"] is True

    asyncio.run(go())


def test_wrong_bytes_are_refused_and_the_upload_starts_again(
    hub_db_url: str, archive_location: str
) -> None:
    data = os.urandom(2 * CHUNK + 10)
    sha = hashlib.sha256(data).hexdigest()
    bad = data[:-1] + bytes([data[-1] ^ 1])

    async def go() -> None:
        async with replicas(hub_db_url, archive_location) as ((a, b), store, auth, site):
            await _patch(a, auth, sha, bad, 0)
            await _patch(b, auth, sha, bad, CHUNK)
            status, body = await _patch(a, auth, sha, bad, 2 * CHUNK)
            assert status == 422 and body["error"]["code"] == "hash_mismatch"
            assert store.archived_size(site["site_id"], sha) is None
            state = await (await b.get(f"/v1/archive/{sha}/upload", headers=auth)).json()
            assert state["offset"] == 0 and not state["complete"]
            assert (await a.get(f"/v1/archive/{sha}", headers=auth)).status == 404
            assert _leftover_parts(archive_location) == []
            # the whole object in one request, with the right bytes: stored at once
            cred = Credential(str(b.make_url("")).rstrip("/"), site["site_id"], site["credential"])
            client = HttpHubClient(cred)
            try:
                assert await client.archive_put(sha, data, chunk=len(data)) == len(data)
                assert await client.archive_get(sha) == data
            finally:
                await client.close()

    asyncio.run(go())


def test_the_edge_client_gives_up_on_an_upload_that_makes_no_progress() -> None:
    """A hub that keeps answering "another offset" (a broken or hostile one): the client
    backs off and raises after a bounded number of tries instead of looping forever."""
    calls = {"patch": 0}

    async def state(_: web.Request) -> web.Response:
        return web.json_response({"offset": 0, "complete": False})

    async def patch(_: web.Request) -> web.Response:
        calls["patch"] += 1
        return web.json_response({"error": {"code": "offset_mismatch"}, "offset": 0}, status=409)

    async def go() -> None:
        app = web.Application()
        app.router.add_get("/v1/archive/{sha}/upload", state)
        app.router.add_patch("/v1/archive/{sha}", patch)
        async with TestClient(TestServer(app)) as srv:
            client = HttpHubClient(Credential(str(srv.make_url("")).rstrip("/"), "s", "c"))
            try:
                with pytest.raises(HubUnavailable, match="makes no progress"):
                    await asyncio.wait_for(client.archive_put("ab" * 32, b"x" * 10), 60)
            finally:
                await client.close()

    asyncio.run(go())
    assert 2 <= calls["patch"] <= 10
